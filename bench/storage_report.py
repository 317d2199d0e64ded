"""Markdown for the storage benchmark's section of ``bench/RESULTS.md``: the targets first,
then one table per measurement. Pure: takes the results, returns text."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storage.partition import Acks

if TYPE_CHECKING:
    from bench.storage import Options, Results

MiB = 1024 * 1024
TARGET_APPEND_RATIO = 0.5  # 1 KiB x 1000, acks=all: at least half the disk's bandwidth
TARGET_RECOVERY_S = 1.0  # a 1 GiB partition with a checkpoint opens in under a second


@dataclass
class Spread:
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, scale: float = 1.0, digits: int = 0) -> str:
        med = self.median / scale
        lo, hi = min(self.values) / scale, max(self.values) / scale
        if len(self.values) == 1:
            return f"{med:,.{digits}f}"
        return f"{med:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def render(res: Results, opt: Options) -> str:
    assert res.disk is not None
    disk_bw = res.disk.bandwidth
    out: list[str] = []
    w = out.append
    w(f"Command: `{opt.command}`, on commit {res.code}  ")
    w(
        f"Date: {res.started:%Y-%m-%d %H:%M} UTC; the run took {res.seconds:.0f} s"
        f"{' (quick mode: small sizes, one repeat; not for comparison)' if opt.quick else ''}.  "
    )
    w(f"Figures are medians of {opt.repeats} run(s), (min-max) in brackets; MB = 10^6 bytes.  ")
    w(
        f"Other load: 1-minute load average {res.load_before:.2f} at the start, "
        f"{res.load_after:.2f} at the end; processes alive at both ends other than this one used "
        f"{res.other_cpu_s:.1f} CPU-seconds during the run "
        f"({res.other_cpu_s / max(res.seconds, 1e-9):.0%} of one core on average; kernel "
        "threads doing this run's I/O count here). Most: "
        + (", ".join(f"`{name}` {secs:.1f} s" for name, secs in res.other_top) or "none")
        + "."
    )
    if res.other_cpu_s / max(res.seconds, 1e-9) > 0.15:
        w("")
        w(
            "**Other work shared the machine during this run**: CPU-bound figures (small "
            "batches, reads, decoding) are lower and noisier than on an idle machine."
        )
    w("")
    w("| Machine | |")
    w("|---|---|")
    for k, v in res.machine:
        w(f"| {k} | {v} |")
    w("")

    # targets first: they are what a reader wants to know
    target_row = next(
        (
            a
            for a in res.appends
            if (a.case.record_size, a.case.batch_records) == (1024, 1000)
            and a.case.acks == Acks.ALL
            and a.case.concurrency == max(opt.concurrency)
        ),
        None,
    )
    single_row = next(
        (
            a
            for a in res.appends
            if (a.case.record_size, a.case.batch_records) == (1024, 1000)
            and a.case.acks == Acks.ALL
            and a.case.concurrency == 1
        ),
        None,
    )
    with_checkpoint = [
        (label, r)
        for label, rows in res.recovery.items()
        for r in rows
        if not r.scenario.startswith("no checkpoint")
    ]
    w("### Targets")
    w("")
    w("| Target | Measured | Met |")
    w("|---|---|---|")
    if target_row is not None:
        for a in filter(None, (single_row, target_row)):
            ratio = a.mb_s.median / disk_bw
            n = a.case.concurrency
            w(
                f"| 1 KiB x 1000, acks=all >= {TARGET_APPEND_RATIO:.0%} of disk bandwidth "
                f"({disk_bw:.0f} MB/s) | {n} appender{'s' if n > 1 else ''}: "
                f"{a.mb_s.median:.0f} MB/s = {ratio:.0%} | "
                f"{'yes' if ratio >= TARGET_APPEND_RATIO else 'no'} |"
            )
    size_note = f"{opt.recovery_mib / 1024:g} GiB" if opt.recovery_mib != 1024 else "1 GiB"
    for label, row in with_checkpoint:
        worst = max(row.wall.values)
        met = "yes" if worst < TARGET_RECOVERY_S else "no"
        w(
            f"| recovery of {size_note} < {TARGET_RECOVERY_S:g} s with a checkpoint: "
            f"{label_text(label)}, {row.scenario}, {row.cache} cache | "
            f"open() {row.wall.fmt(digits=3)} s, worst {worst:.3f} s | {met} |"
        )
    w("")

    d = res.disk
    w("### 1. Physical ceiling (sequential append + `fdatasync`, no Herald code)")
    w("")
    w("| Write size, then fdatasync | Result |")
    w("|---|---|")
    w(
        f"| warm-up: {opt.warmup_mib} MiB in 1 MiB writes, one fdatasync, before anything else "
        f"| {d.warmup_mb_s:,.0f} MB/s (first touch of guest memory; not a disk figure) |"
    )
    for chunk, spread in d.chunk_mb_s.items():
        w(f"| {chunk // MiB} MiB chunks, {opt.disk_mib} MiB in all | {spread.fmt()} MB/s |")
    w(f"| 1 MiB chunks again, after the append runs | {d.recheck_mb_s.fmt()} MB/s |")
    w(
        f"| 200 B appends | {d.tiny_fsyncs.fmt()} fdatasyncs/s "
        f"(median latency {d.tiny_latency_us:.0f} µs) |"
    )
    w("")
    w(
        f"Denominator for the ratios below: **{disk_bw:,.0f} MB/s**, the better median of the "
        "two 1 MiB measurements."
    )
    w("")

    w("### 2. Appends, one batch per request, batches encoded in advance")
    w("")
    w(
        "`records/sync`: records per data `fdatasync` (group commit: appends that arrive "
        "during a sync share the next one). Latency: per append, call to acknowledgement. "
        "CPU: % of one core used by the event-loop thread / by the whole process (user + "
        "sys, so the kernel's copy into the page cache counts); the machine has "
        f"{os.cpu_count()} cores. Spread (min-max) on the throughput columns; medians "
        "elsewhere."
    )
    w("")
    w(
        "| Record | Batch | Appenders | acks | records/s | MB/s | of disk | records/sync "
        "| p50 ms | p99 ms | CPU loop / process |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for a in res.appends:
        c = a.case
        w(
            f"| {c.record_size} B | {c.batch_records} | {c.concurrency} | "
            f"{c.acks.name.lower()} | {a.records_s.fmt()} | {a.mb_s.fmt(digits=1)} | "
            f"{a.mb_s.median / disk_bw:.0%} | {a.records_per_sync.median:,.0f} | "
            f"{a.p50_ms.median:.2f} | {a.p99_ms.median:.2f} | "
            f"{a.loop_cpu.median:.0f}% / {a.process_cpu.median:.0f}% |"
        )
    w("")

    if res.reads:
        w("### 3. Sequential reads (`Partition.read`, 1 MiB fetches, batches of 100 records)")
        w("")
        w(
            "Raw: bytes as a fetch returns them (the broker's side). Decoded: a client "
            "walking `iter_batches` (checksums verified) and `decode_records` on every batch."
        )
        w("")
        w(
            "| Record | Log | Raw records/s | Raw MB/s (warm cache) | Raw MB/s (cold cache) "
            "| Decoded records/s |"
        )
        w("|---|---|---|---|---|---|")
        for r in res.reads:
            w(
                f"| {r.record_size} B | {r.log_bytes / MiB:,.0f} MiB, {r.records:,} records | "
                f"{r.raw_records_s.fmt()} | {r.raw_mb_s.fmt()} | {r.cold_raw_mb_s.fmt()} | "
                f"{r.decoded_records_s.fmt()} |"
            )
        w("")

    if res.recovery:
        w("### 4. Recovery (`Partition.open` on an existing partition)")
        w("")
        w(
            "Warm: the files are in the page cache (a restarted process). Cold: the "
            "partition's files were evicted with `posix_fadvise(DONTNEED)` first (a rebooted "
            "machine). Report seconds, scanned and truncated bytes come from the `RecoveryReport`; "
            "its clock stops before `open` syncs the last two segments and writes the new "
            "checkpoint, so the wall time of the whole `open` call is given too, and the "
            "target is judged on it."
        )
        w("")
        w(
            "| Log | Scenario | Cache | Report seconds | open() wall seconds | Scanned "
            "| Truncated | Checkpoint found |"
        )
        w("|---|---|---|---|---|---|---|---|")
        for label, rows in res.recovery.items():
            for row in rows:
                scanned = Spread([r.scanned_bytes / MiB for r in row.reports])
                cut = Spread([float(r.truncated_bytes) for r in row.reports])
                found = {r.checkpoint_found for r in row.reports}
                w(
                    f"| {label_text(label)}, {row.log_bytes / MiB:,.0f} MiB | {row.scenario} | "
                    f"{row.cache} | {row.seconds.fmt(digits=3)} | {row.wall.fmt(digits=3)} | "
                    f"{scanned.fmt(digits=1)} MiB | "
                    f"{cut.fmt()} B | {'/'.join(sorted(map(str, found)))} |"
                )
        w("")

    if res.profiles:
        w("### Profiles (generated)")
        w("")
        for title, text in res.profiles:
            w(f"**{title}**: {text}")
            w("")
    return "\n".join(out).rstrip() + "\n"


def label_text(label: str) -> str:
    return {"1kib": "1 KiB x 100", "dense": "200 B x 10 (dense index)"}.get(label, label)
