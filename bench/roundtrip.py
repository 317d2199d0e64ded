"""Where a one-at-a-time durable round trip goes, Herald against Redis-always, in place.

    python -m bench.roundtrip [--pairs 2] [--seconds 4] [--no-strace] [--floor]

Issue 12 asks one awaited ``acks=all`` record at a time to run at least at Redis-always's
rate (``bench.run --scenario single``). This runs the same workload (one 200-byte record to
one partition or stream, awaited, then the next) against a fresh Herald node and a fresh
``redis-server --appendfsync always``, alternated ``--pairs`` times, and says per request:

- the round trip (send call to acknowledgement) and the rate;
- the server's user and system CPU (``/proc/PID/stat``, every thread) and the client's
  (this process), per request;
- then, in a further window under ``strace -f -T -e trace=fdatasync`` (which slows the
  server: no rate is taken from it), the server's own ``fdatasync`` time per call: both
  servers sync a few hundred bytes before they answer, and this shows what that costs each
  of them in this pattern (a thread that sleeps between requests), as against a loop that
  only writes and syncs.

With ``--floor``, each round also runs :mod:`bench.peers.bare_produce`, a bare server of
Herald's protocol that checks, writes and syncs the batch and does nothing else, with the
same client: the rate no Python server of this protocol on this machine could pass, so that
Herald's gap to it is what its own layers cost.

Markdown on stdout, for ``bench/RESULTS.md`` (readings there are written by hand).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.machine import interpreter_description
from bench.peers.herald_node import REPO, HeraldNode
from bench.peers.process import HOST, PeerUnavailable, ServerProcess, free_port, port_open
from bench.peers.redis_server import RedisServer

OUT = Path(__file__).resolve().parent / "out"
TICK = os.sysconf("SC_CLK_TCK")
# "fdatasync(7) = 0 <0.000184>": a call strace saw start and end in one line
_SYSCALL_TIME = re.compile(r"fdatasync\(\d+\)\s+= 0 <([0-9.]+)>")


@dataclass
class Window:
    system: str
    records: int
    seconds: float
    rtt_us: list[float]
    server_user_s: float
    server_sys_s: float
    client_s: float
    fsync_us: list[float]


def _cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _loop(send: Callable[[], Awaitable[object]], seconds: float) -> list[float]:
    out: list[float] = []
    end = time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < end:
        await send()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


async def _measure(
    system: str, pid: int, send: Callable[[], Awaitable[object]], seconds: float, trace: bool
) -> Window:
    await _loop(send, 1.0)  # warm-up
    u0, s0 = _cpu(pid)
    c0 = time.process_time()
    t0 = time.perf_counter()
    rtt = await _loop(send, seconds)
    wall = time.perf_counter() - t0
    c1 = time.process_time()
    u1, s1 = _cpu(pid)
    fsync: list[float] = []
    if trace:
        log = OUT / f"roundtrip-strace-{pid}.txt"
        proc = await asyncio.create_subprocess_exec(
            *("strace", "-f", "-T", "-e", "trace=fdatasync", "-p", str(pid), "-o", str(log)),
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.sleep(0.5)  # attached
        await _loop(send, 2.0)
        proc.terminate()
        await proc.wait()
        for m in _SYSCALL_TIME.finditer(log.read_text()):  # whole calls only
            fsync.append(float(m.group(1)) * 1e6)
        log.unlink()
    return Window(system, len(rtt), wall, rtt, u1 - u0, s1 - s0, c1 - c0, fsync)


async def _one_at_a_time(system: str, port: int, pid: int, seconds: float, trace: bool) -> Window:
    """Herald's client, one awaited ``acks=all`` 200-byte record at a time, against the
    server on ``port`` (process ``pid``)."""
    from broker.client import Client

    value = b"x" * 200
    async with await Client.connect(HOST, port, client_id="roundtrip") as client:
        await client.create_topic("roundtrip", 1, exist_ok=True)
        producer = await client.producer(acks=-1, linger_ms=0.0)
        return await _measure(
            system, pid, lambda: producer.send("roundtrip", value, partition=0), seconds, trace
        )


async def _herald(base: Path, seconds: float, trace: bool) -> Window:
    node = HeraldNode(base)
    node.start()
    try:
        return await _one_at_a_time("Herald", node.tcp_port, node.pid, seconds, trace)
    finally:
        node.stop()


async def _bare(base: Path, seconds: float, trace: bool) -> Window:
    """The floor: :mod:`bench.peers.bare_produce` (Herald's protocol, the batch checked,
    written and synced, nothing else), with Herald's client."""
    port = free_port()
    server = ServerProcess(
        "bare produce",
        [sys.executable, "-m", "bench.peers.bare_produce", str(port), str(base / "bare.log")],
        log_path=base / "bare.out",
        cwd=REPO,
    )
    server.start(lambda: port_open(port))
    try:
        return await _one_at_a_time("Bare floor", port, server.pid, seconds, trace)
    finally:
        server.stop()


async def _redis(base: Path, seconds: float, trace: bool) -> Window:
    import redis.asyncio as aioredis

    server = RedisServer(base, appendfsync="always")
    server.start()
    r = aioredis.Redis(host=HOST, port=server.port)
    try:
        fields: dict[Any, Any] = {b"v": b"x" * 200}
        return await _measure(
            "Redis-always", server.pid, lambda: r.xadd("roundtrip", fields), seconds, trace
        )
    finally:
        await r.aclose()
        server.stop()


def _row(w: Window) -> str:
    n = max(w.records, 1)
    fs = (
        f"{_pct(w.fsync_us, 0.5):.0f} / {_pct(w.fsync_us, 0.9):.0f} ({len(w.fsync_us)})"
        if w.fsync_us
        else "not traced"
    )
    return (
        f"| {w.system} | {w.records / w.seconds:,.0f} | {_pct(w.rtt_us, 0.5):.0f} | "
        f"{_pct(w.rtt_us, 0.99):.0f} | {w.server_user_s / n * 1e6:.0f} | "
        f"{w.server_sys_s / n * 1e6:.0f} | {w.client_s / n * 1e6:.0f} | {fs} |"
    )


async def main_async(args: argparse.Namespace) -> None:
    trace = not args.no_strace and shutil.which("strace") is not None
    OUT.mkdir(exist_ok=True)
    windows: list[Window] = []
    for _ in range(args.pairs):
        for run in (_redis, _herald, _bare) if args.floor else (_redis, _herald):
            base = Path(tempfile.mkdtemp(prefix="roundtrip-", dir=OUT))
            try:
                windows.append(await run(base, args.seconds, trace))
            except PeerUnavailable as exc:
                print(f"skipped: {exc}")
            finally:
                shutil.rmtree(base, ignore_errors=True)
    cmd = "python -m bench.roundtrip " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k not in ("no_strace", "floor")
    )
    flag = (" --no-strace" if args.no_strace else "") + (" --floor" if args.floor else "")
    print(
        f"Command: `{cmd}{flag}`; {args.seconds} s windows after 1 s of warm-up, alternated "
        "(Redis-always first). CPU per request: the server's (every thread) user and "
        "system, the client's (one process, uvloop). Python "
        f"{platform.python_version()}, {interpreter_description()}, for the servers in "
        "Python and both clients.\n"
    )
    print(
        "| System | records/s | round trip p50 us | p99 us | server user us/req | "
        "server sys us/req | client CPU us/req | fdatasync p50 / p90 us (calls), under strace |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for w in windows:
        print(_row(w))
    for system in ("Redis-always", "Herald", "Bare floor"):
        rates = [w.records / w.seconds for w in windows if w.system == system]
        if rates:
            print(f"\n{system}: median {statistics.median(rates):,.0f} records/s over {len(rates)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.roundtrip",
        description="One-at-a-time durable round trip, Herald against Redis-always: rate, "
        "CPU per request and the servers' fdatasync time in place.",
    )
    ap.add_argument("--pairs", type=int, default=2, help="alternated pairs (default 2)")
    ap.add_argument("--seconds", type=float, default=4.0, help="measured window (default 4)")
    ap.add_argument(
        "--no-strace", action="store_true", help="skip the traced window (fdatasync times)"
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also run bench.peers.bare_produce (Herald's protocol, check, write, sync, "
        "reply and nothing else) in each round: what no Python server of it can avoid",
    )
    args = ap.parse_args(argv)
    import uvloop

    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
