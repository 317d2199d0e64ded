"""What one write-and-sync round costs the event loop, by how many partitions share the work.

Why: the notification engine appends each stage's outputs keyed by user, so a batch of k
deliveries touches up to min(k, partitions) partitions of ``__deliver.<channel>``,
``__audit`` and ``__inapp``, and every partition touched is a round of its own (a ``pwritev``,
an fdatasync through io_uring, its completion, the acknowledgements). At 1,000 events/s
most rounds carry one record, so the loop's CPU per event grows with the partition count;
the gateway latency benchmark (``--partitions``) shows the effect end to end. This measures
the round alone, on the node's own storage (``storage.log.Log``, io_uring syncs), without
the broker or the engine: each turn appends one 300-byte record to each of ``per_turn``
partitions (round robin over ``partitions``), acks=all, and waits for every
acknowledgement before the next turn. The loop thread's CPU (``time.thread_time``: Python and
the system calls it makes) is divided by appends and by turns.

Run ``python -m bench.sync_rounds`` (``--no-write`` to only print).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

from bench.results import write_section
from bench.storage import code_version
from storage.log import Log
from storage.partition import PartitionConfig
from storage.records import encode_batch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
OUT = REPO / "bench" / "out"
TITLE = "Storage: loop CPU per write-and-sync round"
# (partitions, appends per turn): one lone append; one per partition of 8; 8 appends in one
# turn spread over 8, 2 and 1 partitions (8, 2 and 1 rounds per turn)
CASES = [(1, 1), (8, 1), (8, 8), (2, 8), (1, 8)]


async def one_case(base: Path, partitions: int, per_turn: int, turns: int) -> dict[str, float]:
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    log = Log(base, sync_engine="aio")
    log.open()
    log.create_topic("t", partitions, PartitionConfig())
    parts = [log.partition("t", i) for i in range(partitions)]
    record = [(0, None, b"x" * 300)]
    now = int(time.time() * 1000)

    async def turn(i: int) -> None:
        acks = []
        for j in range(per_turn):
            part = parts[(i * per_turn + j) % partitions]
            res = part.append_nowait([encode_batch(record, first_timestamp=now)])
            ack = part.durable_future(res.last_offset + 1)
            if ack is not None:
                acks.append(ack)
        if acks:
            await asyncio.gather(*acks)

    try:
        for i in range(200):  # warm-up: files grown, caches filled
            await turn(i)
        syncs0 = sum(p.syncs for p in parts)
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        for i in range(turns):
            await turn(i)
        cpu = time.thread_time() - cpu0
        wall = time.perf_counter() - wall0
        rounds = sum(p.syncs for p in parts) - syncs0
        aio = sum(p.aio_syncs for p in parts)
    finally:
        await log.close()
        shutil.rmtree(base, ignore_errors=True)
    appends = turns * per_turn
    return {
        "cpu_append_us": cpu / appends * 1e6,
        "cpu_round_us": cpu / max(rounds, 1) * 1e6,
        "cpu_turn_us": cpu / turns * 1e6,
        "wall_turn_us": wall / turns * 1e6,
        "rounds_per_turn": rounds / turns,
        "aio": float(aio),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sync_rounds",
        description="Loop CPU per write-and-sync round of the log, by partitions touched.",
    )
    parser.add_argument("--turns", type=int, default=2000, help="measured turns per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (median kept)")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="sync-rounds-", dir=OUT))
    load = os.getloadavg()[0]
    rows = []
    try:
        for partitions, per_turn in CASES:
            runs = []
            for r in range(args.repeats):
                print(f"partitions={partitions} per_turn={per_turn} run {r + 1}/{args.repeats}")
                runs.append(uvloop.run(one_case(base / "d", partitions, per_turn, args.turns)))
            med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            lo = min(run["cpu_append_us"] for run in runs)
            hi = max(run["cpu_append_us"] for run in runs)
            rows.append(
                f"| {partitions} | {per_turn} | {med['rounds_per_turn']:.2f} "
                f"| {med['cpu_append_us']:.1f} ({lo:.1f}-{hi:.1f}) | {med['cpu_round_us']:.1f} "
                f"| {med['cpu_turn_us']:.0f} | {med['wall_turn_us']:.0f} |"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    text = (
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {code_version()}, "
        f"{os.cpu_count()} CPUs, load average before the run {load:.2f}. Command: "
        f"`python -m bench.sync_rounds --turns {args.turns} --repeats {args.repeats}`\n\n"
        "Each turn appends one 300-byte record to each of *appends per turn* partitions "
        "(round robin over *partitions*), acks=all, and awaits every acknowledgement; "
        f"{args.turns:,} turns after 200 of warm-up, median of {args.repeats} runs. CPU is "
        "the event loop thread's (Python and its system calls); the fdatasyncs run in the "
        "kernel's io_uring workers and are not in it.\n\n"
        "| Partitions | Appends per turn | Rounds per turn | Loop CPU per append (us) "
        "| per round (us) | per turn (us) | Wall per turn (us) |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(text)
    if not args.no_write:
        write_section(RESULTS, TITLE, "bench.sync_rounds", text)


if __name__ == "__main__":
    main()
