"""After a failed fsync, a restart does not trust the page cache (issue 12, item 6).

A real failing fdatasync, on a real filesystem: an ext4 image on a loop device whose backing
file lives on a small tmpfs. Once the tmpfs is full, ext4 still has room (its data blocks
are holes in the backing file), so ``write`` succeeds, but writeback fails and
``fdatasync`` returns ENOSPC/EIO. Linux then marks the pages clean and keeps them: a plain
read, even through a new file descriptor, returns bytes that are not on the device, and a
second fdatasync "succeeds" (the fsyncgate lesson). The partition must go offline without
acknowledging, and reopening it (same machine, same page cache) must not serve those bytes.

Needs root, ``mount``, ``mkfs.ext4`` and ``debugfs``; skipped otherwise."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import records, recovery
from storage.errors import LogOffline, OffsetOutOfRange
from storage.io_threads import IoThreads
from storage.partition import Partition, PartitionConfig

BLOCK = 4096


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


class FlakyDisk:
    """An ext4 filesystem at ``mount`` whose backing store can be filled up under it."""

    def __init__(self, root: Path) -> None:
        self.backing = root / "backing"
        self.mount = root / "mnt"
        self.filler = self.backing / "filler"

    def up(self) -> None:
        self.backing.mkdir()
        self.mount.mkdir()
        self._ok(_run("mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(self.backing)))
        image = self.backing / "disk.img"
        with open(image, "wb") as f:
            f.truncate(64 << 20)  # sparse: ext4's data blocks are holes in the tmpfs
        self._ok(
            _run(
                "mkfs.ext4", "-q", "-F", "-b", "4096", "-J", "size=4",
                "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", str(image),
            )
        )  # fmt: skip
        # the journal must not be a hole, or its first write fails and ext4 goes read-only
        journal = _run("debugfs", "-R", "blocks <8>", str(image))
        self._ok(journal)
        fd = os.open(image, os.O_RDWR)
        try:
            for block in map(int, journal.stdout.split()):
                os.pwrite(fd, os.pread(fd, BLOCK, block * BLOCK), block * BLOCK)
        finally:
            os.close(fd)
        self._ok(_run("mount", "-o", "loop", str(image), str(self.mount)))

    def fill(self) -> None:
        """Fill the backing tmpfs: from now on ext4's writeback of new blocks fails."""
        os.sync()  # metadata written so far gets its backing pages first
        with open(self.filler, "wb") as f:
            try:
                while True:
                    f.write(bytes(1 << 16))
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC

    def free(self) -> None:
        self.filler.unlink()

    def down(self) -> None:
        for path in (self.mount, self.backing):
            if _run("umount", str(path)).returncode != 0:
                _run("umount", "-l", str(path))  # a failed test may hold files open

    @staticmethod
    def _ok(done: subprocess.CompletedProcess[str]) -> None:
        if done.returncode != 0:
            raise RuntimeError(f"{done.args}: {done.stderr.strip()}")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[FlakyDisk]:
    if os.geteuid() != 0 or not all(map(shutil.which, ("mount", "mkfs.ext4", "debugfs"))):
        pytest.skip("needs root, mount, mkfs.ext4 and debugfs")
    fs = FlakyDisk(tmp_path)
    try:
        fs.up()
    except (OSError, RuntimeError) as exc:
        fs.down()
        pytest.skip(f"cannot mount a loop-backed ext4 here: {exc}")
    try:
        yield fs
    finally:
        fs.down()


def _batch(first: int, count: int, size: int) -> bytes:
    return records.encode_values(
        [(b"%08d:" % (first + i)).ljust(size, b"x") for i in range(count)], timestamp=1
    )


@pytest.mark.parametrize("tail_read", ["direct", "fadvise"])
async def test_records_whose_fsync_failed_are_not_served_after_a_restart(
    disk: FlakyDisk, tail_read: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = disk.mount / "p"
    config = PartitionConfig(checkpoint_interval_ms=10**9)  # the checkpoint stays at 0
    part, _report = Partition.open(directory, config, clock=lambda: 0)
    acked = await part.append([_batch(0, 10, 100)])
    end = acked.last_offset + 1
    disk.fill()
    # ~1.6 MiB: past the space the segment preallocated after the first batch
    # (preallocate_bytes, 1 MiB), so new blocks, which writeback cannot store
    lost = _batch(end, 400, 4000)
    assert len(lost) > config.preallocate_bytes
    with pytest.raises(LogOffline):
        await asyncio.wait_for(part.append([lost]), 10)
    assert part.offline and part.high_watermark == end
    position = part.segments[-1].size - len(lost)
    await part.close()
    disk.free()

    # the page cache still holds the batch whose sync failed, as if it were on disk
    log_file = directory / f"{0:020d}.log"
    fd = os.open(log_file, os.O_RDONLY)
    try:
        cached = os.pread(fd, len(lost), position)
    finally:
        os.close(fd)
    try:
        records.validate_batch(cached)
    except records.CorruptBatch:
        pytest.skip("this kernel dropped the pages whose writeback failed: nothing to show")

    if tail_read == "fadvise":  # as on a filesystem that refuses O_DIRECT (FUSE)
        real_open = os.open

        def no_direct(path: str | Path, flags: int, mode: int = 0o777) -> int:
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, mode)

        monkeypatch.setattr(recovery.os, "open", no_direct)
    again, report = Partition.open(directory, config)
    try:
        assert report.tail_read == tail_read
        assert report.truncated_bytes > 0  # the batch is not on the device: a torn tail
        assert again.log_end_offset == again.high_watermark == end
        data = again.read(0, 1 << 20)
        assert [h.next_offset for _p, h in records.iter_batches(data)] == [end]
        with pytest.raises(OffsetOutOfRange):
            again.read(end + 1, 100)
        # and the partition takes writes again, from the first offset not on disk
        assert (await again.append([_batch(end, 1, 10)])).base_offset == end
    finally:
        await again.close()


async def test_a_failed_fdatasync_run_as_kernel_aio_takes_the_partition_offline(
    disk: FlakyDisk,
) -> None:
    """The same failure through the AIO engine (storage/aio.py): small rounds, no fill ahead
    of them (``preallocate_bytes`` 0), so each new block's writeback fails once the backing
    store is full, and the error comes back as the AIO completion's errno."""
    directory = disk.mount / "p"
    config = PartitionConfig(checkpoint_interval_ms=10**9, preallocate_bytes=0)
    io = IoThreads(2, sync_engine="aio")
    part, _report = Partition.open(directory, config, clock=lambda: 0, io=io)
    try:
        acked = await part.append([_batch(0, 10, 100)])
        if io.aio() is None:
            pytest.skip("this kernel offers no native AIO")
        synced_by_aio = part._flusher.aio_syncs
        assert synced_by_aio + part.inline_syncs == part.syncs == 1
        end = acked.last_offset + 1
        disk.fill()
        offline = None
        for i in range(64):  # 16 KiB rounds, each past the file's last block
            try:
                await asyncio.wait_for(part.append([_batch(end + i * 4, 4, 4000)]), 10)
            except LogOffline as exc:
                offline = exc
                break
        assert offline is not None, "no fdatasync failed: the filler did not take the space"
        assert part.offline
        # the error is the AIO completion's (Flusher._aio_synced), and every round that
        # succeeded before it ran as AIO too
        assert "fdatasync failed" in str(offline)
        assert part._flusher.aio_syncs == part.syncs
        # nothing whose sync failed was acknowledged: the high watermark is the last good one
        assert part.high_watermark == end + i * 4
        with pytest.raises(LogOffline):
            await part.append([_batch(0, 1, 10)])
    finally:
        await part.close()
        io.close()
        disk.free()
