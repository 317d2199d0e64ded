"""What a server costs while nobody uses it: CPU and storage writes of an idle node.

A self-hosted node spends most of its life waiting; what it does then is a cost on every
machine it runs on (a laptop's battery, a small VM's CPU credits, an SSD's writes). Each
server here starts on a fresh data directory with its defaults (Herald: ``herald serve``
with every stage, the gateway and the housekeeping loops; Redis with ``appendfsync
always``; NATS with JetStream), is left alone for a settling time, then measured over a
window: its CPU time (user + system, all threads, ``/proc/PID/stat``) and the bytes it made
the kernel write to storage (``/proc/PID/io`` ``write_bytes``). No client connects.

Run ``python -m bench.idle_node`` (``--no-write`` to only print).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.peers.herald_node import HeraldNode
from bench.peers.nats_server import NatsServer
from bench.peers.redis_server import RedisServer
from bench.results import write_section
from bench.storage import code_version

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
OUT = REPO / "bench" / "out"
TITLE = "Idle node: CPU and storage writes with no client"
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _written(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def measure(server: Any, settle_s: float, window_s: float) -> tuple[float, float]:
    """Start ``server``, wait ``settle_s``, then over ``window_s``: (% of one core, KiB/s
    written to storage)."""
    server.start()
    try:
        time.sleep(settle_s)
        pid = server.pid
        cpu0, w0, t0 = _cpu_s(pid), _written(pid), time.monotonic()
        time.sleep(window_s)
        cpu1, w1, t1 = _cpu_s(pid), _written(pid), time.monotonic()
    finally:
        server.stop()
    return 100 * (cpu1 - cpu0) / (t1 - t0), (w1 - w0) / 1024 / (t1 - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_node", description=__doc__)
    parser.add_argument("--settle", type=float, default=8.0, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--repeats", type=int, default=3, help="runs per server")
    parser.add_argument("--no-write", action="store_true", help="only print")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    makers = {
        "Herald": HeraldNode,
        "Redis (appendfsync always)": lambda base: RedisServer(base, appendfsync="always"),
        "NATS (JetStream)": NatsServer,
    }
    rows = []
    for name, make in makers.items():
        runs = []
        for r in range(args.repeats):
            print(f"{name}: run {r + 1}/{args.repeats}", flush=True)
            base = Path(tempfile.mkdtemp(prefix="idle-", dir=OUT))
            try:
                runs.append(measure(make(base), args.settle, args.window))
            finally:
                shutil.rmtree(base, ignore_errors=True)
        cpu = [c for c, _w in runs]
        wrote = [w for _c, w in runs]
        rows.append(
            f"| {name} | {statistics.median(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f}) "
            f"| {statistics.median(wrote):.1f} ({min(wrote):.1f}-{max(wrote):.1f}) |"
        )
    text = (
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {code_version()}, "
        f"{os.cpu_count()} CPUs, load average before the run {load:.2f}. Command: "
        f"`python -m bench.idle_node --settle {args.settle:g} --window {args.window:g} "
        f"--repeats {args.repeats}`\n\n"
        f"Each server on a fresh data directory with its defaults, no client; after "
        f"{args.settle:g} s, {args.window:g} s measured; median (min-max) of "
        f"{args.repeats} runs. CPU is user + system time of every thread of the process "
        "as a share of one core; writes are what the process made the kernel write to "
        "storage (`/proc/PID/io` `write_bytes`).\n\n"
        "| Server | CPU, % of one core | Storage writes, KiB/s |\n"
        "|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(text)
    if not args.no_write:
        write_section(RESULTS, TITLE, "bench.idle_node", text)


if __name__ == "__main__":
    main()
