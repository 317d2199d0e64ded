"""A partition on disk (``storage/partition.py``): appends, group commit, reads, rolls,
retention, recovery, idempotent producers and I/O failures."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import random
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from storage import partition as partition_mod
from storage import records, segment
from storage.checkpoint import FILE_NAME as CHECKPOINT_FILE
from storage.errors import (
    CorruptBatch,
    CorruptData,
    LogClosed,
    LogOffline,
    OffsetOutOfRange,
    OutOfOrderSequence,
    StorageFull,
)
from storage.partition import Acks, Partition, PartitionConfig

T0 = 1_700_000_000_000  # a wall-clock ms timestamp for records
DAY = 24 * 3600 * 1000


def batch(
    values: list[bytes],
    *,
    ts: int = T0,
    producer_id: int = records.NO_PRODUCER,
    base_sequence: int = records.NO_SEQUENCE,
) -> bytes:
    return records.encode_batch(
        [(0, b"k" if i % 2 else None, v) for i, v in enumerate(values)],
        first_timestamp=ts,
        producer_id=producer_id,
        base_sequence=base_sequence,
    )


def values_for(first: int, count: int, size: int = 20) -> list[bytes]:
    """Values that say which offset they were meant for, so a read can check its bytes."""
    return [(b"%08d:" % (first + i)).ljust(size, b"x") for i in range(count)]


def read_all(
    part: Partition, start: int | None = None, max_bytes: int = 1 << 20
) -> dict[int, bytes]:
    """Every record from ``start`` (default log start) to the high watermark: offset -> value.
    Fails on a repeated offset or a gap."""
    offset = part.log_start_offset if start is None else start
    out: dict[int, bytes] = {}
    while offset < part.high_watermark:
        data = part.read(offset, max_bytes)
        assert data, f"read({offset}) returned nothing below the high watermark"
        for pos, header in records.iter_batches(data):
            recs = records.decode_records(data[pos : pos + header.batch_length], header)
            for i, rec in enumerate(recs):
                o = header.base_offset + i
                if o < offset:
                    continue
                assert o == offset, f"expected offset {offset}, got {o}"
                assert o not in out
                out[o] = rec.value
                offset += 1
    return out


def read_around(
    part: Partition, max_bytes: int = 1 << 20
) -> tuple[dict[int, bytes], list[CorruptData]]:
    """Every record up to the high watermark, as an application that skips damage would
    read them: a read that raises :class:`CorruptData` moves on to the offset the partition
    says is readable next. Every batch served is verified. Returns (offset -> value, the
    errors met). Fails on a repeated offset, a gap not covered by an error, or a served
    batch that fails its checks."""
    offset = part.log_start_offset
    out: dict[int, bytes] = {}
    errors: list[CorruptData] = []
    while offset < part.high_watermark:
        try:
            data = part.read(offset, max_bytes)
        except CorruptData as exc:
            assert exc.first_offset <= offset < exc.end_offset, (offset, exc)
            errors.append(exc)
            offset = part.next_readable_offset(offset)
            assert offset == exc.end_offset
            continue
        assert data, f"read({offset}) returned nothing below the high watermark"
        for pos, header in records.iter_batches(data, verify=True):
            recs = records.decode_records(data[pos : pos + header.batch_length], header)
            for i, rec in enumerate(recs):
                o = header.base_offset + i
                if o < offset:
                    continue
                assert o == offset, f"expected offset {offset}, got {o}"
                out[o] = rec.value
                offset += 1
    return out, errors


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class CountingFsync:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        os.fdatasync(fd)


def open_partition(directory: Path, **kwargs: object) -> Partition:
    part, _report = Partition.open(directory, **kwargs)  # type: ignore[arg-type]
    return part


@pytest.fixture
async def part(tmp_path: Path) -> AsyncIterator[Partition]:
    p = open_partition(tmp_path / "p", config=PartitionConfig(index_interval_bytes=512))
    yield p
    await p.close()


async def fill(part: Partition, batches: int, per_batch: int = 5, *, size: int = 20) -> None:
    for _ in range(batches):
        first = part.log_end_offset
        await part.append([batch(values_for(first, per_batch, size))])


def assert_values_match_offsets(found: dict[int, bytes]) -> None:
    for offset, value in found.items():
        assert value.startswith(b"%08d:" % offset), (offset, value[:12])


# ------------------------------------------------------------------------------ appends


async def test_new_partition_is_empty(part: Partition) -> None:
    assert (part.log_start_offset, part.log_end_offset, part.high_watermark) == (0, 0, 0)
    assert part.read(0, 1000) == b""


async def test_acked_append_is_durable_and_readable(part: Partition) -> None:
    result = await part.append([batch([b"a", b"b", b"c"])])
    assert (result.base_offset, result.last_offset, result.duplicate) == (0, 2, False)
    assert part.high_watermark == 3
    assert read_all(part) == {0: b"a", 1: b"b", 2: b"c"}


async def test_concurrent_appends_get_offsets_in_call_order_and_share_syncs(
    tmp_path: Path,
) -> None:
    fsync = CountingFsync()
    part = open_partition(tmp_path / "p", fsync=fsync)
    try:
        results = await asyncio.gather(
            *(part.append([batch(values_for(3 * i, 3))]) for i in range(50))
        )
        assert [r.base_offset for r in results] == [3 * i for i in range(50)]
        assert part.high_watermark == 150
        # group commit: the appends made in one turn of the loop share a sync
        assert fsync.calls < 50
        found = read_all(part)
        assert sorted(found) == list(range(150))
        assert_values_match_offsets(found)
    finally:
        await part.close()


async def test_multi_batch_append_is_contiguous(part: Partition) -> None:
    result = await part.append([batch(values_for(0, 2)), batch(values_for(2, 4))])
    assert (result.base_offset, result.last_offset) == (0, 5)
    assert_values_match_offsets(read_all(part))


async def test_acks_none_returns_before_the_sync_and_becomes_visible_after(
    part: Partition,
) -> None:
    result = await part.append([batch([b"x"])], acks=Acks.NONE)
    assert result.last_offset == 0
    assert part.log_end_offset == 1
    assert part.high_watermark == 0  # nothing synced yet: consumers cannot see it
    assert part.read(0, 1000) == b""
    await part.flush()
    assert part.high_watermark == 1
    assert read_all(part) == {0: b"x"}


async def test_leader_epoch_is_stamped(part: Partition) -> None:
    await part.append([batch([b"x"])], leader_epoch=7)
    header = records.validate_batch(part.read(0, 1000))
    assert (header.base_offset, header.leader_epoch) == (0, 7)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda b: b[:-1], id="truncated"),
        pytest.param(lambda b: b[:70] + bytes([b[70] ^ 1]) + b[71:], id="flipped-body-byte"),
        pytest.param(lambda b: b + b"\x00", id="trailing-byte"),
    ],
)
async def test_invalid_batch_is_refused_and_nothing_is_written(
    part: Partition, bad: Callable[[bytes], bytes]
) -> None:
    await part.append([batch([b"ok"])])
    size = part.size_bytes
    with pytest.raises(CorruptBatch):
        await part.append([batch([b"fine"]), bad(batch([b"broken", b"batch"]))])
    assert (part.log_end_offset, part.size_bytes) == (1, size)
    assert read_all(part) == {0: b"ok"}


async def test_batch_larger_than_max_batch_bytes_is_refused(tmp_path: Path) -> None:
    part = open_partition(tmp_path / "p", config=PartitionConfig(max_batch_bytes=200))
    try:
        with pytest.raises(CorruptBatch):
            await part.append([batch([b"x" * 300])])
        assert part.log_end_offset == 0
    finally:
        await part.close()


async def test_empty_append_is_refused(part: Partition) -> None:
    with pytest.raises(CorruptBatch):
        await part.append([])


async def test_closed_partition_refuses_appends_and_close_is_idempotent(
    tmp_path: Path,
) -> None:
    part = open_partition(tmp_path / "p")
    waiter = part.high_watermark_changed()
    await part.close()
    await part.close()
    with pytest.raises(LogClosed):
        part.append_nowait([batch([b"x"])])
    with pytest.raises(LogClosed):
        await waiter


# ------------------------------------------------------------------------------ reads


async def test_read_returns_whole_batches_within_max_bytes(part: Partition) -> None:
    await fill(part, 20, per_batch=4)  # 20 batches of equal size
    one = len(part.read(0, 1))
    assert 0 < one < part.size_bytes
    data = part.read(0, 3 * one + one // 2)
    assert len(data) == 3 * one
    assert [h.base_offset for _p, h in records.iter_batches(data)] == [0, 4, 8]


async def test_read_returns_one_whole_batch_even_when_max_bytes_is_smaller(
    part: Partition,
) -> None:
    await part.append([batch(values_for(0, 50, size=100))])
    await part.append([batch(values_for(50, 1))])
    for max_bytes in (0, 1, 64, 500):
        data = part.read(10, max_bytes)
        found = list(records.iter_batches(data))
        assert len(found) == 1
        assert found[0][1].base_offset == 0
        assert len(data) == found[0][1].batch_length > 500


async def test_read_from_the_middle_of_a_batch_starts_at_that_batch(part: Partition) -> None:
    await fill(part, 3, per_batch=5)
    header = records.validate_batch(part.read(7, 1))
    assert (header.base_offset, header.last_offset) == (5, 9)


async def test_read_never_returns_data_past_the_high_watermark(tmp_path: Path) -> None:
    entered = threading.Event()
    release = threading.Event()
    blocking = False

    def slow_fsync(fd: int) -> None:
        if blocking:
            entered.set()
            release.wait(10)
        os.fdatasync(fd)

    part = open_partition(tmp_path / "p", fsync=slow_fsync)
    try:
        await part.append([batch(values_for(0, 3))])
        blocking = True
        pending = asyncio.create_task(part.append([batch(values_for(3, 3))]))
        await asyncio.to_thread(entered.wait, 10)
        # the second batch is in the file, its sync has not returned: not visible yet
        assert batch_end(part.segments[-1].log_path) == part.size_bytes
        assert (part.log_end_offset, part.high_watermark) == (6, 3)
        for max_bytes in (1, 1 << 20):
            data = part.read(0, max_bytes)
            assert [h.next_offset for _p, h in records.iter_batches(data)] == [3]
        assert part.read(3, 1 << 20) == b""
        with pytest.raises(OffsetOutOfRange):
            part.read(4, 1 << 20)
        assert not pending.done()
        release.set()
        assert (await pending).base_offset == 3
        assert sorted(read_all(part)) == list(range(6))
    finally:
        release.set()
        await part.close()


async def test_read_outside_the_log_raises(part: Partition) -> None:
    await fill(part, 2)
    with pytest.raises(OffsetOutOfRange) as info:
        part.read(11, 100)
    assert (info.value.log_start, info.value.high_watermark) == (0, 10)
    with pytest.raises(OffsetOutOfRange):
        part.read(-1, 100)


async def test_reads_cross_segment_boundaries(tmp_path: Path) -> None:
    part = open_partition(tmp_path / "p", config=PartitionConfig(segment_bytes=1024))
    try:
        await fill(part, 60, per_batch=3, size=30)
        assert len(part.segments) > 5
        for max_bytes in (1, 700, 5000):
            found = read_all(part, max_bytes=max_bytes)
            assert sorted(found) == list(range(180))
            assert_values_match_offsets(found)
        for start in (0, 1, 59, 100, 179):
            assert min(read_all(part, start)) == start
    finally:
        await part.close()


async def test_offset_for_timestamp(tmp_path: Path) -> None:
    part = open_partition(
        tmp_path / "p", config=PartitionConfig(segment_bytes=600, index_interval_bytes=200)
    )
    try:
        for i in range(40):  # batch i: timestamp T0 + 1000 * i, offsets 2i, 2i + 1
            await part.append([batch(values_for(2 * i, 2), ts=T0 + 1000 * i)])
        assert len(part.segments) > 3
        assert part.offset_for_timestamp(0) == 0
        assert part.offset_for_timestamp(T0) == 0
        assert part.offset_for_timestamp(T0 + 1) == 2
        assert part.offset_for_timestamp(T0 + 17_000) == 34
        assert part.offset_for_timestamp(T0 + 17_500) == 36
        assert part.offset_for_timestamp(T0 + 39_000) == 78
        assert part.offset_for_timestamp(T0 + 39_001) == part.high_watermark == 80
    finally:
        await part.close()


async def test_offset_for_timestamp_does_not_point_past_the_high_watermark(
    part: Partition,
) -> None:
    await part.append([batch([b"a"], ts=T0)])
    part.append_nowait([batch([b"b"], ts=T0 + 10)])
    assert part.offset_for_timestamp(T0 + 5) == part.high_watermark == 1
    await part.flush()


async def test_high_watermark_listeners_hear_each_advance(part: Partition) -> None:
    seen: list[int] = []
    part.on_high_watermark = lambda p: seen.append(p.high_watermark)
    changed = part.high_watermark_changed()
    await part.append([batch([b"a", b"b"])])
    assert changed.done()
    await part.append([batch([b"c"])])
    assert seen == [2, 3]
    await part.wait_durable(1)  # already durable: returns at once
    assert seen == [2, 3]


# ------------------------------------------------------------------------------ reader/writer


async def test_reader_sees_every_record_once_in_order_while_a_writer_appends(
    tmp_path: Path,
) -> None:
    part = open_partition(tmp_path / "p", config=PartitionConfig(segment_bytes=8 * 1024))
    rng = random.Random(7)
    total = 3000
    sizes = []
    while sum(sizes) < total:
        sizes.append(min(rng.randint(1, 40), total - sum(sizes)))

    async def writer() -> None:
        for n in sizes:
            first = part.log_end_offset
            acks = Acks.ALL if rng.random() < 0.5 else Acks.NONE
            await part.append([batch(values_for(first, n))], acks)
            if rng.random() < 0.3:
                await asyncio.sleep(0)

    async def reader() -> list[tuple[int, bytes]]:
        seen: list[tuple[int, bytes]] = []
        offset = 0
        while offset < total:
            if offset >= part.high_watermark:
                await part.high_watermark_changed()
                continue
            data = part.read(offset, rng.choice([1, 300, 4096]))
            for pos, header in records.iter_batches(data):
                body = data[pos : pos + header.batch_length]
                for i, rec in enumerate(records.decode_records(body, header)):
                    if header.base_offset + i >= offset:
                        seen.append((header.base_offset + i, rec.value))
                offset = max(offset, header.next_offset)
        return seen

    try:
        async with asyncio.timeout(30):
            reader_task = asyncio.create_task(reader())
            await writer()
            seen = await reader_task
        assert [o for o, _v in seen] == list(range(total))
        assert_values_match_offsets(dict(seen))
    finally:
        await part.close()


# ------------------------------------------------------------------------------ rolls


async def test_roll_by_size(tmp_path: Path) -> None:
    cfg = PartitionConfig(segment_bytes=2048)
    part = open_partition(tmp_path / "p", config=cfg)
    try:
        await fill(part, 100, per_batch=2, size=40)
        segs = part.segments
        assert len(segs) > 3
        for seg in segs[:-1]:  # a closed segment reached segment_bytes, then stopped
            assert seg.size >= cfg.segment_bytes
            assert seg.size < cfg.segment_bytes + 300
        bases = [s.base_offset for s in segs]
        assert bases == sorted(bases)
        for prev, nxt in itertools.pairwise(segs):
            assert prev.next_offset == nxt.base_offset
        assert segment.list_segments(tmp_path / "p") == bases
    finally:
        await part.close()


async def test_roll_by_age(tmp_path: Path) -> None:
    clock = Clock()
    cfg = PartitionConfig(segment_ms=60_000)
    part = open_partition(tmp_path / "p", config=cfg, clock=clock)
    try:
        await fill(part, 3)
        clock.now += 59_999
        await fill(part, 1)
        assert len(part.segments) == 1
        clock.now += 1
        await fill(part, 1)
        assert [s.base_offset for s in part.segments] == [0, 20]
        clock.now += 10_000
        await fill(part, 2)
        assert len(part.segments) == 2
        clock.now += 60_000
        await fill(part, 1)
        assert [s.base_offset for s in part.segments] == [0, 20, 35]
        assert sorted(read_all(part)) == list(range(40))
    finally:
        await part.close()


async def test_an_empty_active_segment_is_never_rolled(tmp_path: Path) -> None:
    clock = Clock()
    part = open_partition(tmp_path / "p", config=PartitionConfig(segment_ms=1000), clock=clock)
    try:
        clock.now += 10 * DAY
        await fill(part, 1)
        assert len(part.segments) == 1
    finally:
        await part.close()


# ------------------------------------------------------------------------------ retention


async def _aged_log(directory: Path, cfg: PartitionConfig, clock: Clock) -> Partition:
    """Four segments; segment i holds timestamps from day i."""
    part = open_partition(directory, config=cfg, clock=clock)
    for day in range(4):
        for _ in range(5):
            first = part.log_end_offset
            await part.append([batch(values_for(first, 4), ts=T0 + day * DAY)])
        part.roll()
    await part.flush()
    return part


async def test_retention_by_time_deletes_whole_expired_segments(tmp_path: Path) -> None:
    clock = Clock()
    cfg = PartitionConfig(retention_ms=DAY + 1)
    part = await _aged_log(tmp_path / "p", cfg, clock)
    try:
        bases = [s.base_offset for s in part.segments]
        assert bases == [0, 20, 40, 60, 80]
        # now = day 3: day 0 and day 1 segments are more than a day (+1 ms) old
        assert part.apply_retention(now_ms=T0 + 3 * DAY) == [0, 20]
        assert part.log_start_offset == 40
        assert segment.list_segments(tmp_path / "p") == [40, 60, 80]
        with pytest.raises(OffsetOutOfRange):
            part.read(39, 100)
        found = read_all(part)
        assert sorted(found) == list(range(40, 80))
        assert_values_match_offsets(found)
        # nothing more expired yet
        assert part.apply_retention(now_ms=T0 + 3 * DAY) == []
        # far future: every closed segment goes, the active one (empty here) stays
        assert part.apply_retention(now_ms=T0 + 100 * DAY) == [40, 60]
        assert [s.base_offset for s in part.segments] == [80]
        assert part.log_start_offset == part.high_watermark == 80
    finally:
        await part.close()


async def test_retention_never_deletes_the_active_segment(tmp_path: Path) -> None:
    part = open_partition(tmp_path / "p", config=PartitionConfig(retention_ms=1000))
    try:
        await part.append([batch([b"old"], ts=T0)])
        assert part.apply_retention(now_ms=T0 + 100 * DAY) == []
        assert read_all(part) == {0: b"old"}
    finally:
        await part.close()


async def test_retention_uses_the_injected_clock(tmp_path: Path) -> None:
    clock = Clock(T0)
    cfg = PartitionConfig(retention_ms=DAY)
    part = await _aged_log(tmp_path / "p", cfg, clock)
    try:
        assert part.apply_retention() == []
        clock.now = T0 + 2 * DAY + 1
        assert part.apply_retention() == [0, 20]
    finally:
        await part.close()


async def test_retention_off_the_loop_unlinks_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(T0)
    part = await _aged_log(tmp_path / "p", PartitionConfig(retention_ms=DAY), clock)
    threads: list[int] = []
    real_fsync_dir = partition_mod.fsync_dir

    def watched(directory: Path) -> None:
        threads.append(threading.get_ident())
        real_fsync_dir(directory)

    monkeypatch.setattr(partition_mod, "fsync_dir", watched)
    try:
        clock.now = T0 + 2 * DAY + 1
        assert await part.apply_retention_off_loop() == [0, 20]
        assert threads and threading.get_ident() not in threads
        assert part.log_start_offset == 40
        assert not (tmp_path / "p" / "00000000000000000000.log").exists()
        assert sorted(read_all(part)) == list(range(40, 80))
        assert await part.apply_retention_off_loop() == []
    finally:
        await part.close()


async def test_retention_by_size_keeps_at_least_retention_bytes(tmp_path: Path) -> None:
    clock = Clock()
    cfg = PartitionConfig(retention_ms=None, retention_bytes=1)
    part = await _aged_log(tmp_path / "p", cfg, clock)
    await part.close()
    seg_size = os.path.getsize(tmp_path / "p" / "00000000000000000000.log")
    # keep at least two segments' worth: the two oldest of four full segments go
    cfg = PartitionConfig(retention_ms=None, retention_bytes=2 * seg_size)
    part = open_partition(tmp_path / "p", config=cfg, clock=clock)
    try:
        assert part.apply_retention() == [0, 20]
        assert part.size_bytes >= 2 * seg_size
        assert part.log_start_offset == 40
        assert sorted(read_all(part)) == list(range(40, 80))
    finally:
        await part.close()
    # a limit below one segment: every closed segment goes, the active one stays whole
    cfg = PartitionConfig(retention_ms=None, retention_bytes=1)
    part = open_partition(tmp_path / "p", config=cfg, clock=clock)
    try:
        await part.append([batch(values_for(80, 3))])
        assert part.apply_retention() == [40, 60]
        assert [s.base_offset for s in part.segments] == [80]
        assert read_all(part) == dict(zip(range(80, 83), values_for(80, 3), strict=True))
    finally:
        await part.close()


async def test_retention_keeps_a_segment_not_yet_synced(tmp_path: Path) -> None:
    part = open_partition(tmp_path / "p", config=PartitionConfig(retention_ms=1000))
    try:
        part.append_nowait([batch([b"a"], ts=T0)])
        part.roll()
        # nothing has been synced: deleting the old segment would hide the loss of data
        # that was never durable
        assert part.apply_retention(now_ms=T0 + DAY) == []
        await part.flush()
        assert part.apply_retention(now_ms=T0 + DAY) == [0]
    finally:
        await part.close()


async def test_retention_during_a_sync_neither_breaks_the_sync_nor_the_log(
    tmp_path: Path,
) -> None:
    entered = threading.Event()
    release = threading.Event()
    blocking = False

    def slow_fsync(fd: int) -> None:
        if blocking:
            entered.set()
            release.wait(10)
        os.fdatasync(fd)

    part = open_partition(
        tmp_path / "p", config=PartitionConfig(retention_ms=1000), fsync=slow_fsync
    )
    try:
        await part.append([batch([b"a"], ts=T0)])
        blocking = True
        part.roll()  # the old segment is synced and sealed by the flush this starts
        await asyncio.to_thread(entered.wait, 10)
        # expired, but its sync is in flight: deleting it now would close the file under
        # the sync thread (and take the partition offline)
        assert part.apply_retention(now_ms=T0 + DAY) == []
        release.set()
        await part.append([batch([b"b"], ts=T0 + DAY)])
        assert not part.offline
        assert part.apply_retention(now_ms=T0 + DAY) == [0]
        assert read_all(part) == {1: b"b"}
    finally:
        release.set()
        await part.close()


# ------------------------------------------------------------------------------ recovery


def batch_bytes(log_file: Path) -> bytes:
    """A segment file's bytes before the fill preallocated after its batches, if any."""
    data = log_file.read_bytes()
    return data[: segment.fill_start(data)]


def batch_end(log_file: Path) -> int:
    """Where a segment file's batches end (its preallocated fill, if any, begins)."""
    return len(batch_bytes(log_file))


def write_after_batches(log_file: Path, data: bytes) -> None:
    """Write ``data`` where a segment file's batches end, over its preallocated fill if it
    has some, as a write the crash tore would have: a torn tail."""
    with open(log_file, "r+b") as f:
        f.seek(batch_end(log_file))
        f.write(data)


def crash_image(src: Path, dst: Path) -> Path:
    """What a SIGKILL leaves on disk: the files as they are now, no close, no checkpoint.
    A file that goes while the directory is copied (a checkpoint's temporary file, renamed
    by the partition's own I/O thread) is left out, as a crash at that instant would."""

    def copy(a: str, b: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=copy)
    return dst


async def test_clean_close_reopens_with_everything_and_scans_nothing(tmp_path: Path) -> None:
    cfg = PartitionConfig(segment_bytes=64 * 1024)
    part = open_partition(tmp_path / "p", config=cfg)
    await fill(part, 400, per_batch=10, size=100)
    size = part.size_bytes
    await part.close()
    assert size > 300_000
    part, report = Partition.open(tmp_path / "p", cfg)
    try:
        assert report.checkpoint_found
        assert report.scanned_bytes == 0
        assert report.truncated_bytes == 0
        assert report.next_offset == 4000 == part.high_watermark == part.log_end_offset
        found = read_all(part)
        assert sorted(found) == list(range(4000))
        assert_values_match_offsets(found)
        result = await part.append([batch(values_for(4000, 1))])
        assert result.base_offset == 4000
    finally:
        await part.close()


async def test_recovery_scans_only_past_the_checkpoint(tmp_path: Path) -> None:
    clock = Clock()  # frozen: no periodic checkpoint, only the ones rolls write
    cfg = PartitionConfig(segment_bytes=32 * 1024)
    part = open_partition(tmp_path / "p", config=cfg, clock=clock)
    try:
        await fill(part, 300, per_batch=10, size=100)
        crash = crash_image(tmp_path / "p", tmp_path / "crash")
        total = part.size_bytes
    finally:
        await part.close()
    again, report = Partition.open(crash, cfg)
    try:
        assert report.checkpoint_found
        assert 0 < report.scanned_bytes <= 32 * 1024 + 2000  # at most the active segment
        assert report.scanned_bytes < total / 10
        assert report.truncated_bytes == 0
        found = read_all(again)
        assert sorted(found) == list(range(3000))
        assert_values_match_offsets(found)
    finally:
        await again.close()


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b"\x00" * 100, id="zeros"),
        pytest.param(random.Random(20261207).randbytes(1000), id="garbage"),
        pytest.param(b"partial", id="partial-batch"),
    ],
)
async def test_recovery_truncates_a_torn_tail(tmp_path: Path, tail: bytes) -> None:
    clock = Clock()
    part = open_partition(tmp_path / "p", clock=clock)
    await fill(part, 20)
    crash = crash_image(tmp_path / "p", tmp_path / "crash")
    await part.close()
    log_file = crash / "00000000000000000000.log"
    good = batch_end(log_file)
    if tail == b"partial":
        whole = records.stamp_header(batch(values_for(100, 5)), 100, 0)
        tail = whole + batch(values_for(100, 5))[records.HEADER_SIZE :][:-10]
    # a last byte that happens to equal the fill at its position is fill to recovery (the
    # two cannot be told apart), so the torn tail must not end like the fill it covers
    last = good + len(tail) - 1
    if tail[-1:] == segment.fill_bytes(last, 1):
        tail = tail[:-1] + bytes([tail[-1] ^ 0xFF])
    write_after_batches(log_file, tail)  # where the next append would have gone
    again, report = Partition.open(crash)
    try:
        assert report.truncated_bytes == len(tail)
        assert report.next_offset == 100
        assert log_file.stat().st_size == good
        found = read_all(again)
        assert sorted(found) == list(range(100))
        assert_values_match_offsets(found)
        assert (await again.append([batch(values_for(100, 1))])).base_offset == 100
    finally:
        await again.close()


async def test_a_corrupt_batch_is_quarantined_and_the_segments_after_it_are_kept(
    tmp_path: Path,
) -> None:
    clock = Clock()
    cfg = PartitionConfig(segment_bytes=1024)
    part = open_partition(tmp_path / "p", config=cfg, clock=clock)
    await fill(part, 50)
    crash = crash_image(tmp_path / "p", tmp_path / "crash")
    await part.close()
    (crash / CHECKPOINT_FILE).unlink()  # no checkpoint: everything is verified
    bases = segment.list_segments(crash)
    assert len(bases) > 4
    victim = crash / f"{bases[2]:020d}.log"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF  # in the body of the segment's first batch (offsets base..base+4)
    victim.write_bytes(bytes(data))
    again, report = Partition.open(crash, cfg)
    try:
        assert not report.checkpoint_found
        assert report.truncated_bytes == 0 and report.removed_segments == []
        assert segment.list_segments(crash) == bases
        (rng,) = report.quarantined
        assert (rng.segment, rng.position, rng.first_offset, rng.end_offset) == (
            bases[2],
            0,
            bases[2],
            bases[2] + 5,
        )
        assert again.log_end_offset == again.high_watermark == 250
        found, errors = read_around(again)
        lost = set(range(bases[2], bases[2] + 5))
        assert sorted(found) == sorted(set(range(250)) - lost)
        assert_values_match_offsets(found)
        assert [(e.first_offset, e.end_offset) for e in errors] == [(bases[2], bases[2] + 5)]
        assert (await again.append([batch(values_for(250, 1))])).base_offset == 250
    finally:
        await again.close()


@pytest.mark.parametrize("break_at", ["corrupt", "gap"])
async def test_damage_or_a_gap_before_later_segments_is_quarantined_and_only_the_end_cut(
    tmp_path: Path, break_at: str
) -> None:
    # A segment's last batch is damaged (or missing) and every later segment has bytes of
    # garbage after its batches: only the garbage at the very end of the log is a torn
    # tail. The rest is quarantined; no segment is deleted, no valid record lost.
    cfg = PartitionConfig(segment_bytes=1024)
    part = open_partition(tmp_path / "p", config=cfg, clock=Clock())
    await fill(part, 50)
    crash = crash_image(tmp_path / "p", tmp_path / "crash")
    await part.close()
    (crash / CHECKPOINT_FILE).unlink()
    bases = segment.list_segments(crash)
    assert len(bases) > 4
    victim = crash / f"{bases[1]:020d}.log"
    data = victim.read_bytes()
    last_batch = list(records.iter_batches(data))[-1][0]
    lost_from = records.validate_batch(data, last_batch).base_offset
    if break_at == "corrupt":
        victim.write_bytes(
            data[:last_batch] + bytes([data[last_batch] ^ 1]) + data[last_batch + 1 :]
        )
    else:  # the last batch is missing: the next segment starts past a gap
        victim.write_bytes(data[:last_batch])
    for base in bases[2:]:
        write_after_batches(crash / f"{base:020d}.log", b"torn" * 5)
    again, report = Partition.open(crash, cfg)
    try:
        assert report.removed_segments == []
        assert segment.list_segments(crash) == bases
        assert report.truncated_bytes == 20  # the last segment's torn tail only
        damaged = [r for r in report.quarantined if r.first_offset < r.end_offset]
        assert [(r.segment, r.first_offset, r.end_offset) for r in damaged] == [
            (bases[1], lost_from, bases[2])
        ]
        assert damaged[0].length == (len(data) - last_batch if break_at == "corrupt" else 0)
        found, errors = read_around(again)
        assert sorted(found) == sorted(set(range(250)) - set(range(lost_from, bases[2])))
        assert_values_match_offsets(found)
        assert [(e.first_offset, e.end_offset) for e in errors] == [(lost_from, bases[2])]
        assert (await again.append([batch(values_for(250, 1))])).base_offset == 250
    finally:
        await again.close()


async def test_a_missing_or_torn_checkpoint_means_a_full_scan(tmp_path: Path) -> None:
    cfg = PartitionConfig(segment_bytes=4096)
    part = open_partition(tmp_path / "p", config=cfg)
    await fill(part, 50)
    size = part.size_bytes
    await part.close()
    cp = tmp_path / "p" / CHECKPOINT_FILE
    cp.write_bytes(cp.read_bytes()[:-3])
    again, report = Partition.open(tmp_path / "p", cfg)
    try:
        assert not report.checkpoint_found
        assert report.scanned_bytes == size
        assert sorted(read_all(again)) == list(range(250))
    finally:
        await again.close()


@pytest.mark.parametrize("damage", ["garbage", "shifted", "truncated", "missing"])
async def test_a_damaged_index_is_rebuilt_and_reads_stay_correct(
    tmp_path: Path, damage: str
) -> None:
    cfg = PartitionConfig(segment_bytes=8 * 1024, index_interval_bytes=256)
    part = open_partition(tmp_path / "p", config=cfg)
    for i in range(100):
        first = part.log_end_offset
        await part.append([batch(values_for(first, 4), ts=T0 + i)])
    await part.close()
    rng = random.Random(damage)
    for index in sorted((tmp_path / "p").glob("*.index")):
        raw = index.read_bytes()
        if damage == "garbage":
            index.write_bytes(rng.randbytes(len(raw) or 64))
        elif damage == "shifted":  # every entry a few bytes off its batch
            entries = [segment._ENTRY.unpack_from(raw, i) for i in range(0, len(raw), 16)]
            index.write_bytes(b"".join(segment._ENTRY.pack(r, p + 7, t) for r, p, t in entries))
        elif damage == "truncated":
            index.write_bytes(raw[: len(raw) // 3])
        else:
            index.unlink()
    again, report = Partition.open(tmp_path / "p", cfg)
    try:
        assert report.truncated_bytes == 0
        assert report.removed_segments == []
        for start in (0, 1, 97, 201, 399):
            found = read_all(again, start, max_bytes=300)
            assert sorted(found) == list(range(start, 400))
            assert_values_match_offsets(found)
        assert again.offset_for_timestamp(T0 + 50) == 200
        assert (await again.append([batch(values_for(400, 1))])).base_offset == 400
    finally:
        await again.close()


async def test_reopen_after_retention_keeps_the_new_log_start(tmp_path: Path) -> None:
    clock = Clock()
    cfg = PartitionConfig(retention_ms=DAY)
    part = await _aged_log(tmp_path / "p", cfg, clock)
    part.apply_retention(now_ms=T0 + 10 * DAY)
    await part.close()
    again, report = Partition.open(tmp_path / "p", cfg)
    try:
        assert again.log_start_offset == again.log_end_offset == 80
        assert report.truncated_bytes == 0
        assert (await again.append([batch(values_for(80, 1))])).base_offset == 80
    finally:
        await again.close()


# ------------------------------------------------------------------------------ producers


def pbatch(seq: int, count: int, pid: int = 99, first: int = 0) -> bytes:
    return batch(values_for(first, count), producer_id=pid, base_sequence=seq)


async def test_duplicate_batch_returns_original_offsets_and_is_stored_once(
    part: Partition,
) -> None:
    first = await part.append([pbatch(0, 3)])
    await part.append([batch([b"other"])])
    second = await part.append([pbatch(3, 2)])
    again = await part.append([pbatch(0, 3)])
    assert (again.base_offset, again.last_offset, again.duplicate) == (0, 2, True)
    assert (first.base_offset, first.last_offset, first.duplicate) == (0, 2, False)
    retry = await part.append([pbatch(3, 2)])
    assert (retry.base_offset, retry.last_offset, retry.duplicate) == (4, 5, True)
    assert second.base_offset == 4
    assert part.log_end_offset == 6
    assert len(read_all(part)) == 6


async def test_out_of_order_sequence_is_refused(part: Partition) -> None:
    await part.append([pbatch(0, 3)])
    with pytest.raises(OutOfOrderSequence):
        await part.append([pbatch(5, 1)])  # gap
    with pytest.raises(OutOfOrderSequence):
        await part.append([pbatch(1, 1)])  # overlaps, not a retry of a whole batch
    assert part.log_end_offset == 3
    assert (await part.append([pbatch(3, 1)])).base_offset == 3


async def test_producers_are_independent(part: Partition) -> None:
    await part.append([pbatch(0, 2, pid=1)])
    await part.append([pbatch(0, 2, pid=2)])
    assert (await part.append([pbatch(0, 2, pid=1)])).duplicate
    assert (await part.append([pbatch(0, 2, pid=2)])).base_offset == 2


async def test_consecutive_batches_of_one_producer_in_one_append(part: Partition) -> None:
    await part.append([pbatch(0, 2)])
    result = await part.append([pbatch(2, 2), pbatch(4, 3)])
    assert (result.base_offset, result.last_offset) == (2, 6)
    assert (await part.append([pbatch(4, 3)])).base_offset == 4
    with pytest.raises(OutOfOrderSequence):
        await part.append([pbatch(7, 1), pbatch(9, 1)])  # gap inside the request
    with pytest.raises(CorruptBatch):
        await part.append([pbatch(7, 1), pbatch(7, 1)])  # the same batch twice
    with pytest.raises(CorruptBatch):
        await part.append([pbatch(0, 1, pid=5), pbatch(0, 1, pid=5)])  # new producer, twice
    assert part.log_end_offset == 7


async def test_a_duplicate_inside_a_multi_batch_append_is_refused(part: Partition) -> None:
    await part.append([pbatch(0, 2)])
    with pytest.raises(CorruptBatch):
        await part.append([pbatch(0, 2), batch([b"x"])])
    assert part.log_end_offset == 2


async def test_producer_state_survives_a_clean_reopen(tmp_path: Path) -> None:
    part = open_partition(tmp_path / "p")
    await part.append([pbatch(0, 3)])
    await part.append([pbatch(3, 3)])
    await part.close()
    again, report = Partition.open(tmp_path / "p")
    try:
        assert report.scanned_bytes == 0  # restored from the checkpoint alone
        retry = await again.append([pbatch(3, 3)])
        assert (retry.base_offset, retry.duplicate) == (3, True)
        with pytest.raises(OutOfOrderSequence):
            await again.append([pbatch(10, 1)])
        assert (await again.append([pbatch(6, 1)])).base_offset == 6
    finally:
        await again.close()


async def test_producer_state_is_rebuilt_from_the_log_past_the_checkpoint(
    tmp_path: Path,
) -> None:
    clock = Clock()  # frozen: the checkpoint stays where open wrote it
    part = open_partition(tmp_path / "p", clock=clock)
    await part.append([pbatch(0, 3, pid=1)])
    await part.close()  # checkpoint knows producer 1 up to sequence 2
    part = open_partition(tmp_path / "p", clock=clock)
    await part.append([pbatch(3, 2, pid=1)])
    await part.append([pbatch(0, 4, pid=2)])
    crash = crash_image(tmp_path / "p", tmp_path / "crash")
    await part.close()
    again, report = Partition.open(crash)
    try:
        assert report.checkpoint_found
        assert report.scanned_bytes > 0
        assert (await again.append([pbatch(0, 3, pid=1)])).base_offset == 0  # from checkpoint
        r1 = await again.append([pbatch(3, 2, pid=1)])  # from the scan
        r2 = await again.append([pbatch(0, 4, pid=2)])  # from the scan
        assert (r1.base_offset, r1.duplicate, r2.base_offset, r2.duplicate) == (3, True, 5, True)
        assert again.log_end_offset == 9
    finally:
        await again.close()


async def test_producer_state_forgets_batches_cut_by_recovery(tmp_path: Path) -> None:
    clock = Clock()
    part = open_partition(tmp_path / "p", clock=clock)
    await part.append([pbatch(0, 3)])
    await part.append([pbatch(3, 3)])
    crash = crash_image(tmp_path / "p", tmp_path / "crash")
    await part.close()
    log_file = crash / "00000000000000000000.log"
    first_len = records.validate_batch(log_file.read_bytes()).batch_length
    with open(log_file, "r+b") as f:
        f.truncate(first_len + 30)  # the second batch is torn
    again, report = Partition.open(crash)
    try:
        assert report.truncated_bytes == 30
        # the torn batch is gone, so its retry must be appended again, at offset 3
        retry = await again.append([pbatch(3, 3)])
        assert (retry.base_offset, retry.duplicate) == (3, False)
    finally:
        await again.close()


# ------------------------------------------------------------------------------ failures


async def test_failed_fsync_takes_the_partition_offline_and_is_never_retried(
    tmp_path: Path,
) -> None:
    calls: list[int] = []
    failing = False

    def fsync(fd: int) -> None:
        calls.append(fd)
        if failing:
            raise OSError(errno.EIO, "Input/output error")
        os.fdatasync(fd)

    part = open_partition(tmp_path / "p", fsync=fsync)
    try:
        await part.append([batch([b"safe"])])
        assert part.high_watermark == 1
        failing = True
        calls.clear()
        with pytest.raises(LogOffline):
            await part.append([batch([b"lost?"])])
        assert part.offline
        assert part.high_watermark == 1
        assert part.read(1, 100) == b""
        failing = False  # even if the disk "recovers", the partition must not trust it
        for acks in (Acks.ALL, Acks.NONE):
            with pytest.raises(LogOffline):
                await part.append([batch([b"later"])], acks)
        with pytest.raises(LogOffline):
            await part.wait_durable(2)
        await asyncio.sleep(0.01)
        assert len(calls) == 1
        assert part.high_watermark == 1
    finally:
        await part.close()
    # reopening re-reads the disk (recovery), and the partition takes writes again
    again, _report = Partition.open(tmp_path / "p")
    try:
        assert again.read(0, 100)
        result = await again.append([batch([b"after"])])
        assert result.base_offset == again.log_end_offset - 1
    finally:
        await again.close()


async def test_failed_fsync_fails_every_pending_ack(tmp_path: Path) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    part = open_partition(tmp_path / "p", fsync=fsync)
    try:
        results = await asyncio.gather(
            *(part.append([batch([b"x"])]) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, LogOffline) for r in results)
        assert part.high_watermark == 0
    finally:
        await part.close()


async def test_disk_full_rolls_back_and_appends_resume_when_space_returns(
    part: Partition, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(part, 3)
    active = part.segments[-1]
    stored, end, hw = batch_bytes(active.log_path), part.log_end_offset, part.high_watermark

    def full(fd: int, buffers: list[bytes], offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segment.os, "pwritev", full)
    for batches in ([batch(values_for(end, 2))], [batch([b"a"]), batch([b"b"])]):
        with pytest.raises(StorageFull):
            await part.append(batches)
        assert batch_bytes(active.log_path) == stored
        assert (part.log_end_offset, part.high_watermark) == (end, hw)
    assert not part.offline
    monkeypatch.undo()
    result = await part.append([batch(values_for(end, 2))])
    assert result.base_offset == end
    found = read_all(part)
    assert sorted(found) == list(range(end + 2))
    assert_values_match_offsets(found)


async def test_disk_full_does_not_record_the_producer_sequence(
    part: Partition, monkeypatch: pytest.MonkeyPatch
) -> None:
    await part.append([pbatch(0, 1)])

    def full(fd: int, buffers: list[bytes], offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segment.os, "pwritev", full)
    with pytest.raises(StorageFull):
        await part.append([pbatch(1, 1)])
    monkeypatch.undo()
    # the refused batch was never stored: its retry is a new append, not a duplicate
    result = await part.append([pbatch(1, 1)])
    assert (result.base_offset, result.duplicate) == (1, False)


async def test_disk_full_while_rolling_is_storage_full_and_a_later_roll_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = open_partition(tmp_path / "p", config=PartitionConfig(segment_bytes=100))
    try:
        await part.append([batch(values_for(0, 1, size=100))])  # the next append rolls
        real_open = os.open

        def no_room_for_the_index(path: Path, flags: int, mode: int = 0o777) -> int:
            if str(path).endswith(".index") and flags & os.O_EXCL:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(path, flags, mode)

        monkeypatch.setattr(segment.os, "open", no_room_for_the_index)
        with pytest.raises(StorageFull):
            await part.append([batch(values_for(1, 1))])
        monkeypatch.undo()
        assert part.log_end_offset == 1
        for first in (1, 2):
            assert (await part.append([batch(values_for(first, 1))])).base_offset == first
        assert len(part.segments) == 2
        found = read_all(part)
        assert sorted(found) == [0, 1, 2]
        assert_values_match_offsets(found)
    finally:
        await part.close()
    assert segment.list_segments(tmp_path / "p") == [0, 1]


async def test_checkpoint_after_a_roll_and_retention_still_names_a_live_segment(
    tmp_path: Path,
) -> None:
    # a roll with no append after it, then retention deleting every closed segment: the
    # close-time checkpoint must point into the new segment, so the reopen trusts it
    directory = tmp_path / "p"
    p = open_partition(directory, config=PartitionConfig(retention_bytes=1))
    await fill(p, 3)
    end = p.log_end_offset
    p.roll()
    await p.flush()
    assert p.apply_retention() != []
    await p.close()
    reopened, report = Partition.open(directory, PartitionConfig(retention_bytes=1))
    assert report.checkpoint_found
    assert (reopened.log_start_offset, reopened.log_end_offset) == (end, end)
    await reopened.close()


async def test_abandoned_long_poll_waiters_do_not_pile_up_on_an_idle_partition(
    part: Partition,
) -> None:
    for _ in range(10_000):
        part.high_watermark_changed().cancel()
    assert len(part._hw_waiters) <= 128


async def test_a_failed_checkpoint_write_does_not_take_the_partition_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import storage.flush as flush_module

    def full(directory: Path, checkpoint: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    p = open_partition(tmp_path / "p", config=PartitionConfig(checkpoint_interval_ms=0))
    monkeypatch.setattr(flush_module, "write_checkpoint", full)
    result = await p.append([batch([b"still durable"])])
    assert p.high_watermark == result.last_offset + 1
    assert not p.offline
    monkeypatch.undo()
    await p.close()


# ------------------------------------------------------------------------------ retention (pure)


def test_retention_decision_stops_at_the_first_segment_that_must_stay(tmp_path: Path) -> None:
    from storage.retention import segments_to_delete

    segs = [segment.Segment.create(tmp_path, base, index_interval_bytes=4096) for base in (0, 10)]
    try:
        for i, seg in enumerate(segs):
            seg.size, seg.max_timestamp = 100, T0 + i * DAY
        old, active = segs

        def decide(**kw: object) -> int:
            args: dict[str, object] = {
                "now_ms": T0 + 10 * DAY,
                "retention_ms": DAY,
                "retention_bytes": None,
                "in_use": lambda s: False,
            }
            args.update(kw)
            return segments_to_delete(segs, **args)  # type: ignore[arg-type]

        assert decide() == 1  # expired; the active segment always stays
        assert decide(retention_ms=None) == 0
        assert decide(retention_ms=None, retention_bytes=100) == 1  # 100 B left without it
        assert decide(retention_ms=None, retention_bytes=101) == 0
        assert decide(in_use=lambda s: s is old) == 0
        assert decide(now_ms=T0 + DAY) == 0  # not yet older than a day
        assert active.size == 100
    finally:
        for seg in segs:
            seg.close()


def test_idle_producers_expire_by_the_nodes_clock_not_their_timestamps(tmp_path: Path) -> None:
    from storage.producers import ProducerTable

    table = ProducerTable()
    table.update(1, 0, 1, 0, timestamp=1_000)
    table.update(2, 0, 1, 1, timestamp=2_000)
    table.update(1, 1, 1, 2, timestamp=3_000)  # producer 1 used again: now the newest
    assert table.expire(2_500) == 1
    assert [e.producer_id for e in table.snapshot()] == [1]
    assert table.expire(3_001) == 1 and len(table) == 0
