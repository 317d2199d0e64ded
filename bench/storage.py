"""Storage benchmark: what one partition does against what the disk under it can do.

Run with ``python -m bench.storage`` (or ``make bench-storage``); ``--help`` lists options.
One run measures, on a fresh directory on the disk that holds the repository:

1. the physical ceiling: sequential ``write`` + ``fdatasync`` bandwidth, and ``fdatasync``s
   per second for tiny writes (the denominators of everything else);
2. appends with ``acks=ALL`` for 200 B and 1 KiB records in batches of 1, 100 and 1000, with
   one appender and with N concurrent appenders (group commit), on uvloop, from batches
   encoded before the clock starts (a broker receives bytes);
3. sequential reads through ``Partition.read``, raw and decoded by a client;
4. recovery of a 1 GiB partition: clean reopen, reopen after a simulated crash (files left
   as a killed process leaves them, plus a torn half-batch), and the worst case without a
   recovery checkpoint, each with a warm and a cold page cache.

Results go to the ``## Storage`` section of ``bench/RESULTS.md``, between markers, so notes
written by hand in that section survive a re-run. Nothing here is asserted: this is a
measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib.metadata
import io
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import uvloop

from bench.machine import (
    disk_description,
    evict,
    machine_description,
    mount_of,
    prewarm,
    process_cpu_seconds,
    top_other_cpu,
)
from bench.results import write_section
from bench.storage_report import Spread, render
from storage import records
from storage.checkpoint import FILE_NAME as CHECKPOINT_FILE
from storage.partition import Acks, Partition, RecoveryReport

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
GiB = 1024 * MiB


def libraries() -> str:
    import msgspec
    import xxhash

    uvloop_version = importlib.metadata.version("uvloop")
    return f"uvloop {uvloop_version}, msgspec {msgspec.__version__}, xxhash {xxhash.VERSION}"


def code_version() -> str:
    """The commit measured, and whether ``storage/`` differed from it (uncommitted work)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "storage"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}" + (" with uncommitted changes in storage/" if dirty else "")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Options:
    out: Path
    parent: Path
    quick: bool
    concurrency: list[int]
    repeats: int
    duration: float
    disk_mib: int
    warmup_mib: int
    read_mib: int
    recovery_mib: int
    profile: bool
    dense_index: bool
    keep: bool
    write: bool
    command: str


# ------------------------------------------------------------------------ 1. disk ceiling
@dataclass
class DiskResult:
    warmup_mb_s: float  # first writes into never-used memory (see warm_page_cache)
    chunk_mb_s: dict[int, Spread]  # chunk bytes -> MB/s
    tiny_fsyncs: Spread  # fdatasyncs per second, 200-byte appends
    tiny_latency_us: float  # median
    recheck_mb_s: Spread = field(default_factory=lambda: Spread([]))  # 1 MiB, after appends

    @property
    def bandwidth(self) -> float:
        """The denominator: 1 MiB write+fdatasync MB/s, the better of the two measurements
        (the conservative choice for the ratios)."""
        best = self.chunk_mb_s[MiB].median
        if self.recheck_mb_s.values:
            best = max(best, self.recheck_mb_s.median)
        return best


def warm_page_cache(base: Path, mib: int) -> float:
    """Write ``mib`` MiB and delete it, so later page-cache allocations reuse memory the
    kernel has touched before. On a fresh VM (this one is Firecracker) the first touch of a
    guest page faults on the host and a 1 MiB ``write`` then costs ~3 ms instead of ~0.2
    ms: measuring before this would report the hypervisor, not the disk. Returns MB/s."""
    buf = os.urandom(MiB)
    path = base / "warmup"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        started = time.perf_counter()
        for _ in range(mib):
            os.write(fd, buf)
        os.fdatasync(fd)
        return mib * MiB / (time.perf_counter() - started) / 1e6
    finally:
        os.close(fd)
        path.unlink()


def sync_bandwidth(base: Path, chunk: int, total: int) -> float:
    """Append ``chunk`` bytes then fdatasync, ``total`` bytes in all, like a log does (the
    file grows, so each sync also commits the new size). Returns MB/s."""
    buf = os.urandom(chunk)
    path = base / f"disk-{chunk}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        started = time.perf_counter()
        written = 0
        while written < total:
            written += os.write(fd, buf)
            os.fdatasync(fd)
        return written / (time.perf_counter() - started) / 1e6
    finally:
        os.close(fd)
        path.unlink()


def tiny_syncs(base: Path, seconds: float) -> tuple[float, list[float]]:
    """200-byte appends, each followed by fdatasync: (syncs per second, latencies)."""
    payload = os.urandom(200)
    path = base / "tiny"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    latencies: list[float] = []
    try:
        started = now = time.perf_counter()
        deadline = started + seconds
        while now < deadline:
            os.write(fd, payload)
            os.fdatasync(fd)
            t = time.perf_counter()
            latencies.append(t - now)
            now = t
        return len(latencies) / (now - started), latencies
    finally:
        os.close(fd)
        path.unlink()


def disk_ceiling(base: Path, opt: Options) -> DiskResult:
    warm = warm_page_cache(base, opt.warmup_mib)
    say(f"disk: page-cache warm-up, {opt.warmup_mib} MiB written once: {warm:,.0f} MB/s")
    chunks = {MiB: Spread([]), 16 * MiB: Spread([])}
    for _ in range(opt.repeats):
        for chunk, spread in chunks.items():
            spread.values.append(sync_bandwidth(base, chunk, opt.disk_mib * MiB))
            say(f"disk: {chunk // MiB} MiB write+fdatasync: {spread.values[-1]:,.0f} MB/s")
    tiny = Spread([])
    latencies: list[float] = []
    for _ in range(opt.repeats):
        rate, lat = tiny_syncs(base, 0.5 if opt.quick else 2.0)
        tiny.values.append(rate)
        latencies += lat
        say(f"disk: 200 B write+fdatasync: {rate:,.0f}/s")
    return DiskResult(warm, chunks, tiny, statistics.median(latencies) * 1e6)


def recheck_disk(base: Path, opt: Options, disk: DiskResult) -> None:
    for _ in range(opt.repeats):
        disk.recheck_mb_s.values.append(sync_bandwidth(base, MiB, opt.disk_mib * MiB))
        say(f"disk re-check: 1 MiB write+fdatasync: {disk.recheck_mb_s.values[-1]:,.0f} MB/s")


# ------------------------------------------------------------------------------ 2. append
@dataclass
class AppendCase:
    record_size: int
    batch_records: int
    concurrency: int
    acks: Acks = Acks.ALL


@dataclass
class AppendResult:
    case: AppendCase
    records_s: Spread
    mb_s: Spread  # log bytes (headers included) per second, 1e6 bytes
    records_per_sync: Spread
    p50_ms: Spread
    p99_ms: Spread
    loop_cpu: Spread  # % of one core used by the event-loop thread
    process_cpu: Spread  # % of one core used by the process


def make_pool(record_size: int, batch_records: int, count: int) -> list[bytes]:
    """Distinct encoded batches, as producers would send them."""
    ts = time.time_ns() // 1_000_000
    return [
        records.encode_values([os.urandom(record_size) for _ in range(batch_records)], timestamp=ts)
        for _ in range(count)
    ]


class SyncCounter:
    """An ``fsync`` for ``Partition.open`` that counts the syncs it makes."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        os.fdatasync(fd)


@dataclass
class Run:
    batches: int  # acknowledged
    size: int  # bytes acknowledged
    seconds: float
    latencies: list[float]
    loop_cpu: float  # CPU seconds of the event-loop thread (user + sys, syscalls included)
    process_cpu: float  # CPU seconds of the whole process (the sync threads too)


async def timed_appends(
    part: Partition, pool: Sequence[bytes], concurrency: int, duration: float, acks: Acks
) -> Run:
    """``concurrency`` producers append one batch per request until ``duration`` is over.
    The clock stops when the last producer's last append is acknowledged."""
    loop = asyncio.get_running_loop()
    counts = [0] * concurrency
    sizes = [0] * concurrency
    latencies: list[float] = []
    clock = time.perf_counter

    async def producer(i: int) -> None:
        n = size = 0
        k = i
        lat = latencies.append
        while loop.time() < deadline:
            batch = pool[k % len(pool)]
            k += 1
            t = clock()
            await part.append((batch,), acks)
            lat(clock() - t)
            if not durable:
                await asyncio.sleep(0)  # a broker awaits the next request here
            n += 1
            size += len(batch)
        counts[i], sizes[i] = n, size

    durable = acks == Acks.ALL
    cpu0, proc0 = time.thread_time(), time.process_time()
    started = clock()
    deadline = loop.time() + duration
    async with asyncio.TaskGroup() as tg:
        for i in range(concurrency):
            tg.create_task(producer(i))
    if acks != Acks.ALL:
        await part.flush()  # what was written counts once it is on disk too
    return Run(
        sum(counts),
        sum(sizes),
        clock() - started,
        latencies,
        time.thread_time() - cpu0,
        time.process_time() - proc0,
    )


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_append_case(base: Path, case: AppendCase, opt: Options) -> AppendResult:
    pool = make_pool(case.record_size, case.batch_records, max(8, min(case.concurrency, 64)))
    res = AppendResult(case, *(Spread([]) for _ in range(7)))
    for _ in range(opt.repeats):
        directory = base / f"append-{case.record_size}-{case.batch_records}-{case.concurrency}"
        counter = SyncCounter()
        part, _ = Partition.open(directory, fsync=counter)
        try:
            synced_before = counter.calls
            run = await timed_appends(part, pool, case.concurrency, opt.duration, case.acks)
            syncs = counter.calls - synced_before
        finally:
            await part.close()
            shutil.rmtree(directory)
        secs = run.seconds
        res.records_s.values.append(run.batches * case.batch_records / secs)
        res.mb_s.values.append(run.size / secs / 1e6)
        res.records_per_sync.values.append(run.batches * case.batch_records / max(1, syncs))
        res.p50_ms.values.append(quantile(run.latencies, 0.5) * 1e3)
        res.p99_ms.values.append(quantile(run.latencies, 0.99) * 1e3)
        res.loop_cpu.values.append(run.loop_cpu / secs * 100)
        res.process_cpu.values.append(run.process_cpu / secs * 100)
    say(
        f"append {case.record_size} B x {case.batch_records}, {case.concurrency} appender(s), "
        f"acks={case.acks.name}: {res.records_s.fmt()} records/s, {res.mb_s.fmt(digits=1)} MB/s"
    )
    return res


# ---------------------------------------------------------------------------- 3. reading
async def fill(part: Partition, pool: Sequence[bytes], target: int, *, per_request: int) -> None:
    """Append ``pool``'s batches round robin until the log holds ``target`` bytes, with 16
    concurrent ``acks=ALL`` requests of ``per_request`` batches each (disk-bound)."""
    loop = asyncio.get_running_loop()
    last_report = loop.time()

    async def producer(i: int) -> None:
        nonlocal last_report
        k = i * per_request
        while part.size_bytes < target:
            req = [pool[(k + j) % len(pool)] for j in range(per_request)]
            k += per_request * 16
            await part.append(req, Acks.ALL)
            if loop.time() - last_report > 5:
                last_report = loop.time()
                say(
                    f"  filling {part.name}: {part.size_bytes / MiB:,.0f} / {target / MiB:,.0f} MiB"
                )

    async with asyncio.TaskGroup() as tg:
        for i in range(16):
            tg.create_task(producer(i))


@dataclass
class ReadResult:
    record_size: int
    log_bytes: int
    records: int
    raw_records_s: Spread
    raw_mb_s: Spread
    decoded_records_s: Spread
    cold_raw_mb_s: Spread


def read_all(part: Partition, fetch: int, decode: bool) -> tuple[int, int]:
    """Read the partition from its start like a consumer: fetch ``fetch`` bytes, continue at
    the offset after the last batch returned. Returns (records, bytes)."""
    offset, hw = part.log_start_offset, part.high_watermark
    total_records = total_bytes = 0
    while offset < hw:
        data = part.read(offset, fetch)
        total_bytes += len(data)
        if decode:
            view = memoryview(data)
            for pos, header in records.iter_batches(data):
                total_records += len(
                    records.decode_records(view[pos : pos + header.batch_length], header)
                )
                offset = header.next_offset
        else:
            pos = 0
            while True:  # find the last batch: its header says where the next fetch starts
                _base, length = records.peek_length(data, pos)
                if pos + length >= len(data):
                    break
                pos += length
            header = records.parse_header(data, pos)
            offset = header.next_offset
    if not decode:
        total_records = offset - part.log_start_offset
    return total_records, total_bytes


async def run_reads(base: Path, record_size: int, opt: Options, fetch: int) -> ReadResult:
    directory = base / f"read-{record_size}"
    part, _ = Partition.open(directory)
    pool = make_pool(record_size, 100, 32)
    await fill(part, pool, opt.read_mib * MiB, per_request=8)
    raw_r, raw_mb, dec_r = Spread([]), Spread([]), Spread([])
    n_records = n_bytes = 0
    try:
        for _ in range(opt.repeats):
            started = time.perf_counter()
            n_records, n_bytes = read_all(part, fetch, decode=False)
            secs = time.perf_counter() - started
            raw_r.values.append(n_records / secs)
            raw_mb.values.append(n_bytes / secs / 1e6)
            started = time.perf_counter()
            decoded, _ = read_all(part, fetch, decode=True)
            dec_r.values.append(decoded / (time.perf_counter() - started))
            assert decoded == n_records, (decoded, n_records)
        cold = Spread([])
        for _ in range(opt.repeats):
            evict(directory)
            started = time.perf_counter()
            _, cold_bytes = read_all(part, fetch, decode=False)
            cold.values.append(cold_bytes / (time.perf_counter() - started) / 1e6)
    finally:
        await part.close()
        shutil.rmtree(directory)
    say(
        f"read {record_size} B records ({n_bytes / MiB:,.0f} MiB, fetch {fetch // 1024} KiB): "
        f"raw {raw_r.fmt()} records/s = {raw_mb.fmt()} MB/s warm, {cold.fmt()} MB/s cold; "
        f"decoded {dec_r.fmt()} records/s"
    )
    return ReadResult(record_size, n_bytes, n_records, raw_r, raw_mb, dec_r, cold)


# --------------------------------------------------------------------------- 4. recovery
@dataclass
class RecoveryRow:
    scenario: str
    cache: str
    log_bytes: int
    reports: list[RecoveryReport] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)  # the whole Partition.open call

    @property
    def seconds(self) -> Spread:
        """``RecoveryReport.seconds``: measured inside ``open`` before its final syncs and
        checkpoint write."""
        return Spread([r.seconds for r in self.reports])

    @property
    def wall(self) -> Spread:
        return Spread(self.walls)

    def add(self, measured: tuple[RecoveryReport, float]) -> None:
        self.reports.append(measured[0])
        self.walls.append(measured[1])


def reopen(
    directory: Path, scenario: str, cache: str, *, name: str
) -> tuple[RecoveryReport, float]:
    """Open the partition as a restarting node would; returns its report and the wall time
    of the whole ``Partition.open`` call."""
    if cache == "cold":
        evict(directory)
    else:
        prewarm(directory)
    started = time.perf_counter()
    part, report = Partition.open(directory, name=name)
    wall = time.perf_counter() - started
    part.close_sync()
    say(
        f"recovery {name}, {scenario}, {cache} cache: {report.seconds:.3f} s "
        f"(open() {wall:.3f} s), scanned {report.scanned_bytes / MiB:,.1f} MiB, "
        f"truncated {report.truncated_bytes} B"
    )
    return report, wall


def log_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.log"))


def crash(part: Partition) -> None:
    """Leave the files as a killed process would: no final sync, no final checkpoint. The
    flush task must be idle so no worker thread is still writing."""
    for seg in part.segments:
        seg.close()


def tear(directory: Path, batch: bytes) -> int:
    """Append the first half of a batch to the active segment: a torn write."""
    active = sorted(directory.glob("*.log"))[-1]
    half = batch[: len(batch) // 2]
    with open(active, "ab") as f:
        f.write(half)
    return len(half)


async def build(
    directory: Path, opt: Options, record_size: int, batch_records: int, label: str
) -> Partition:
    """An open partition holding ``recovery_mib`` MiB, written at full speed (acks=all)."""
    part, _ = Partition.open(directory, name=label)
    pool = make_pool(record_size, batch_records, 64)
    say(
        f"recovery {label}: writing {opt.recovery_mib} MiB of {record_size} B x "
        f"{batch_records} batches"
    )
    await fill(part, pool, opt.recovery_mib * MiB, per_request=max(1, MiB // len(pool[0])))
    return part


async def run_recovery(
    base: Path, opt: Options, record_size: int, batch_records: int, label: str
) -> list[RecoveryRow]:
    directory = base / f"recovery-{label}"
    rows: list[RecoveryRow] = []
    try:
        part = await build(directory, opt, record_size, batch_records, label)
        await part.close()
        size = log_size(directory)
        for cache in ("warm", "cold"):
            row = RecoveryRow("clean close, checkpoint present", cache, size)
            for _ in range(opt.repeats):
                row.add(reopen(directory, row.scenario, cache, name=label))
            rows.append(row)
        if label != "1kib":
            return rows
        for cache in ("warm", "cold"):
            row = RecoveryRow("no checkpoint (worst case: full scan)", cache, size)
            for _ in range(opt.repeats if cache == "warm" else 1):
                (directory / CHECKPOINT_FILE).unlink()
                row.add(reopen(directory, row.scenario, cache, name=label))
            rows.append(row)
        shutil.rmtree(directory)
        # crash: the partition is written at full speed and stopped dead at the end (no final
        # sync, no final checkpoint), then a torn half-batch is left at its tail
        for cache in ("warm", "cold"):
            row = RecoveryRow("crash at the end of writing + torn half-batch", cache, 0)
            for _ in range(opt.repeats):
                part = await build(directory, opt, record_size, batch_records, label)
                await part.flush()  # the flusher is idle: no worker thread still writing
                crash(part)
                tear(directory, make_pool(record_size, batch_records, 1)[0])
                row.log_bytes = log_size(directory)
                row.add(reopen(directory, row.scenario, cache, name=label))
                shutil.rmtree(directory)
            rows.append(row)
        return rows
    finally:
        if not opt.keep:
            shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------- profiling
async def profile_case(base: Path, case: AppendCase, duration: float) -> str:
    """cProfile of the event-loop thread (where the Python per-append work happens; the
    fdatasync threads only wait) during one append case."""
    pool = make_pool(case.record_size, case.batch_records, 64)
    directory = base / "profile"
    part, _ = Partition.open(directory)
    prof = cProfile.Profile()
    try:
        prof.enable()
        run = await timed_appends(part, pool, case.concurrency, duration, case.acks)
        prof.disable()
        batches, secs = run.batches, run.seconds
    finally:
        await part.close()
        shutil.rmtree(directory)
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(14)
    text = out.getvalue()
    body = text[text.index("   ncalls") :] if "   ncalls" in text else text
    lines = [ln.replace(str(REPO) + "/", "") for ln in body.rstrip().splitlines()]
    say(
        f"profiled {case.record_size} B x {case.batch_records}, {case.concurrency} appenders: "
        f"{batches * case.batch_records / secs:,.0f} records/s under the profiler"
    )
    head = (
        f"{batches:,} appends in {secs:.2f} s under cProfile "
        f"({batches / secs:,.0f} appends/s, {case.concurrency} appenders); "
        f"top functions by own time:"
    )
    return head + "\n\n```\n" + "\n".join(lines) + "\n```"


# ------------------------------------------------------------------------------ report
@dataclass
class Results:
    started: datetime
    machine: list[tuple[str, str]]
    disk: DiskResult | None = None
    appends: list[AppendResult] = field(default_factory=list)
    reads: list[ReadResult] = field(default_factory=list)
    recovery: dict[str, list[RecoveryRow]] = field(default_factory=dict)
    profiles: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    other_cpu_s: float = 0.0  # CPU seconds used by other processes during the run
    load_before: float = 0.0  # 1-minute load average when the run started
    load_after: float = 0.0
    other_top: list[tuple[str, float]] = field(default_factory=list)  # (command, CPU seconds)
    code: str = ""  # commit measured


# -------------------------------------------------------------------------------- main
async def run(opt: Options, base: Path, res: Results) -> None:
    say("1/4 disk ceiling")
    res.disk = disk_ceiling(base, opt)
    say(f"    1 MiB write+fdatasync: {res.disk.bandwidth:,.0f} MB/s (re-checked after appends)")

    say("2/4 appends")
    cases = [
        AppendCase(size, batch, n)
        for size in (200, 1024)
        for batch in (1, 100, 1000)
        for n in opt.concurrency
    ]
    # the event loop's ceiling for one appender: acks=none waits for nothing (each append
    # still queues a write and a sync; the clock stops once everything is synced)
    cases += [AppendCase(size, 1, 1, Acks.NONE) for size in (200, 1024)]
    for case in cases:
        res.appends.append(await run_append_case(base, case, opt))
    recheck_disk(base, opt, res.disk)

    say("3/4 reads")
    for size in (200, 1024):
        res.reads.append(await run_reads(base, size, opt, MiB))

    say("4/4 recovery")
    res.recovery["1kib"] = await run_recovery(base, opt, 1024, 100, "1kib")
    if opt.dense_index:
        res.recovery["dense"] = await run_recovery(base, opt, 200, 10, "dense")

    if opt.profile:
        say("profiling the small-batch cases")
        for case in (
            AppendCase(200, 1, max(opt.concurrency)),
            AppendCase(200, 100, max(opt.concurrency)),
        ):
            title = (
                f"{case.record_size} B x {case.batch_records}, {case.concurrency} "
                f"appenders, acks=all"
            )
            res.profiles.append((title, await profile_case(base, case, opt.duration * 2)))


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench.storage",
        description="Benchmark Herald's storage layer against the disk it runs on "
        "(appends with acks=all, reads, recovery) and write bench/RESULTS.md.",
    )
    p.add_argument(
        "--quick", action="store_true", help="~30 s smoke run: small sizes, one repeat, no profile"
    )
    p.add_argument(
        "--output",
        type=Path,
        default=REPO / "bench" / "RESULTS.md",
        help="results file; only its '## Storage' section is touched (default: %(default)s)",
    )
    p.add_argument("--no-write", action="store_true", help="print the results, write no file")
    p.add_argument(
        "--dir",
        type=Path,
        default=REPO / "bench" / "out",
        help="parent of the temporary data directory; keep it on the disk you "
        "want to measure (default: %(default)s)",
    )
    p.add_argument(
        "--concurrency",
        default="1,16,64",
        help="comma-separated numbers of concurrent appenders (default: %(default)s)",
    )
    p.add_argument("--repeats", type=int, help="runs per case (default 3, quick 1)")
    p.add_argument("--duration", type=float, help="seconds per append run (default 1.5, quick 0.4)")
    p.add_argument(
        "--recovery-mib", type=int, help="size of the recovery partition (default 1024, quick 256)"
    )
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile runs")
    p.add_argument("--keep", action="store_true", help="keep the data directory")
    a = p.parse_args(argv)
    q = a.quick
    return Options(
        out=a.output,
        parent=a.dir,
        quick=q,
        concurrency=sorted({int(x) for x in a.concurrency.split(",")}),
        repeats=a.repeats or (1 if q else 3),
        duration=a.duration or (0.4 if q else 1.5),
        disk_mib=64 if q else 256,
        warmup_mib=512 if q else 3072,
        read_mib=64 if q else 512,
        recovery_mib=a.recovery_mib or (256 if q else 1024),
        profile=not (q or a.no_profile),
        dense_index=not q,
        keep=a.keep,
        write=not a.no_write,
        command="python -m bench.storage" + (" " + " ".join(argv) if argv else ""),
    )


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    opt = parse_args(argv)
    opt.parent.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="storage-", dir=opt.parent))
    tmp_fs = mount_of(Path(tempfile.gettempdir()))
    say(f"data dir {base}: {disk_description(base)}")
    if tmp_fs[0] != mount_of(base)[0]:
        say(f"note: {tempfile.gettempdir()} is on {tmp_fs[0]}, a different filesystem; not used")
    res = Results(datetime.now(UTC), machine_description(base, libraries()))
    res.load_before = os.getloadavg()[0]
    res.code = code_version()
    if res.load_before > 0.5:
        say(f"warning: load average is {res.load_before:.2f}: other work will skew the figures")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the data on kill
    procs0 = process_cpu_seconds()
    started = time.perf_counter()
    runner_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=runner_factory) as runner:
            runner.run(run(opt, base, res))
    finally:
        if opt.keep:
            say(f"data kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
            try:
                opt.parent.rmdir()  # only if empty
            except OSError:
                pass
    res.seconds = time.perf_counter() - started
    others = top_other_cpu(procs0, process_cpu_seconds(), os.getpid(), n=None)
    res.other_cpu_s = sum(secs for _name, secs in others)
    res.load_after = os.getloadavg()[0]
    res.other_top = others[:4]
    say(
        f"other processes used {res.other_cpu_s:.1f} CPU-seconds during the run "
        f"({res.other_cpu_s / res.seconds:.0%} of one core on average): "
        + ", ".join(f"{name} {secs:.1f} s" for name, secs in res.other_top)
    )
    text = render(res, opt)
    if opt.write:
        write_section(opt.out, "Storage", "bench.storage", text)
        say(f"results written to the Storage section of {opt.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
