"""What the power-loss test filesystem (tests/system/powercut) costs: the same small file,
LMDB and Herald operations on a plain directory and on the mount, in operations per second.

    python -m bench.powercut_fs [--seconds S]

Prints a Markdown section for bench/RESULTS.md. Needs root and /dev/fuse (as the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lmdb

from broker.client import Client
from tests.integration.herald_process import HeraldProcess
from tests.system.powercut.control import PowerLossFS


def rate(n: int, fn: Callable[[int], object]) -> float:
    started = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - started)


def file_ops(root: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    fd = os.open(root / "f", os.O_CREAT | os.O_RDWR, 0o644)
    data = b"x" * 200
    out["pwrite 200 B (append)"] = rate(5000, lambda i: os.pwrite(fd, data, i * 200))

    def pwrite_sync(i: int) -> None:
        os.pwrite(fd, data, (5000 + i) * 200)
        os.fdatasync(fd)

    out["pwrite 200 B + fdatasync"] = rate(1000, pwrite_sync)
    out["pread 4 KiB (cached)"] = rate(5000, lambda i: os.pread(fd, 4096, (i * 4096) % 1_000_000))
    os.close(fd)
    env = lmdb.open(
        str(root / "lmdb"), map_size=1 << 30, sync=False, metasync=False, readahead=False
    )

    def put(i: int) -> None:
        with env.begin(write=True) as txn:
            txn.put(b"k%06d" % i, b"v" * 100)

    out["LMDB put + commit (NOSYNC)"] = rate(3000, put)

    def put_sync(i: int) -> None:
        put(10_000 + i)
        env.sync(True)

    out["LMDB put + commit + env.sync"] = rate(300, put_sync)
    with env.begin() as txn:
        out["LMDB get (mmap)"] = rate(50_000, lambda i: txn.get(b"k%06d" % (i % 3000)))
    env.close()
    return out


async def herald_ops(node: HeraldProcess, seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    async with await Client.connect(node.host, node.tcp_port) as client:
        await client.create_topic("bench", 1)
        producer = await client.producer(acks=-1, linger_ms=0)
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            await producer.send("bench", b"v" * 200, partition=0)
            n += 1
        out["herald: one acks=all record at a time"] = n / (time.perf_counter() - started)
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            futs = [producer.send_nowait("bench", b"v" * 200, partition=0) for _ in range(500)]
            await asyncio.gather(*futs)
            n += 500
        out["herald: acks=all, 500 in flight"] = n / (time.perf_counter() - started)
    return out


def measure(root: Path, seconds: float) -> dict[str, float]:
    results = file_ops(root)
    data = root / "herald"
    data.mkdir()
    node = HeraldProcess(data, root.parent / f"work-{root.name}")
    try:
        node.start()
        results.update(asyncio.run(herald_ops(node, seconds)))
    finally:
        node.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="powercut-bench-"))
    try:
        plain = base / "plain"
        plain.mkdir()
        direct = measure(plain, args.seconds)
        with PowerLossFS.start(base / "fs") as fs:
            mounted = measure(fs.mountpoint, args.seconds)
            stats = fs.stats()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("| Operation | plain directory (ops/s) | power-loss mount (ops/s) | ratio |")
    print("|---|---:|---:|---:|")
    for name, value in direct.items():
        m = mounted[name]
        print(f"| {name} | {value:,.0f} | {m:,.0f} | {m / value:.2f} |")
    per_op = {k: stats["op_seconds"][k] / v * 1e6 for k, v in stats["ops"].items() if v >= 100}
    print()
    print(
        "Daemon time per request (us, handler only): "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(per_op.items()))
    )
    print(f"\nKernel {platform.release()}, Python {platform.python_version()}")


if __name__ == "__main__":
    main()
