"""Scenario 2, consume with acknowledgement: one consumer in one Python asyncio process
(uvloop) reads a pre-filled stream of 200-byte messages and acknowledges what it read, as a
member of a consumer group, as fast as it can.

* Redis: ``XREADGROUP COUNT 1000`` on a new group, the ``XACK`` of the previous read's ids
  pipelined with the next read (one round trip per read; the last XACK is awaited).
* NATS: a durable pull consumer with ``AckPolicy.ALL``; ``fetch(1000)`` and an ack of each
  fetch's last message (which acknowledges everything before it). nats-py's ``ack`` is a
  publish without a reply; the window ends after ``flush`` so every ack reached the server.
* Herald: ``Consumer`` in a new group, ``getmany`` (each record decoded into a
  ``ConsumerRecord``) then ``commit`` per fetch, awaited. A second row uses
  ``fetch_batches`` and decodes each batch with ``storage.records.decode_records`` (one
  msgspec call per batch): what a consumer that wants values, not objects, pays.

Each repeat consumes the whole pre-filled stream with a fresh group; the time from the first
read to the last acknowledgement is the window.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from bench.scenarios.measure import CpuMeter, Sample
from bench.scenarios.produce import HOST, MESSAGE_BYTES, nats_stream


@dataclass(frozen=True)
class Case:
    system: str
    label: str
    mode: str = ""


CASES = [
    Case("redis", "XREADGROUP COUNT 1000 + pipelined XACK"),
    Case("nats", "pull fetch(1000) + AckAll (ack last of each fetch)"),
    Case("herald", "getmany + commit per fetch (1 partition)", "getmany"),
    Case("herald", "fetch_batches + decode_records + commit per fetch", "batches"),
]


def _value() -> bytes:
    return os.urandom(MESSAGE_BYTES)


# ------------------------------------------------------------------------------ herald
async def herald(
    port: int,
    server_pid: int,
    case: Case,
    topic: str,
    count: int,
    repeats: int,
    ready: Any = None,
    stop_after: float | None = None,
) -> list[Sample]:
    """With ``ready`` (an Event), set it once the topic is filled; with ``stop_after``, stop
    repeating once that many seconds of consuming have passed (for profiling)."""
    from broker.client import Client
    from storage import records

    async with await Client.connect(HOST, port, client_id="bench-consume") as client:
        await client.create_topic(topic, 1, exist_ok=True)
        producer = await client.producer(acks=-1, max_inflight=16)
        values = [_value() for _ in range(1000)]
        await asyncio.gather(
            *(producer.send_batch(topic, values, partition=0) for _ in range(count // 1000))
        )
        if ready is not None:
            ready.set()
        samples = []
        started = time.monotonic()
        for rep in range(repeats):
            if stop_after is not None and time.monotonic() - started > stop_after:
                break
            consumer = await client.consumer(
                topic,
                group=f"bench-{case.mode}-{rep}",
                auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_bytes=4 * 1024 * 1024,
            )
            meter = CpuMeter([server_pid])
            meter.start()
            got = 0
            while got < count:
                if case.mode == "getmany":
                    got += len(await consumer.getmany(timeout_ms=1000))
                else:
                    for _t, _p, data, start in await consumer.fetch_batches(timeout_ms=1000):
                        for pos, header in records.iter_batches(data, verify=True):
                            recs = records.decode_records(
                                data[pos : pos + header.batch_length], header
                            )
                            skip = max(0, start - header.base_offset)
                            got += len(recs) - skip
                await consumer.commit()
            meter.stop()
            samples.append(Sample(got, meter.wall, meter.client, meter.server[0]))
            await consumer.close()
        await client.delete_topic(topic)
    return samples


# ------------------------------------------------------------------------------- redis
async def redis(
    port: int, server_pid: int, case: Case, stream: str, count: int, repeats: int
) -> list[Sample]:
    import redis.asyncio as aioredis

    r = aioredis.Redis(host=HOST, port=port, max_connections=8)
    try:
        await r.delete(stream)
        fields: dict[Any, Any] = {b"v": _value()}
        for _ in range(count // 1000):
            pipe = r.pipeline(transaction=False)
            for _ in range(1000):
                pipe.xadd(stream, fields)
            await pipe.execute()
        samples = []
        for rep in range(repeats):
            group = f"bench-{rep}"
            await r.xgroup_create(stream, group, id="0")
            meter = CpuMeter([server_pid])
            meter.start()
            got = 0
            ids: list[bytes] = []
            while got < count:
                pipe = r.pipeline(transaction=False)
                if ids:
                    pipe.xack(stream, group, *ids)
                pipe.xreadgroup(group, "c1", {stream: ">"}, count=1000, block=1000)
                replies = await pipe.execute()
                ids = []
                for _name, entries in replies[-1] or []:
                    ids = [entry_id for entry_id, _fields in entries]
                got += len(ids)
            if ids:
                await r.xack(stream, group, *ids)
            meter.stop()
            pending = await r.xpending(stream, group)
            samples.append(
                Sample(got, meter.wall, meter.client, meter.server[0], errors=pending["pending"])
            )
        await r.delete(stream)
    finally:
        await r.aclose()
    return samples


# -------------------------------------------------------------------------------- nats
async def nats(
    url: str, server_pid: int, case: Case, stream: str, count: int, repeats: int
) -> list[Sample]:
    import nats as natslib
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    subject = f"{stream}.in"
    nc = await natslib.connect(url, pending_size=64 * 1024 * 1024)
    try:
        js = nc.jetstream(publish_async_max_pending=4000)
        await nats_stream(js, stream, subject)
        # fill with plain publishes (the stream captures the subject) and wait until the
        # stream holds them all: much faster than acknowledged publishes from Python
        body = _value()
        for i in range(count):
            await nc.publish(subject, body)
            if i % 10_000 == 0:
                await nc.flush()
        await nc.flush()
        for _ in range(600):
            if (await js.stream_info(stream)).state.messages >= count:
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"NATS stream {stream} never held {count} messages")
        samples = []
        for rep in range(repeats):
            durable = f"bench-{rep}"
            sub = await js.pull_subscribe(
                subject,
                durable=durable,
                stream=stream,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.ALL,
                    deliver_policy=DeliverPolicy.ALL,
                    max_ack_pending=-1,
                ),
            )
            meter = CpuMeter([server_pid])
            meter.start()
            got = 0
            while got < count:
                msgs = await sub.fetch(1000, timeout=5)
                got += len(msgs)
                await msgs[-1].ack()
            await nc.flush()
            meter.stop()
            await asyncio.sleep(0.2)  # let the server apply the last ack before asking
            info = await js.consumer_info(stream, durable)
            samples.append(
                Sample(got, meter.wall, meter.client, meter.server[0], errors=info.num_ack_pending)
            )
            await sub.unsubscribe()
        await js.delete_stream(stream)
    finally:
        await nc.close()
    return samples
