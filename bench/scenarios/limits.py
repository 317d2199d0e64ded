"""Scenario 5, the physical limits of this machine, measured in the same run as the
brokers: what the data disk does with ``write`` + ``fdatasync`` (bandwidth for 1 MiB appends,
syncs per second for 4 KiB appends) and what loopback TCP carries (one sender blasting 1 MiB
buffers at one receiver in another process). They are the denominators: a broker that acks
after fdatasync cannot beat the first two, and no figure here beats the third."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.scenarios.measure import Spread
from bench.storage import warm_page_cache  # one warm-up for both benchmarks

MiB = 1024 * 1024


@dataclass
class Limits:
    warmup_mb_s: float = 0.0
    disk_mb_s: Spread = field(default_factory=Spread)  # 1 MiB append + fdatasync
    fsyncs_per_s: Spread = field(default_factory=Spread)  # 4 KiB append + fdatasync
    fsync_ms: Spread = field(default_factory=Spread)  # median latency of one of those
    loopback_mb_s: Spread = field(default_factory=Spread)


def disk_bandwidth(base: Path, seconds: float, chunk: int = MiB) -> float:
    """Append ``chunk`` bytes and fdatasync, again and again, for ``seconds``: MB/s. The file
    grows, so each sync also commits the new size, as a log's does."""
    buf = os.urandom(chunk)
    path = base / "seq"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            written += os.write(fd, buf)
            os.fdatasync(fd)
        return written / (time.perf_counter() - t0) / 1e6
    finally:
        os.close(fd)
        path.unlink()


def fsync_rate(base: Path, seconds: float) -> tuple[float, float]:
    """4 KiB append + fdatasync in a loop for ``seconds``: (syncs per second, median ms)."""
    buf = os.urandom(4096)
    path = base / "tiny"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    lat = []
    try:
        t0 = now = time.perf_counter()
        deadline = t0 + seconds
        while now < deadline:
            os.write(fd, buf)
            os.fdatasync(fd)
            t = time.perf_counter()
            lat.append(t - now)
            now = t
        lat.sort()
        return len(lat) / (now - t0), lat[len(lat) // 2] * 1000
    finally:
        os.close(fd)
        path.unlink()


def sink(listen_port: int, ready: Any) -> int:
    """Child process: accept one connection on 127.0.0.1:``listen_port`` (``ready`` is set
    once listening), read to EOF into a 1 MiB buffer, return the byte count."""
    with socket.create_server(("127.0.0.1", listen_port)) as srv:
        ready.set()
        conn, _ = srv.accept()
        with conn:
            buf = bytearray(MiB)
            view = memoryview(buf)
            total = 0
            while True:
                n = conn.recv_into(view)
                if not n:
                    return total
                total += n


def loopback_bandwidth(seconds: float) -> float:
    """Loopback TCP: ``sendall`` of 1 MiB buffers to a receiver process for ``seconds``."""
    from bench.peers.process import free_port
    from bench.scenarios import worker

    port = free_port()
    ready = worker.Event()
    child = worker.Child(sink, port, ready, name="loopback-sink")
    try:
        if not ready.wait(30):
            raise RuntimeError("loopback receiver did not start")
        buf = os.urandom(MiB)
        with socket.create_connection(("127.0.0.1", port)) as s:
            sent = 0
            t0 = time.perf_counter()
            end = t0 + seconds
            while time.perf_counter() < end:
                s.sendall(buf)
                sent += len(buf)
            s.shutdown(socket.SHUT_WR)
            received = child.result(30)
            elapsed = time.perf_counter() - t0
        if received != sent:
            raise RuntimeError(f"loopback: sent {sent} bytes, receiver counted {received}")
        return sent / elapsed / 1e6
    finally:
        child.stop()


def measure(
    base: Path, repeats: int, seconds: float, warmup_mib: int, report: Callable[[str], None]
) -> Limits:
    out = Limits()
    out.warmup_mb_s = warm_page_cache(base, warmup_mib)
    report(
        f"limits: page-cache warm-up, {warmup_mib} MiB written once: {out.warmup_mb_s:,.0f} MB/s"
    )
    for i in range(repeats):
        out.disk_mb_s.values.append(disk_bandwidth(base, seconds))
        rate, ms = fsync_rate(base, seconds)
        out.fsyncs_per_s.values.append(rate)
        out.fsync_ms.values.append(ms)
        out.loopback_mb_s.values.append(loopback_bandwidth(seconds))
        report(
            f"limits {i + 1}/{repeats}: disk {out.disk_mb_s.values[-1]:,.0f} MB/s "
            f"(1 MiB write+fdatasync), {rate:,.0f} fdatasync/s (4 KiB, median {ms:.2f} ms), "
            f"loopback TCP {out.loopback_mb_s.values[-1]:,.0f} MB/s"
        )
    return out
