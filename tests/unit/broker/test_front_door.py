"""The front door in process, on a real log and state store: acknowledgements by ``acks``, the
event intake's promises (a ``duplicate`` answer means stored), producer ids and commits that
are durable before they are answered, and the in-process client the engines use."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from broker import protocol as p
from broker.auth import NODE_PRINCIPAL, OPEN_PRINCIPAL
from broker.client import BrokerError
from broker.config import Config, LimitsConfig, StorageConfig
from broker.events import EventIn, EventIntake
from broker.local import LocalClient
from broker.producer_ids import ProducerIds
from broker.replication import Acks
from broker.service import BrokerService
from broker.topics import EVENTS_TOPIC
from storage import records
from storage.errors import StorageFull
from storage.kv import KV
from storage.log import Log
from storage.partition import Partition


@dataclass
class Door:
    service: BrokerService
    intake: EventIntake
    log: Log
    kv: KV


async def open_door(data: Path, config: Config | None = None) -> Door:
    cfg = config or Config(storage=StorageConfig(data_dir=str(data)))
    log = Log(data)
    await asyncio.get_running_loop().run_in_executor(None, log.open)
    kv = KV(data / "state")
    service = BrokerService(cfg, log, kv)
    intake = EventIntake(cfg, service)
    intake.start()
    await intake.recover()
    return Door(service, intake, log, kv)


async def close_door(door: Door) -> None:
    door.service.stop()
    await door.log.close()
    door.kv.close()


@pytest.fixture
async def door(tmp_path: Path) -> AsyncIterator[Door]:
    d = await open_door(tmp_path / "data")
    try:
        yield d
    finally:
        await close_door(d)


def batch(*values: bytes) -> bytes:
    return records.encode_batch([(0, None, v) for v in values], first_timestamp=1)


def event(topic: str = "signup", event_id: str | None = None, size: int = 10) -> EventIn:
    payload = msgspec.Raw(msgspec.json.encode({"pad": "x" * size}))
    return EventIn(topic=topic, payload=payload, event_id=event_id)


# ------------------------------------------------------------------------------- produce
@pytest.mark.parametrize(
    ("acks", "waits_for"), [(0, None), (1, "written_future"), (-1, "durable_future")]
)
async def test_produce_returns_the_acknowledgement_chosen_by_acks(
    door: Door, acks: Acks, waits_for: str | None
) -> None:
    await door.service.create_topic(OPEN_PRINCIPAL, p.CreateTopic(id=0, topic="t", partitions=1))
    part = door.service.partition(OPEN_PRINCIPAL, "t", 0)
    appended = door.service.produce(OPEN_PRINCIPAL, "t", [batch(b"a")], acks=acks)
    if waits_for is None:
        assert appended.ack is None
    else:
        assert appended.ack is not None and not appended.ack.done()
        await appended.ack
        if acks == -1:
            assert part.high_watermark == 1
    await part.flush()
    assert part.read(0, 1 << 20)


async def test_a_duplicate_is_acknowledged_only_once_the_original_is_durable(
    door: Door,
) -> None:
    await door.service.create_topic(OPEN_PRINCIPAL, p.CreateTopic(id=0, topic="t", partitions=1))
    pid = await door.service.init_producer(OPEN_PRINCIPAL)
    one = records.encode_batch(
        [(0, None, b"x")], first_timestamp=1, producer_id=pid, base_sequence=0
    )
    first = door.service.produce(OPEN_PRINCIPAL, "t", [one], partition=0)
    again = door.service.produce(OPEN_PRINCIPAL, "t", [one], partition=0)
    assert again.duplicate and again.base_offset == first.base_offset
    # the retry arrived before the original's fsync: its answer must wait for it too
    assert again.ack is not None and not again.ack.done()
    await asyncio.gather(*(a for a in (first.ack, again.ack) if a is not None))
    assert door.service.partition(OPEN_PRINCIPAL, "t", 0).high_watermark == 1


# ------------------------------------------------------------------------ producer ids
async def test_producer_ids_are_reserved_durably_and_never_reissued(tmp_path: Path) -> None:
    kv = KV(tmp_path / "state")
    ids = ProducerIds(kv)
    syncs = 0
    real_sync = kv.sync

    async def counting_sync() -> None:
        nonlocal syncs
        syncs += 1
        await real_sync()

    kv.sync = counting_sync  # type: ignore[method-assign]
    issued = [await ids.issue() for _ in range(ProducerIds.BLOCK + 5)]
    assert issued == list(range(1, ProducerIds.BLOCK + 6))
    assert syncs == 2  # one durable reservation per block, not one per id
    kv.close()
    # a restart (or a power cut after the reservation's sync) resumes past the whole block
    again = ProducerIds(KV(tmp_path / "state"))
    assert await again.issue() == 2 * ProducerIds.BLOCK + 1


async def test_concurrent_producer_ids_are_distinct_across_blocks(tmp_path: Path) -> None:
    ids = ProducerIds(KV(tmp_path / "state"))
    got = await asyncio.gather(*(ids.issue() for _ in range(2 * ProducerIds.BLOCK + 3)))
    assert len(set(got)) == len(got)


# ------------------------------------------------------------------------------ commits
async def test_a_commit_is_answered_only_after_the_state_store_is_synced(door: Door) -> None:
    await door.service.create_topic(OPEN_PRINCIPAL, p.CreateTopic(id=0, topic="t", partitions=2))
    gate = threading.Event()
    real = door.kv.sync_now

    def gated_sync() -> None:
        gate.wait(10)
        real()

    door.kv.sync_now = gated_sync  # type: ignore[method-assign]
    commit = asyncio.create_task(
        door.service.commit_offsets(
            OPEN_PRINCIPAL, p.CommitOffsets(id=1, group="g", offsets=[("t", 1, 5)])
        )
    )
    await asyncio.sleep(0.2)
    assert not commit.done(), "answered before the offsets were synced"
    gate.set()
    assert (await commit).count == 1


@pytest.mark.parametrize(("partition", "offset"), [(2, 0), (-1, 0), (0, -5)])
async def test_commits_to_partitions_that_do_not_exist_are_refused(
    door: Door, partition: int, offset: int
) -> None:
    await door.service.create_topic(OPEN_PRINCIPAL, p.CreateTopic(id=0, topic="t", partitions=2))
    req = p.CommitOffsets(id=1, group="g", offsets=[("t", partition, offset)])
    with pytest.raises((p.errors.UnknownPartition, p.errors.InvalidRequest)):
        await door.service.commit_offsets(OPEN_PRINCIPAL, req)
    assert door.service.groups.group_offsets(OPEN_PRINCIPAL.qualify_group("g")) == []


# ------------------------------------------------------------------------------- events
async def test_events_larger_in_all_than_a_batch_are_cut_into_batches(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = Config(
        storage=StorageConfig(data_dir=str(data)),
        limits=LimitsConfig(max_batch_bytes=1 << 20, max_frame_bytes=1 << 20),
    )
    door = await open_door(data, cfg)
    try:
        events = [event(size=200_000) for _ in range(12)]  # 2.4 MB, keyless: one partition
        accepted = door.intake.publish(OPEN_PRINCIPAL, events, batch=True)
        assert accepted.ack is not None
        await accepted.ack
        (partition,) = {r.partition for r in accepted.results}
        offsets = [r.offset for r in accepted.results]
        assert offsets == list(range(offsets[0], offsets[0] + 12))
        part = door.log.partition(EVENTS_TOPIC, partition)
        stored = part.read(offsets[0], 64 << 20)
        headers = [h for _pos, h in records.iter_batches(stored)]
        assert len(headers) > 1 and all(h.batch_length <= 1 << 20 for h in headers)
    finally:
        await close_door(door)


async def test_a_repeat_in_flight_shares_the_originals_outcome(door: Door) -> None:
    eid = "0b6f8d4e-1c2a-4f55-9a3e-77aa00bb11cc"
    first = door.intake.publish(OPEN_PRINCIPAL, [event(event_id=eid)], batch=False)
    repeat = door.intake.publish(OPEN_PRINCIPAL, [event(event_id=eid)], batch=False)
    assert repeat.events == 0 and repeat.results[0].duplicate
    assert repeat.results[0].offset == first.results[0].offset
    assert repeat.ack is first.ack  # answered when, and as, the original is
    assert first.ack is not None
    await first.ack
    later = door.intake.publish(OPEN_PRINCIPAL, [event(event_id=eid)], batch=False)
    assert later.ack is None and later.results[0].duplicate


class _FailingReplication:
    """The acknowledgement port, failing the next append as a full disk would."""

    def __init__(self) -> None:
        self.fail_next = True

    def ack_future(
        self, partition: Partition, end_offset: int, acks: Acks
    ) -> asyncio.Future[None] | None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail_next:
            self.fail_next = False
            fut.set_exception(StorageFull("disk full"))
            return fut
        return partition.durable_future(end_offset)


async def test_an_event_whose_append_failed_is_stored_on_retry_not_called_a_duplicate(
    door: Door,
) -> None:
    door.service.replication = _FailingReplication()
    eid = "5d0e7f1a-2b3c-4d5e-8f90-a1b2c3d4e5f6"
    first = door.intake.publish(OPEN_PRINCIPAL, [event(event_id=eid)], batch=False)
    repeat = door.intake.publish(OPEN_PRINCIPAL, [event(event_id=eid)], batch=False)
    for accepted in (first, repeat):
        assert accepted.ack is not None
        with pytest.raises(StorageFull):
            await accepted.ack
    await asyncio.sleep(0)  # the error reaches a client only after the intake saw it
    retry = door.intake.publish(OPEN_PRINCIPAL, [event(event_id=eid)], batch=False)
    assert retry.events == 1 and not retry.results[0].duplicate
    assert retry.ack is not None
    await retry.ack


async def test_the_event_index_is_rebuilt_from_the_log_after_losing_its_rows(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    door = await open_door(data)
    ids = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(20)]
    accepted = door.intake.publish(OPEN_PRINCIPAL, [event(event_id=e) for e in ids], batch=True)
    assert accepted.ack is not None
    await accepted.ack
    placed = {r.event_id: (r.partition, r.offset) for r in accepted.results}
    # what a power cut does to an unsynced index: the rows and marks are gone, the log is not
    door.kv.table("event_ids", msgspec.Raw).delete_prefix(b"")
    door.kv.table("event_ids_marks", msgspec.Raw).delete_prefix(b"")
    await close_door(door)
    door = await open_door(data)
    try:
        again = door.intake.publish(OPEN_PRINCIPAL, [event(event_id=e) for e in ids], batch=True)
        assert again.events == 0
        assert {r.event_id: (r.partition, r.offset) for r in again.results} == placed
        assert all(r.duplicate for r in again.results)
    finally:
        await close_door(door)


async def test_ids_made_durable_together_are_indexed_in_one_transaction(
    door: Door, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    put_many = door.intake.ids.put_many

    def counted(rows: list[Any]) -> None:
        calls.append(len(rows))
        put_many(rows)

    monkeypatch.setattr(door.intake.ids, "put_many", counted)
    ids = [f"{i:08x}-0000-4000-8000-00000000000a" for i in range(40)]
    published = [door.intake.publish(OPEN_PRINCIPAL, [event(event_id=e)], batch=False) for e in ids]
    # durable, not yet indexed: a repeat is still a duplicate, at the same place
    await asyncio.gather(*(a.ack for a in published if a.ack is not None))
    repeat = door.intake.publish(OPEN_PRINCIPAL, [event(event_id=ids[7])], batch=False)
    assert repeat.events == 0 and repeat.results[0].duplicate
    assert repeat.results[0].offset == published[7].results[0].offset
    await asyncio.sleep(0)
    # 40 separate publishes over 8 partitions, made durable by one round: one transaction
    assert sum(calls) == 40 and len(calls) < 40, calls
    now = time.time_ns() // 1_000_000
    for e, accepted in zip(ids, published, strict=True):
        seen = door.intake.ids.get(OPEN_PRINCIPAL.tenant, e, now)
        assert seen is not None and seen.offset == accepted.results[0].offset, e


async def test_a_failed_index_write_holds_the_partition_marks_until_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    door = await open_door(data)
    first = [f"{i:08x}-0000-4000-8000-00000000000b" for i in range(8)]
    then = [f"{i:08x}-0000-4000-8000-00000000000c" for i in range(8)]
    put_many = door.intake.ids.put_many
    failing = [True]

    def fails_once(rows: list[Any]) -> None:
        if failing.pop() if failing else False:
            raise StorageFull("the state store is full")
        put_many(rows)

    monkeypatch.setattr(door.intake.ids, "put_many", fails_once)
    a = door.intake.publish(OPEN_PRINCIPAL, [event(event_id=e) for e in first], batch=True)
    assert a.ack is not None
    await a.ack
    await asyncio.sleep(0)
    b = door.intake.publish(OPEN_PRINCIPAL, [event(event_id=e) for e in then], batch=True)
    assert b.ack is not None
    await b.ack
    await asyncio.sleep(0)
    # the later ids are indexed, but no mark moved past the ones that were not
    door.intake.save_marks()
    failed_at = {r.partition: r.offset for r in reversed(a.results)}
    marks = door.intake.ids.marks()
    assert all(marks.get(part, 0) <= off for part, off in failed_at.items()), marks
    await close_door(door)
    door = await open_door(data)  # re-indexes from the marks
    try:
        again = door.intake.publish(OPEN_PRINCIPAL, [event(event_id=e) for e in first], batch=True)
        assert again.events == 0 and all(r.duplicate for r in again.results)
    finally:
        await close_door(door)


async def test_a_keyless_append_does_not_move_the_mark_past_ids_not_yet_written(
    door: Door, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(rows: list[Any]) -> None:
        raise StorageFull("the state store is full")

    monkeypatch.setattr(door.intake.ids, "put_many", full)
    keyed = door.intake.publish(
        OPEN_PRINCIPAL, [event(event_id="0c0c0c0c-0000-4000-8000-000000000001")], batch=False
    )
    keyless = door.intake.publish(OPEN_PRINCIPAL, [event()], batch=False)  # same topic
    part = keyed.results[0].partition
    assert keyless.results[0].partition == part
    await asyncio.gather(*(a.ack for a in (keyed, keyless) if a.ack is not None))
    await asyncio.sleep(0)
    door.intake.save_marks()
    assert door.intake.ids.marks().get(part, 0) <= keyed.results[0].offset


# ---------------------------------------------------------------------- local client
async def test_engines_produce_and_consume_in_process_with_a_group(door: Door) -> None:
    door.service.topics.ensure_internal("__deliver.email", 3)  # as an engine's start does
    client = LocalClient(door.service, door.intake)
    producer = await client.producer(linger_ms=0)
    metas = await asyncio.gather(
        *(
            producer.send("__deliver.email", f"d{i}".encode(), key=f"u{i % 7}".encode())
            for i in range(100)
        )
    )
    assert len({(m.partition, m.offset) for m in metas}) == 100
    consumer = await client.consumer("__deliver.email", group="delivery.email")
    seen: list[bytes] = []
    while len(seen) < 100:
        seen += [r.value for r in await consumer.getmany(timeout_ms=500)]
    assert sorted(seen) == sorted(f"d{i}".encode() for i in range(100))
    await consumer.commit()
    described = door.service.describe_group(NODE_PRINCIPAL, "delivery.email")
    assert sum(lag.lag for lag in described.offsets) == 0
    await consumer.close()
    await producer.close()
    await client.close()


async def test_the_in_process_client_reports_errors_as_the_network_one_does(door: Door) -> None:
    client = LocalClient(door.service, door.intake, principal=OPEN_PRINCIPAL)
    with pytest.raises(BrokerError) as caught:
        await client.create_topic("__internal", 1)
    assert caught.value.code == "invalid_topic"
    with pytest.raises(BrokerError) as missing:
        await client.list_offsets("nope", 0)
    assert missing.value.code == "unknown_topic" and not missing.value.retriable
    await client.close()


class _FailNth:
    """The acknowledgement port, failing the ``n``-th append of a topic with ``error`` once
    the append is done (the node's answer was lost, as on a timeout: it may be stored)."""

    def __init__(self, topic: str, n: int, error: Exception) -> None:
        self.topic, self.n, self.seen, self.error = topic, n, 0, error

    def ack_future(
        self, partition: Partition, end_offset: int, acks: Acks
    ) -> asyncio.Future[None] | None:
        if partition.name.endswith(f"{self.topic}-0"):
            self.seen += 1
            if self.seen == self.n:
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                fut.set_exception(self.error)
                return fut
        return partition.durable_future(end_offset)


async def test_a_producer_goes_on_after_a_batch_failed_for_good(door: Door) -> None:
    # issue 12 item 7: a batch that fails for good leaves the producer's sequence with a
    # possible hole; the batches after it must neither fail forever nor be taken for it
    door.service.topics.ensure_internal("__seq", 1)
    door.service.replication = _FailNth("__seq", 2, p.errors.Timeout("answer lost"))
    client = LocalClient(door.service, door.intake)
    producer = await client.producer(linger_ms=0, retries=0)
    first = await producer.send("__seq", b"one", partition=0)
    with pytest.raises(BrokerError) as failed:
        await producer.send("__seq", b"two", partition=0)
    assert failed.value.code == "timeout"
    after = [await producer.send("__seq", b"three-%d" % i, partition=0) for i in range(3)]
    offsets = [m.offset for m in after]
    assert offsets == sorted(offsets) and len(set(offsets)) == 3
    # "two" was in fact stored (its answer was lost); nothing after it was taken for it
    part = door.log.partition("__seq", 0)
    await part.flush()
    values = [
        rec.value
        for _pos, h in records.iter_batches(part.read(0, 1 << 20))
        for rec in records.decode_records(part.read(h.base_offset, 1 << 20)[: h.batch_length], h)
    ]
    assert values == [b"one", b"two", b"three-0", b"three-1", b"three-2"]
    assert first.offset == 0
    await producer.close()
    await client.close()


async def test_in_flight_batches_after_a_refused_one_are_sent_again_under_a_new_id(
    door: Door,
) -> None:
    # the first batch is refused unstored (a full disk), while the next ones are already on
    # their way with the sequence numbers after it: they are renewed, not failed forever
    door.service.topics.ensure_internal("__seq", 1)
    real_append = door.service.append
    refused = 0

    def refuse_first(topic: str, partition: int, batches: Any, acks: Acks) -> Any:
        nonlocal refused
        if topic == "__seq" and refused == 0:
            refused += 1
            raise StorageFull("disk full")
        return real_append(topic, partition, batches, acks)

    door.service.append = refuse_first  # type: ignore[method-assign]
    client = LocalClient(door.service, door.intake)
    producer = await client.producer(linger_ms=0, retries=0, partition_inflight=5)
    futures = []
    for i in range(5):  # one batch per loop turn, all in flight together
        futures.append(producer.send_nowait("__seq", b"r%d" % i, partition=0))
        await asyncio.sleep(0)
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(outcomes[0], BrokerError) and outcomes[0].code == "storage_full"
    stored = [o for o in outcomes[1:] if not isinstance(o, BaseException)]
    assert len(stored) == 4, outcomes
    assert [m.offset for m in stored] == [0, 1, 2, 3]
    later = await producer.send("__seq", b"later", partition=0)
    assert later.offset == 4
    await producer.close()
    await client.close()
