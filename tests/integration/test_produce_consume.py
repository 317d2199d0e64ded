"""Produce and consume through a real node: volume with per-partition order, and long-poll
fetch bounds."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest

from broker import protocol as p
from broker.client import Client, RecordMetadata
from broker.topics import partition_for_key
from storage import records

from .herald_process import HeraldProcess

RECORDS = 100_000
KEYS = 1_000
PARTITIONS = 6


def key_of(i: int) -> bytes:
    # a stride co-prime to KEYS spreads consecutive records over every key
    return b"user-%04d" % ((i * 7919) % KEYS)


async def test_100k_records_consumed_once_in_order_per_partition(herald: HeraldProcess) -> None:
    topic = "volume"
    async with await Client.connect(herald.host, herald.tcp_port) as client:
        await client.create_topic(topic, PARTITIONS)
        producer = await client.producer(linger_ms=5)
        seq: dict[bytes, int] = defaultdict(int)
        sent: list[tuple[bytes, bytes]] = []
        futures: list[asyncio.Future[RecordMetadata]] = []
        for i in range(RECORDS):
            key = key_of(i)
            value = b"%s:%06d:%06d" % (key, seq[key], i)
            seq[key] += 1
            sent.append((key, value))
            futures.append(producer.send_nowait(topic, value, key=key))
        await producer.flush()
        acked = [f.result() for f in futures]

        # the acknowledgements: each key on its partition, offsets dense and in send order
        by_partition: dict[int, list[int]] = defaultdict(list)
        for (key, _value), meta in zip(sent, acked, strict=True):
            assert meta.partition == partition_for_key(key, PARTITIONS)
            by_partition[meta.partition].append(meta.offset)
        assert sorted(by_partition) == list(range(PARTITIONS)), "keys did not spread"
        for offsets in by_partition.values():
            assert offsets == list(range(len(offsets)))

        consumer = await client.consumer(topic, group="volume-readers", session_timeout_ms=10_000)
        got: list[tuple[int, int, bytes | None, bytes]] = []
        deadline = time.monotonic() + 90
        while len(got) < RECORDS and time.monotonic() < deadline:
            for r in await consumer.getmany(timeout_ms=500):
                got.append((r.partition, r.offset, r.key, r.value))
        # a little more: nothing beyond what was produced may arrive
        for r in await consumer.getmany(timeout_ms=200):
            got.append((r.partition, r.offset, r.key, r.value))
        await consumer.close()

        assert len(got) == RECORDS
        expected = {(m.partition, m.offset): kv for kv, m in zip(sent, acked, strict=True)}
        consumed = {(part, off): (key, value) for part, off, key, value in got}
        assert len(consumed) == RECORDS, "a record was consumed twice"
        assert consumed == expected

        last_offset: dict[int, int] = {}
        last_seq: dict[bytes, int] = {}
        for part, off, key, value in got:
            assert off == last_offset.get(part, -1) + 1, f"partition {part}: {off} out of order"
            last_offset[part] = off
            assert key is not None
            key_seq = int(value.split(b":")[1])
            assert key_seq == last_seq.get(key, -1) + 1, f"{key!r}: seq {key_seq} out of order"
            last_seq[key] = key_seq

        # the group committed everything it consumed
        info = await client.describe_group("volume-readers")
        assert {(o.partition, o.committed, o.lag) for o in info.offsets} == {
            (part, len(offs), 0) for part, offs in by_partition.items()
        }


async def _produce_one(client: Client, topic: str, value: bytes) -> p.Produced:
    batch = records.encode_batch([(0, None, value)], first_timestamp=time.time_ns() // 1_000_000)
    resp = await client.request(p.Produce(id=0, topic=topic, partition=0, batches=[batch]))
    assert isinstance(resp, p.Produced)
    return resp


@pytest.mark.serial  # bounds elapsed time: run alone (make test)
async def test_long_poll_at_high_watermark_returns_empty_after_max_wait(
    herald: HeraldProcess,
) -> None:
    async with await Client.connect(herald.host, herald.tcp_port) as client:
        await client.create_topic("idle", 1)
        await _produce_one(client, "idle", b"first")
        hw = await client.list_offsets("idle", 0)
        assert hw == 1
        started = time.monotonic()
        (res,) = await client.fetch([("idle", 0, hw)], max_wait_ms=500)
        elapsed = time.monotonic() - started
        assert res.error is None
        assert res.records == b""
        assert res.high_watermark == 1
        # waited for (about) max_wait, and not much more
        assert 0.4 <= elapsed < 0.5 + 2.5, elapsed


@pytest.mark.serial  # bounds elapsed time: run alone (make test)
async def test_long_poll_returns_early_when_a_record_arrives(herald: HeraldProcess) -> None:
    async with (
        await Client.connect(herald.host, herald.tcp_port) as consumer,
        await Client.connect(herald.host, herald.tcp_port) as producer,
    ):
        await consumer.create_topic("wakeup", 1)
        started = time.monotonic()
        poll = asyncio.ensure_future(consumer.fetch([("wakeup", 0, 0)], max_wait_ms=20_000))
        await asyncio.sleep(0.3)
        assert not poll.done(), "the fetch did not wait for data"
        await _produce_one(producer, "wakeup", b"wake up")
        (res,) = await asyncio.wait_for(poll, 15)
        elapsed = time.monotonic() - started
        assert elapsed < 10, f"long poll ran {elapsed:.1f}s: it did not return on new data"
        values = [
            r.value
            for pos, h in records.iter_batches(res.records)
            for r in records.decode_records(res.records[pos : pos + h.batch_length], h)
        ]
        assert values == [b"wake up"]


async def batch_sizes(client: Client, topic: str) -> list[int]:
    """Record count of every batch in partition 0, in log order (one batch per request)."""
    (fetched,) = await client.fetch([(topic, 0, 0)], partition_max_bytes=16 * 1024 * 1024)
    data = bytes(fetched.records)
    return [h.record_count for _pos, h in records.iter_batches(data)]


async def test_linger_zero_batches_by_load_not_by_time(herald: HeraldProcess) -> None:
    """linger_ms=0: a record leaves at the end of its loop turn while the partition has
    fewer than ``partition_inflight`` requests unanswered; after that, records wait for a
    reply and leave together."""
    topic = "linger0"
    async with await Client.connect(herald.host, herald.tcp_port) as client:
        await client.create_topic(topic, 1)
        producer = await client.producer(linger_ms=0, partition_inflight=2)
        lone = producer.send_nowait(topic, b"alone", partition=0)
        await lone
        assert await batch_sizes(client, topic) == [1]

        # 200 records, each in its own loop turn: one request per record would be 200
        # batches; a round trip (with its fdatasync) spans many turns, so once two requests
        # are in flight the records that follow share one
        futures = []
        for i in range(200):
            futures.append(producer.send_nowait(topic, b"%03d" % i, partition=0))
            await asyncio.sleep(0)
        offsets = [(await f).offset for f in futures]
        assert offsets == list(range(1, 201))
        sizes = await batch_sizes(client, topic)
        assert sizes[0] == 1 and sum(sizes) == 201
        assert sizes[1] == 1, "the first record of an idle partition should not wait"
        assert len(sizes) - 1 <= 80, f"{len(sizes) - 1} requests for 200 records: {sizes}"
        assert max(sizes) > 1
