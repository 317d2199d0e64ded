"""The engines' appends in process: ``Producer.send_batches`` over a :class:`LocalClient`,
whose produce callbacks come straight from the append's acknowledgement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker import protocol as p
from broker.auth import NODE_PRINCIPAL
from broker.client import BrokerError
from broker.local import LocalClient
from storage import records
from tests.unit.broker.test_front_door import Door, close_door, open_door


@pytest.fixture
async def door(tmp_path: Path) -> AsyncIterator[Door]:
    d = await open_door(tmp_path / "data")
    for name in ("a", "b"):
        d.service.topics.ensure_internal(name, 2)
    try:
        yield d
    finally:
        await close_door(d)


def produce(topic: str, partition: int, *values: bytes) -> p.Produce:
    batch = records.encode_batch([(0, None, v) for v in values], first_timestamp=1)
    return p.Produce(id=0, topic=topic, partition=partition, key=None, batches=[batch], acks=-1)


async def test_send_batches_appends_every_partition_and_answers_once(door: Door) -> None:
    client = LocalClient(door.service, door.intake, principal=NODE_PRINCIPAL)
    producer = await client.producer(acks=-1, linger_ms=0)
    fut = producer.send_batches(
        [("a", 1, None, [b"x", b"y"]), ("b", 0, [b"k", None], [b"z", b"w"]), ("a", 1, None, [b"v"])]
    )
    # appended before anything was awaited: the log ends are past them already
    assert door.log.partition("a", 1).log_end_offset == 3
    assert door.log.partition("b", 0).log_end_offset == 2
    metas = await asyncio.wait_for(fut, 10)
    assert [(m.topic, m.partition, m.base_offset, m.last_offset) for m in metas] == [
        ("a", 1, 0, 1),
        ("b", 0, 0, 1),
        ("a", 1, 2, 2),
    ]
    # acknowledged means durable: the high watermarks cover them
    assert door.log.partition("a", 1).high_watermark == 3
    assert door.log.partition("b", 0).high_watermark == 2
    await producer.close()
    await client.close()


async def test_a_refused_batch_fails_the_future_and_the_rest_still_land(door: Door) -> None:
    client = LocalClient(door.service, door.intake, principal=NODE_PRINCIPAL)
    producer = await client.producer(acks=-1, linger_ms=0)
    with pytest.raises(BrokerError) as err:
        await asyncio.wait_for(
            producer.send_batches([("a", 0, None, [b"ok"]), ("a", 9, None, [b"no"])]), 10
        )
    assert err.value.code == "unknown_partition"
    assert door.log.partition("a", 0).log_end_offset == 1
    metas = await asyncio.wait_for(producer.send_batches([("a", 0, None, [b"next"])]), 10)
    assert metas[0].base_offset == 1
    await producer.close()
    await client.close()


async def test_a_produce_callback_comes_after_the_call_returns_with_the_reply(
    door: Door,
) -> None:
    """Never inside ``send_callback`` (a refusal found at once comes a turn later), and an
    append's reply only once the append is durable."""
    client = LocalClient(door.service, door.intake, principal=NODE_PRINCIPAL)
    replies: list[object] = []
    returned = False

    def callback(reply: object) -> None:
        assert returned, "called before send_callback returned"
        replies.append(reply)

    client.send_callback(produce("a", 7, b"x"), callback)  # no such partition
    returned = True
    await asyncio.sleep(0)
    assert len(replies) == 1
    assert isinstance(replies[0], p.Error) and replies[0].code == "unknown_partition"

    done = asyncio.get_running_loop().create_future()
    returned = False
    client.send_callback(produce("b", 1, b"y"), lambda r: (callback(r), done.set_result(None)))
    returned = True
    assert door.log.partition("b", 1).high_watermark == 0
    await asyncio.wait_for(done, 10)
    assert isinstance(replies[1], p.Produced) and replies[1].base_offset == 0
    assert door.log.partition("b", 1).high_watermark == 1
    await client.close()


async def test_an_in_process_fetch_answered_at_once_yields_a_turn(door: Door) -> None:
    """A consumer in the node's own loop that always finds data must still let the loop run:
    its fetch yields a turn when it answers without waiting. Over TCP (the connection's own
    task) the service does not add that turn."""
    client = LocalClient(door.service, door.intake, principal=NODE_PRINCIPAL)
    producer = await client.producer(acks=-1, linger_ms=0)
    await producer.send_batches([("a", 0, None, [b"x"])])
    loop = asyncio.get_running_loop()
    req = p.Fetch(id=0, partitions=[p.FetchPartition("a", 0, 0)], max_wait_ms=0)

    ran: list[str] = []
    loop.call_soon(ran.append, "other")
    reply = await client._request_now(req)  # data at once
    assert isinstance(reply, p.Fetched) and reply.partitions[0].records
    assert ran == ["other"], "an in-process fetch answered at once did not yield"

    ran.clear()
    loop.call_soon(ran.append, "other")
    parts, _throttle = await door.service.fetch(NODE_PRINCIPAL, req)
    assert parts[0].records and ran == [], "a fetch for a transport yielded a turn"
    await asyncio.sleep(0)
    await producer.close()
    await client.close()


async def test_an_in_process_fetch_answers_only_partitions_with_something_to_say(
    door: Door,
) -> None:
    """A stage waits on many partitions and gets one or two: its fetches leave out those
    with nothing to read and no error (a transport's fetch still answers every partition),
    and an error still comes back."""
    client = LocalClient(door.service, door.intake, principal=NODE_PRINCIPAL)
    producer = await client.producer(acks=-1, linger_ms=0)
    await producer.send_batches([("a", 1, None, [b"x"])])
    parts = [p.FetchPartition("a", 0, 0), p.FetchPartition("a", 1, 0)]
    reply = await client._request_now(p.Fetch(id=0, partitions=parts, max_wait_ms=0))
    assert isinstance(reply, p.Fetched)
    assert [(r.topic, r.partition) for r in reply.partitions] == [("a", 1)]
    assert reply.partitions[0].records
    served, _throttle = await door.service.fetch(
        NODE_PRINCIPAL, p.Fetch(id=0, partitions=parts, max_wait_ms=0)
    )
    assert [(r.partition, bool(r.records)) for r in served] == [(0, False), (1, True)]
    missing = [p.FetchPartition("nope", 0, 0)]
    reply = await client._request_now(p.Fetch(id=0, partitions=missing, max_wait_ms=0))
    assert isinstance(reply, p.Fetched)
    assert [r.error for r in reply.partitions] == ["unknown_topic"]
    await producer.close()
    await client.close()


async def test_an_in_process_client_reads_a_topic_made_anew_not_the_closed_one(
    door: Door,
) -> None:
    """The partitions an in-process client fetched are remembered across its fetches; a
    topic deleted and made again under the same name is looked up again (its old partitions
    are closed), so the client reads the new records, never the old files."""
    client = LocalClient(door.service, door.intake, principal=NODE_PRINCIPAL)
    producer = await client.producer(acks=-1, linger_ms=0)
    await producer.send_batches([("b", 0, None, [b"old-0", b"old-1"])])
    want = [p.FetchPartition("b", 0, 0)]
    reply = await client._request_now(p.Fetch(id=0, partitions=want, max_wait_ms=0))
    assert isinstance(reply, p.Fetched) and reply.partitions[0].high_watermark == 2
    await door.service.delete_topic(NODE_PRINCIPAL, "b")
    reply = await client._request_now(p.Fetch(id=0, partitions=want, max_wait_ms=0))
    assert isinstance(reply, p.Fetched)
    assert [r.error for r in reply.partitions] == ["unknown_topic"]  # not the closed files
    door.service.topics.ensure_internal("b", 2)
    fresh = await client.producer(acks=-1, linger_ms=0)
    await fresh.send_batches([("b", 0, None, [b"new-0"])])
    reply = await client._request_now(p.Fetch(id=0, partitions=want, max_wait_ms=0))
    assert isinstance(reply, p.Fetched)
    got = reply.partitions[0]
    assert got.high_watermark == 1
    values = [
        r.value
        for pos, header in records.iter_batches(got.records)
        for r in records.decode_records(got.records[pos : pos + header.batch_length], header)
    ]
    assert values == [b"new-0"]
    await fresh.close()
    await producer.close()
    await client.close()
