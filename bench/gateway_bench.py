"""Benchmarks of the WebSocket gateway (``gateway/``), each writing its own section of
``bench/RESULTS.md``::

    python -m bench.gateway_bench idle --connections 1000,5000,10000
        # idle connections held by one node: its resident memory and open files per 1,000
    python -m bench.gateway_bench idle --workers 3 --connections 25000,50000
        # the same past one process's open files: gateway.workers = 3 worker processes
        # sharing ws-port; memory summed over the node and its workers
    python -m bench.gateway_bench broadcast --clients 10000 --runs 20
        # one broadcast -> N connected clients: time to the first, p50, p99 and last receipt
    python -m bench.gateway_bench latency --rate 1000 --seconds 10 --clients 1000 --repeats 3
        # POST /events (one user each) at a fixed rate -> the notification on that user's socket,
        # a fresh node per repeat, the median of each percentile and the host's speed per run
        # (--trace: and where the time goes, per stage of the node: bench/notify_trace.py)
    (broadcast and latency take --workers N too: the node with N gateway worker processes,
    each result in a block of its own beside the in-process gateway's)

The node is ``herald serve`` in a subprocess (its own process, so its memory and open files
are its own), with gateway keepalive pings off (the clients here do not answer them; a ping
costs no memory between pings). The clients are a minimal WebSocket client written on
``asyncio.Protocol`` (the handshake, then only the server's frames' headers are parsed and a
marker searched in the text) spread over ``--procs`` processes, so that the client side stays
cheap next to the node: the figures are the node's, plus one loopback hop and the client's
loop turn. Arrival times are ``time.perf_counter`` (CLOCK_MONOTONIC, one clock for every
process on the machine), taken in ``data_received``.

A process here may hold at most 20,000 open files (hard limit): the node needs one per
connection plus its own (~100), and each client process one per connection, so
``--connections`` stays below ~19,500 without ``--workers`` (with N workers, below N times
that), and ``--procs`` is chosen so that no client process holds more than 19,000. The
clients connect from 127.0.0.2-9 in turn (one source address has only ~28,000 ephemeral
ports towards one port).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from bench.results import write_section

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
OUT = REPO / "bench" / "out"
SECRET = "bench-gateway-secret-0123456789abcdef"
MARK = re.compile(rb'"bench": ?(\d+)')


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status(pid: int, field: str) -> int:
    """A numeric ``/proc/PID/status`` field (VmRSS, RssAnon, RssFile in KiB; PPid)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ----------------------------------------------------------------------- the clients
class Client(asyncio.Protocol):
    """One WebSocket client: the handshake, then the frames' headers only; a text frame
    with ``"bench":K`` in it calls ``seen(K, arrival)``. Answers pings (masked pong)."""

    def __init__(self, path: str, host: str, seen: Callable[[int, float], None]) -> None:
        self.path = path
        self.host = host
        self.seen = seen
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf + data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(buf[:80].decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            buf = buf[end + 4 :]
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1] & 0x7F
            head = 2
            if b1 == 126:
                if n - pos < 4:
                    break
                b1 = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif b1 == 127:
                if n - pos < 10:
                    break
                b1 = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if n - pos < head + b1:
                break
            payload = buf[pos + head : pos + head + b1]
            pos += head + b1
            opcode = b0 & 0x0F
            if opcode == 1:
                if not self.ready.done() and b'"type":"ready"' in payload:
                    self.ready.set_result(None)
                m = MARK.search(payload)
                if m is not None:
                    self.seen(int(m.group(1)), now)
            elif opcode == 9:  # ping -> pong, masked with a zero mask
                assert self.transport is not None and len(payload) < 126
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            elif opcode == 8:
                self.closed = True
        self.buf = buf[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before ready"))


def _mint(users: list[str]) -> list[str]:
    from gateway.auth import mint

    now = int(time.time())
    return [mint(SECRET.encode(), u, tenant="default", now_s=now, ttl_s=86_400) for u in users]


async def _client_proc(
    pipe: multiprocessing.connection.Connection, port: int, users: list[str]
) -> None:
    """One client process: connect ``users`` (a connection each), say ready, then answer
    ``("collect", k, n)``: the arrival times of marker ``k`` once ``n`` of its clients have it
    (or 30 s passed), and ``("stop",)``."""
    loop = asyncio.get_running_loop()
    arrivals: dict[int, list[float]] = {}
    changed = asyncio.Event()

    def seen(k: int, t: float) -> None:
        arrivals.setdefault(k, []).append(t)
        changed.set()

    tokens = _mint(users)
    clients: list[Client] = []
    host = f"127.0.0.1:{port}"
    # source addresses 127.0.0.2-9 in turn: one address has ~28,000 ephemeral ports towards
    # one port, and the client processes together may hold more connections than that
    sources = [(f"127.0.0.{2 + k}", 0) for k in range(8)]
    for i in range(0, len(tokens), 200):  # in waves: the listen backlog is finite
        wave = []
        for j, token in enumerate(tokens[i : i + 200], i):

            def factory(t: str = token) -> Client:
                return Client(f"/?token={t}", host, seen)

            _, c = await loop.create_connection(
                factory,
                "127.0.0.1",
                port,
                local_addr=sources[j % len(sources)],
            )
            wave.append(c)
        await asyncio.wait_for(asyncio.gather(*(c.ready for c in wave)), 60)
        clients += wave
    pipe.send(("ready", len(clients), os.getpid()))
    while True:
        cmd = await loop.run_in_executor(None, pipe.recv)
        if cmd[0] == "stop":
            break
        _, k, want = cmd
        deadline = loop.time() + 30
        while len(arrivals.get(k, ())) < want and loop.time() < deadline:
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 0.5)
        pipe.send(("arrivals", k, arrivals.pop(k, [])))
    for c in clients:
        if c.transport is not None:
            c.transport.abort()


def _client_main(pipe: multiprocessing.connection.Connection, port: int, users: list[str]) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.run(_client_proc(pipe, port, users))
    except ImportError:
        asyncio.run(_client_proc(pipe, port, users))


class Crowd:
    """``procs`` client processes holding one connection per user between them."""

    def __init__(self, port: int, users: list[str], procs: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        self.shares: list[int] = []
        for i in range(procs):
            share = users[i::procs]
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_client_main, args=(theirs, port, share), daemon=True)
            p.start()
            self.pipes.append(mine)
            self.procs.append(p)
            self.shares.append(len(share))
        self.pids: list[int] = []

    def wait_ready(self, within: float = 600) -> int:
        total = 0
        for pipe in self.pipes:
            if not pipe.poll(within):
                raise TimeoutError("client processes did not connect in time")
            msg = pipe.recv()
            total += msg[1]
            self.pids.append(msg[2])
        return total

    def collect(self, k: int, per_proc: list[int] | None = None) -> list[float]:
        want = per_proc or self.shares
        for pipe, n in zip(self.pipes, want, strict=True):
            pipe.send(("collect", k, n))
        out: list[float] = []
        for pipe in self.pipes:
            out += pipe.recv()[2]
        return out

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


# ----------------------------------------------------------------------------- node
class NodeProcess:
    """``herald serve`` on a fresh data directory, gateway pings off, the token secret
    known to the clients."""

    def __init__(
        self,
        base: Path,
        extra: str = "",
        workers: int = 0,
        trace: Path | None = None,
        partitions: int = 0,
    ) -> None:
        self.base = base
        self.http = free_port()
        self.ws = free_port()
        config = base / "herald.toml"
        # partitions > 0: of every internal topic on this path (__events, __deliver.*,
        # __audit, __inapp) instead of the node's defaults
        per_topic = f"partitions = {partitions}\n" if partitions else ""
        events = f"[topics]\nevents-partitions = {partitions}\n\n" if partitions else ""
        config.write_text(
            '[notify]\nchannels = ["inapp", "null"]\ndefault-channels = ["inapp"]\n'
            f"{per_topic}\n{events}"
            f'[gateway]\ntoken-secret = "{SECRET}"\nping-interval-ms = 0\n{per_topic}'
            f"max-connections = 100000\nworkers = {workers}\n\n"
            # every client here comes from 127.0.0.1
            "[admission]\nmax-connections-per-address = 100000\n"
            "max-unauthenticated-per-address = 100000\n" + extra
        )
        self.log = open(base / "serve.log", "w")  # noqa: SIM115 - closed in stop()
        herald = shutil.which("herald", path=str(Path(sys.executable).parent)) or "herald"
        # with a trace: the same node, with the stage marks of bench/notify_trace.py
        command = [sys.executable, "-m", "bench.notify_trace", str(trace)] if trace else [herald]
        self.proc = subprocess.Popen(
            [
                *command,
                "serve",
                "--config",
                str(config),
                "--data-dir",
                str(base / "data"),
                "--http-port",
                str(self.http),
                "--tcp-port",
                str(free_port()),
                "--ws-port",
                str(self.ws),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.url = f"http://127.0.0.1:{self.http}"

    async def ready(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as s:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(f"{self.url}/healthz") as r:
                        if r.status == 200:
                            return
                if self.proc.poll() is not None:
                    raise RuntimeError(f"herald serve exited: see {self.base / 'serve.log'}")
                await asyncio.sleep(0.05)
        raise TimeoutError("herald serve did not become healthy")

    def rss_kib(self) -> int:
        return proc_status(self.proc.pid, "VmRSS")

    def workers(self) -> list[int]:
        """The pids of the node's gateway worker processes (its children)."""
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if proc_status(int(entry), "PPid") == self.proc.pid:
                        out.append(int(entry))
        return sorted(out)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _procs_for(n: int, asked: int | None) -> int:
    return max(asked or 1, -(-n // 19_000))


def _fresh_dir(prefix: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=OUT))


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _header(command: str) -> str:
    load = os.getloadavg()
    return (
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {_commit()}, "
        f"{os.cpu_count()} CPUs, load average before the run {load[0]:.2f}. Command: "
        f"`{command}`\n\n"
    )


# ---------------------------------------------------------------------------- idle
async def scenario_idle(args: argparse.Namespace) -> str:
    if args.workers:
        return await scenario_idle_workers(args)
    counts = [int(c) for c in (args.connections or "1000,5000,10000").split(",")]
    rows = []
    for n in counts:
        base = _fresh_dir("gateway-idle-")
        node = NodeProcess(base)
        crowd: Crowd | None = None
        try:
            await node.ready()
            await asyncio.sleep(1.0)
            rss0, fds0 = node.rss_kib(), open_files(node.proc.pid)
            t0 = time.perf_counter()
            crowd = Crowd(node.ws, [f"u{i:06d}" for i in range(n)], _procs_for(n, args.procs))
            held = crowd.wait_ready()
            connect_s = time.perf_counter() - t0
            await asyncio.sleep(2.0)  # let the connect bursts' garbage go
            rss1, fds1 = node.rss_kib(), open_files(node.proc.pid)
            anon = proc_status(node.proc.pid, "RssAnon")
            per = (rss1 - rss0) / held
            say(f"{held} idle: +{(rss1 - rss0) / 1024:.1f} MiB, {per:.1f} KiB per connection")
            rows.append(
                f"| {held:,} | {rss0 / 1024:.0f} | {rss1 / 1024:.0f} | {anon / 1024:.0f} "
                f"| {per:.1f} | {per * 1000 / 1024:.1f} | {fds1 - fds0:,} | {connect_s:.1f} |"
            )
        finally:
            if crowd is not None:
                crowd.stop()
            node.stop()
            shutil.rmtree(base, ignore_errors=True)
    return (
        _header(f"python -m bench.gateway_bench idle --connections {','.join(map(str, counts))}")
        + "| idle connections | node RSS before (MiB) | after (MiB) | of which anonymous "
        "(MiB) | KiB per connection | MiB per 1,000 | node fds added | connect time (s) |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


async def scenario_idle_workers(args: argparse.Namespace) -> str:
    """``idle --workers N``: the node with N gateway worker processes sharing ws-port; the
    clients in as many processes as their own 19,000-descriptor share needs. Memory is the
    resident set summed over the node and its workers."""
    counts = [int(c) for c in (args.connections or "25000").split(",")]
    rows = []
    for n in counts:
        base = _fresh_dir("gateway-idle-")
        node = NodeProcess(base, workers=args.workers)
        crowd: Crowd | None = None
        try:
            await node.ready()
            await asyncio.sleep(1.0)
            pids = [node.proc.pid, *node.workers()]
            assert len(pids) == args.workers + 1, f"expected {args.workers} workers: {pids}"
            rss0 = {p: proc_status(p, "VmRSS") for p in pids}
            fds0 = {p: open_files(p) for p in pids}
            t0 = time.perf_counter()
            crowd = Crowd(node.ws, [f"u{i:06d}" for i in range(n)], _procs_for(n, args.procs))
            held = crowd.wait_ready()
            connect_s = time.perf_counter() - t0
            await asyncio.sleep(3.0)  # let the connect bursts' garbage go
            rss1 = {p: proc_status(p, "VmRSS") for p in pids}
            fds1 = {p: open_files(p) for p in pids}
            total0, total1 = sum(rss0.values()), sum(rss1.values())
            per = (total1 - total0) / held
            spread = [fds1[p] - fds0[p] for p in pids[1:]]
            say(
                f"{held} idle over {args.workers} workers {spread}: node+workers "
                f"{total0 / 1024:.0f} -> {total1 / 1024:.0f} MiB, {per:.1f} KiB per connection"
            )
            rows.append(
                f"| {held:,} | {args.workers} | {len(crowd.procs)} "
                f"| {' / '.join(f'{c:,}' for c in spread)} "
                f"| {rss0[node.proc.pid] / 1024:.0f} -> {rss1[node.proc.pid] / 1024:.0f} "
                f"| {' / '.join(f'{rss1[p] / 1024:.0f}' for p in pids[1:])} "
                f"| {total0 / 1024:.0f} | {total1 / 1024:.0f} | {per:.1f} "
                f"| {max(fds1.values()):,} | {connect_s:.1f} |"
            )
        finally:
            if crowd is not None:
                crowd.stop()
            node.stop()
            shutil.rmtree(base, ignore_errors=True)
    return (
        _header(
            f"python -m bench.gateway_bench idle --workers {args.workers} "
            f"--connections {','.join(map(str, counts))}"
        )
        + "| idle connections | workers | client processes | connections per worker "
        "| node RSS (MiB) | worker RSS after (MiB) | node + workers before (MiB) "
        "| after (MiB) | KiB per connection | most fds in one process | connect time (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


# ----------------------------------------------------------------------- broadcast
async def _post(session: Any, url: str, body: dict[str, Any]) -> None:
    async with session.post(f"{url}/events", json=body) as r:
        if r.status >= 300:
            raise RuntimeError(f"POST /events: {r.status} {await r.text()}")


async def scenario_broadcast(args: argparse.Namespace) -> str:
    import aiohttp

    n = args.clients or 10_000
    runs = args.runs or 20
    base = _fresh_dir("gateway-broadcast-")
    node = NodeProcess(base, workers=args.workers)
    crowd: Crowd | None = None
    firsts, p50s, p99s, lasts = [], [], [], []
    everything: list[float] = []
    try:
        await node.ready()
        crowd = Crowd(node.ws, [f"u{i:06d}" for i in range(n)], _procs_for(n, args.procs))
        held = crowd.wait_ready()
        say(f"{held} clients connected; node RSS {node.rss_kib() / 1024:.0f} MiB")
        async with aiohttp.ClientSession() as session:
            for k in range(runs + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                await _post(
                    session,
                    node.url,
                    {"topic": "news", "broadcast": True, "payload": {"bench": k}},
                )
                got = await asyncio.get_running_loop().run_in_executor(None, crowd.collect, k)
                if len(got) < held:
                    raise RuntimeError(f"broadcast {k}: {len(got)} of {held} clients got it")
                lat = sorted((t - t0) * 1000 for t in got)
                if k == 0:
                    continue
                everything += lat
                firsts.append(lat[0])
                p50s.append(pct(lat, 0.5))
                p99s.append(pct(lat, 0.99))
                lasts.append(lat[-1])
                say(
                    f"run {k}: first {lat[0]:.1f} ms, p50 {pct(lat, 0.5):.1f} ms, "
                    f"p99 {pct(lat, 0.99):.1f} ms, last {lat[-1]:.1f} ms"
                )
                await asyncio.sleep(0.5)
    finally:
        if crowd is not None:
            crowd.stop()
        node.stop()
        shutil.rmtree(base, ignore_errors=True)
    med = statistics.median
    return (
        _header(
            f"python -m bench.gateway_bench broadcast --clients {n} --runs {runs}"
            + _workers_flag(args)
        )
        + f"One broadcast (`POST /events` with `broadcast: true`) to {held:,} connected "
        f"clients, {runs} runs after a warm-up; latency from just before the POST to each "
        "client's receipt (ms).\n\n"
        "| | first client | p50 | p99 | last client |\n|---|---|---|---|---|\n"
        f"| median of the runs | {med(firsts):.1f} | {med(p50s):.1f} | {med(p99s):.1f} "
        f"| {med(lasts):.1f} |\n"
        f"| worst run | {max(firsts):.1f} | {max(p50s):.1f} | {max(p99s):.1f} "
        f"| {max(lasts):.1f} |\n"
        f"| every receipt of every run | {min(everything):.1f} | {pct(everything, 0.5):.1f} "
        f"| {pct(everything, 0.99):.1f} | {max(everything):.1f} |\n"
    )


def _workers_flag(args: argparse.Namespace) -> str:
    """The command's ``--workers`` and ``--partitions`` parts, for the results' header."""
    flags = f" --workers {args.workers}" if args.workers else ""
    return flags + (f" --partitions {args.partitions}" if args.partitions else "")


# -------------------------------------------------------------------------- latency
def host_speed_s() -> float:
    """Seconds a bare Python loop of 10M additions takes here, now: the host's speed drifts
    (0.65-1.30 s on this VM over two days), and a latency at a saturated loop moves with it,
    so each run says which stretch it ran on."""
    started = time.perf_counter()
    total = 0
    for i in range(10_000_000):
        total += i
    return time.perf_counter() - started


@dataclass
class LatencyRun:
    lat: list[float]
    achieved: float
    errors: int
    missing: int
    speed_s: float
    directory: Path  # the node's data, deleted once every run is done
    breakdown: str = ""


async def scenario_latency(args: argparse.Namespace) -> str:
    """``--repeats`` runs (a fresh node and clients each), one row each, and the median of
    each percentile over them: one run's p99 moves by tens of per cent from run to run."""
    rate = args.rate or 1000
    seconds = args.seconds or 10
    n = args.clients or 1000
    repeats = max(1, args.repeats or 1)
    runs: list[LatencyRun] = []
    dirs: list[Path] = []
    try:
        for _ in range(repeats):
            # the disk settled first: the previous run's writeback drained, and its data
            # directory not deleted until every run is done (on a filesystem mounted with
            # `discard`, freeing a run's gigabyte made the next run's syncs slower: in
            # alternated pairs whichever ran second had the worse p99, either way round)
            os.sync()
            await asyncio.sleep(2)
            run = await _latency_run(args, rate, seconds, n)
            runs.append(run)
            dirs.append(run.directory)
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    qs = (0.5, 0.9, 0.99, 0.999)
    rows = []
    for i, r in enumerate(runs, 1):
        cells = " | ".join(f"{pct(r.lat, q):.1f}" for q in qs)
        rows.append(
            f"| {i} | {r.speed_s:.2f} | {r.achieved:,.0f} | {cells} | {max(r.lat):.1f} "
            f"| {r.errors} | {r.missing} |\n"
        )
    if repeats > 1:
        cells = " | ".join(f"**{statistics.median(pct(r.lat, q) for r in runs):.1f}**" for q in qs)
        worst = statistics.median(max(r.lat) for r in runs)
        rows.append(f"| median | | | {cells} | {worst:.1f} | | |\n")
    return (
        _header(
            f"python -m bench.gateway_bench latency --rate {rate} --seconds {seconds} --clients {n}"
            + (f" --repeats {repeats}" if repeats > 1 else "")
            + _workers_flag(args)
            + (" --trace" if args.trace else "")
        )
        + f"`POST /events` for one user each (of {n:,} connected) at {rate:,}/s offered for "
        f"{seconds} s after a 1 s warm-up, {repeats} run(s), each with a fresh node and "
        "clients; latency from just before the POST to the notification's receipt on the "
        "user's socket (ms). Host speed: a bare Python loop of 10M additions, timed just "
        "before each run (s; lower is faster).\n\n"
        "| run | host speed (s) | achieved/s | p50 | p90 | p99 | p99.9 | max | HTTP errors "
        "| never received |\n|---|---|---|---|---|---|---|---|---|---|\n"
        + "".join(rows)
        + "".join(r.breakdown for r in runs)
    )


async def _latency_run(args: argparse.Namespace, rate: int, seconds: int, n: int) -> LatencyRun:
    import aiohttp

    speed_s = host_speed_s()
    base = _fresh_dir("gateway-latency-")
    trace = base / "trace.jsonl" if args.trace else None
    node = NodeProcess(base, workers=args.workers, trace=trace, partitions=args.partitions)
    crowd: Crowd | None = None
    users = [f"u{i:06d}" for i in range(n)]
    traced: dict[str, tuple[int, int]] = {}  # with --trace: event id -> (POST, arrival) ns
    breakdown = ""
    total = rate * seconds
    warm = rate  # the first second is a warm-up
    procs = _procs_for(n, args.procs)
    try:
        await node.ready()
        crowd = Crowd(node.ws, users, procs)
        crowd.wait_ready()
        sent: dict[int, float] = {}
        failed: set[int] = set()
        errors = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:

            async def post(i: int) -> None:
                nonlocal errors
                sent[i] = time.perf_counter()
                body: dict[str, object] = {
                    "topic": "orders",
                    "users": [users[i % n]],
                    "payload": {"bench": i},
                }
                if trace is not None:  # known ids, to join the node's marks
                    body["event_id"] = _trace_id(i)
                try:
                    await _post(session, node.url, body)
                except (aiohttp.ClientError, RuntimeError):
                    errors += 1
                    failed.add(i)  # nothing to wait for

            tasks = set()
            start = time.perf_counter()
            for i in range(total + warm):
                due = start + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                t = asyncio.create_task(post(i))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
            achieved = (total + warm) / (time.perf_counter() - start)
        loop = asyncio.get_running_loop()
        lat: list[float] = []
        missing = 0
        # user i % n is in client process (i % n) % procs
        for i in range(warm, total + warm):
            if i in failed:
                continue
            share = [0] * procs
            share[(i % n) % procs] = 1
            got = await loop.run_in_executor(None, crowd.collect, i, share)
            if got:
                lat.append((got[0] - sent[i]) * 1000)
                traced[_trace_id(i)] = (int(sent[i] * 1e9), int(got[0] * 1e9))
            else:
                missing += 1
    finally:
        if crowd is not None:
            crowd.stop()
        node.stop()  # a traced node writes its marks as it exits
        if trace is not None:
            from bench.notify_trace import breakdown as trace_breakdown

            steps = ["post", "intake", "durable", "fanout", "out_acked:handled"]
            steps += ["out_acked:sending", "out_acked", "worker", "inapp_acked:handled"]
            steps += ["inapp_acked:sending", "inapp_acked", "reader", "pushed", "arrived"]
            breakdown = "\n" + trace_breakdown(trace, {rate: traced}, steps)
        if sys.exc_info()[1] is not None:  # a failed run: nobody else will delete it
            shutil.rmtree(base, ignore_errors=True)
        # else scenario_latency deletes it, once every run is done
    return LatencyRun(lat, achieved, errors, missing, speed_s, base, breakdown)


def _trace_id(i: int) -> str:
    """The event id of the ``i``-th event of a traced latency run (a UUID, as the API
    wants)."""
    return f"00000000-0000-4000-8000-{i:012x}"


SCENARIOS = {
    "idle": ("Gateway: idle connections and memory", scenario_idle),
    "broadcast": ("Gateway: one broadcast to N clients", scenario_broadcast),
    "latency": ("Gateway: POST /events to WebSocket receipt", scenario_latency),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_bench", description=__doc__)
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--connections", help="idle: comma-separated connection counts")
    parser.add_argument("--clients", type=int, help="broadcast/latency: connected clients")
    parser.add_argument("--runs", type=int, help="broadcast: measured broadcasts")
    parser.add_argument("--rate", type=int, help="latency: events per second offered")
    parser.add_argument("--seconds", type=int, help="latency: measured seconds")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="latency: runs, each with a fresh node (default 3; the median is reported)",
    )
    parser.add_argument("--procs", type=int, help="client processes (default: 1 per 19,000)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="gateway.workers of the node (default 0: in-process gateway)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=0,
        help="latency: partitions of the internal topics on the way (__events, __deliver.*, "
        "__audit, __inapp; default: the node's, 8 each)",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="latency: also time each event's stages in the node (bench/notify_trace.py)",
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    for name in names:
        title, run = SCENARIOS[name]
        text = asyncio.run(run(args))
        print(f"## {title}\n\n{text}")
        if not args.no_write:
            # with --workers, a block of its own in the section: both tables stay; with
            # --partitions, one per count
            owner = f"bench.gateway_bench {name}" + (" --workers" if args.workers else "")
            owner += f" --partitions {args.partitions}" if args.partitions else ""
            write_section(RESULTS, title, owner, text)


if __name__ == "__main__":
    main()
