"""Results of a run and their Markdown: one block per scenario (plus the setup and the targets
of issues #4 and #12, checked here), each stating the date and commit it was measured at.
:mod:`bench.scenarios.results_file` puts the blocks into ``bench/RESULTS.md``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.scenarios.http_events import HttpSample
from bench.scenarios.latency import StepResult
from bench.scenarios.limits import Limits
from bench.scenarios.measure import ForeignLoad, Sample, Spread
from bench.scenarios.profile import Profile
from bench.scenarios.single import SingleSample


# ------------------------------------------------------------------------------ results
@dataclass
class ThroughputRow:
    system: str
    label: str
    samples: list[Sample]
    reference: bool = False  # shown for context; never in a ratio or a target

    def spread(self, get: Callable[[Sample], float]) -> Spread:
        return Spread([get(s) for s in self.samples])

    @property
    def rate(self) -> Spread:
        return self.spread(lambda s: s.rate)


@dataclass
class LatencyRow:
    system: str
    rate: int
    runs: list[StepResult]

    def spread(self, get: Callable[[StepResult], float]) -> Spread:
        return Spread([get(r) for r in self.runs if not math.isnan(get(r))])


@dataclass
class HttpRow:
    label: str
    samples: list[HttpSample]
    processes: int

    def spread(self, get: Callable[[HttpSample], float]) -> Spread:
        return Spread([get(s) for s in self.samples])


@dataclass
class SingleRow:
    system: str
    label: str
    samples: list[SingleSample]

    def spread(self, get: Callable[[SingleSample], float]) -> Spread:
        return Spread([get(s) for s in self.samples if not math.isnan(get(s))])

    @property
    def rate(self) -> Spread:
        return self.spread(lambda s: s.sample.rate)


@dataclass
class ProfileResult:
    title: str
    seconds: float
    profile: Profile
    workload: str


@dataclass
class Results:
    stamp: str  # "2026-05-04 18:20 UTC, commit abc1234"
    setup: list[tuple[str, str]] = field(default_factory=list)
    limits: Limits | None = None
    produce: list[ThroughputRow] = field(default_factory=list)
    consume: list[ThroughputRow] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)
    latency_note: str = ""
    http: list[HttpRow] = field(default_factory=list)
    single: list[SingleRow] = field(default_factory=list)
    profiles: dict[str, ProfileResult] = field(default_factory=dict)
    foreign: dict[str, ForeignLoad] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    describe: dict[str, str] = field(default_factory=dict)  # scenario -> how it was run
    # a run of some scenarios (or systems) only: it writes its scenarios' blocks and leaves
    # the setup and the targets, which describe the last full run, as they are
    partial: bool = False

    def note(self, scenario: str, text: str) -> None:
        self.notes.setdefault(scenario, []).append(text)


# ---------------------------------------------------------------------------- rendering
def _cores(x: Spread) -> str:
    return x.fmt(digits=2)


def _saturated(system: str, client: float, server: float) -> str:
    """Which side had a CPU core busy (a mechanical reading, not a diagnosis)."""
    single = system in ("Herald", "Redis")  # one thread does the work (Herald: + fsync)
    sides = []
    if client >= 0.85:
        sides.append("client")
    if single and server >= 0.85:
        sides.append("server")
    return " + ".join(sides) or "neither"


def _ratio(a: float, b: float) -> str:
    if not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:,.1f}x"


def _header(res: Results, block: str) -> list[str]:
    lines = [f"_Measured {res.stamp}._", ""]
    if res.partial:
        lines = [
            f"_Measured {res.stamp}, in a run of part of the benchmark: the setup above and"
            " the targets below are those of the last full run._",
            "",
        ]
    if block in res.describe:
        lines += [res.describe[block], ""]
    fl = res.foreign.get(block)
    if fl is not None:
        top = "; ".join(f"`{cmd}` {c:.2f}" for cmd, c in fl.top)
        lines += [
            f"Other processes on the machine used {fl.cores:.2f} cores and wrote"
            f" {fl.write_mb_s:.1f} MB/s to storage during this scenario"
            + (f" (busiest: {top})" if top else "")
            + ".",
            "",
        ]
    return lines


def _notes(res: Results, block: str) -> list[str]:
    return [f"- {n}" for n in res.notes.get(block, [])] + ([""] if block in res.notes else [])


def render_setup(res: Results) -> list[str]:
    out = ["### Setup", "", f"_Run {res.stamp}._", ""]
    out += [f"- **{k}**: {v}" for k, v in res.setup]
    return [*out, ""]


def render_limits(res: Results) -> list[str]:
    lim = res.limits
    if lim is None:
        return []
    out = ["### Physical limits", "", *_header(res, "limits")]
    out += [
        "| Measure | Median (min-max) |",
        "|---|---|",
        f"| Sequential 1 MiB append + fdatasync, data disk | {lim.disk_mb_s.fmt(unit=' MB/s')} |",
        f"| 4 KiB append + fdatasync, data disk | {lim.fsyncs_per_s.fmt(unit=' syncs/s')} |",
        f"| ... median latency of one | {lim.fsync_ms.fmt(digits=2, unit=' ms')} |",
        f"| Loopback TCP, 1 MiB sends, two processes | {lim.loopback_mb_s.fmt(unit=' MB/s')} |",
        "",
        f"Page-cache warm-up before measuring (a one-off {lim.warmup_mb_s:,.0f} MB/s write, "
        "not a result).",
        "",
    ]
    herald = [r for r in res.produce if r.system == "Herald"]
    if herald:
        out += [
            "Herald's durable produce against these limits (bytes its log grew by per second,"
            " record framing and batch headers included, over the disk's 1 MiB"
            " write+fdatasync bandwidth; message payload bytes over loopback TCP):",
            "",
            "| Herald produce case | Log MB/s | Share of disk bandwidth | Payload MB/s |"
            " Share of loopback TCP |",
            "|---|---|---|---|---|",
        ]
        for r in herald:
            stored = r.spread(lambda s: s.stored_bytes / s.seconds / 1e6)
            payload = r.spread(lambda s: s.rate * 200 / 1e6)
            out.append(
                f"| {r.label} | {stored.fmt(digits=1)} | "
                f"{stored.median / lim.disk_mb_s.median:.0%} | {payload.fmt(digits=1)} | "
                f"{payload.median / lim.loopback_mb_s.median:.1%} |"
            )
        out.append("")
    return out + _notes(res, "limits")


def _throughput_table(
    res: Results, rows: list[ThroughputRow], stored: bool, block: str
) -> list[str]:
    peers = {r.system: r.rate.median for r in rows if r.system != "Herald" and not r.reference}
    head = "| System | Case | msgs/s, median (min-max) |"
    sep = "|---|---|---|"
    for p in peers:
        head += f" Herald / {p} |"
        sep += "---|"
    head += " Client CPU (cores) | Server CPU (cores) | CPU-saturated side |"
    sep += "---|---|---|"
    if stored:
        head += " Log MB/s |"
        sep += "---|"
    out = [head, sep]
    for r in rows:
        client = r.spread(lambda s: s.client_cpu)
        server = r.spread(lambda s: s.server_cpu)
        line = f"| {r.system} | {r.label} | {r.rate.fmt()} |"
        for p in peers:
            line += f" {_ratio(r.rate.median, peers[p]) if r.system == 'Herald' else ''} |"
        line += (
            f" {_cores(client)} | {_cores(server)} |"
            f" {_saturated(r.system, client.median, server.median)} |"
        )
        if stored:
            mb = r.spread(lambda s: s.stored_bytes / s.seconds / 1e6)
            line += f" {mb.fmt(digits=1) if r.system == 'Herald' else ''} |"
        out.append(line)
        errors = sum(s.errors for s in r.samples)
        if errors:
            res.note(
                block,
                f"{r.system}, {r.label}: {errors} messages failed or were left unacknowledged",
            )
    return [*out, ""]


def render_profile(res: Results, key: str) -> list[str]:
    pr = res.profiles.get(key)
    if pr is None:
        return []
    prof = pr.profile
    if not prof.samples:
        return [f"Profile ({pr.title}): py-spy collected no samples.", ""]
    out = [
        f"**Profile: {pr.title}.** py-spy, 100 Hz, {pr.seconds:.0f} s, during {pr.workload}"
        f" (a separate run, not one of the measured ones). The node's main thread (the event"
        f" loop) was busy {prof.busy / prof.samples:.0%} of the wall time;"
        f" top functions as a share of wall time (raw stacks: `{prof.raw_path}`):",
        "",
        "| Main thread: function (self) | Self | | Main thread: function (inclusive) | Inclusive |",
        "|---|---|---|---|---|",
    ]
    selfs = prof.top("self", 12)
    incl = prof.top("inclusive", 12)
    for i in range(max(len(selfs), len(incl))):
        a = selfs[i] if i < len(selfs) else ("", 0.0)
        b = incl[i] if i < len(incl) else ("", 0.0)
        out.append(
            f"| `{a[0]}` | {a[1]:.1%} | | `{b[0]}` | {b[1]:.1%} |"
            if a[0] and b[0]
            else f"| `{a[0]}` | {a[1]:.1%} | | | |"
            if a[0]
            else f"| | | | `{b[0]}` | {b[1]:.1%} |"
        )
    threads = prof.top_threads(5)
    if threads:
        out += [
            "",
            f"Other threads ({prof.threads}: the storage executor) spent, as a share of one"
            " thread's wall time: "
            + ", ".join(f"`{n}` {f:.0%}" for n, f in threads)
            + " (the rest idle).",
        ]
    return [*out, ""]


def render_produce(res: Results) -> list[str]:
    if not res.produce:
        return []
    out = ["### 1. Durable produce, 200-byte messages, one client process", ""]
    out += _header(res, "produce")
    out += _throughput_table(res, res.produce, True, "produce")
    ref = next((r for r in res.produce if r.reference), None)
    herald = [r for r in res.produce if r.system == "Herald"]
    if ref is not None and herald:
        out += [
            "Against the Redis server driven by its own C client (the reference row, "
            f"{ref.rate.fmt()} msgs/s), Herald's rows are "
            + ", ".join(f"{_ratio(r.rate.median, ref.rate.median)} ({r.label})" for r in herald)
            + ": the Python client, not the Redis server, bounds the Redis row above.",
            "",
        ]
    out += _notes(res, "produce") + render_profile(res, "produce")
    return out


def render_consume(res: Results) -> list[str]:
    if not res.consume:
        return []
    out = ["### 2. Consume with acknowledgement, one consumer process", ""]
    out += _header(res, "consume")
    out += _throughput_table(res, res.consume, False, "consume")
    out += _notes(res, "consume") + render_profile(res, "consume")
    return out


def render_latency(res: Results) -> list[str]:
    if not res.latency:
        return []
    out = ["### 3. End-to-end latency at fixed offered rates", ""]
    out += _header(res, "latency")
    out += [
        "| System | Offered msg/s | Achieved msg/s | p50 ms | p99 ms | p99.9 ms | max ms |"
        " Received / sent | Producer's worst lag, ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res.latency:
        recv = sum(x.received for x in r.runs)
        sent = sum(x.sent for x in r.runs)
        out.append(
            f"| {r.system} | {r.rate:,} | {r.spread(lambda x: x.achieved_rate).fmt()} |"
            f" {r.spread(lambda x: x.p50_ms).fmt(digits=2)} |"
            f" {r.spread(lambda x: x.p99_ms).fmt(digits=2)} |"
            f" {r.spread(lambda x: x.p999_ms).fmt(digits=2)} |"
            f" {r.spread(lambda x: x.max_ms).fmt(digits=1)} | {recv:,} / {sent:,} |"
            f" {r.spread(lambda x: x.max_lag_ms).fmt(digits=1)} |"
        )
    ratios = []
    for r in res.latency:
        if r.system != "Herald":
            continue
        h99 = r.spread(lambda x: x.p99_ms).median
        parts = []
        for peer in res.latency:
            if peer.system != "Herald" and peer.rate == r.rate:
                parts.append(f"{_ratio(h99, peer.spread(lambda x: x.p99_ms).median)} {peer.system}")
        if parts:
            ratios.append(f"{r.rate:,} msg/s: " + ", ".join(parts))
    if ratios:
        out += [
            "",
            "Herald's p99 over the peer's (below 1x: Herald lower): " + "; ".join(ratios) + ".",
        ]
    out += [
        "",
        "The producer's worst lag is how far behind its schedule it fell at worst (a backlog"
        " of due messages, then sent in a burst): more than a few ms means the client could"
        " not keep the rate and the figures for that row describe the client as much as the"
        " broker.",
        "",
        "Worst latency of each step, in run order (repeat 1, 2, ...), with the time into the"
        " step (warm-up included) at which its record was sent, and how many measured"
        " records took over 20 ms:",
        "",
        "| System | Offered msg/s | Worst per repeat: ms @ s | Records over 20 ms |",
        "|---|---|---|---|",
    ]
    for r in res.latency:
        worst = ", ".join(f"{x.max_ms:.1f} @ {x.max_at_s:.2f}" for x in r.runs)
        out.append(f"| {r.system} | {r.rate:,} | {worst} | {sum(x.over_20ms for x in r.runs):,} |")
    out.append("")
    return out + _notes(res, "latency")


def render_http(res: Results) -> list[str]:
    if not res.http:
        return []
    out = ["### 4. HTTP ingest: POST /events and POST /events/batch", ""]
    out += _header(res, "http")
    out += [
        "| Endpoint | events/s, median (min-max) | requests/s | Request p50 / p99 ms |"
        " Client CPU (cores, all processes) | Server CPU (cores) | Non-200 answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res.http:
        out.append(
            f"| {r.label} | {r.spread(lambda s: s.sample.rate).fmt()} |"
            f" {r.spread(lambda s: s.requests / s.sample.seconds).fmt()} |"
            f" {r.spread(lambda s: s.p50_ms).fmt(digits=1)} /"
            f" {r.spread(lambda s: s.p99_ms).fmt(digits=1)} |"
            f" {r.spread(lambda s: s.sample.client_cpu).fmt(digits=2)} |"
            f" {r.spread(lambda s: s.sample.server_cpu).fmt(digits=2)} |"
            f" {sum(s.sample.errors for s in r.samples)} |"
        )
        bad = next((s.first_error for s in r.samples if s.first_error), "")
        if bad:
            res.note("http", f"{r.label}: first non-200 answer: `{bad[:160]}`")
    out.append("")
    return (
        out + _notes(res, "http") + render_profile(res, "http") + render_profile(res, "http-batch")
    )


def render_single(res: Results) -> list[str]:
    if not res.single:
        return []
    out = ["### 5. One-at-a-time durable produce, 200-byte records, one partition", ""]
    out += _header(res, "single")
    always = next((r for r in res.single if r.system == "Redis-always"), None)
    everysec = next((r for r in res.single if r.system == "Redis"), None)
    out += [
        "| System | Case | records/s, median (min-max) | Herald / Redis-always |"
        " Herald / Redis | Round trip p50 ms | p99 ms | p99.9 ms | max ms |"
        " Client CPU (cores) | Server CPU (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res.single:
        herald = r.system == "Herald"
        out.append(
            f"| {r.system} | {r.label} | {r.rate.fmt()} |"
            f" {_ratio(r.rate.median, always.rate.median) if herald and always else ''} |"
            f" {_ratio(r.rate.median, everysec.rate.median) if herald and everysec else ''} |"
            f" {r.spread(lambda s: s.p50_ms).fmt(digits=3)} |"
            f" {r.spread(lambda s: s.p99_ms).fmt(digits=3)} |"
            f" {r.spread(lambda s: s.p999_ms).fmt(digits=2)} |"
            f" {r.spread(lambda s: s.max_ms).fmt(digits=1)} |"
            f" {r.spread(lambda s: s.sample.client_cpu).fmt(digits=2)} |"
            f" {r.spread(lambda s: s.sample.server_cpu).fmt(digits=2)} |"
        )
        slow = [x for s in r.samples for x in s.slow]
        if slow:
            res.note(
                "single",
                f"{r.system}: round trips over 20 ms: "
                + ", ".join(f"{x:.1f}" for x in sorted(slow, reverse=True)[:10])
                + " ms",
            )
    out.append("")
    return out + _notes(res, "single") + render_profile(res, "single")


@dataclass
class Target:
    name: str
    herald: float
    reference: float
    goal: str  # how `met` is decided, in words
    met: bool
    margin: str


def targets(res: Results) -> list[Target]:
    out: list[Target] = []

    def pick(rows: list[ThroughputRow], system: str, prefix: str = "") -> ThroughputRow | None:
        return next((r for r in rows if r.system == system and r.label.startswith(prefix)), None)

    for name, rows, prefix in (
        ("Durable produce >= 10x Redis Streams", res.produce, "send_batch 100 records, 64"),
        ("Consume with commit >= 10x Redis", res.consume, "getmany"),
    ):
        h, r = pick(rows, "Herald", prefix), pick(rows, "Redis")
        if h and r:
            x = h.rate.median / r.rate.median
            out.append(
                Target(
                    f"{name} (Herald: {h.label})",
                    h.rate.median,
                    r.rate.median,
                    "ratio >= 10",
                    x >= 10,
                    f"{x:.1f}x of the 10x asked ({x / 10:.0%})",
                )
            )
    hl = next((r for r in res.latency if r.system == "Herald" and r.rate == 5000), None)
    for peer, why in (
        ("Redis-always", "issue #12: no worse than"),
        ("Redis", "issue #4, and the aim of #12: no worse than"),
    ):
        rl = next((r for r in res.latency if r.system == peer and r.rate == 5000), None)
        if hl and rl:
            h99, r99 = hl.spread(lambda x: x.p99_ms).median, rl.spread(lambda x: x.p99_ms).median
            pairs = _paired([x.p99_ms for x in hl.runs], [x.p99_ms for x in rl.runs])
            out.append(
                Target(
                    f"End-to-end p99 at 5k msg/s ({why} {peer}'s, ms)",
                    h99,
                    r99,
                    f"Herald p99 <= {peer} p99",
                    h99 <= r99,
                    f"Herald's p99 is {h99 / r99:.2f}x {peer}'s ({h99 - r99:+.2f} ms)" + pairs,
                )
            )
    herald_steps = [x for r in res.latency if r.system == "Herald" for x in r.runs]
    if herald_steps:
        worst = max((x.max_ms for x in herald_steps if not math.isnan(x.max_ms)), default=0.0)
        out.append(
            Target(
                "No stall above 20 ms (issue #12: Herald's worst end-to-end latency over every"
                " latency step, ms)",
                worst,
                20.0,
                "max <= 20 ms",
                worst <= 20.0,
                f"worst {worst:.1f} ms over {len(herald_steps)} steps",
            )
        )
    hs = next((r for r in res.single if r.system == "Herald"), None)
    rs = next((r for r in res.single if r.system == "Redis-always"), None)
    if hs and rs:
        x = hs.rate.median / rs.rate.median
        pairs = _paired([s.sample.rate for s in hs.samples], [s.sample.rate for s in rs.samples])
        out.append(
            Target(
                "One-at-a-time durable produce >= Redis-always's rate (issue #12, records/s)",
                hs.rate.median,
                rs.rate.median,
                "Herald >= Redis-always",
                x >= 1.0,
                f"{x:.2f}x Redis-always's rate" + pairs,
            )
        )
    for label_start, goal in (("POST /events,", 10_000), ("POST /events/batch", 100_000)):
        row = next((r for r in res.http if r.label.startswith(label_start)), None)
        if row:
            v = row.spread(lambda s: s.sample.rate).median
            out.append(
                Target(
                    f"{label_start.rstrip(',')} >= {goal:,} events/s",
                    v,
                    goal,
                    f">= {goal:,}",
                    v >= goal,
                    f"{v / goal:.0%} of the target",
                )
            )
    return out


def _paired(herald: list[float], peer: list[float]) -> str:
    """The ratio of each repeat's figures (Herald's over the peer's): the scenarios
    interleave the systems, so repeat i of each ran minutes apart at most, on the same
    host's mood; the spread of these says how far the ratio of medians can be trusted."""
    ratios = [h / r for h, r in zip(herald, peer, strict=False) if r and not math.isnan(h / r)]
    if len(ratios) < 2:
        return ""
    return "; per repeat " + ", ".join(f"{r:.2f}x" for r in ratios)


def render_targets(res: Results) -> list[str]:
    rows = targets(res)
    if not rows:
        return []
    out = [
        "### Targets from issues #4 and #12",
        "",
        f"_Evaluated on the run of {res.stamp}, medians._",
        "",
        "| Target | Herald | Reference | Met? | By how much |",
        "|---|---|---|---|---|",
    ]
    for t in rows:
        digits = 2 if t.herald < 100 else 0
        out.append(
            f"| {t.name} | {t.herald:,.{digits}f} | {t.reference:,.{digits}f} | "
            f"{'met' if t.met else '**missed**'} | {t.margin} |"
        )
    return [*out, ""]


RENDER: dict[str, Callable[[Results], list[str]]] = {
    "setup": render_setup,
    "limits": render_limits,
    "produce": render_produce,
    "consume": render_consume,
    "latency": render_latency,
    "http": render_http,
    "single": render_single,
    "targets": render_targets,
}


def blocks_of(res: Results, scenarios: list[str]) -> list[str]:
    """The blocks a run writes: a full run its scenarios with the setup and the targets; a
    partial one (some scenarios, or some systems) only its scenarios' blocks, each saying
    so, so the section never pairs one run's setup or targets with another's tables."""
    return [*scenarios] if res.partial else ["setup", *scenarios, "targets"]


def render(res: Results, blocks: list[str]) -> dict[str, str]:
    out = {}
    for b in blocks:
        lines = RENDER[b](res)
        if lines:
            out[b] = "\n".join(lines).rstrip("\n")
    return out
