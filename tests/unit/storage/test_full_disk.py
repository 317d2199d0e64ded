"""A full disk (issue 12, item 7, storage side): appends fail with ``storage_full`` and roll
back, the producer that hit it is not stuck, topics can be closed and deleted to free
space, the log opens on a full disk, and appends resume by themselves once space returns.

Each behaviour is tested with ENOSPC injected into the one system call, and again on a real
full filesystem (a small tmpfs, and an ext4 image on a loop device) where mounting works."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import storage.log as log_module
import storage.partition as partition_module
from storage import segment
from storage.errors import StorageFull
from storage.log import Log
from storage.partition import Partition, PartitionConfig
from tests.unit.storage.test_partition import (
    Clock,
    assert_values_match_offsets,
    batch,
    crash_image,
    open_partition,
    read_all,
    values_for,
)


def pbatch(seq: int, count: int = 2, pid: int = 7, first: int = 0, size: int = 20) -> bytes:
    return batch(values_for(first, count, size), producer_id=pid, base_sequence=seq)


def no_space(*_args: object, **_kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


# --------------------------------------------------------------- (a) the producer's retry
async def test_a_producer_that_hit_storage_full_is_accepted_on_retry_and_keeps_its_dedupe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = open_partition(tmp_path / "p")
    try:
        acked = [await part.append([pbatch(2 * i, first=part.log_end_offset)]) for i in range(8)]
        end = part.log_end_offset
        monkeypatch.setattr(segment.os, "pwritev", no_space)
        # more batches in flight than the producer window (5) holds: all refused together
        waits = []
        for i in range(8, 15):
            part.append_nowait([pbatch(2 * i, first=end + 2 * (i - 8))])
            fut = part.durable_future(part.log_end_offset)
            assert fut is not None
            waits.append(fut)
        results = await asyncio.gather(*waits, return_exceptions=True)
        assert all(isinstance(r, StorageFull) for r in results)
        assert (part.log_end_offset, part.high_watermark) == (end, end)
        monkeypatch.undo()  # space returns
        # the retry of the first refused batch is appended, at the offsets it would have had
        retry = await part.append([pbatch(16, first=end)])
        assert (retry.base_offset, retry.duplicate) == (end, False)
        # and the producer's window is as it was: an acknowledged batch is still a duplicate
        again = await part.append([pbatch(14, first=acked[7].base_offset)])
        assert (again.base_offset, again.duplicate) == (acked[7].base_offset, True)
        found = read_all(part)
        assert sorted(found) == list(range(end + 2))
        assert_values_match_offsets(found)
    finally:
        await part.close()


# --------------------------------------------------- (b) close and delete on a full disk
async def test_close_on_a_full_disk_logs_the_checkpoint_failure_and_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    part = open_partition(tmp_path / "p", clock=Clock())
    await part.append([batch(values_for(0, 5))])
    monkeypatch.setattr(partition_module, "write_checkpoint", no_space)
    with caplog.at_level(logging.WARNING, logger="herald.storage"):
        await part.close()  # does not raise
    assert "event=checkpoint_failed" in caplog.text
    assert all(seg.closed for seg in part.segments)
    monkeypatch.undo()
    again, report = Partition.open(tmp_path / "p")
    try:
        assert report.scanned_bytes > 0  # from the older checkpoint
        assert sorted(read_all(again)) == list(range(5))
    finally:
        await again.close()


@pytest.mark.parametrize("refused", ["checkpoint", "checkpoint-and-rename"])
async def test_deleting_a_topic_on_a_full_disk_completes_and_it_stays_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    log = Log(tmp_path)
    log.open()
    log.create_topic("t", 2, PartitionConfig())
    await log.partition("t", 0).append([batch(values_for(0, 3))])
    monkeypatch.setattr(partition_module, "write_checkpoint", no_space)
    if refused == "checkpoint-and-rename":
        monkeypatch.setattr(log_module.os, "rename", no_space)
    await log.delete_topic("t")
    monkeypatch.undo()
    assert "t" not in log.topics
    assert not (tmp_path / "log" / "t").exists()
    assert [p.name for p in (tmp_path / "log").iterdir()] == []
    await log.close()
    again = Log(tmp_path)
    again.open()
    try:
        assert "t" not in again.topics
        again.create_topic("t", 1, PartitionConfig())  # the name is free
    finally:
        await again.close()


# ---------------------------------------------------------------- (c) open on a full disk
async def test_a_partition_opens_on_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    part = open_partition(tmp_path / "p", clock=Clock())
    await part.append([batch(values_for(0, 5))])
    crash = tmp_path / "crash"
    crash_image(tmp_path / "p", crash)  # killed: the tail is past the checkpoint
    await part.close()
    monkeypatch.setattr(partition_module, "write_checkpoint", no_space)
    with caplog.at_level(logging.WARNING, logger="herald.storage"):
        again, report = Partition.open(crash)
    try:
        assert "event=checkpoint_failed" in caplog.text
        assert report.scanned_bytes > 0 and report.next_offset == 5
        assert sorted(read_all(again)) == list(range(5))
    finally:
        await again.close()


# ------------------------------------------------------- a real, small, full filesystem
def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


class SmallDisk:
    """A few MiB of real filesystem at ``path``, and a filler file to take its space."""

    def __init__(self, root: Path, kind: str) -> None:
        self.kind = kind
        self.path = root / "mnt"
        self.image = root / "disk.img"
        self.filler = self.path / "filler"

    def up(self) -> None:
        self.path.mkdir()
        if self.kind == "tmpfs":
            done = _run("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(self.path))
        else:
            with open(self.image, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, 16 << 20)
            done = _run("mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", str(self.image))
            if done.returncode == 0:
                done = _run("mount", "-o", "loop", str(self.image), str(self.path))
        if done.returncode != 0:
            raise OSError(done.stderr.strip())

    def fill(self) -> None:
        """Take every free byte (the filler file grows until ENOSPC)."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for chunk in (1 << 20, 4096, 512):
                try:
                    while True:
                        os.write(fd, bytes(chunk))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def down(self) -> None:
        if _run("umount", str(self.path)).returncode != 0:
            _run("umount", "-l", str(self.path))  # a failed test may hold files open


@pytest.fixture(params=["tmpfs", "ext4"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SmallDisk]:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small filesystem needs root and mount")
    small = SmallDisk(tmp_path, request.param)
    try:
        small.up()
    except OSError as exc:
        small.down()
        pytest.skip(f"cannot mount a {request.param} here: {exc}")
    try:
        yield small
    finally:
        small.down()


async def test_on_a_real_full_disk_appends_fail_cleanly_and_resume_with_the_same_sequence(
    disk: SmallDisk,
) -> None:
    part = open_partition(disk.path / "p")
    try:
        first = await part.append([pbatch(0, 4, size=1000)])
        disk.fill()
        seq, end = 4, part.log_end_offset
        last_stored, last_batch = first, pbatch(0, 4, size=1000)
        # the space the segment holds ahead of its batches (preallocated fill, at most
        # preallocate_bytes) takes appends until the disk is full for them too
        for _ in range(100):
            candidate = pbatch(seq, 64, first=end, size=1000)
            try:
                last_stored = await part.append([candidate])
            except StorageFull:
                break
            last_batch = candidate
            seq, end = seq + 64, part.log_end_offset
        else:
            pytest.fail("the disk never filled")
        assert end - 4 <= 64 * (PartitionConfig().preallocate_bytes // 64_000 + 1)
        for _attempt in range(3):  # a retry while the disk is still full fails the same way
            with pytest.raises(StorageFull):
                await part.append([pbatch(seq, 64, first=end, size=1000)])
            assert (part.log_end_offset, part.high_watermark) == (end, end)
            assert not part.offline
        disk.free()  # space returns: nothing to restart, the same sequence goes in
        retry = await part.append([pbatch(seq, 64, first=end, size=1000)])
        assert (retry.base_offset, retry.duplicate) == (end, False)
        # the dedupe window is intact: the last batch stored before the disk filled is
        # still known as a duplicate
        again = await part.append([last_batch])
        assert (again.base_offset, again.duplicate) == (last_stored.base_offset, True)
        found = read_all(part)
        assert sorted(found) == list(range(end + 64))
        assert_values_match_offsets(found)
    finally:
        await part.close()


async def test_on_a_real_full_disk_a_topic_can_be_deleted_and_frees_its_space(
    disk: SmallDisk,
) -> None:
    log = Log(disk.path)
    log.open()
    log.create_topic("big", 1, PartitionConfig(segment_bytes=256 * 1024))
    part = log.partition("big", 0)
    for i in range(12):
        await part.append([batch(values_for(i * 100, 100, size=1000))])
    disk.fill()
    with pytest.raises(StorageFull):
        await part.append([batch(values_for(1200, 100, size=1000))])
    before = disk.free_bytes()
    await log.delete_topic("big")
    assert disk.free_bytes() > before + 1_000_000
    await log.close()
    again = Log(disk.path)
    again.open()
    try:
        assert "big" not in again.topics
    finally:
        await again.close()


async def test_on_a_real_full_disk_the_log_opens(disk: SmallDisk) -> None:
    log = Log(disk.path)
    log.open()
    log.create_topic("t", 1, PartitionConfig())
    part = log.partition("t", 0)
    await part.append([batch(values_for(0, 10, size=500))])
    await log.close()
    disk.fill()
    again = Log(disk.path)
    again.open()  # recovery and its checkpoint need no free space
    try:
        part = again.partition("t", 0)
        assert sorted(read_all(part)) == list(range(10))
        with pytest.raises(StorageFull):
            await part.append([batch(values_for(10, 100, size=1000))])
        disk.free()
        assert (await part.append([batch(values_for(10, 1))])).base_offset == 10
    finally:
        await again.close()
