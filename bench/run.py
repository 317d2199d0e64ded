"""Broker benchmark: a Herald node against Redis Streams and NATS JetStream on this machine.

    python -m bench.run [--scenario all|produce|consume|latency|http|single|limits] [--quick]
                        [--repeats N] [--out bench/RESULTS.md] [--no-profile] [--keep]
                        [--rates 1000,5000,20000] [--systems herald,redis-always,...]

(``make bench SCENARIO=produce BENCH_ARGS=--quick``). The run starts its own servers, each
on free ports on 127.0.0.1 with a fresh directory under ``bench/out/`` (on the repository's
disk, checked not to be tmpfs): a Herald node (``python -m herald.cli serve``), two
redis-servers (AOF on, one with ``appendfsync everysec``, one with ``appendfsync always``) and
nats-server (JetStream, file storage). A peer that is
missing or fails to start is reported and skipped; Herald's rows are still measured. Every
server and client process is stopped when the run ends, also on Ctrl-C or an error.

Scenarios (details in each module of ``bench/scenarios``): ``limits`` (disk and loopback
ceilings), ``produce`` (durable produce throughput), ``consume`` (consume with
acknowledgement), ``latency`` (end-to-end latency at 1k, 5k and 20k msg/s), ``http`` (POST
/events and /events/batch), ``single`` (one-at-a-time durable produce: one awaited record
at a time). Each figure is the median over ``--repeats`` windows with the
min-max spread. The Herald node is profiled with py-spy during produce, consume and HTTP
ingest (separate, unmeasured runs). ``all`` takes about six minutes, ``--quick`` about one.

Results replace the generated blocks of the ``## Broker`` section of ``--out``; text written
by hand around them and other sections are kept. Nothing here asserts anything: this is a
measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from bench.peers.process import say
from bench.peers.servers import Servers
from bench.scenarios import (
    consume,
    http_events,
    latency,
    limits,
    produce,
    profile,
    report,
    results_file,
    single,
    worker,
)
from bench.scenarios.environment import check_disk, git_commit, machine
from bench.scenarios.measure import ForeignLoad, Sample

REPO = Path(__file__).resolve().parent.parent
# http last: the events it posts keep the node's notifications engine busy for a while after
# it ends, which would load the node under whichever scenario came next
SCENARIOS = ("limits", "produce", "consume", "latency", "single", "http")


T = TypeVar("T")


def _rotated(items: list[T], by: int) -> list[T]:
    """``items`` rotated left by ``by``: the order of an interleaved repeat (each repeat
    starts one system later, so none always runs first or last)."""
    k = by % len(items) if items else 0
    return items[k:] + items[:k]


def _utc(wall: float) -> str:
    """A ``time.time()`` as the servers' logs print it (UTC, milliseconds)."""
    if wall != wall:  # nan: no record measured
        return "-"
    return datetime.fromtimestamp(wall, UTC).strftime("%H:%M:%S.%f")[:-3]


INTRO = (
    "Herald against Redis Streams and NATS JetStream on one machine, all three started by"
    " `python -m bench.run` (`make bench`) on 127.0.0.1 with fresh data directories on the"
    " repository's disk. Generated blocks are replaced by the next run; the text between"
    " them is written by hand."
)


def settle() -> None:
    """Before each system's latency-bound run: what the earlier ones wrote is synced and
    the disk left alone for 2 s, so no system's figures carry another's writeback (in
    back-to-back gateway runs the second had the worse p99, whichever it was)."""
    os.sync()
    time.sleep(2)


@dataclass(frozen=True)
class Plan:
    """How long everything runs: the full plan and the ``--quick`` one."""

    repeats: int
    produce_s: float
    produce_warmup_s: float
    consume_counts: dict[str, int]
    latency_rates: tuple[int, ...]
    latency_warmup_s: float
    latency_s: float
    http_s: float
    http_processes: int
    limits_s: float
    warmup_mib: int
    profile_s: float
    single_s: float
    single_warmup_s: float
    # one-at-a-time windows are short and their ratio the noisiest of the targets: more of
    # them (interleaved with the peers') unless --repeats says otherwise
    single_repeats: int = 5
    # the end-to-end p99 of one 5 s step moved 0.8-2.3x Redis-always's between repeats of one
    # run (one fdatasync of 20-45 ms, or a slow stretch, decides a step): five, not three
    latency_repeats: int = 5

    @staticmethod
    def make(quick: bool, repeats: int | None, rates: tuple[int, ...] | None = None) -> Plan:
        plan = Plan._make(quick, repeats)
        if rates:
            plan = dataclasses.replace(plan, latency_rates=rates)
        return plan

    @staticmethod
    def _make(quick: bool, repeats: int | None) -> Plan:
        if quick:
            return Plan(
                repeats=repeats or 2,
                produce_s=1.0,
                produce_warmup_s=0.3,
                consume_counts={"herald": 100_000, "redis": 40_000, "nats": 20_000},
                latency_rates=(1000, 5000, 20000),
                latency_warmup_s=0.3,
                latency_s=1.0,
                http_s=1.5,
                http_processes=2,
                limits_s=0.5,
                warmup_mib=256,
                profile_s=0.0,
                single_s=1.0,
                single_warmup_s=0.3,
                single_repeats=repeats or 2,
                latency_repeats=repeats or 2,
            )
        return Plan(
            repeats=repeats or 3,
            produce_s=3.0,
            produce_warmup_s=1.0,
            consume_counts={"herald": 500_000, "redis": 200_000, "nats": 100_000},
            latency_rates=(1000, 5000, 20000),
            latency_warmup_s=0.5,
            latency_s=5.0,
            http_s=4.0,
            http_processes=2,
            limits_s=2.0,
            warmup_mib=1024,
            profile_s=8.0,
            single_s=3.0,
            single_warmup_s=1.0,
            single_repeats=repeats or 5,
            latency_repeats=repeats or 5,
        )


DISPLAY = {
    "herald": "Herald",
    "redis": "Redis",
    "redis-always": "Redis-always",
    "redis-benchmark": "Redis",
    "nats": "NATS",
}


class Bench:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.plan = Plan.make(args.quick, args.repeats, args.rates)
        self.servers = Servers(base)
        self.profile_dir = REPO / "bench" / "out"
        now = datetime.now(UTC)
        self.commit = git_commit()  # once: others may commit while this runs
        self.res = report.Results(
            stamp=f"{now:%Y-%m-%d %H:%M} UTC, commit {self.commit}",
            partial=args.scenario != "all" or args.systems is not None,
        )

    # ------------------------------------------------------------------ scenarios
    def limits(self) -> None:
        p = self.plan
        self.res.limits = limits.measure(self.base, p.repeats, p.limits_s, p.warmup_mib, say)
        self.res.describe["limits"] = (
            f"{p.repeats} repeats of {p.limits_s:g} s each, in `{self.base}`, before any"
            " server has work (they are idle)."
        )

    def produce(self) -> None:
        p = self.plan
        fns: dict[str, Callable[..., Any]] = {
            "herald": produce.herald,
            "redis": produce.redis,
            "redis-benchmark": produce.redis_benchmark,
            "nats": produce.nats,
        }
        for i, case in enumerate(produce.CASES):
            if not self._wanted(case.system):
                continue
            target = self.servers.target(case.system)
            if target is None:
                self.res.note("produce", f"{DISPLAY[case.system]} unavailable: skipped")
                continue
            say(f"produce: {DISPLAY[case.system]}, {case.label}")
            samples = worker.run(
                fns[case.system],
                *target,
                case,
                f"bench-produce-{i}",
                p.produce_s,
                p.repeats,
                p.produce_warmup_s,
                timeout=120 + p.repeats * p.produce_s * 4,
            )
            self._say_rates(samples, "msgs/s")
            reference = case.system == "redis-benchmark"
            row = report.ThroughputRow(DISPLAY[case.system], case.label, samples, reference)
            self.res.produce.append(row)
        self.res.describe["produce"] = (
            f"Command `{self.command}`. Each row: one client process, a"
            f" {p.produce_warmup_s:g} s warm-up, then {p.repeats} windows of {p.produce_s:g} s;"
            " a window counts the messages acknowledged (acks=all for Herald: after"
            " fdatasync) until the last request in flight returns. CPU: cores used during"
            " the window by the client process and by the server process (all its threads)."
        )
        if self.args.profile and self._wanted("herald"):
            case = next(c for c in produce.CASES if c.system == "herald")

            def workload() -> None:
                worker.run(
                    produce.herald,
                    self.servers.herald.tcp_port,
                    self.servers.herald.pid,
                    case,
                    "bench-produce-profile",
                    p.profile_s + 1.5,
                    1,
                    0.0,
                    timeout=120,
                )

            self._profile("produce", f"durable produce, {case.label}", workload)

    def consume(self) -> None:
        p = self.plan
        fns: dict[str, Callable[..., Any]] = {
            "herald": consume.herald,
            "redis": consume.redis,
            "nats": consume.nats,
        }
        for i, case in enumerate(consume.CASES):
            if not self._wanted(case.system):
                continue
            target = self.servers.target(case.system)
            if target is None:
                self.res.note("consume", f"{DISPLAY[case.system]} unavailable: skipped")
                continue
            count = p.consume_counts[case.system]
            say(f"consume: {DISPLAY[case.system]}, {case.label}: filling {count:,} messages")
            samples = worker.run(
                fns[case.system],
                *target,
                case,
                f"bench-consume-{i}",
                count,
                p.repeats,
                timeout=600,
            )
            self._say_rates(samples, "msgs/s")
            self.res.consume.append(report.ThroughputRow(DISPLAY[case.system], case.label, samples))
        counts = ", ".join(f"{DISPLAY[k]} {v:,}" for k, v in p.consume_counts.items())
        self.res.describe["consume"] = (
            f"Command `{self.command}`. Each row: the stream is filled first (not timed), then"
            f" {p.repeats} times a new group reads all of it, acknowledging as it goes; the"
            f" window runs from the first read to the last acknowledgement. Messages per"
            f" repeat: {counts} (sized so a window lasts about a second or more)."
        )
        if self.args.profile and self._wanted("herald"):
            self._profile_consume()

    def _profile_consume(self) -> None:
        p = self.plan
        case = consume.CASES[2]
        ready = worker.Event()
        child = worker.Child(
            consume.herald,
            self.servers.herald.tcp_port,
            self.servers.herald.pid,
            case,
            "bench-consume-profile",
            p.consume_counts["herald"],
            1000,
            ready,
            p.profile_s + 1.0,
            name="consume-profile",
        )
        try:
            if not ready.wait(300):
                raise worker.WorkerFailed("the consume profile workload never filled its topic")
            self._profile("consume", f"consume, {case.label}", None)
            child.result(300)
        finally:
            child.stop()

    def latency(self) -> None:
        p = self.plan
        fns: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
            "herald": (latency.herald_consumer, latency.herald_producer),
            "redis": (latency.redis_consumer, latency.redis_producer),
            "redis-always": (latency.redis_consumer, latency.redis_producer),
            "nats": (latency.nats_consumer, latency.nats_producer),
        }
        steps = [latency.Step(rate, p.latency_warmup_s, p.latency_s) for rate in p.latency_rates]
        systems = []
        for system in ("redis-always", "redis", "nats", "herald"):
            if not self._wanted(system):
                continue
            if self.servers.target(system) is None:
                self.res.note("latency", f"{DISPLAY[system]} unavailable: skipped")
                continue
            systems.append(system)
        # interleaved: repeat after repeat, each system once, in an order rotated by one
        # each repeat, so that a drift of the host (a slower stretch of the VM's disk or
        # CPU) falls on every system alike and not on whichever ran last
        runs: dict[str, list[tuple[latency.Step, Any, Any]]] = {s: [] for s in systems}
        for rep in range(p.latency_repeats):
            for system in _rotated(systems, rep):
                target = self.servers.target(system)
                assert target is not None
                say(
                    f"latency: {DISPLAY[system]}, rates {list(p.latency_rates)},"
                    f" repeat {rep + 1} of {p.latency_repeats}"
                )
                settle()
                cons_fn, prod_fn = fns[system]
                ready = worker.Event()
                name = f"bench-latency-{system}-{rep}"
                timeout = latency.timeout_for(steps) + 60
                consumer = worker.Child(cons_fn, target[0], name, steps, ready, name="lat-consumer")
                try:
                    if not ready.wait(60):
                        consumer.result(1)  # raises with the consumer's error
                    producer = worker.Child(prod_fn, target[0], name, steps, name="lat-producer")
                    sent = producer.result(timeout)
                    got = consumer.result(timeout)
                finally:
                    consumer.stop()
                if got.consumer_timed_out:
                    self.res.note("latency", f"{DISPLAY[system]}: the consumer timed out")
                if sent.producer_errors:
                    self.res.note(
                        "latency", f"{DISPLAY[system]}: {sent.producer_errors} failed sends"
                    )
                runs[system].extend(zip(steps, sent.steps, got.steps, strict=True))
        for system in systems:
            for rate in p.latency_rates:
                got_runs = []
                for st, s, g in runs[system]:
                    if st.rate == rate:
                        g.sent, g.achieved_rate, g.max_lag_ms = (
                            s.sent,
                            s.achieved_rate,
                            s.max_lag_ms,
                        )
                        got_runs.append(g)
                row = report.LatencyRow(DISPLAY[system], rate, got_runs)
                self.res.latency.append(row)
                say(
                    f"   {DISPLAY[system]} {rate:>6,} msg/s: p50"
                    f" {row.spread(lambda x: x.p50_ms).fmt(digits=2)} ms,"
                    f" p99 {row.spread(lambda x: x.p99_ms).fmt(digits=2)} ms,"
                    f" p99.9 {row.spread(lambda x: x.p999_ms).fmt(digits=2)} ms; worst "
                    + ", ".join(
                        f"{r.max_ms:.1f} ms sent at {_utc(r.max_at_wall)}" for r in got_runs
                    )
                    + " (match with the server's log)"
                )
        self.res.describe["latency"] = (
            f"Command `{self.command}`. Producer and consumer are two processes on this"
            f" machine (plus the server). Per rate: {p.latency_warmup_s:g} s warm-up, then"
            f" {p.latency_s:g} s measured; the rates run in order 1k, 5k, 20k; {p.latency_repeats}"
            " repeats, interleaved (each repeat runs every system once, fresh producer and"
            " consumer processes, the order rotated by one each repeat, so a drift of the"
            " host falls on all alike); figures are the median (min-max) of the per-repeat"
            " percentiles."
            " Producer: Redis pipelines the XADDs due in each loop turn, NATS uses"
            " publish_async, Herald send_nowait with acks=all and linger_ms=0 (records due in"
            " a turn leave together; those sent while a request is in flight follow its"
            " reply). Consumer:"
            " Redis XREADGROUP BLOCK + XACK pipelined with the next read, NATS push consumer"
            " (AckAll every 20 ms), Herald getmany long poll committing after each poll"
            " (auto_commit_interval_ms=0: what the previous getmany returned is committed"
            " when it is called next; a commit is answered once synced to disk). Herald's"
            " consumer sees a record only after its fdatasync; Redis-always fsyncs its AOF"
            " before answering each loop turn's commands; Redis (everysec) answers from"
            " memory (fsync once a second) and NATS does not fsync per message."
        )

    def http(self) -> None:
        p = self.plan
        url = self.servers.herald.http_url
        for case in http_events.CASES:
            say(f"http: {case.label}, {p.http_processes} client processes")
            samples = []
            for _ in range(p.repeats):
                s = http_events.measure(
                    url, self.servers.herald.pid, case, p.http_s, p.http_processes
                )
                samples.append(s)
                say(
                    f"   {s.sample.rate:,.0f} events/s ({s.requests / s.sample.seconds:,.0f}"
                    f" req/s), client CPU {s.sample.client_cpu:.2f}, server CPU"
                    f" {s.sample.server_cpu:.2f}, errors {s.sample.errors}"
                )
            self.res.http.append(report.HttpRow(case.label, samples, p.http_processes))
        self.res.describe["http"] = (
            f"Command `{self.command}`. Keep-alive connections, one request in flight on"
            f" each, {p.http_processes} client processes started together (connections split"
            f" between them), counts summed; {p.repeats} windows of {p.http_s:g} s. The lean"
            " client is a raw asyncio Protocol per connection writing a prebuilt request and"
            " reading only the status line, Content-Length and body (like wrk); the aiohttp"
            " client spends about as much CPU per request as the server, so its row shows"
            " the client as much as the node. Each event is ~200 bytes of JSON (`topic` and"
            " `payload`, no key, so the node places them with its sticky partitioner); the"
            " node assigns the event_id and answers after the fdatasync. Client CPU is the"
            " sum over the client processes: with 2"
            " cores for clients and server together, a figure whose client + server CPU"
            " reaches ~2 is bounded by the machine, not by either side alone."
        )
        if self.args.profile and self._wanted("herald"):
            for case in http_events.CASES:
                if case.profile is None:
                    continue

                def workload(case: http_events.Case = case) -> None:
                    http_events.measure(
                        url, self.servers.herald.pid, case, p.profile_s + 1.0, p.http_processes
                    )

                self._profile(case.profile, case.label, workload, delay=2.0)

    def single(self) -> None:
        p = self.plan
        fns = {"herald": single.herald, "redis": single.redis, "redis-always": single.redis}
        cases = []
        for case in single.CASES:
            if not self._wanted(case.system):
                continue
            if self.servers.target(case.system) is None:
                self.res.note("single", f"{DISPLAY[case.system]} unavailable: skipped")
                continue
            cases.append(case)
        # interleaved as the latency scenario's repeats are: one window of each system per
        # repeat, the order rotated by one each repeat (a drift of the host falls on all)
        got: dict[str, list[single.SingleSample]] = {c.system: [] for c in cases}
        for rep in range(p.single_repeats):
            for case in _rotated(cases, rep):
                target = self.servers.target(case.system)
                assert target is not None
                say(
                    f"single: {DISPLAY[case.system]}, {case.label},"
                    f" repeat {rep + 1} of {p.single_repeats}"
                )
                settle()
                i = single.CASES.index(case)
                samples = worker.run(
                    fns[case.system],
                    *target,
                    case,
                    f"bench-single-{i}-{rep}",
                    p.single_s,
                    1,
                    p.single_warmup_s,
                    timeout=120 + p.single_s * 4,
                )
                s0 = samples[0]
                say(
                    f"   {s0.sample.rate:,.0f}/s (p50 {s0.p50_ms:.3f} ms, p99 {s0.p99_ms:.3f} ms,"
                    f" max {s0.max_ms:.1f} ms)"
                )
                got[case.system].extend(samples)
        for case in cases:
            self.res.single.append(
                report.SingleRow(DISPLAY[case.system], case.label, got[case.system])
            )
        self.res.describe["single"] = (
            f"Command `{self.command}`. One client process sends one 200-byte record, awaits"
            " its acknowledgement, then sends the next: one partition (stream), nothing"
            " pipelined, nothing batched. Herald: `Producer.send` with acks=all (answered"
            " after fdatasync) and linger_ms=0; Redis-always: XADD against `appendfsync"
            " always` (fsync before the reply); Redis: XADD against `appendfsync everysec`"
            f" (reply from memory). {p.single_repeats} windows of {p.single_s:g} s per system,"
            " interleaved (each repeat runs one window of every system, from a fresh client"
            f" process after a {p.single_warmup_s:g} s warm-up, the order rotated by one each"
            " repeat); the round trip is timed from the send call to the"
            " acknowledgement. CPU: cores used by the client process and by the server"
            " process (all its threads) during the window."
        )
        if self.args.profile and self._wanted("herald"):
            case = next(c for c in single.CASES if c.system == "herald")

            def workload() -> None:
                worker.run(
                    single.herald,
                    self.servers.herald.tcp_port,
                    self.servers.herald.pid,
                    case,
                    "bench-single-profile",
                    p.profile_s + 1.5,
                    1,
                    0.0,
                    timeout=120,
                )

            self._profile("single", f"one-at-a-time durable produce, {case.label}", workload)

    # ------------------------------------------------------------------- helpers
    def _wanted(self, system: str) -> bool:
        return self.args.systems is None or system in self.args.systems

    def _profile(
        self, key: str, title: str, workload: Any, delay: float = 0.5, seconds: float = 0
    ) -> None:
        """py-spy on the node while ``workload`` runs (or, with None, while whatever the
        caller started runs)."""
        secs = seconds or self.plan.profile_s
        if profile.py_spy() is None:
            self.res.note(key, "py-spy is not installed: no profile (pip install py-spy)")
            return
        out = self.profile_dir / f"broker-profile-{key}.txt"
        say(f"profile: py-spy on the Herald node for {secs:g} s during {key}")
        spy = None
        try:
            if workload is None:
                spy = profile.record(self.servers.herald.pid, secs, out)
                spy.wait(secs + 60)
            else:
                import threading

                def start_spy() -> None:
                    nonlocal spy
                    time.sleep(delay)
                    spy = profile.record(self.servers.herald.pid, secs, out)

                t = threading.Thread(target=start_spy)
                t.start()
                workload()
                t.join()
                assert spy is not None
                spy.wait(secs + 60)
            assert spy is not None
            err = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
            if spy.returncode != 0 or not out.exists():
                self.res.note(key, f"py-spy failed (status {spy.returncode}): {err[-300:]}")
                return
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
                spy.wait()
        prof = profile.summarize(out)
        with contextlib.suppress(ValueError):
            prof.raw_path = str(out.relative_to(REPO))
        during = "an unmeasured repeat of that workload"
        self.res.profiles[key] = report.ProfileResult(title, secs, prof, during)
        for name, share in prof.top("self", 5):
            say(f"   {share:6.1%}  {name}")

    @staticmethod
    def _say_rates(samples: list[Sample], unit: str) -> None:
        say(
            "   "
            + ", ".join(
                f"{s.rate:,.0f} {unit} (client {s.client_cpu:.2f}, server {s.server_cpu:.2f})"
                for s in samples
            )
        )

    @property
    def command(self) -> str:
        return " ".join(["python -m bench.run", *(shlex.quote(a) for a in self.args.argv)])

    def run(self, scenarios: Sequence[str]) -> None:
        for name in scenarios:
            load = ForeignLoad()
            load.start()
            if name == "limits":
                self.limits()
            else:
                getattr(self, name)()
            load.stop()
            self.res.foreign[name] = load
            if load.cores >= 0.2 or load.write_mb_s >= 1:
                say(
                    f"note: other processes used {load.cores:.2f} cores and wrote"
                    f" {load.write_mb_s:.1f} MB/s during {name}"
                )


# ---------------------------------------------------------------------------- setup
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Broker benchmark: Herald against Redis Streams and NATS JetStream "
        "(durable produce, consume with acknowledgement, end-to-end latency, HTTP ingest, "
        "and the machine's disk and loopback limits). Writes the '## Broker' section of "
        "bench/RESULTS.md.",
    )
    parser.add_argument(
        "--scenario",
        choices=("all", *SCENARIOS),
        default="all",
        help="what to run (default: all, about six minutes)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short windows, about one minute for all"
    )
    parser.add_argument(
        "--repeats", type=int, metavar="N", help="windows per figure (default 3, quick 2)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "RESULTS.md",
        help="results file (default: bench/RESULTS.md); '-' prints to stdout instead",
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the py-spy profiles of the node (off anyway with --quick)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the servers' data directories afterwards"
    )
    parser.add_argument(
        "--rates",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        metavar="R1,R2",
        help="offered rates of the latency scenario, msg/s (default 1000,5000,20000)",
    )
    parser.add_argument(
        "--systems",
        type=lambda v: set(v.split(",")),
        metavar="S1,S2",
        help="only these systems (herald, redis, redis-always, redis-benchmark, nats;"
        " default: all), e.g. to compare builds quickly",
    )
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.quick:
        args.profile = False
    return args


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _keep_node_log(bench: Bench, out_dir: Path) -> None:
    """Copy the Herald node's log out of the data directory that is about to go, to
    ``bench/out/broker-herald.log``: the worst latencies printed come with the wall-clock
    time their record was sent, to be matched with the node's ``loop_stall``, ``gc_pause``
    and ``sync_slow`` lines there."""
    log_path = bench.servers.herald.dir / "herald.log"
    if log_path.exists():
        kept = out_dir / "broker-herald.log"
        shutil.copyfile(log_path, kept)
        lines = kept.read_text(errors="replace").splitlines()
        marks = ("event=loop_stall", "event=gc_pause", "event=sync_slow", "event=inline_io_slow")
        found = [line for line in lines if any(m in line for m in marks)]
        say(f"the node's log: {kept} ({len(found)} stall, pause or slow-sync lines)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="broker-", dir=out_dir))
    check_disk(base)
    started = time.monotonic()
    bench = Bench(args, base)
    try:
        if "limits" in scenarios:
            bench.run(["limits"])
        rest = [s for s in scenarios if s != "limits"]
        if rest:
            with bench.servers.running():
                bench.run(rest)
        bench.res.setup = machine(base, bench.servers, bench.commit)
        minutes = (time.monotonic() - started) / 60
        bench.res.setup.insert(0, ("Command", f"`{bench.command}` ({minutes:.1f} min)"))
    except KeyboardInterrupt:
        say("interrupted: servers stopped, nothing written")
        return 130
    finally:
        _keep_node_log(bench, out_dir)
        if args.keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    rendered = report.render(bench.res, report.blocks_of(bench.res, scenarios))
    if str(args.out) == "-":
        print("\n\n".join(rendered.values()))
    else:
        results_file.write(args.out, rendered, INTRO)
        say(f"wrote the ## Broker section of {args.out}")
    for t in report.targets(bench.res):
        print(f"{'met   ' if t.met else 'MISSED'} {t.name}: {t.margin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
