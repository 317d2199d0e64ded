"""Emails per second from one process to a local SMTP server (issue 16: "emails/s to a local
SMTP server"), written into the ``## Email`` section of ``bench/RESULTS.md``.

    python -m bench.emails            # ~40 s
    python -m bench.emails --quick    # ~8 s smoke run, writes nothing unless --write

What runs:

- a receiver in its own process: aiosmtpd (the SMTP server the tests use) on 127.0.0.1 with
  uvloop, whose handler parses every message with the standard library's ``email`` parser
  (as a mailbox provider would), counts it and answers ``250``; it prints its count when
  stopped;
- in this process, sender tasks, as a delivery worker's pool would run them, each looping
  ``await channel.send(delivery)`` on one shared :class:`channels.email.EmailChannel` (its
  bounded pool of reused SMTP connections, plain text on loopback: ``tls = "none"``) until
  the run's time is up. Every delivery is built anew with rendered text and HTML parts and
  the RFC 8058 unsubscribe headers, so the channel builds and encodes a full multipart
  message each time.

Rows: pool sizes 1, 4 and 8 (``[channels.email] pool-size``), twice as many sender tasks as
connections. CPU is measured for the sender (this process) and the receiver; the other
processes' CPU over the run is reported, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import uvloop

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import machine_description, process_cpu_seconds, top_other_cpu  # noqa: E402
from bench.results import write_section  # noqa: E402
from channels.base import Delivered, Delivery, EmailAddress, EmailContent  # noqa: E402
from channels.config import EmailConfig  # noqa: E402
from channels.email import EmailChannel  # noqa: E402

TEXT = (
    "Hello Ada,\n\nYour order 48213 has shipped with DHL (tracking JD014600006281230512).\n"
    "Items: 2 x A-1001, 1 x B-2002.\n\nThanks for shopping with us.\n"
)
HTML = (
    "<html><body><p>Hello Ada,</p><p>Your order <b>48213</b> has shipped with DHL "
    "(tracking <code>JD014600006281230512</code>).</p><ul><li>2 &times; A-1001</li>"
    "<li>1 &times; B-2002</li></ul><p>Thanks for shopping with us.</p></body></html>"
)


# ----------------------------------------------------------------------------- receiver
def serve(port: int) -> None:
    """The receiver process: ``ready`` on stdout once listening; on SIGTERM prints
    ``count <n> bytes <m>`` and exits."""
    from email import message_from_bytes

    from aiosmtpd.smtp import SMTP, Envelope, Session

    counts = {"n": 0, "bytes": 0}

    class Handler:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            raw = envelope.original_content or b""
            message_from_bytes(raw)  # parsed as a receiving server would
            counts["n"] += 1
            counts["bytes"] += len(raw)
            return "250 OK"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        handler = Handler()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="bench.local", data_size_limit=10 * 2**20),
            "127.0.0.1",
            port,
        )
        print("ready", flush=True)
        await stop
        server.close()
        print(f"count {counts['n']} bytes {counts['bytes']}", flush=True)

    uvloop.run(main())


class ReceiverProcess:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.emails", "--serve", str(self.port)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"the SMTP receiver did not start: {line!r}")

    def stop(self) -> tuple[int, int]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        for line in out.splitlines():
            if line.startswith("count "):
                _, n, _, b = line.split()
                return int(n), int(b)
        return 0, 0


# ------------------------------------------------------------------------------- sender
@dataclass
class Case:
    pool: int
    tasks: int
    seconds: float
    sent: int
    failed: int
    sender_cpu_s: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds


def delivery(i: int) -> Delivery:
    return Delivery(
        delivery_id=f"d-bench-{i:09d}",
        tenant="bench",
        user=f"user-{i % 1000}",
        topic="orders",
        event_id=f"e-{i:09d}",
        created_ms=int(time.time() * 1000),
        category="marketing",
        payload=msgspec.Raw(b'{"order":48213}'),
        address=EmailAddress(
            to=f"user-{i % 1000}@example.com",
            unsubscribe_url=f"https://herald.example.com/unsubscribe/tok{i:09d}.sig",
            ref=f"ref{i:09d}.sig",
        ),
        content=EmailContent(subject=f"Your order 48213 has shipped ({i})", text=TEXT, html=HTML),
    )


async def run_case(port: int, pool: int, seconds: float) -> Case:
    channel = EmailChannel(
        EmailConfig(
            host="127.0.0.1",
            port=port,
            tls="none",
            pool_size=pool,
            from_address="Herald <notifications@example.com>",
            local_hostname="bench.local",
            max_messages_per_connection=1000,
        )
    )
    counter = iter(range(10**9))
    sent = failed = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def sender() -> None:
        nonlocal sent, failed
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            outcome = await channel.send(delivery(next(counter)))
            latencies.append(time.perf_counter() - t0)
            if isinstance(outcome, Delivered):
                sent += 1
            else:
                failed += 1

    tasks = 2 * pool
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(tasks)))
    took = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    await channel.close()
    latencies.sort()
    return Case(
        pool=pool,
        tasks=tasks,
        seconds=took,
        sent=sent,
        failed=failed,
        sender_cpu_s=cpu,
        p50_ms=1000 * statistics.median(latencies) if latencies else 0.0,
        p99_ms=1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else 0.0,
    )


def render(
    cases: list[Case],
    received: tuple[int, int],
    receiver_cpu_s: float,
    opt: argparse.Namespace,
    started: float,
    took: float,
    load: tuple[float, float],
    others: str,
    commit: str,
) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    lines = [
        f"Run of {when}, commit {commit}, `python -m bench.emails"
        + (" --quick" if opt.quick else "")
        + f"`, {took:.0f} s in all; load average {load[0]:.2f} at the start, "
        f"{load[1]:.2f} at the end.",
        "",
    ]
    for key, value in machine_description(REPO, "aiosmtplib (client), aiosmtpd (receiver)"):
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "| pool-size | sender tasks | seconds | emails sent | emails/s | failed "
        "| send p50 ms | send p99 ms | sender CPU-us per email |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        per = 1e6 * c.sender_cpu_s / c.sent if c.sent else 0.0
        lines.append(
            f"| {c.pool} | {c.tasks} | {c.seconds:.1f} | {c.sent:,} | **{c.rate:,.0f}** "
            f"| {c.failed} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | {per:.0f} |"
        )
    total = sum(c.sent for c in cases)
    n, size = received
    lines += [
        "",
        f"The receiver parsed and counted {n:,} messages ({size / max(n, 1):,.0f} bytes each on "
        f"average) against {total:,} answered `250` to the sender"
        + (" (equal)" if n == total else " (NOT equal)")
        + f"; its CPU over the run: {receiver_cpu_s:.1f} s. Other processes' CPU: {others}.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.emails", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="~8 s smoke run; writes only with --write")
    p.add_argument("--seconds", type=float, default=12.0, help="per pool size (default 12)")
    p.add_argument("--pools", default="1,4,8", help="pool sizes to run (default 1,4,8)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md")
    p.add_argument("--write", action="store_true", help="write even with --quick")
    opt = p.parse_args(argv)
    if opt.quick:
        opt.seconds = 2.5
    else:
        opt.write = True
    opt.pools = [int(x) for x in opt.pools.split(",")]
    return opt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        serve(int(argv[1]))
        return 0
    opt = parse_args(argv)
    started, load0 = time.time(), os.getloadavg()[0]
    receiver = ReceiverProcess()
    cpu0 = process_cpu_seconds()
    try:
        cases = [uvloop.run(run_case(receiver.port, pool, opt.seconds)) for pool in opt.pools]
    finally:
        cpu1 = process_cpu_seconds()
        recv_pid = receiver.proc.pid
        received = receiver.stop()
    receiver_cpu = cpu1.get(recv_pid, ("", 0.0))[1] - cpu0.get(recv_pid, ("", 0.0))[1]
    for snapshot in (cpu0, cpu1):
        snapshot.pop(recv_pid, None)
    others = ", ".join(
        f"{name} {sec:.1f} s" for name, sec in top_other_cpu(cpu0, cpu1, os.getpid(), n=5)
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    took = time.time() - started
    report = render(
        cases,
        received,
        receiver_cpu,
        opt,
        started,
        took,
        (load0, os.getloadavg()[0]),
        others,
        commit,
    )
    print(report)
    if opt.write:
        write_section(opt.out, "Email", "bench.emails", report)
        print(f"\nwritten to {opt.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
