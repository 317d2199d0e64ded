"""One segment file and its sparse index (``storage/segment.py``)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import records, segment
from storage.errors import CorruptBatch, StorageError, StorageFull
from storage.segment import Segment


def _batch(n: int, *, ts: int = 1_000, tag: bytes = b"v") -> bytes:
    return records.encode_batch([(i, None, tag + b"%d" % i) for i in range(n)], first_timestamp=ts)


def _append(seg: Segment, batch: bytes) -> tuple[int, records.BatchHeader]:
    header = records.validate_batch(batch)
    head = records.stamp_header(batch, seg.next_offset, 0)
    stamped = records.validate_batch(head + batch[records.HEADER_SIZE :])
    pos = seg.append(head, memoryview(batch)[records.HEADER_SIZE :], stamped)
    assert stamped.record_count == header.record_count
    return pos, stamped


def _fill(seg: Segment, count: int, *, per_batch: int = 3, ts0: int = 1_000) -> list[int]:
    """Append ``count`` batches; returns their positions."""
    return [_append(seg, _batch(per_batch, ts=ts0 + i))[0] for i in range(count)]


def _offsets_in(data: bytes) -> list[int]:
    out = []
    for _pos, header in records.iter_batches(data):
        out.extend(range(header.base_offset, header.next_offset))
    return out


@pytest.fixture
def seg(tmp_path: Path) -> Iterator[Segment]:
    s = Segment.create(tmp_path, 100, index_interval_bytes=256)
    yield s
    s.close()


def test_create_names_files_by_base_offset(tmp_path: Path) -> None:
    s = Segment.create(tmp_path, 42, index_interval_bytes=4096)
    s.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000000000000000042.index",
        "00000000000000000042.log",
    ]
    assert segment.list_segments(tmp_path) == [42]


def test_create_refuses_an_existing_segment(tmp_path: Path) -> None:
    Segment.create(tmp_path, 0, index_interval_bytes=4096).close()
    with pytest.raises(StorageError):
        Segment.create(tmp_path, 0, index_interval_bytes=4096)


def test_list_segments_ignores_strays(tmp_path: Path) -> None:
    for base in (300, 7, 20):
        Segment.create(tmp_path, base, index_interval_bytes=4096).close()
    (tmp_path / "00000000000000000005.log.tmp").write_bytes(b"")
    (tmp_path / "00000000000000000009.index").write_bytes(b"")
    (tmp_path / "notes.log").write_bytes(b"")
    assert segment.list_segments(tmp_path) == [7, 20, 300]


def test_appends_get_contiguous_offsets_and_read_back(seg: Segment) -> None:
    positions = _fill(seg, 20)
    assert positions[0] == 0
    assert seg.next_offset == 100 + 60
    assert seg.size == os.fstat(seg.fd).st_size
    data = seg.read(0, seg.size)
    assert _offsets_in(data) == list(range(100, 160))


def test_find_position_lands_on_the_batch_holding_the_offset(seg: Segment) -> None:
    positions = _fill(seg, 40)  # 3 records per batch: offsets 100..219
    for offset in range(100, 220):
        pos = seg.find_position(offset)
        assert pos == positions[(offset - 100) // 3]
    assert seg.find_position(220) == seg.size
    # the index is sparse: fewer entries than batches, but more than one
    assert 1 < len(seg._idx_offsets) < 40


def test_find_position_respects_a_limit(seg: Segment) -> None:
    positions = _fill(seg, 10)
    assert seg.find_position(100 + 3 * 8, limit=positions[5]) == positions[5]


def test_reopen_recovers_size_offsets_and_timestamps(tmp_path: Path) -> None:
    s = Segment.create(tmp_path, 0, index_interval_bytes=200)
    _fill(s, 30, ts0=5_000)
    size, next_offset, max_ts = s.size, s.next_offset, s.max_timestamp
    s.seal()
    s.close()
    again = Segment.open(tmp_path, 0, index_interval_bytes=200)
    try:
        assert (again.size, again.next_offset, again.max_timestamp) == (size, next_offset, max_ts)
        assert again.first_timestamp == 5_000
        assert _offsets_in(again.read(0, again.size)) == list(range(90))
    finally:
        again.close()


def test_trusted_prefix_ending_mid_batch_is_refused(tmp_path: Path) -> None:
    s = Segment.create(tmp_path, 0, index_interval_bytes=200)
    _fill(s, 4)
    s.close()
    with pytest.raises(CorruptBatch):
        Segment.open(tmp_path, 0, index_interval_bytes=200, trusted_size=10)


def test_index_with_a_lost_tail_is_still_usable(tmp_path: Path) -> None:
    s = Segment.create(tmp_path, 0, index_interval_bytes=100)
    positions = _fill(s, 30)
    s.close()
    index = tmp_path / "00000000000000000000.index"
    raw = index.read_bytes()
    index.write_bytes(raw[: len(raw) // 2 + 5])  # half the entries and a torn one
    again = Segment.open(tmp_path, 0, index_interval_bytes=100)
    try:
        assert again.next_offset == 90
        for offset in range(90):
            assert again.find_position(offset) == positions[offset // 3]
    finally:
        again.close()


@pytest.mark.parametrize("shift", [-3, 6])
def test_index_naming_the_wrong_batches_is_rebuilt_on_use(tmp_path: Path, shift: int) -> None:
    s = Segment.create(tmp_path, 0, index_interval_bytes=250)
    positions = _fill(s, 30)
    s.close()
    # every entry names a real batch boundary, but says it holds other offsets than it does
    # (-3: a later batch than the index claims, so trusting it would skip records)
    index = tmp_path / "00000000000000000000.index"
    raw = index.read_bytes()
    entries = [segment._ENTRY.unpack_from(raw, i) for i in range(0, len(raw), 16)]
    assert len(entries) > 3
    lying = entries[:1] + [(rel + shift, pos, ts) for rel, pos, ts in entries[1:]]
    index.write_bytes(b"".join(segment._ENTRY.pack(*e) for e in lying))
    again = Segment.open(tmp_path, 0, index_interval_bytes=250)
    try:
        for offset in range(90):
            assert again.find_position(offset) == positions[offset // 3]
        assert again.next_offset == 90
    finally:
        again.close()


def test_rebuild_index_matches_the_original(tmp_path: Path) -> None:
    s = Segment.create(tmp_path, 0, index_interval_bytes=150)
    _fill(s, 25)
    before = (list(s._idx_offsets), list(s._idx_positions), list(s._idx_timestamps))
    s.rebuild_index()
    try:
        after = (list(s._idx_offsets), list(s._idx_positions), list(s._idx_timestamps))
        assert after == before
        assert s.next_offset == 75
    finally:
        s.close()


def test_truncate_to_a_batch_boundary(seg: Segment) -> None:
    positions = _fill(seg, 12)
    seg.truncate_to(positions[5])
    assert seg.size == positions[5]
    assert seg.next_offset == 100 + 15
    assert os.fstat(seg.fd).st_size == positions[5]
    assert seg.find_position(100 + 14) == positions[4]
    _append(seg, _batch(2))
    assert _offsets_in(seg.read(0, seg.size)) == list(range(100, 117))


def test_find_offset_by_timestamp(tmp_path: Path) -> None:
    s = Segment.create(tmp_path, 0, index_interval_bytes=120)
    try:
        # batch i holds timestamps 10*i .. 10*i + 2 and offsets 3i .. 3i+2
        for i in range(30):
            _append(s, _batch(3, ts=10 * i))
        assert s.find_offset_by_timestamp(0) == 0
        assert s.find_offset_by_timestamp(12) == 3 * 1
        assert s.find_offset_by_timestamp(13) == 3 * 2
        assert s.find_offset_by_timestamp(150) == 3 * 15
        assert s.find_offset_by_timestamp(292) == 3 * 29
        assert s.find_offset_by_timestamp(293) is None
    finally:
        s.close()


def test_append_many_writes_all_batches(seg: Segment) -> None:
    items = []
    offset = seg.next_offset
    for n in (1, 4, 2):
        batch = _batch(n)
        head = records.stamp_header(batch, offset, 0)
        stamped = records.validate_batch(head + batch[records.HEADER_SIZE :])
        items.append((head, memoryview(batch)[records.HEADER_SIZE :], stamped))
        offset += n
    seg.append_many(items)
    assert seg.next_offset == 107
    assert _offsets_in(seg.read(0, seg.size)) == list(range(100, 107))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_rolls_the_file_back(
    seg: Segment, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    _fill(seg, 3)
    size, next_offset = seg.size, seg.next_offset

    def partial_then_full(fd: int, buffers: list[bytes], offset: int) -> int:
        os.pwrite(fd, bytes(buffers[0])[:30], offset)  # some bytes landed, then the disk filled
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(segment.os, "pwritev", partial_then_full)
    with pytest.raises(StorageFull):
        _append(seg, _batch(2))
    assert (seg.size, seg.next_offset) == (size, next_offset)
    assert os.fstat(seg.fd).st_size == size
    monkeypatch.undo()
    _append(seg, _batch(2))
    assert _offsets_in(seg.read(0, seg.size)) == list(range(100, 111))


def test_other_write_errors_are_storage_errors_not_disk_full(
    seg: Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    def eio(fd: int, buffers: list[bytes], offset: int) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(segment.os, "pwritev", eio)
    with pytest.raises(StorageError) as info:
        _append(seg, _batch(2))
    assert not isinstance(info.value, StorageFull)
    assert seg.size == 0


def test_short_write_is_completed(seg: Segment, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev

    def short(fd: int, buffers: list[bytes], offset: int) -> int:
        return real(fd, [bytes(buffers[0])[:10]], offset)

    monkeypatch.setattr(segment.os, "pwritev", short)
    _append(seg, _batch(3))
    monkeypatch.undo()
    assert _offsets_in(seg.read(0, seg.size)) == [100, 101, 102]
    assert os.fstat(seg.fd).st_size == seg.size


def test_delete_removes_both_files(tmp_path: Path) -> None:
    s = Segment.create(tmp_path, 0, index_interval_bytes=100)
    _fill(s, 2)
    s.delete()
    assert list(tmp_path.iterdir()) == []
    assert s.closed


def test_a_refused_open_leaves_no_file_open(tmp_path: Path) -> None:
    s = Segment.create(tmp_path, 0, index_interval_bytes=200)
    _fill(s, 4)
    s.close()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(CorruptBatch):
            Segment.open(tmp_path, 0, index_interval_bytes=200, trusted_size=10)
    assert len(os.listdir("/proc/self/fd")) == before
