"""When the producer's records leave with ``linger_ms=0``: a record awaited alone leaves at
once; records queued in one loop turn leave together at the end of it. Against a stand-in
client that writes what it was given when told to flush (or at the end of the turn, as the
real connection does), so no node is needed."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from broker import protocol as p
from broker.client import BrokerError, ConnectionLost, Producer, RecordMetadata
from storage import records


class _Wire:
    """Requests queued with ``send_callback`` leave at ``flush`` (scheduled for the end of
    the turn, or at once with ``flush=True``); ``written`` holds each write's requests."""

    def __init__(self) -> None:
        self.queued: list[p.Produce] = []
        self.written: list[list[p.Produce]] = []
        self.callbacks: dict[int, Any] = {}
        self._ids = 0

    def send_callback(self, msg: p.Produce, callback: Any, *, flush: bool = False) -> None:
        self._ids += 1
        msg.id = self._ids
        self.callbacks[msg.id] = callback
        if not self.queued:
            asyncio.get_running_loop().call_soon(self.flush)
        self.queued.append(msg)
        if flush:
            self.flush()

    def flush(self) -> None:
        if self.queued:
            self.written.append(self.queued)
            self.queued = []

    def answer(self, msg: p.Produce, base_offset: int) -> None:
        count = records.parse_header(msg.batches[0]).record_count
        reply = p.Produced(
            id=msg.id,
            topic=msg.topic,
            partition=msg.partition or 0,
            base_offset=base_offset,
            last_offset=base_offset + count - 1,
        )
        self.callbacks.pop(msg.id)(reply)


def _producer(wire: _Wire, **kw: Any) -> Producer:
    producer = Producer(wire, acks=-1, linger_ms=0.0, **kw)  # type: ignore[arg-type]
    producer.producer_id = 7  # as start() would set it
    return producer


def _counts(write: list[p.Produce]) -> list[int]:
    return [records.parse_header(m.batches[0]).record_count for m in write]


def _step(coro: Coroutine[Any, Any, RecordMetadata]) -> None:
    """Run ``coro`` up to where it waits for its acknowledgement."""
    coro.send(None)


def _finish(coro: Coroutine[Any, Any, RecordMetadata]) -> RecordMetadata:
    try:
        coro.send(None)
    except StopIteration as done:
        result: RecordMetadata = done.value
        return result
    raise AssertionError("send() still waits after its acknowledgement")


async def test_an_awaited_lone_record_is_written_before_send_waits() -> None:
    wire = _Wire()
    producer = _producer(wire)
    sending = producer.send("t", b"v", partition=0)
    _step(sending)
    assert [_counts(w) for w in wire.written] == [[1]], "the record waited for the turn's end"
    wire.answer(wire.written[0][0], base_offset=41)
    assert _finish(sending) == RecordMetadata("t", 0, 41)
    # one at a time, the next record leaves at once as well, with the next sequence number
    sending = producer.send("t", b"w", partition=0)
    _step(sending)
    assert len(wire.written) == 2
    assert records.parse_header(wire.written[1][0].batches[0]).base_sequence == 1
    wire.answer(wire.written[1][0], base_offset=42)
    assert _finish(sending) == RecordMetadata("t", 0, 42)


async def test_records_queued_in_one_turn_leave_as_one_batch_at_its_end() -> None:
    wire = _Wire()
    producer = _producer(wire)
    futures = [producer.send_nowait("t", b"v%d" % i, partition=0) for i in range(5)]
    assert wire.written == [] and wire.queued == []
    await asyncio.sleep(0)
    assert [_counts(w) for w in wire.written] == [[5]]
    wire.answer(wire.written[0][0], base_offset=10)
    assert [f.result().offset for f in futures] == [10, 11, 12, 13, 14]


async def test_records_awaited_after_a_lone_one_in_the_same_turn_leave_together() -> None:
    wire = _Wire()
    producer = _producer(wire)
    first = asyncio.ensure_future(producer.send("t", b"a", partition=0))
    rest = [asyncio.ensure_future(producer.send("t", b"x", partition=0)) for _ in range(3)]
    await asyncio.sleep(0)  # the four tasks run, one after another, in this turn
    await asyncio.sleep(0)  # ... and the turn's end sends what they queued
    # the first found the partition idle and left alone; the others found it busy
    assert [_counts(w) for w in wire.written] == [[1], [3]]
    sequences = [records.parse_header(w[0].batches[0]).base_sequence for w in wire.written]
    assert sequences == [0, 1]
    wire.answer(wire.written[0][0], base_offset=0)
    wire.answer(wire.written[1][0], base_offset=1)
    assert (await first).offset == 0
    assert [(await f).offset for f in rest] == [1, 2, 3]


async def test_an_awaited_record_behind_queued_ones_waits_for_the_turns_end() -> None:
    wire = _Wire()
    producer = _producer(wire)
    queued = producer.send_nowait("t", b"a", partition=0)
    sending = producer.send("t", b"b", partition=0)
    _step(sending)
    assert wire.written == [], "a record overtook or split the batch queued before it"
    await asyncio.sleep(0)
    assert [_counts(w) for w in wire.written] == [[2]]
    wire.answer(wire.written[0][0], base_offset=5)
    assert queued.result().offset == 5
    assert _finish(sending).offset == 6


async def test_an_awaited_record_waits_its_linger() -> None:
    wire = _Wire()
    producer = Producer(wire, linger_ms=1.0)  # type: ignore[arg-type]
    sending = asyncio.ensure_future(producer.send("t", b"v", partition=0))
    await asyncio.sleep(0)
    assert wire.written == []
    await asyncio.sleep(0.01)
    assert [_counts(w) for w in wire.written] == [[1]]
    wire.answer(wire.written[0][0], base_offset=0)
    assert (await sending).offset == 0


async def test_a_lone_record_that_cannot_leave_goes_the_retrying_way() -> None:
    wire = _Wire()
    producer = _producer(wire, retries=0)

    def lost(msg: p.Produce, callback: Any, *, flush: bool = False) -> None:
        raise ConnectionLost()

    async def refuse(*args: Any, **kw: Any) -> p.Produced:
        raise ConnectionLost("still not connected")

    wire.send_callback = lost  # type: ignore[method-assign]
    producer._produce_renewing = refuse  # type: ignore[method-assign]
    sending = asyncio.ensure_future(producer.send("t", b"v", partition=0))
    try:
        await sending
    except BrokerError as exc:
        assert exc.code == "connection_lost"
    else:
        raise AssertionError("a send that could not leave succeeded")
    assert not producer._busy and producer._inflight.take()
