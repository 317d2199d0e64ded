"""Scenario 4, ``POST /events`` over HTTP: aiohttp clients with keep-alive connections post
one event per request (the same JSON body every time, no ``event_id``, so the node assigns a
fresh UUID to each and appends it durably before answering), and ``POST /events/batch`` with
1000 events per request.

One Python client process cannot drive an HTTP server on this machine: it spends as much CPU
per request as the server does. So the load comes from ``processes`` client processes (2 by
default), each with its share of the connections, and their counts are summed; every figure
is reported with the client and server CPU it took, so what bound it is visible.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from bench.scenarios.measure import Sample, cpu_seconds, percentiles


@dataclass(frozen=True)
class Case:
    label: str
    path: str
    events_per_request: int
    connections: int  # in total, split between the processes


CASES = [
    Case("POST /events, 1 event per request, 64 connections", "/events", 1, 64),
    Case("POST /events/batch, 1000 events per request, 8 connections", "/events/batch", 1000, 8),
]


def event_body(events: int) -> bytes:
    """~200-byte events without a key, the default path: the node partitions each by its
    fresh event_id, so they spread over all partitions of ``__events``."""
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
    children = [
        worker.Child(client, url, case, n, ready, go, seconds, name=f"http-client-{i}")
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
