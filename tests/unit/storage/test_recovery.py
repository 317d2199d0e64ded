"""Recovery (``storage/recovery.py``) on real files: torn tails are cut, corruption is
quarantined, and the tail past the checkpoint is read from the device."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import pytest

from storage import partition, records, recovery
from storage.checkpoint import FILE_NAME as CHECKPOINT_FILE
from storage.partition import Partition
from storage.quarantine import read_quarantine
from storage.recovery import recover
from storage.segment import Segment, list_segments


def _batch(n: int, *, ts: int = 1_000) -> bytes:
    return records.encode_batch([(i, None, b"v%d" % i) for i in range(n)], first_timestamp=ts)


def _stamped(batch: bytes, offset: int) -> bytes:
    return records.stamp_header(batch, offset, 0) + batch[records.HEADER_SIZE :]


def _write_segment(directory: Path, base: int, batches: int, per_batch: int = 3) -> list[int]:
    """A segment file of ``batches`` batches from offset ``base``; returns their positions."""
    seg = Segment.create(directory, base, index_interval_bytes=200)
    positions = []
    for _ in range(batches):
        batch = _batch(per_batch)
        head = records.stamp_header(batch, seg.next_offset, 0)
        positions.append(
            seg.append(
                head, batch[records.HEADER_SIZE :], records.validate_batch(head + batch[64:])
            )
        )
    seg.close()
    return positions


def _recover(directory: Path) -> recovery.Recovered:
    return recover(directory, index_interval_bytes=200, name="t")


def _close(found: recovery.Recovered) -> None:
    for seg in found.segments:
        seg.close()


def test_a_torn_batch_at_the_end_is_cut_and_the_rest_kept(tmp_path: Path) -> None:
    _write_segment(tmp_path, 0, 10)
    log_file = tmp_path / "00000000000000000000.log"
    good = log_file.stat().st_size
    torn = _stamped(_batch(3), 30)[:-5]  # its last bytes never reached the disk
    with open(log_file, "ab") as f:
        f.write(torn)
    found = _recover(tmp_path)
    try:
        report = found.report
        assert (report.scanned_bytes, report.truncated_bytes) == (good + len(torn), len(torn))
        assert report.quarantined == [] and report.next_offset == 30
        assert log_file.stat().st_size == good
    finally:
        _close(found)


def test_a_batch_with_the_wrong_offset_at_the_end_is_cut(tmp_path: Path) -> None:
    _write_segment(tmp_path, 0, 4)
    log_file = tmp_path / "00000000000000000000.log"
    stray = _stamped(_batch(2), 500)  # valid checksums, offsets that do not follow
    with open(log_file, "ab") as f:
        f.write(stray)
    found = _recover(tmp_path)
    try:
        assert found.report.truncated_bytes == len(stray)
        assert found.segments[-1].next_offset == 12
    finally:
        _close(found)


def test_damage_followed_by_a_valid_batch_is_quarantined_not_cut(tmp_path: Path) -> None:
    positions = _write_segment(tmp_path, 0, 10)
    log_file = tmp_path / "00000000000000000000.log"
    size = log_file.stat().st_size
    data = bytearray(log_file.read_bytes())
    data[positions[4] + 70] ^= 0x01  # a body byte of the batch at offset 12
    log_file.write_bytes(bytes(data))
    found = _recover(tmp_path)
    try:
        report = found.report
        assert report.truncated_bytes == 0 and report.removed_segments == []
        (rng,) = report.quarantined
        assert (rng.segment, rng.position, rng.length) == (
            0,
            positions[4],
            positions[5] - positions[4],
        )
        assert (rng.first_offset, rng.end_offset) == (12, 15)
        assert "body checksum" in rng.reason
        assert report.next_offset == 30 and log_file.stat().st_size == size
        assert read_quarantine(tmp_path) == [rng]  # recorded durably
    finally:
        _close(found)


def test_a_damaged_last_segment_with_nothing_valid_is_removed_as_torn(tmp_path: Path) -> None:
    _write_segment(tmp_path, 0, 5)
    (tmp_path / f"{15:020d}.log").write_bytes(b"\x00" * 4096)  # created, never written
    (tmp_path / f"{15:020d}.index").write_bytes(b"")
    found = _recover(tmp_path)
    try:
        assert found.report.removed_segments == [15]
        assert list_segments(tmp_path) == [0]
        assert found.report.quarantined == []
    finally:
        _close(found)


def test_a_segment_wholly_damaged_before_a_valid_one_is_quarantined_whole(
    tmp_path: Path,
) -> None:
    _write_segment(tmp_path, 0, 5)
    _write_segment(tmp_path, 15, 5)
    _write_segment(tmp_path, 30, 5)
    middle = tmp_path / f"{15:020d}.log"
    middle.write_bytes(b"\x00" * middle.stat().st_size)
    found = _recover(tmp_path)
    try:
        report = found.report
        assert report.removed_segments == [] and report.truncated_bytes == 0
        (rng,) = report.quarantined
        assert (rng.segment, rng.position, rng.first_offset, rng.end_offset) == (15, 0, 15, 30)
        assert report.next_offset == 45
    finally:
        _close(found)


def test_the_tail_is_read_with_o_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_segment(tmp_path, 0, 10)
    opened: list[int] = []
    real_open = os.open

    def spy(path: str | Path, flags: int, mode: int = 0o777) -> int:
        opened.append(flags)
        return real_open(path, flags, mode)

    monkeypatch.setattr(recovery.os, "open", spy)
    found = _recover(tmp_path)
    try:
        assert found.report.tail_read == "direct"
        assert any(flags & os.O_DIRECT for flags in opened)
        assert found.report.next_offset == 30
    finally:
        _close(found)


def test_where_o_direct_is_refused_the_tail_is_read_after_dropping_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_segment(tmp_path, 0, 10)
    advice: list[int] = []
    real_open, real_fadvise = os.open, os.posix_fadvise

    def no_direct(path: str | Path, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:  # as FUSE (without direct_io) or an old tmpfs answers
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    def spy(fd: int, offset: int, length: int, how: int) -> None:
        advice.append(how)
        real_fadvise(fd, offset, length, how)

    monkeypatch.setattr(recovery.os, "open", no_direct)
    monkeypatch.setattr(recovery.os, "posix_fadvise", spy)
    found = _recover(tmp_path)
    try:
        assert found.report.tail_read == "fadvise"
        assert os.POSIX_FADV_DONTNEED in advice
        assert found.report.next_offset == 30 and found.report.truncated_bytes == 0
    finally:
        _close(found)


def test_the_tail_is_synced_before_it_is_read_from_the_device(tmp_path: Path) -> None:
    _write_segment(tmp_path, 0, 3)
    synced: list[int] = []

    def fsync(fd: int) -> None:
        synced.append(fd)
        os.fdatasync(fd)

    found = recover(tmp_path, index_interval_bytes=200, name="t", fsync=fsync)
    try:
        assert len(synced) == 1  # the one segment with a tail past the (missing) checkpoint
    finally:
        _close(found)


def test_nothing_past_the_checkpoint_means_no_device_read(tmp_path: Path) -> None:
    from storage.checkpoint import new_checkpoint, write_checkpoint

    _write_segment(tmp_path, 0, 3)
    size = (tmp_path / "00000000000000000000.log").stat().st_size
    write_checkpoint(tmp_path, new_checkpoint(0, size, 9, []))
    found = _recover(tmp_path)
    try:
        assert found.report.checkpoint_found
        assert (found.report.scanned_bytes, found.report.tail_read) == (0, "")
    finally:
        _close(found)
    assert (tmp_path / CHECKPOINT_FILE).exists()


def _open_files() -> set[str]:
    fds = Path("/proc/self/fd")
    out = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            out.add(os.readlink(fd))
    return out


def test_a_failed_open_of_a_new_partition_leaves_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors right after the first segment's two files (a topic created past
    the open-files limit): recovery, or the partition built on it, fails, and neither
    keeps the segment's files open (they leaked, two per failed create, before)."""
    before = _open_files()

    def no_more_files(*_args: object, **_kw: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    # where it runs out: recovery's directory sync, then the partition's own construction
    for module, name, directory in ((recovery, "fsync_dir", "a"), (partition, "Flusher", "b")):
        with monkeypatch.context() as m:
            m.setattr(module, name, no_more_files)
            with pytest.raises(OSError):
                Partition.open(tmp_path / directory)
        assert {f for f in _open_files() - before if str(tmp_path) in f} == set()
    part, _ = Partition.open(tmp_path / "b")  # the same directory opens once it can
    part.close_sync()
