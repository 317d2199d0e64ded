"""The data directory's LOCK (``herald.node.DataDirLock``) on a disk with no byte free: the
node must still start there (issue 12, item 7), so writing the holder's pid into the file
(only a hint for the "in use by pid" message) must not be what stops it."""

from __future__ import annotations

import os

import pytest

from herald.node import DataDirLock, DataDirLocked
from tests.unit.storage.test_full_disk import SmallDisk, disk  # noqa: F401 (the fixture)


async def test_the_lock_is_taken_on_a_full_disk_and_still_keeps_a_second_node_out(
    disk: SmallDisk,  # noqa: F811 (the fixture imported above)
) -> None:
    data = disk.path / "data"
    first = DataDirLock(data)
    await first.start()
    await first.stop()  # a clean stop leaves LOCK empty
    assert (data / "LOCK").read_bytes() == b""
    disk.fill()
    lock = DataDirLock(data)
    await lock.start()  # the pid cannot be written: no page is free for it
    try:
        with pytest.raises(DataDirLocked):
            await DataDirLock(data).start()
    finally:
        await lock.stop()
    disk.free()
    again = DataDirLock(data)
    await again.start()
    try:
        assert (data / "LOCK").read_bytes() == str(os.getpid()).encode()
    finally:
        await again.stop()
