"""Scenario 4, ``POST /events`` over HTTP: clients with keep-alive connections post one event
per request (the same JSON body every time, no ``event_id``, so the node assigns a fresh UUID
to each and appends it durably before answering), and ``POST /events/batch`` with 1000 events
per request.

The main single-event row uses a lean client (:func:`raw_client`): a raw asyncio ``Protocol``
per connection that writes a prebuilt request and reads back only the status line,
``Content-Length`` and the body, one request in flight per connection and no pipelining, like
wrk. An aiohttp client spends ~100-120 us of CPU per request, as much as the server, so on a
machine where clients and server share two cores it measures the client as much as the node;
a load generator must not be the bound (the lean client needs ~12 us). The aiohttp-client
row is kept, labelled, so both are visible (it is also what a Python application posting
events would see).

The load comes from ``processes`` client processes (2 by default), each with its share of the
connections, and their counts are summed; every figure is reported with the client and server
CPU it took, so what bound it is visible.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bench.scenarios.measure import Sample, cpu_seconds, percentiles


@dataclass(frozen=True)
class Case:
    label: str
    path: str
    events_per_request: int
    connections: int  # in total, split between the processes
    client: str  # "raw" (raw_client) or "aiohttp" (client)
    profile: str | None  # the key of the node's profile taken during this case, if any


CASES = [
    Case(
        "POST /events, 1 event per request, 64 connections, lean raw-socket client",
        "/events",
        1,
        64,
        "raw",
        "http",
    ),
    Case(
        "POST /events, 1 event per request, 64 connections, aiohttp client",
        "/events",
        1,
        64,
        "aiohttp",
        None,
    ),
    Case(
        "POST /events/batch, 1000 events per request, 8 connections, aiohttp client",
        "/events/batch",
        1000,
        8,
        "aiohttp",
        "http-batch",
    ),
]


def event_body(events: int) -> bytes:
    """~200-byte events without a key, the default path: the node places them with its sticky
    partitioner (the keyless events of one fsync round share a partition)."""
    ev = {
        "topic": "bench.orders",
        "payload": {"order": 1234, "user": "user-1", "note": os.urandom(56).hex()},
    }
    if events == 1:
        return json.dumps(ev).encode()
    return json.dumps({"events": [ev] * events}).encode()


@dataclass
class ClientResult:
    requests: int
    events: int
    errors: int
    seconds: float
    cpu: float  # seconds of CPU this process used in the window
    latencies_ms: list[float]
    first_error: str = ""


class _Lane(asyncio.Protocol):
    """One keep-alive connection with one request in flight: write the prebuilt request, read
    the status line, ``Content-Length`` and the body, then write the next one, until
    ``deadline`` (loop time; None = stop after one answer)."""

    def __init__(self, wire: bytes, out: ClientResult) -> None:
        self.wire = wire
        self.out = out
        self.deadline: float | None = None
        self.buf = bytearray()
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] | None = None
        self.counting = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self, deadline: float | None, counting: bool) -> asyncio.Future[None]:
        self.deadline, self.counting = deadline, counting
        self.done = done = self.loop.create_future()
        self._send()
        return done

    def _send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.wire)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        end_of_head = buf.find(b"\r\n\r\n")
        if end_of_head < 0:
            return
        head = bytes(buf[:end_of_head]).lower()
        at = head.find(b"\r\ncontent-length:")
        length = 0
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        end = end_of_head + 4 + length
        if len(buf) < end:
            return
        status = int(buf[9:12])
        body = bytes(buf[end_of_head + 4 : end])
        del buf[:end]
        self._answered(status, body)

    def _answered(self, status: int, body: bytes) -> None:
        out = self.out
        if self.counting:
            out.latencies_ms.append((time.perf_counter() - self.sent_at) * 1000)
            if status == 200:
                out.requests += 1
            else:
                out.errors += 1
                out.first_error = (
                    out.first_error or f"{status} {body[:200].decode(errors='replace')}"
                )
        if self.deadline is not None and self.loop.time() < self.deadline:
            self._send()
        elif self.done is not None and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"server closed the connection: {exc}"))


async def raw_client(
    url: str, case: Case, connections: int, ready: Any, go: Any, seconds: float
) -> ClientResult:
    """Child: like :func:`client` with :class:`_Lane` connections instead of aiohttp."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = event_body(case.events_per_request)
    wire = (
        f"POST {case.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    out = ClientResult(0, 0, 0, 0.0, 0.0, [])
    lanes: list[_Lane] = []
    for _ in range(connections):
        _transport, lane = await loop.create_connection(lambda: _Lane(wire, out), host, port)
        lanes.append(lane)
    try:
        await asyncio.gather(*(lane.start(None, counting=False) for lane in lanes))  # warm up
        ready.set()
        await loop.run_in_executor(None, go.wait)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        deadline = loop.time() + seconds
        await asyncio.gather(*(lane.start(deadline, counting=True) for lane in lanes))
        out.seconds = time.perf_counter() - t0
        out.cpu = time.process_time() - cpu0
    finally:
        for lane in lanes:
            if lane.transport is not None:
                lane.transport.close()
    out.events = out.requests * case.events_per_request
    return out


async def client(
    url: str, case: Case, connections: int, ready: Any, go: Any, seconds: float
) -> ClientResult:
    """Child: open ``connections`` keep-alive connections (one request each), set ``ready``,
    wait for ``go``, then post for ``seconds``."""
    import aiohttp

    body = event_body(case.events_per_request)
    headers = {"Content-Type": "application/json"}
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    requests = errors = 0
    first_error = ""
    lat: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> tuple[int, str]:
            async with session.post(url + case.path, data=body, headers=headers) as resp:
                text = await resp.read()
                return resp.status, text[:200].decode(errors="replace")

        await asyncio.gather(*(one() for _ in range(connections)))
        ready.set()
        await loop.run_in_executor(None, go.wait)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        deadline = loop.time() + seconds

        async def lane() -> None:
            nonlocal requests, errors, first_error
            while loop.time() < deadline:
                t = time.perf_counter()
                status, text = await one()
                lat.append((time.perf_counter() - t) * 1000)
                if status == 200:
                    requests += 1
                else:
                    errors += 1
                    first_error = first_error or f"{status} {text}"

        await asyncio.gather(*(lane() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    return ClientResult(
        requests, requests * case.events_per_request, errors, elapsed, cpu, lat, first_error
    )


@dataclass
class HttpSample:
    sample: Sample
    requests: int
    p50_ms: float
    p99_ms: float
    first_error: str


def measure(url: str, server_pid: int, case: Case, seconds: float, processes: int) -> HttpSample:
    """One window: ``processes`` client processes start together; the server's CPU is read
    over the same window."""
    from bench.scenarios import worker

    per = [case.connections // processes] * processes
    per[0] += case.connections - sum(per)
    go = worker.Event()
    readies = [worker.Event() for _ in per]
    fn = raw_client if case.client == "raw" else client
    children = [
        worker.Child(fn, url, case, n, ready, go, seconds, name=f"http-client-{i}")
        for i, (n, ready) in enumerate(zip(per, readies, strict=True))
    ]
    try:
        for ready, child in zip(readies, children, strict=True):
            if not ready.wait(60):
                child.result(1)  # raises with the child's error
        go.set()
        s0, t0 = cpu_seconds(server_pid), time.perf_counter()
        time.sleep(seconds)
        s1, t1 = cpu_seconds(server_pid), time.perf_counter()
        results: list[ClientResult] = [c.result(seconds + 60) for c in children]
    finally:
        for c in children:
            c.stop()
    wall = max(r.seconds for r in results)
    lat: list[float] = []
    for r in results:
        lat.extend(r.latencies_ms)
    p50, p99 = percentiles(lat, (0.5, 0.99))
    sample = Sample(
        count=sum(r.events for r in results),
        seconds=wall,
        client_cpu=sum(r.cpu for r in results) / wall,
        server_cpu=(s1 - s0) / (t1 - t0),
        errors=sum(r.errors for r in results),
    )
    first_error = next((r.first_error for r in results if r.first_error), "")
    return HttpSample(sample, sum(r.requests for r in results), p50, p99, first_error)
