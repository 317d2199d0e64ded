"""Signed webhooks per second from one process to a local aiohttp receiver (issue 16: >= 5,000/s
per node), written into the ``## Webhooks`` section of ``bench/RESULTS.md``.

    python -m bench.webhooks            # ~1 minute
    python -m bench.webhooks --quick    # ~10 s smoke run, writes nothing unless --write

What runs:

- a receiver in its own process (aiohttp + uvloop, one per run), listening on 127.0.0.1 and,
  for the many-endpoint case, on 127.0.0.2..N as well (each address is its own endpoint: its
  own breaker, concurrency limit and connections); it verifies the signature of every 20th
  request with :func:`channels.signing.verify` and answers 204;
- in this process, 16 or 64 sender tasks, as a delivery worker's pool would run them, each
  looping ``await channel.send(delivery)`` on one shared :class:`WebhookChannel` until the
  run's time is up; every delivery is built, encoded and signed anew (two secrets: two
  signatures per request, as during a rotation);
- for scale, two rows without the channel: the signing alone, and a bare aiohttp POST loop with a
  fixed body and no signature (what the HTTP client and the receiver cost by themselves).

CPU is measured for the sender (this process) and the receiver; other processes' CPU over the
run is reported, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import uvloop

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import machine_description, process_cpu_seconds, top_other_cpu  # noqa: E402
from bench.results import write_section  # noqa: E402
from channels import signing  # noqa: E402
from channels.base import Delivered, Delivery, WebhookAddress  # noqa: E402
from channels.config import WebhookConfig  # noqa: E402
from channels.webhook import WebhookChannel  # noqa: E402

# a rotation in progress: two secrets, two signatures per request. Fixed, so that the receiver
# process knows them too (bench keys, never used anywhere else).
SECRETS = (
    signing.encode_secret(bytes(range(32))),
    signing.encode_secret(bytes(range(100, 132))),
)
PAYLOAD = msgspec.Raw(
    msgspec.json.encode(
        {
            "order": 48213,
            "status": "shipped",
            "carrier": "DHL",
            "tracking": "JD014600006281230512",
            "items": [{"sku": "A-1001", "qty": 2}, {"sku": "B-2002", "qty": 1}],
            "customer": {"id": "c-99120", "email": "ada@example.com"},
        }
    )
)
VERIFY_EVERY = 20


# ----------------------------------------------------------------------------- receiver
def serve(port: int, hosts: list[str]) -> None:
    """The receiver process: ``ready`` on stdout once listening; ``GET /stats`` answers its
    counts; SIGTERM stops it."""
    from aiohttp import web

    counts = {"received": 0, "verified": 0, "bad": 0}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        counts["received"] += 1
        if counts["received"] % VERIFY_EVERY == 0:
            try:
                signing.verify(body, request.headers, list(SECRETS), now=time.time())
                counts["verified"] += 1
            except Exception:
                counts["bad"] += 1
        return web.Response(status=204)

    async def bare(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counts)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/hook", hook)
        app.router.add_post("/bare", bare)  # unsigned posts of the bare-aiohttp row
        app.router.add_get("/stats", stats)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        for host in hosts:
            await web.TCPSite(runner, host, port, backlog=1024).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await runner.cleanup()

    uvloop.run(main())


class ReceiverProcess:
    def __init__(self, hosts: list[str]) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.hosts = hosts
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.webhooks", "--serve", str(self.port), *hosts],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError("the receiver did not start")

    def url(self, i: int) -> str:
        return f"http://{self.hosts[i % len(self.hosts)]}:{self.port}/hook"

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def stats(self) -> dict[str, int]:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{self.port}/stats") as r,
        ):
            result: dict[str, int] = await r.json()
            return result

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------- measuring
@dataclass
class Run:
    sends: int
    seconds: float
    sender_cpu: float  # fraction of one core
    receiver_cpu: float
    latencies: array  # type: ignore[type-arg]
    failures: int

    @property
    def rate(self) -> float:
        return self.sends / self.seconds


@dataclass
class Case:
    title: str
    runs: list[Run] = field(default_factory=list)
    verified: int = 0
    bad: int = 0

    def rates(self) -> list[float]:
        return [r.rate for r in self.runs]


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(
    send: Callable[[int], Coroutine[Any, Any, bool]],
    concurrency: int,
    seconds: float,
    receiver: ReceiverProcess,
) -> Run:
    """``concurrency`` tasks calling ``send(i)`` until ``seconds`` have passed."""
    deadline = time.perf_counter() + seconds
    counter = iter(range(1 << 62))
    latencies: array = array("d")  # type: ignore[type-arg]
    failures = 0

    async def worker() -> None:
        nonlocal failures
        clock = time.perf_counter
        while (start := clock()) < deadline:
            ok = await send(next(counter))
            latencies.append(clock() - start)
            failures += not ok

    r0, c0, t0 = (
        resource.getrusage(resource.RUSAGE_SELF),
        receiver.cpu_seconds(),
        time.perf_counter(),
    )
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    t1, r1, c1 = (
        time.perf_counter(),
        resource.getrusage(resource.RUSAGE_SELF),
        receiver.cpu_seconds(),
    )
    wall = t1 - t0
    own = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return Run(len(latencies), wall, own / wall, (c1 - c0) / wall, latencies, failures)


def delivery(i: int, url: str) -> Delivery:
    return Delivery(
        delivery_id=f"bench-{i}",
        tenant="bench",
        user=f"u{i % 1000}",
        topic="orders.shipped",
        event_id=f"e{i}",
        created_ms=1_764_000_000_000 + i,
        payload=PAYLOAD,
        address=WebhookAddress(url=url, secrets=SECRETS),
    )


@dataclass
class Spec:
    """One row: the channel (or bare aiohttp) with ``tasks`` senders over ``endpoints``."""

    title: str
    bare: bool
    endpoints: int
    tasks: int


def specs(opt: Options) -> list[Spec]:
    n, limit = opt.endpoints, opt.per_endpoint
    return [
        Spec(f"WebhookChannel, 1 endpoint, 16 senders (limit {limit})", False, 1, 16),
        Spec(f"WebhookChannel, 1 endpoint, 64 senders (limit {limit})", False, 1, 64),
        Spec(f"WebhookChannel, {n} endpoints, 64 senders (limit {limit} each)", False, n, 64),
        Spec("bare aiohttp POST, 1 endpoint, 16 senders (no Herald code)", True, 1, 16),
    ]


async def channel_run(spec: Spec, opt: Options, receiver: ReceiverProcess) -> Run:
    channel = WebhookChannel(
        WebhookConfig(
            allow_networks=["127.0.0.0/8"],
            concurrency_per_endpoint=opt.per_endpoint,
            pool_size=max(256, spec.tasks),
        )
    )
    urls = [receiver.url(i) for i in range(spec.endpoints)]

    async def send(i: int) -> bool:
        return isinstance(await channel.send(delivery(i, urls[i % len(urls)])), Delivered)

    try:
        await drive(send, spec.tasks, opt.warmup, receiver)
        return await drive(send, spec.tasks, opt.duration, receiver)
    finally:
        await channel.close()


async def bare_run(spec: Spec, opt: Options, receiver: ReceiverProcess) -> Run:
    """The HTTP client and the receiver alone: a fixed body, no signature, no guards."""
    body = (
        b'{"type":"orders.shipped","timestamp":"2025-11-24T16:00:00.000Z","data":'
        + bytes(PAYLOAD)
        + b"}"
    )
    url = receiver.url(0).replace("/hook", "/bare")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=spec.tasks)) as session:

        async def send(i: int) -> bool:
            async with session.post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as r:
                await r.read()
                return r.status == 204

        await drive(send, spec.tasks, opt.warmup, receiver)
        return await drive(send, spec.tasks, opt.duration, receiver)


async def run(opt: Options, receiver: ReceiverProcess) -> list[Case]:
    """Every case once per round, rounds repeated: noise from other work on a shared machine
    spreads over all cases instead of landing on one."""
    todo = specs(opt)
    cases = [Case(spec.title) for spec in todo]
    before = await receiver.stats()
    for _ in range(opt.repeats):
        for spec, case in zip(todo, cases, strict=True):
            runner = bare_run if spec.bare else channel_run
            case.runs.append(await runner(spec, opt, receiver))
    after = await receiver.stats()
    cases[0].verified = after["verified"] - before["verified"]
    cases[0].bad = after["bad"] - before["bad"]
    return cases


def signing_rate(secrets: int, seconds: float = 1.0) -> float:
    keys = [signing.decode_secret(s) for s in SECRETS[:secrets]]
    body = msgspec.json.encode({"type": "t", "timestamp": "x", "data": PAYLOAD})
    n, deadline = 0, time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        for i in range(1000):
            signing.webhook_headers(keys, f"bench-{i}", 1_764_000_000, body)
        n += 1000
    return n / (time.perf_counter() - start)


# ------------------------------------------------------------------------------ report
@dataclass
class Options:
    duration: float
    warmup: float
    repeats: int
    per_endpoint: int
    endpoints: int
    out: Path
    write: bool
    command: str


def render(
    cases: list[Case],
    sign_rates: dict[int, float],
    opt: Options,
    started: float,
    took: float,
    load: tuple[float, float],
    others: list[tuple[str, float]],
    commit: str,
) -> str:
    lines = [
        f"Command: `{opt.command}`, on commit {commit}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; the run took "
        f"{took:.0f} s.  ",
        f"Each row: median of {opt.repeats} run(s) of {opt.duration:g} s after a "
        f"{opt.warmup:g} s warm-up, (min-max) in brackets; the cases take turns, round after "
        "round. Senders: tasks each looping `await channel.send(delivery)`, as a delivery "
        "worker's pool would; the channel runs its default config but for the allow-list "
        "(127.0.0.0/8).  ",
        f"Other load: 1-minute load average {load[0]:.2f} at the start, {load[1]:.2f} at the "
        "end; other processes' CPU during the run: "
        + (", ".join(f"`{n}` {s:.1f} s" for n, s in others) or "none")
        + ".",
        "",
        "| Machine | |",
        "|---|---|",
    ]
    from importlib.metadata import version

    libs = ", ".join(f"{lib} {version(lib)}" for lib in ("aiohttp", "uvloop", "msgspec"))
    for label, value in machine_description(REPO, libs):
        if label != "Data dir":
            lines.append(f"| {label} | {value} |")
    channel_cases = [c for c in cases if "WebhookChannel" in c.title]
    best = max(channel_cases, key=lambda c: statistics.median(c.rates()))
    best_rate = statistics.median(best.rates())
    cost = statistics.median(r.sender_cpu / r.rate for c in channel_cases for r in c.runs)
    lines += [
        "",
        "### Target",
        "",
        "| Target | Measured | Met |",
        "|---|---|---|",
        f"| signed webhooks/s from one process >= 5,000 (issue 16) | {best_rate:,.0f}/s "
        f"({best.title}); the sender used {cost * 1e6:.0f} us of CPU per webhook, "
        f"{1 / cost:,.0f} per CPU-second | {'yes' if best_rate >= 5000 else 'no'} |",
        "",
        "### Results",
        "",
        "Latency: one `send`, call to outcome, over every send of the median run. CPU: share of "
        f"one core, median run; the machine has {os.cpu_count()}; us/webhook: the sender's CPU "
        "time per webhook, which other load on the machine changes far less than the rate. "
        "Failures: sends that were not `delivered`, over all runs.",
        "",
        "| Case | webhooks/s | p50 ms | p99 ms | sender CPU | us/webhook | receiver CPU "
        "| failures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        rates = c.rates()
        med = sorted(c.runs, key=lambda r: r.rate)[len(c.runs) // 2]
        lat = med.latencies
        lines.append(
            f"| {c.title} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"
            f" | {pct(lat, 0.5) * 1000:.2f} | {pct(lat, 0.99) * 1000:.2f} "
            f"| {med.sender_cpu:.0%} | {med.sender_cpu / med.rate * 1e6:.0f} "
            f"| {med.receiver_cpu:.0%} "
            f"| {sum(r.failures for r in c.runs)} |"
        )
    lines += [
        "",
        "Signatures checked by the receiver over the whole run (every 20th request, with "
        f"`channels.signing.verify`): {cases[0].verified:,} good, {cases[0].bad} bad.",
        "",
        "Signing alone (`signing.webhook_headers`, ~330-byte body, one core): "
        + ", ".join(f"{n} secret{'s' * (n > 1)}: {r:,.0f}/s" for n, r in sign_rates.items())
        + ".",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="~10 s smoke run; writes only with --write")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 5, quick 1)")
    p.add_argument("--repeats", type=int, help="runs per case (default 3, quick 1)")
    p.add_argument(
        "--per-endpoint",
        type=int,
        default=WebhookConfig().concurrency_per_endpoint,
        help="the channel's concurrency limit per endpoint (default: the config's, %(default)s)",
    )
    p.add_argument("--endpoints", type=int, default=8, help="endpoints in the spread case")
    p.add_argument("--output", type=Path, default=REPO / "bench" / "RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--write", action="store_true", help="write even with --quick")
    a = p.parse_args(argv)
    return Options(
        duration=a.duration or (1.0 if a.quick else 5.0),
        warmup=0.3 if a.quick else 1.0,
        repeats=a.repeats or (1 if a.quick else 3),
        per_endpoint=a.per_endpoint,
        endpoints=a.endpoints,
        out=a.output,
        write=(a.write or not a.quick) and not a.no_write,
        command="python -m bench.webhooks" + (" " + " ".join(argv) if argv else ""),
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        serve(int(argv[1]), argv[2:])
        return 0
    opt = parse_args(argv)
    started, load0 = time.time(), os.getloadavg()[0]
    receiver = ReceiverProcess([f"127.0.0.{i}" for i in range(1, opt.endpoints + 1)])
    cpu0 = process_cpu_seconds()
    try:
        cases = uvloop.run(run(opt, receiver))
        sign_rates = {1: signing_rate(1), 2: signing_rate(2)}
    finally:
        cpu1 = process_cpu_seconds()
        receiver.stop()
    for snapshot in (cpu0, cpu1):  # the receiver is reported in its own column
        snapshot.pop(receiver.proc.pid, None)
    others = top_other_cpu(cpu0, cpu1, os.getpid(), n=5)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    took = time.time() - started
    load = (load0, os.getloadavg()[0])
    report = render(cases, sign_rates, opt, started, took, load, others, commit)
    print(report)
    if opt.write:
        write_section(opt.out, "Webhooks", "bench.webhooks", report)
        print(f"\nwritten to {opt.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
