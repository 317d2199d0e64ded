"""Scenario 1, durable produce: 200-byte messages from one Python asyncio client process
(uvloop), each system with its best batching, as many messages as it acknowledges in a
fixed window.

* Redis: pipelines of ``XADD`` (``transaction=False``), several pipelines in flight, each on
  its own connection (redis.asyncio's pool).
* NATS: ``js.publish_async`` (the client pipelines publishes and matches the acks), then
  ``publish_async_completed``.
* Herald: ``Producer.send_batch`` with acks=all (the ack follows the fdatasync), batches of
  100 or 1000 records, many requests in flight on one connection.

A window counts the messages acknowledged by the time the last in-flight request returns
(sending stops at the deadline; the drain is inside the window). Each workload runs a short
warm-up window first and does not count it.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from bench.scenarios.measure import CpuMeter, Sample

MESSAGE_BYTES = 200
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Case:
    system: str  # "herald" | "redis" | "nats"
    label: str
    batch: int
    inflight: int
    partitions: int = 1


CASES = [
    Case("redis", "pipeline of 1000 XADD, 4 pipelines in flight", 1000, 4),
    Case(
        "redis-benchmark",
        "reference, not Python: redis-benchmark (C), XADD, 4 connections, pipeline 1000",
        1000,
        4,
    ),
    Case("nats", "publish_async, 4000 pending", 4000, 1),
    Case("herald", "send_batch 100 records, 64 in flight, 1 partition", 100, 64),
    Case("herald", "send_batch 100 records, 256 in flight, 1 partition", 100, 256),
    Case("herald", "send_batch 1000 records, 16 in flight, 1 partition", 1000, 16),
    Case("herald", "send_batch 100 records, 64 in flight, 4 partitions", 100, 64, 4),
]


def payload() -> bytes:
    return os.urandom(MESSAGE_BYTES)


# ------------------------------------------------------------------------------ herald
async def herald_sizes(client: object, topic: str) -> int:
    from broker.client import Client

    assert isinstance(client, Client)
    (info,) = await client.metadata([topic])
    return sum(pi.size_bytes for pi in info.partitions)


async def herald(
    port: int, server_pid: int, case: Case, topic: str, seconds: float, repeats: int, warmup: float
) -> list[Sample]:
    from broker.client import Client

    loop = asyncio.get_running_loop()
    values = [payload() for _ in range(case.batch)]
    async with await Client.connect(HOST, port, client_id="bench-produce") as client:
        await client.create_topic(topic, case.partitions, exist_ok=True)
        producer = await client.producer(acks=-1, max_inflight=case.inflight)

        async def window(length: float) -> int:
            deadline = loop.time() + length
            count = 0

            async def lane() -> None:
                nonlocal count
                while loop.time() < deadline:
                    await producer.send_batch(topic, values)
                    count += len(values)

            await asyncio.gather(*(lane() for _ in range(case.inflight)))
            return count

        await window(warmup)
        samples = []
        for _ in range(repeats):
            before = await herald_sizes(client, topic)
            meter = CpuMeter([server_pid])
            meter.start()
            n = await window(seconds)
            meter.stop()
            after = await herald_sizes(client, topic)
            samples.append(Sample(n, meter.wall, meter.client, meter.server[0], after - before))
        await client.delete_topic(topic)
    return samples


# ------------------------------------------------------------------------------- redis
async def redis(
    port: int, server_pid: int, case: Case, stream: str, seconds: float, repeats: int, warmup: float
) -> list[Sample]:
    import redis.asyncio as aioredis

    loop = asyncio.get_running_loop()
    fields: dict[Any, Any] = {b"v": payload()}
    r = aioredis.Redis(host=HOST, port=port, max_connections=case.inflight + 2)
    try:
        await r.delete(stream)

        async def window(length: float) -> int:
            deadline = loop.time() + length
            count = 0

            async def lane() -> None:
                nonlocal count
                while loop.time() < deadline:
                    pipe = r.pipeline(transaction=False)
                    for _ in range(case.batch):
                        pipe.xadd(stream, fields)
                    await pipe.execute()
                    count += case.batch

            await asyncio.gather(*(lane() for _ in range(case.inflight)))
            return count

        await window(warmup)
        samples = []
        for _ in range(repeats):
            meter = CpuMeter([server_pid])
            meter.start()
            n = await window(seconds)
            meter.stop()
            samples.append(Sample(n, meter.wall, meter.client, meter.server[0]))
        await r.delete(stream)
    finally:
        await r.aclose()
    return samples


def redis_benchmark(
    port: int, server_pid: int, case: Case, stream: str, seconds: float, repeats: int, warmup: float
) -> list[Sample]:
    """The same XADDs from ``redis-benchmark``, Redis's own C client: what the Redis server
    does when the client is not the bound. A reference row, not a Python client, so the
    ratios and targets never use it."""
    import resource
    import subprocess
    import time

    from bench.peers.process import find_binary
    from bench.scenarios.measure import cpu_seconds

    exe = find_binary("redis-benchmark")
    cli = find_binary("redis-cli")
    if exe is None or cli is None:
        raise FileNotFoundError("redis-benchmark or redis-cli is not installed")
    value = "x" * MESSAGE_BYTES
    # about ``seconds`` at the ~200k/s this machine showed; the window is what it took
    n = max(10_000, int(200_000 * seconds))

    def run(count: int) -> None:
        argv = [exe, "-h", HOST, "-p", str(port), "-n", str(count), "-c", str(case.inflight)]
        argv += ["-P", str(case.batch), "-q", "XADD", stream, "*", "v", value]
        subprocess.run(argv, check=True, capture_output=True)

    run(max(1000, int(n * warmup / max(seconds, 0.1))))
    samples = []
    for _ in range(repeats):
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        s0, t0 = cpu_seconds(server_pid), time.perf_counter()
        run(n)
        wall = time.perf_counter() - t0
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        client = (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / wall
        samples.append(Sample(n, wall, client, (cpu_seconds(server_pid) - s0) / wall))
    subprocess.run([cli, "-h", HOST, "-p", str(port), "DEL", stream], capture_output=True)
    return samples


# -------------------------------------------------------------------------------- nats
async def nats_stream(js: object, name: str, subject: str) -> None:
    from nats.js import JetStreamContext
    from nats.js.api import StorageType
    from nats.js.errors import NotFoundError

    assert isinstance(js, JetStreamContext)
    try:
        await js.delete_stream(name)
    except NotFoundError:
        pass
    await js.add_stream(name=name, subjects=[subject], storage=StorageType.FILE, num_replicas=1)


async def nats(
    url: str, server_pid: int, case: Case, stream: str, seconds: float, repeats: int, warmup: float
) -> list[Sample]:
    import nats as natslib

    loop = asyncio.get_running_loop()
    body = payload()
    subject = f"{stream}.in"
    nc = await natslib.connect(url, pending_size=64 * 1024 * 1024)
    try:
        js = nc.jetstream(publish_async_max_pending=case.batch)
        await nats_stream(js, stream, subject)

        async def window(length: float) -> tuple[int, int]:
            deadline = loop.time() + length
            acked = errors = 0

            def done(fut: asyncio.Future[Any]) -> None:
                nonlocal acked, errors
                if fut.cancelled() or fut.exception() is not None:
                    errors += 1
                else:
                    acked += 1

            while loop.time() < deadline:
                for _ in range(100):
                    fut = await js.publish_async(subject, body)
                    fut.add_done_callback(done)
            await js.publish_async_completed()
            return acked, errors

        await window(warmup)
        samples = []
        for _ in range(repeats):
            meter = CpuMeter([server_pid])
            meter.start()
            n, errors = await window(seconds)
            meter.stop()
            samples.append(Sample(n, meter.wall, meter.client, meter.server[0], errors=errors))
        await js.delete_stream(stream)
    finally:
        await nc.close()
    return samples
