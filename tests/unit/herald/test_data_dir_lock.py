"""The data directory's LOCK (``herald.node.DataDirLock``) on a disk with no byte free: the
node must still start there (issue 12, item 7), so writing the holder's pid into the file
(only a hint for the "in use by pid" message) must not be what stops it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from herald.node import DataDirLock, DataDirLocked
from tests.unit.storage.test_full_disk import SmallDisk


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[SmallDisk]:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small filesystem needs root and mount")
    small = SmallDisk(tmp_path, "tmpfs")
    try:
        small.up()
    except OSError as exc:
        small.down()
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield small
    finally:
        small.down()


async def test_the_lock_is_taken_on_a_full_disk_and_still_keeps_a_second_node_out(
    tmpfs: SmallDisk,
) -> None:
    data = tmpfs.path / "data"
    first = DataDirLock(data)
    await first.start()
    await first.stop()  # a clean stop leaves LOCK empty
    assert (data / "LOCK").read_bytes() == b""
    tmpfs.fill()
    lock = DataDirLock(data)
    await lock.start()  # the pid cannot be written: no page is free for it
    try:
        with pytest.raises(DataDirLocked):
            await DataDirLock(data).start()
    finally:
        await lock.stop()
    tmpfs.free()
    again = DataDirLock(data)
    await again.start()
    try:
        assert (data / "LOCK").read_bytes() == str(os.getpid()).encode()
    finally:
        await again.stop()
