"""Notification registry benchmark: one topic with a million subscribers, on the disk that
holds the repository.

Run with ``python -m bench.registry`` (``--help`` lists options). One run:

1. registers N subscribers (default 1,000,000; random 32-hex-digit ids, as UUIDs are) to one
   topic through ``Registry.subscribe_many``, in batches, each batch made durable
   (``Registry.sync``) before the next, sampling resident memory as it goes;
2. reports the bytes on disk per subscriber: LMDB's page counts of the two tables a
   subscription lives in (the user's row and the topic's index entry) and the file's
   allocated size;
3. pages through every subscriber (``Registry.subscribers``, 1,000 per page) with a warm
   and then a cold page cache, sampling resident memory;
4. gives 100,000 of them a profile (contact, preferences with rules, quiet hours and a cap,
   consent) and measures what the fan-out pays per recipient: ``Registry.recipients`` (the
   reads) and ``policy.decide`` (the decision), and the whole per-subscriber path (page +
   read + decide);
5. measures the API write path: ``Registry.subscribe`` one at a time (each awaits its
   fsync) and 200 at once (group commit).

Results go to the ``## Notification registry`` section of ``bench/RESULTS.md``. Resident
memory is split as Linux reports it: ``RssAnon`` (the process's own heap: the figure that
must stay bounded) and ``RssFile`` (pages of the LMDB file mapped in: page cache, which the
kernel reclaims under pressure).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import uvloop

from bench.machine import evict, machine_description
from bench.results import write_section
from notify import policy
from notify.model import (
    Cap,
    ConsentState,
    Contact,
    Preferences,
    Profile,
    QuietHours,
    Rule,
    Subscription,
)
from notify.preferences import check_preferences
from notify.registry import Registry
from notify.workflows import Send
from storage.kv import KV

REPO = Path(__file__).resolve().parent.parent
TENANT, TOPIC = "acme", "news"
T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z: outside the quiet hours used below


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def memory() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[name] = int(rest.split()[0])
    return out


def code_version() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "notify", "storage"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes in notify/ or storage/" if dirty else "")


@dataclass
class Results:
    n: int
    batch: int
    ids: str
    register_s: float = 0.0
    register_samples: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    tables: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # entries, bytes, depth
    file_bytes: int = 0
    file_allocated: int = 0
    paging: list[tuple[str, float, float, int, dict[str, int], dict[str, int]]] = field(
        default_factory=list
    )
    per_recipient_us: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    profiled: int = 0
    api_one_ms: list[float] = field(default_factory=list)
    api_burst: tuple[int, float] = (0, 0.0)
    start_memory: dict[str, int] = field(default_factory=dict)
    code: str = ""
    load: tuple[float, float] = (0.0, 0.0)


def ids(n: int, kind: str) -> Iterator[str]:
    """``n`` user ids, made as they are consumed (a list of a million would be 90 MB of
    this process's heap, measured as if the registry held it)."""
    if kind == "sequential":
        yield from (f"user-{i:09d}" for i in range(n))
        return
    x = 0x5EED  # a 128-bit LCG from a fixed seed: "random" ids, the same every run
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 128)
        yield f"{x:032x}"


async def register(reg: Registry, res: Results) -> None:
    sub = Subscription(channels=["email", "push"])
    users = ids(res.n, res.ids)
    step = max(1, res.n // 10)
    t0 = time.perf_counter()
    done = 0
    while done < res.n:
        chunk = list(itertools.islice(users, res.batch))
        reg.subscribe_many(TENANT, TOPIC, [(u, sub) for u in chunk], now_ms=T0)
        await reg.sync()
        before, done = done, done + len(chunk)
        if done // step != before // step or done == res.n:
            res.register_samples.append((done, memory()))
            say(f"registered {done:,} ({done / (time.perf_counter() - t0):,.0f}/s)")
    res.register_s = time.perf_counter() - t0


def clocks() -> tuple[float, float]:
    """(wall, CPU of this process) seconds: the CPU figure is what the work costs; the wall
    one also holds the time other processes took the cores (2 cores, shared)."""
    return time.perf_counter(), time.process_time()


def page_all(reg: Registry, label: str, res: Results) -> None:
    start = memory()
    t0, c0 = clocks()
    after = None
    seen = 0
    peak: dict[str, int] = {}
    pages = 0
    while True:
        page = reg.subscribers(TENANT, TOPIC, after=after, limit=1000)
        seen += len(page.subscribers)
        pages += 1
        if pages % 100 == 0:
            m = memory()
            peak = {k: max(peak.get(k, 0), v) for k, v in m.items()}
        if page.next_after is None:
            break
        after = page.next_after
    t1, c1 = clocks()
    took = t1 - t0
    m = memory()
    peak = {k: max(peak.get(k, 0), v) for k, v in m.items()}
    res.paging.append((label, took, c1 - c0, seen, start, peak))
    say(f"paged {seen:,} subscribers ({label}) in {took:.2f} s: {seen / took:,.0f}/s")


def profile_for(i: int) -> Profile:
    prefs = check_preferences(
        Preferences(
            rules=[
                Rule(category="marketing", allow=False),
                Rule(topic="news", channel="sms", allow=False),
                Rule(channel="push", allow=True),
            ],
            quiet_hours=QuietHours(start="22:00", end="07:00"),
            caps=[Cap(category="digest", max=3, per="1d")],
        ),
        now_ms=T0,
    )
    return Profile(
        contact=Contact(email=f"user{i}@example.com", timezone="Europe/Paris", locale="fr-FR"),
        preferences=prefs,
        consent={"sms": ConsentState(opted_in=False, legal=True, at_ms=T0, source="sms_stop")},
        created_ms=T0,
    )


async def per_recipient(reg: Registry, kv: KV, res: Results, count: int) -> None:
    page = reg.subscribers(TENANT, TOPIC, limit=min(count, 10_000))
    users = [s.user for s in page.subscribers]
    while len(users) < count and page.next_after is not None:
        page = reg.subscribers(TENANT, TOPIC, after=page.next_after, limit=10_000)
        users.extend(s.user for s in page.subscribers)
    users = users[:count]
    profiles = kv.table("notify.profiles", Profile)  # the layout notify/registry.py documents
    for i in range(0, len(users), 10_000):
        profiles.put_many(
            [(f"{TENANT}\0{u}", profile_for(i + j)) for j, u in enumerate(users[i : i + 10_000])]
        )
    await reg.sync()
    res.profiled = len(users)
    occasion = policy.Occasion(topic=TOPIC, category="news", data={"title": "hello"})
    step = Send(0, "steps[0]", "email")
    for _repeat in range(3):
        # page by page, as a fan-out does (holding every recipient at once would measure
        # the garbage collector walking them)
        read = [0.0, 0.0]
        decide = [0.0, 0.0]
        delivered = 0
        for i in range(0, len(users), 1000):
            t0 = clocks()
            recipients = reg.recipients(TENANT, users[i : i + 1000])
            t1 = clocks()
            for r in recipients:
                if isinstance(policy.decide(step, occasion, r, None, now_ms=T0), policy.Deliver):
                    delivered += 1
            t2 = clocks()
            for k in (0, 1):
                read[k] += t1[k] - t0[k]
                decide[k] += t2[k] - t1[k]
        assert delivered == len(users), delivered
        # the whole path a fan-out walks per subscriber: page, read, decide
        after = None
        n = 0
        t3 = clocks()
        while n < len(users):
            page = reg.subscribers(TENANT, TOPIC, after=after, limit=1000)
            batch = reg.recipients(TENANT, [s.user for s in page.subscribers])
            for r in batch:
                policy.decide(step, occasion, r, None, now_ms=T0)
            n += len(batch)
            after = page.next_after
            if after is None:
                break
        t4 = clocks()
        whole = [t4[0] - t3[0], t4[1] - t3[1]]
        for key, secs, k in (
            ("recipients", read, len(users)),
            ("decide", decide, len(users)),
            ("page+recipients+decide", whole, n),
        ):
            res.per_recipient_us.setdefault(key, []).append((secs[0] / k * 1e6, secs[1] / k * 1e6))
    say(
        "per recipient (CPU): "
        + ", ".join(
            f"{k} {statistics.median(c for _w, c in v):.2f} µs"
            for k, v in res.per_recipient_us.items()
        )
    )


async def api_writes(reg: Registry, res: Results) -> None:
    sub = Subscription(channels=["email"])
    for i in range(200):
        t0 = time.perf_counter()
        await reg.subscribe(TENANT, f"api-one-{i}", "api", sub, now_ms=T0)
        res.api_one_ms.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    await asyncio.gather(
        *(reg.subscribe(TENANT, f"api-burst-{i}", "api", sub, now_ms=T0) for i in range(200))
    )
    res.api_burst = (200, time.perf_counter() - t0)


async def run(base: Path, res: Results, map_gib: int) -> None:
    res.start_memory = memory()
    kv = KV(base / "state", map_size=map_gib << 30)
    try:
        reg = Registry(kv)
        say(f"registering {res.n:,} subscribers ({res.ids} ids) in batches of {res.batch:,}")
        await register(reg, res)
        for name in ("notify.user_subs", "notify.topic_subs", "notify.topic_counts"):
            st = kv.table(name, msgspec.Raw).stats()
            res.tables[name] = (st.entries, st.bytes, st.depth)
        data = base / "state" / "data.mdb"
        res.file_bytes = data.stat().st_size
        res.file_allocated = data.stat().st_blocks * 512
        page_all(reg, "warm page cache", res)
        # cold: unmap the file (pages mapped into a process cannot be evicted), evict it,
        # and open it again
        kv.close()
        evict(base / "state")
        kv = KV(base / "state", map_size=map_gib << 30)
        reg = Registry(kv)
        page_all(reg, "cold page cache (store reopened)", res)
        await per_recipient(reg, kv, res, min(100_000, res.n))
        await api_writes(reg, res)
    finally:
        kv.close()


def render(
    res: Results,
    opt: argparse.Namespace,
    started: datetime,
    seconds: float,
    machine: list[tuple[str, str]],
) -> str:
    kib = 1024
    lines = [
        f"Command: `{opt.command}`, on commit {res.code}  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC; the run took {seconds:.0f} s. "
        "MB = 10^6 bytes; memory in MiB.  ",
        f"Load average (1 min) {res.load[0]:.2f} at the start, {res.load[1]:.2f} at the end "
        "(2 cores shared with other engineers' work).",
        "",
        "| Machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine],
        "",
        f"### Registering {res.n:,} subscribers to one topic",
        "",
        f"`Registry.subscribe_many` in batches of {res.batch:,}, each batch one LMDB write "
        f"transaction followed by `Registry.sync()` (one fsync); {res.ids} ids "
        "(32 hex digits).",
        "",
        f"Rate: **{res.n / res.register_s:,.0f} subscribers/s** "
        f"({res.register_s:.1f} s for {res.n:,}).",
        "",
        "| registered | VmRSS | RssAnon (heap) | RssFile (mapped LMDB pages) |",
        "|---|---|---|---|",
        f"| 0 (before opening the store) | {res.start_memory['VmRSS'] / kib:.0f} | "
        f"{res.start_memory['RssAnon'] / kib:.0f} | {res.start_memory['RssFile'] / kib:.0f} |",
    ]
    for done, m in res.register_samples:
        lines.append(
            f"| {done:,} | {m['VmRSS'] / kib:.0f} | {m['RssAnon'] / kib:.0f} | "
            f"{m['RssFile'] / kib:.0f} |"
        )
    total_tables = sum(b for _e, b, _d in res.tables.values())
    lines += [
        "",
        "### Bytes on disk per subscriber",
        "",
        "| table | entries | bytes (pages x 4 KiB) | B-tree depth | bytes per subscriber |",
        "|---|---|---|---|---|",
    ]
    for name, (entries, size, depth) in res.tables.items():
        lines.append(
            f"| `{name}` | {entries:,} | {size / 1e6:,.1f} MB | {depth} | {size / res.n:.0f} |"
        )
    lines += [
        f"| **all three** | | {total_tables / 1e6:,.1f} MB | | **{total_tables / res.n:.0f}** |",
        "",
        f"The LMDB file (`data.mdb`, every table of the run, free pages included): "
        f"{res.file_allocated / 1e6:,.1f} MB allocated on disk = "
        f"**{res.file_allocated / res.n:.0f} bytes per subscriber**.",
        "",
        "### Paging through every subscriber (1,000 per page)",
        "",
        "| page cache | subscribers | wall time | rate (wall) | rate (CPU time) | "
        "RssAnon before -> peak | RssFile before -> peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, took, cpu, seen, start, peak in res.paging:
        lines.append(
            f"| {label} | {seen:,} | {took:.2f} s | {seen / took:,.0f}/s | "
            f"**{seen / cpu:,.0f}/s** | "
            f"{start['RssAnon'] / kib:.0f} -> {peak['RssAnon'] / kib:.0f} | "
            f"{start['RssFile'] / kib:.0f} -> {peak['RssFile'] / kib:.0f} |"
        )
    lines += [
        "",
        f"### Cost per recipient for the fan-out ({res.profiled:,} recipients with a profile)",
        "",
        "Each profile: contact (email, Europe/Paris), 3 rules, quiet hours 22:00-07:00, one cap, "
        "a legal SMS opt-out; decision for an email step at 13:00 Paris (outside quiet hours; "
        "every one delivers). Median of 3 passes (min-max); CPU time of this process, and wall "
        "time (which also holds the time other processes had the cores).",
        "",
        "| what | µs per recipient, CPU | µs per recipient, wall |",
        "|---|---|---|",
    ]
    labels = {
        "recipients": "`Registry.recipients` (profile + cap windows, 1,000 per snapshot)",
        "decide": "`policy.decide` (legal opt-out, channel data, rules, caps, quiet hours)",
        "page+recipients+decide": "the whole path: page of subscribers + recipients + decide",
    }
    for key, values in res.per_recipient_us.items():
        wall = [w for w, _c in values]
        cpus = [c for _w, c in values]
        lines.append(
            f"| {labels[key]} | **{statistics.median(cpus):.2f}** "
            f"({min(cpus):.2f}-{max(cpus):.2f}) "
            f"| {statistics.median(wall):.2f} ({min(wall):.2f}-{max(wall):.2f}) |"
        )
    one = sorted(res.api_one_ms)
    n, secs = res.api_burst
    lines += [
        "",
        "### API writes (durable before they return)",
        "",
        f"`Registry.subscribe` one at a time, 200 calls: p50 {one[len(one) // 2]:.2f} ms, "
        f"p99 {one[int(len(one) * 0.99) - 1]:.2f} ms (each waits for its fsync).  ",
        f"{n} concurrent calls: {secs * 1000:.0f} ms in all, {n / secs:,.0f}/s "
        "(they share fsyncs: group commit).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    p = argparse.ArgumentParser(prog="python -m bench.registry", description=__doc__.split("\n")[0])
    p.add_argument("--subscribers", type=int, default=1_000_000)
    p.add_argument(
        "--batch",
        type=int,
        default=1_000,
        help="subscribers per transaction (LMDB holds each page a transaction dirties in "
        "memory until it commits: with random ids, heap grows with the batch)",
    )
    p.add_argument("--ids", choices=("random", "sequential"), default="random")
    p.add_argument("--map-gib", type=int, default=8, help="LMDB map size")
    p.add_argument("--dir", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--output", type=Path, default=REPO / "bench" / "RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print the results, write no file")
    p.add_argument("--keep", action="store_true", help="keep the data directory")
    opt = p.parse_args(argv)
    opt.command = "python -m bench.registry" + (" " + " ".join(argv) if argv else "")
    opt.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="registry-", dir=opt.dir))
    res = Results(opt.subscribers, opt.batch, opt.ids)
    res.code = code_version()
    load0 = os.getloadavg()[0]
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    libs = (
        f"uvloop {importlib.metadata.version('uvloop')}, msgspec {msgspec.__version__}, "
        f"lmdb {importlib.metadata.version('lmdb')}"
    )
    machine = machine_description(base, libs)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(base, res, opt.map_gib))
    finally:
        if opt.keep:
            say(f"data kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    res.load = (load0, os.getloadavg()[0])
    text = render(res, opt, started, time.perf_counter() - t0, machine)
    if opt.no_write:
        print(text)
    else:
        write_section(opt.output, "Notification registry", "bench.registry", text)
        say(f"results written to the Notification registry section of {opt.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
