"""The client SDK's surface against a real node: ``send_nowait`` is a plain call returning a
future (records keep their order even while the topic's metadata is looked up),
``send_batch`` answers with metadata like ``send``, ``getmany(max_records=…)`` keeps what it
fetched for the next call, and committed offsets can be read back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker import protocol as p
from broker.client import BatchMetadata, BrokerError, Client, RecordMetadata
from storage import records

from .herald_process import HeraldProcess


@pytest.fixture
async def client(shared_herald: HeraldProcess) -> AsyncIterator[Client]:
    async with Client(shared_herald.host, shared_herald.tcp_port) as c:
        yield c


def count_fetches(client: Client) -> list[int]:
    """Count the client's fetch requests from now on: ``[n]``, updated in place."""
    fetches = [0]
    real_fetch = client.fetch

    async def counting_fetch(*args: Any, **kw: Any) -> Any:
        fetches[0] += 1
        return await real_fetch(*args, **kw)

    client.fetch = counting_fetch  # type: ignore[method-assign]
    return fetches


async def test_send_nowait_is_a_plain_call_and_keeps_order_on_a_new_topic(client: Client) -> None:
    producer = await client.producer(linger_ms=0)
    # an unknown topic: the first records wait for one metadata request (auto-create)
    futures = [producer.send_nowait("api-order", b"%03d" % i, partition=None) for i in range(50)]
    assert all(isinstance(f, asyncio.Future) for f in futures)
    metas = await asyncio.gather(*futures)
    assert all(isinstance(m, RecordMetadata) for m in metas)
    by_partition: dict[int, list[int]] = {}
    for m in metas:
        by_partition.setdefault(m.partition, []).append(m.offset)
    for offsets in by_partition.values():
        assert offsets == sorted(offsets)  # send order is offset order per partition
    await producer.close()


async def test_send_batch_answers_with_metadata_like_send(client: Client) -> None:
    await client.create_topic("api-batch", 1)
    producer = await client.producer()
    meta = await producer.send_batch("api-batch", [b"a", b"b", b"c"], partition=0)
    assert isinstance(meta, BatchMetadata)
    assert (meta.base_offset, meta.last_offset, meta.duplicate) == (0, 2, False)
    assert meta.record(2) == RecordMetadata("api-batch", 0, 2)
    await producer.close()


async def test_getmany_with_max_records_keeps_the_rest_for_the_next_call(client: Client) -> None:
    await client.create_topic("api-max", 1)
    producer = await client.producer()
    await producer.send_batch("api-max", [b"%04d" % i for i in range(1000)], partition=0)
    consumer = await client.consumer("api-max", group="api-max-g", auto_commit=False)
    fetches = count_fetches(client)
    got: list[bytes] = []
    while len(got) < 1000:
        got += [r.value for r in await consumer.getmany(timeout_ms=500, max_records=100)]
    assert got == [b"%04d" % i for i in range(1000)]
    assert fetches[0] == 1, "records fetched once were fetched again"
    # a position only covers records returned: commit after 100 of a fresh fetch
    await consumer.commit()
    assert await consumer.committed() == {("api-max", 0): 1000}
    await consumer.close()
    await producer.close()


async def test_getmany_with_max_records_across_partitions_moves_each_position_to_its_last_record(
    client: Client,
) -> None:
    await client.create_topic("api-runs", 2)
    producer = await client.producer()
    for partition in (0, 1):
        await producer.send_batch(
            "api-runs", [b"%d-%03d" % (partition, i) for i in range(300)], partition=partition
        )
    consumer = await client.consumer("api-runs", group="api-runs-g", auto_commit=False)
    fetches = count_fetches(client)
    returned = {("api-runs", 0): 0, ("api-runs", 1): 0}  # both start at the beginning
    calls: list[list[Any]] = []
    for want in (250, 100, 1, 300):  # the second call crosses from one partition to the other
        got = await consumer.getmany(timeout_ms=500, max_records=want)
        assert len(got) == want or sum(len(c) for c in calls) + len(got) == 600
        calls.append(got)
        for r in got:
            returned[(r.topic, r.partition)] = r.offset + 1
        assert {tp: consumer.positions.get(tp, 0) for tp in returned} == returned
    assert fetches[0] == 1, "both partitions came in one fetch: the test must cross within it"
    assert {r.partition for r in calls[1]} == {0, 1}
    assert sorted(r.value for c in calls for r in c) == sorted(
        b"%d-%03d" % (p, i) for p in (0, 1) for i in range(300)
    )
    await consumer.commit()
    assert await consumer.committed() == {("api-runs", 0): 300, ("api-runs", 1): 300}
    await consumer.close()
    await producer.close()


async def test_a_seek_drops_the_buffered_rest_of_that_partition_only(client: Client) -> None:
    await client.create_topic("api-seek", 2)
    producer = await client.producer()
    for partition in (0, 1):
        values = [b"%03d" % i for i in range(100)]
        await producer.send_batch("api-seek", values, partition=partition)
    consumer = await client.consumer("api-seek", group="api-seek-g", auto_commit=False)
    first = await consumer.getmany(timeout_ms=500, max_records=10)
    sought = first[0].partition
    other = 1 - sought
    consumer.seek("api-seek", sought, 90)
    rest: list[Any] = []
    for _ in range(10):  # until the other partition's 100 and the sought one's last 10
        rest += await consumer.getmany(timeout_ms=200)
        if len(rest) >= 110:
            break
    assert [r.offset for r in rest if r.partition == sought] == list(range(90, 100))
    assert [r.offset for r in rest if r.partition == other] == list(range(100))
    assert consumer.positions == {("api-seek", 0): 100, ("api-seek", 1): 100}
    await consumer.close()
    await producer.close()


async def test_a_commit_covers_only_the_records_the_application_got(client: Client) -> None:
    await client.create_topic("api-partial", 1)
    producer = await client.producer()
    await producer.send_batch("api-partial", [b"x"] * 500, partition=0)
    consumer = await client.consumer("api-partial", group="api-partial-g", auto_commit=False)
    first = await consumer.getmany(timeout_ms=500, max_records=120)
    assert [r.offset for r in first] == list(range(120))
    await consumer.commit()
    assert await consumer.committed([("api-partial", 0)]) == {("api-partial", 0): 120}
    await consumer.close()
    # a new member starts where the commit left off, not past the buffered rest
    again = await client.consumer("api-partial", group="api-partial-g", auto_commit=False)
    nxt = await again.getmany(timeout_ms=500, max_records=1)
    assert nxt[0].offset == 120
    await again.close()
    await producer.close()


@pytest.mark.parametrize("linger_ms", [0, 5])
async def test_flush_returns_once_every_acknowledgement_is_delivered(
    client: Client, linger_ms: float
) -> None:
    topic = f"api-flush-{linger_ms}"
    await client.create_topic(topic, 2)
    producer = await client.producer(linger_ms=linger_ms)
    acked: list[int] = []
    for i in range(300):
        fut = producer.send_nowait(topic, b"%03d" % i, partition=i % 2)
        fut.add_done_callback(lambda f: acked.append(f.result().offset))
        if i % 50 == 0:
            await asyncio.sleep(0)
    await producer.flush()
    # the callbacks of every record's future have run, not only the futures resolved
    assert len(acked) == 300
    assert sorted(acked) == sorted(list(range(150)) * 2)
    await producer.close()


async def test_a_record_refused_for_good_fails_its_future_without_retries(
    client: Client,
) -> None:
    await client.create_topic("api-refused", 1)
    producer = await client.producer(linger_ms=0, retry_backoff_ms=1000)
    started = asyncio.get_running_loop().time()
    with pytest.raises(BrokerError) as info:
        await producer.send("api-refused", b"x", partition=5)
    assert info.value.code == "unknown_partition" and not info.value.retriable
    assert asyncio.get_running_loop().time() - started < 0.5, "a refusal was retried"
    # the producer goes on: the next record is sent and acknowledged
    assert (await producer.send("api-refused", b"y", partition=0)).offset == 0
    await producer.close()


async def test_an_auto_commit_goes_out_with_the_next_fetch_and_is_not_awaited(
    client: Client,
) -> None:
    await client.create_topic("api-autocommit", 1)
    producer = await client.producer()
    await producer.send_batch("api-autocommit", [b"%02d" % i for i in range(20)], partition=0)
    consumer = await client.consumer(
        "api-autocommit", group="api-autocommit-g", auto_commit_interval_ms=0
    )
    got = await consumer.getmany(timeout_ms=500, max_records=5)
    assert [r.offset for r in got] == list(range(5))
    for _ in range(100):  # the starting position's commit, answered
        if not consumer._commit_in_flight:
            break
        await asyncio.sleep(0.01)
    held: list[tuple[Any, Any]] = []
    real = client.send_callback

    def holding(msg: Any, callback: Any) -> None:
        if isinstance(msg, p.CommitOffsets):
            held.append((msg, callback))  # the node is slow to answer this commit
        else:
            real(msg, callback)

    client.send_callback = holding  # type: ignore[method-assign]
    # the next poll commits offset 5 and gets its records without waiting for that commit
    got = await consumer.getmany(timeout_ms=500, max_records=5)
    assert [r.offset for r in got] == list(range(5, 10))
    assert [m.offsets for m, _cb in held] == [[("api-autocommit", 0, 5)]]
    # one auto commit at a time: while it is unanswered the next poll sends none
    await consumer.getmany(timeout_ms=500, max_records=5)
    assert len(held) == 1
    client.send_callback = real  # type: ignore[method-assign]
    msg, callback = held[0]
    real(msg, callback)  # the node answers it now
    for _ in range(100):
        if not consumer._commit_in_flight:
            break
        await asyncio.sleep(0.01)
    await consumer.getmany(timeout_ms=500, max_records=5)  # commits 15, pipelined again
    for _ in range(100):
        if await consumer.committed() == {("api-autocommit", 0): 15}:
            break
        await asyncio.sleep(0.01)
    assert await consumer.committed() == {("api-autocommit", 0): 15}
    await consumer.close()
    assert await consumer.committed() == {("api-autocommit", 0): 20}
    await producer.close()


async def test_send_batches_answers_for_every_batch_in_order_with_one_future(
    client: Client,
) -> None:
    await client.create_topic("api-batches", 3)
    producer = await client.producer()
    fut = producer.send_batches(
        [
            ("api-batches", 2, None, [b"a", b"b"]),
            ("api-batches", 0, [b"k1", None, b"k3"], [b"c", b"d", b"e"]),
            ("api-batches", 2, None, [b"f"]),
        ]
    )
    assert isinstance(fut, asyncio.Future)  # a plain call: sent before anything is awaited
    metas = await fut
    assert [(m.partition, m.base_offset, m.last_offset) for m in metas] == [
        (2, 0, 1),
        (0, 0, 2),
        (2, 2, 2),
    ]
    consumer = await client.consumer("api-batches", group="api-batches-g", auto_commit=False)
    got: dict[int, list[tuple[bytes | None, bytes]]] = {}
    async with asyncio.timeout(10):
        while sum(len(v) for v in got.values()) < 6:
            for r in await consumer.getmany(timeout_ms=200):
                got.setdefault(r.partition, []).append((r.key, r.value))
    assert got == {
        2: [(None, b"a"), (None, b"b"), (None, b"f")],
        0: [(b"k1", b"c"), (None, b"d"), (b"k3", b"e")],
    }
    assert await producer.send_batches([]) == []
    await consumer.close()
    await producer.close()


async def test_send_batches_fails_with_the_batch_refused_for_good_and_frees_its_slot(
    client: Client,
) -> None:
    await client.create_topic("api-batches-bad", 1)
    producer = await client.producer(max_inflight=1)
    with pytest.raises(BrokerError) as err:
        await producer.send_batches(
            [("api-batches-bad", 0, None, [b"ok"]), ("api-batches-bad", 5, None, [b"no"])]
        )
    assert err.value.code == "unknown_partition"
    # the in-flight slots the first attempts held are free again: the next send goes out
    metas = await asyncio.wait_for(
        producer.send_batches([("api-batches-bad", 0, None, [b"again"])]), 10
    )
    assert metas[0].partition == 0
    await producer.close()


async def test_fetch_batches_hands_raw_batches_on_and_moves_positions_past_them(
    client: Client,
) -> None:
    await client.create_topic("api-raw", 1)
    producer = await client.producer()
    await producer.send_batch("api-raw", [b"a", b"b", b"c"], partition=0)
    await producer.send_batch("api-raw", [b"d", b"e"], partition=0)
    consumer = await client.consumer("api-raw", auto_offset_reset="earliest")
    consumer.seek("api-raw", 0, 1)  # inside the first batch: it comes whole, from offset 1 on
    fetched = await consumer.fetch_batches(timeout_ms=1000)
    assert [(t, i, start) for t, i, _data, start in fetched] == [("api-raw", 0, 1)]
    batches = list(records.iter_batches(fetched[0][2]))
    assert [h.base_offset for _pos, h in batches] == [0, 3]
    assert consumer.positions[("api-raw", 0)] == 5
    assert await consumer.fetch_batches(timeout_ms=50) == []  # nothing past the position
    assert consumer.positions[("api-raw", 0)] == 5
    await consumer.close()
    await producer.close()
