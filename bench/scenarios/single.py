"""Scenario "single", one-at-a-time durable produce: one client process sends one 200-byte
record to one partition (stream), awaits its acknowledgement, then sends the next. Nothing is
pipelined and nothing is batched, so the rate is the inverse of one durable round trip: the
client's send, the server's write and fsync, the reply. It is the case where group commit
cannot help and every hand-off between processes and threads is paid in full.

* Herald: ``await Producer.send(topic, value, partition=0)`` with acks=all (the answer
  follows the fdatasync) and ``linger_ms=0``: the application's plain send-and-await.
* Redis-always: ``await XADD`` against the server with ``appendfsync always`` (the AOF is
  written and fsynced before the reply): the like-for-like peer.
* Redis: the same against ``appendfsync everysec`` (the reply comes from memory; the AOF is
  fsynced once a second): what durability costs Redis.

Each system runs a warm-up window (not counted), then ``repeats`` windows of ``seconds``; a
window counts the records acknowledged and times each round trip (send call to
acknowledgement, ``perf_counter_ns``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bench.scenarios.measure import CpuMeter, Sample, percentiles
from bench.scenarios.produce import HOST, payload

QS = (0.5, 0.99, 0.999)


@dataclass(frozen=True)
class Case:
    system: str  # "herald" | "redis-always" | "redis"
    label: str


CASES = [
    Case("redis-always", "XADD, awaited, appendfsync always"),
    Case("redis", "XADD, awaited, appendfsync everysec"),
    Case("herald", "Producer.send, awaited, acks=all, linger_ms=0"),
]


@dataclass
class SingleSample:
    """One window: the throughput sample and the round trips' percentiles, in ms."""

    sample: Sample
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    p999_ms: float = float("nan")
    max_ms: float = float("nan")
    slow: list[float] = field(default_factory=list)  # round trips over 20 ms, ms


def _window_result(lat_ns: list[int], meter: CpuMeter) -> SingleSample:
    ms = [x / 1e6 for x in lat_ns]
    p50, p99, p999 = percentiles(ms, QS)
    return SingleSample(
        Sample(len(ms), meter.wall, meter.client, meter.server[0]),
        p50,
        p99,
        p999,
        max(ms, default=float("nan")),
        sorted((x for x in ms if x > 20.0), reverse=True)[:10],
    )


async def _windows(
    send_one: Callable[[], Awaitable[None]],
    server_pid: int,
    seconds: float,
    repeats: int,
    warmup: float,
) -> list[SingleSample]:
    """Warm up, then ``repeats`` timed windows of one awaited send after another."""
    perf = time.perf_counter_ns

    async def window(length: float) -> list[int]:
        lat: list[int] = []
        deadline = perf() + int(length * 1e9)
        while True:
            t0 = perf()
            if t0 >= deadline:
                return lat
            await send_one()
            lat.append(perf() - t0)

    await window(warmup)
    out = []
    for _ in range(repeats):
        meter = CpuMeter([server_pid])
        meter.start()
        lat = await window(seconds)
        meter.stop()
        out.append(_window_result(lat, meter))
    return out


async def herald(
    port: int, server_pid: int, case: Case, topic: str, seconds: float, repeats: int, warmup: float
) -> list[SingleSample]:
    from broker.client import Client

    value = payload()
    async with await Client.connect(HOST, port, client_id="bench-single") as client:
        await client.create_topic(topic, 1, exist_ok=True)
        producer = await client.producer(acks=-1, linger_ms=0.0)

        async def send_one() -> None:
            await producer.send(topic, value, partition=0)

        samples = await _windows(send_one, server_pid, seconds, repeats, warmup)
        await client.delete_topic(topic)
    return samples


async def redis(
    port: int, server_pid: int, case: Case, stream: str, seconds: float, repeats: int, warmup: float
) -> list[SingleSample]:
    import redis.asyncio as aioredis

    fields: dict[Any, Any] = {b"v": payload()}
    r = aioredis.Redis(host=HOST, port=port)
    try:
        await r.delete(stream)

        async def send_one() -> None:
            await r.xadd(stream, fields)

        samples = await _windows(send_one, server_pid, seconds, repeats, warmup)
        await r.delete(stream)
    finally:
        await r.aclose()
    return samples
