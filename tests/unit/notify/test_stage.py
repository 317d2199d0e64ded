"""The stage loop (``notify/stage.py``) on a real broker in process: a batch whose handling
fails is not committed and is handled again (from its first record), outputs are appended
before the offsets are committed, and one partition's slow sync does not hold up the next
batch's outputs to other partitions."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from pathlib import Path

import msgspec
import pytest

from broker.client import BrokerError, ConsumerRecord
from broker.config import Config
from broker.events import EventIntake
from broker.local import LocalClient
from broker.service import BrokerService
from notify import stage as stage_module
from notify.stage import Stage
from storage import records
from storage.kv import KV
from storage.log import Log


def in_process(tmp_path: Path, *topics: str) -> tuple[Log, KV, BrokerService, LocalClient]:
    """A broker in this process (log, state store, service, in-process client) with
    ``topics`` made, one partition each."""
    cfg = Config()
    cfg = msgspec.structs.replace(
        cfg, storage=msgspec.structs.replace(cfg.storage, data_dir=str(tmp_path))
    )
    log = Log(tmp_path)
    log.open()
    kv = KV(tmp_path / "state")
    service = BrokerService(cfg, log, kv)
    intake = EventIntake(cfg, service)
    intake.start()
    for name in topics:
        service.topics.ensure_internal(name, 1)
    return log, kv, service, LocalClient(service, intake)


class Doubler(Stage):
    """Copies every record of ``in`` to ``out``; fails the first time it sees ``boom``."""

    failed = False  # class-level: survives the retry

    async def handle(self, recs: list[ConsumerRecord]) -> None:
        for rec in recs:
            if rec.value == b"boom" and not self.failed:
                Doubler.failed = True
                raise RuntimeError("a bug")
            self.outbox.add("out", rec.key or b"k", rec.value)


async def test_a_failed_batch_is_redone_and_nothing_is_lost_or_committed_early(
    tmp_path: Path,
) -> None:
    log, kv, service, client = in_process(tmp_path, "in", "out")
    producer = await client.producer(acks=-1)
    for value in (b"a", b"boom", b"c"):
        await producer.send("in", value, key=b"k")
    stage = Doubler(client, kv, group="g", topics=["in"], batch=10, max_batch_bytes=1 << 20)
    stage.retry_pause_s = 0.01
    await stage.start()
    try:
        async with asyncio.timeout(10):
            while stage.records_in < 3:
                await asyncio.sleep(0.01)
    finally:
        await stage.stop()
    got: list[bytes] = []
    for part in await client.fetch([("out", 0, 0)]):
        for pos, header in records.iter_batches(part.records):
            batch = part.records[pos : pos + header.batch_length]
            got.extend(r.value for r in records.decode_records(batch, header))
    assert got == [b"a", b"boom", b"c"]  # the failed batch left nothing half-written
    committed = service.groups.committed("*/g", "in", 0)
    assert committed is not None and committed.offset == 3
    await client.close()
    await log.close()
    kv.close()


class Router(Stage):
    """Copies each record of ``in`` to the topic its key names."""

    async def handle(self, recs: list[ConsumerRecord]) -> None:
        for rec in recs:
            assert rec.key is not None
            self.outbox.add(rec.key.decode(), b"k", rec.value)


async def test_a_slow_sync_of_one_output_partition_holds_up_no_other_partitions_outputs(
    tmp_path: Path,
) -> None:
    """Batch N's outputs to a partition whose sync is stuck do not keep batch N+1's outputs
    to another partition from being appended and synced (a user's order is per partition,
    which the log keeps), while N+1 still commits only after N."""
    log, kv, service, client = in_process(tmp_path, "in", "slow", "fast")
    release = threading.Event()
    flusher = log.partition("slow", 0)._flusher  # its syncs wait until released

    def stuck_fsync(fd: int) -> None:
        release.wait(10)
        os.fdatasync(fd)

    flusher._fsync = stuck_fsync
    producer = await client.producer(acks=-1)
    stage = Router(client, kv, group="g", topics=["in"], batch=1, max_batch_bytes=1 << 20)
    await stage.start()
    try:
        await producer.send("in", b"first", key=b"slow")
        slow = log.partition("slow", 0)
        async with asyncio.timeout(5):  # the first batch's output appended, its sync stuck
            while slow.log_end_offset < 1:
                await asyncio.sleep(0.01)
        await producer.send("in", b"second", key=b"fast")
        fast = log.partition("fast", 0)
        async with asyncio.timeout(5):  # synced while "slow" is stuck
            while fast.high_watermark < 1:
                await asyncio.sleep(0.01)
        assert slow.high_watermark == 0
        committed = service.groups.committed("*/g", "in", 0)
        assert committed is None or committed.offset == 0  # N+1 waits for N's commit
        release.set()
        async with asyncio.timeout(5):
            while stage.records_in < 2:
                await asyncio.sleep(0.01)
        committed = service.groups.committed("*/g", "in", 0)
        assert committed is not None and committed.offset == 2
    finally:
        release.set()
        await stage.stop()
    await client.close()
    await log.close()
    kv.close()


class Done(msgspec.Struct):
    value: str


class Recorder(Stage):
    """Copies each record of ``in`` to ``out`` and records it as done in LMDB once the copy
    is acknowledged (``after_sent``): what a delivery worker does with its dedupe rows."""

    async def handle(self, recs: list[ConsumerRecord]) -> None:
        done = self.kv.table("done", Done)
        for rec in recs:
            self.outbox.add("out", b"k", rec.value)
            value = rec.value.decode()

            def write(value: str = value) -> None:
                done.put(value, Done(value))

            self.after_sent(write)


async def test_rows_written_after_the_outputs_are_not_written_when_the_outputs_fail(
    tmp_path: Path,
) -> None:
    """A row that records an output as done is written only once the output is acknowledged:
    when the append fails, the batch is redone and the row is absent meanwhile (a crash then
    would redo the effect, not skip it), and it is there after the redo succeeded."""
    log, kv, service, client = in_process(tmp_path, "in", "out")
    producer = await client.producer(acks=-1)
    await producer.send("in", b"a", key=b"k")
    stage = Recorder(client, kv, group="g", topics=["in"], batch=10, max_batch_bytes=1 << 20)
    stage.retry_pause_s = 0.5
    await stage.start()
    assert stage.producer is not None
    real = stage.producer.send_batches
    failed = asyncio.Event()

    def flaky(*args: object, **kwargs: object) -> object:
        if not failed.is_set():
            failed.set()
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(BrokerError("storage_error", "the disk said no", True))
            return fut
        return real(*args, **kwargs)  # type: ignore[arg-type]

    stage.producer.send_batches = flaky  # type: ignore[method-assign,assignment]
    done = kv.table("done", Done)
    try:
        async with asyncio.timeout(10):
            await failed.wait()
            await asyncio.sleep(0.2)  # within the retry pause: the batch is given up
            assert done.get("a") is None
            while stage.records_in < 1:
                await asyncio.sleep(0.01)
    finally:
        await stage.stop()
    assert done.get("a") == Done("a")
    committed = service.groups.committed("*/g", "in", 0)
    assert committed is not None and committed.offset == 1
    await client.close()
    await log.close()
    kv.close()


class Counter(Stage):
    """Keeps the size of every batch it handles."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sizes: list[int] = []

    async def handle(self, recs: list[ConsumerRecord]) -> None:
        self.sizes.append(len(recs))


async def test_a_lingering_stage_takes_what_arrives_meanwhile_in_one_batch(
    tmp_path: Path,
) -> None:
    """After a batch smaller than its batch size a stage with ``linger_s`` waits before its
    next fetch (the fan-out and the delivery workers, ``notify.linger-ms``): records
    appended one by one during the wait come as one batch, while a record that finds the
    stage waiting in its fetch is taken at once, alone."""
    log, kv, _service, client = in_process(tmp_path, "in")
    producer = await client.producer(acks=-1)
    stage = Counter(client, kv, group="g", topics=["in"], batch=10, max_batch_bytes=1 << 20)
    stage.linger_s = 1.0  # far longer than three appends take
    await stage.start()
    try:
        async with asyncio.timeout(10):
            await producer.send("in", b"first", key=b"k")
            while not stage.sizes:
                await asyncio.sleep(0.005)
            for value in (b"a", b"b", b"c"):  # each acknowledged (durable) before the next
                await producer.send("in", value, key=b"k")
            while sum(stage.sizes) < 4:
                await asyncio.sleep(0.005)
    finally:
        await stage.stop()
    assert stage.sizes == [1, 3]
    await client.close()
    await log.close()
    kv.close()


async def test_stopping_an_idle_stage_cuts_its_fetch_short_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle stage waits in its fetch (``IDLE_POLL_MS``, here a minute): ``stop`` does
    not wait that out, and a record appended after it is handled by the next start."""
    monkeypatch.setattr(stage_module, "IDLE_POLL_MS", 60_000)
    _log, kv, service, client = in_process(tmp_path, "in", "out")
    producer = await client.producer(acks=-1)
    await producer.send("in", b"a", key=b"k")
    stage = Doubler(client, kv, group="g", topics=["in"], batch=10, max_batch_bytes=1 << 20)
    await stage.start()
    async with asyncio.timeout(10):
        while stage.records_in < 1 or not stage._polling:
            await asyncio.sleep(0.01)
    # neither the minute the fetch would wait nor the stop timeout's fallback (a cancel)
    async with asyncio.timeout(stage.stop_timeout / 2):
        await stage.stop()
    assert stage._task is not None and stage._task.done()
    await producer.send("in", b"b", key=b"k")
    again = Doubler(client, kv, group="g", topics=["in"], batch=10, max_batch_bytes=1 << 20)
    await again.start()
    try:
        async with asyncio.timeout(10):
            while again.records_in < 1:
                await asyncio.sleep(0.01)
    finally:
        async with asyncio.timeout(10):
            await again.stop()
    committed = service.groups.committed("*/g", "in", 0)
    assert committed is not None and committed.offset == 2


class Stepper(Stage):
    """Handles a batch unit by unit (a record each), taking a turn between units as the
    fan-out and the delivery workers do; notes, per unit, how often the loop ran a callback
    of someone else's (``ticks``) while the batch was in hand."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.ticks = 0
        self.seen: list[int] = []

    async def handle(self, recs: list[ConsumerRecord]) -> None:
        for _ in recs:
            self.seen.append(self.ticks)
            await self.take_turn()


async def _stepped(tmp_path: Path, slice_s: float, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    monkeypatch.setattr(stage_module, "SLICE_S", slice_s)
    log, kv, _service, client = in_process(tmp_path, "in")
    producer = await client.producer(acks=-1)
    for i in range(5):
        producer.send_nowait("in", b"%d" % i, key=b"k")
    await producer.flush()
    stage = Stepper(client, kv, group="g", topics=["in"], batch=10, max_batch_bytes=1 << 20)
    loop = asyncio.get_running_loop()
    ticking = True

    def tick() -> None:  # another user of the loop, ready at every turn
        stage.ticks += 1
        if ticking:
            loop.call_soon(tick)

    await stage.start()
    tick()
    try:
        async with asyncio.timeout(10):
            while stage.records_in < 5:
                await asyncio.sleep(0.01)
    finally:
        ticking = False
        await stage.stop()
        await client.close()
        await log.close()
        kv.close()
    return stage.seen


async def test_a_batch_whose_slice_is_used_up_gives_the_loop_a_turn_between_units(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the slice used up at once, the loop serves others between every two units."""
    seen = await _stepped(tmp_path, 0.0, monkeypatch)
    assert len(seen) == 5
    assert all(b > a for a, b in itertools.pairwise(seen)), seen


async def test_a_batch_within_its_slice_keeps_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within its slice a batch runs on: a turn costs a loop pass, not taken for nothing."""
    seen = await _stepped(tmp_path, 60.0, monkeypatch)
    assert len(seen) == 5
    assert len(set(seen)) == 1, seen
