"""The power-loss filesystem keeps exactly what was made durable, and nothing else.

Each test is a small program run against the mount (plain ``os`` calls, as any process
would make them), then a power cut, then a look at what is left. No Herald here: these
prove the simulation before the Herald tests trust it.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
from pathlib import Path

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .control import PowerLossFS
from .fuse_kernel import is_mounted
from .model import Ranges


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, sync: bool = False, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        if sync:
            os.fdatasync(f.fileno())


def durable_dir(fs: PowerLossFS, name: str) -> Path:
    """A directory whose own name is durable, for a test's files."""
    d = fs.mountpoint / name
    d.mkdir()
    fsync_dir(fs.mountpoint)
    return d


def test_write_without_fsync_is_lost(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    write_file(d / "f", b"")
    fsync_dir(d)  # the name is durable, the (empty) data too
    write_file(d / "f", b"never synced", mode="ab")
    assert (d / "f").read_bytes() == b"never synced"  # the page cache has it
    report = powerfs.power_cut()
    assert (d / "f").read_bytes() == b""
    assert report["lost_bytes"] == {"d/f": 12}


def test_fdatasync_keeps_data(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    write_file(d / "f", b"synced", sync=True)
    fsync_dir(d)
    write_file(d / "f", b" and lost", mode="ab")
    powerfs.power_cut()
    assert (d / "f").read_bytes() == b"synced"


def test_overwrite_in_place_rolls_back_to_the_synced_bytes(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    write_file(d / "f", b"A" * 10000, sync=True)
    fsync_dir(d)
    fd = os.open(d / "f", os.O_RDWR)
    os.pwrite(fd, b"B" * 100, 5000)
    os.fdatasync(fd)
    os.pwrite(fd, b"C" * 100, 6000)  # not synced
    os.close(fd)
    powerfs.power_cut()
    data = (d / "f").read_bytes()
    assert data == b"A" * 5000 + b"B" * 100 + b"A" * 4900


def test_fsynced_file_in_unsynced_directory_is_gone(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    write_file(d / "new", b"data", sync=True)  # fsync of the file: its name is not durable
    report = powerfs.power_cut()
    assert not (d / "new").exists()
    assert "d/new" in report["lost_names"]


def test_directory_fsync_makes_the_name_durable(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    write_file(d / "new", b"data", sync=True)
    fsync_dir(d)
    powerfs.power_cut()
    assert (d / "new").read_bytes() == b"data"


def test_new_directory_needs_its_parent_synced(powerfs: PowerLossFS) -> None:
    sub = powerfs.mountpoint / "sub"
    sub.mkdir()
    write_file(sub / "f", b"data", sync=True)
    fsync_dir(sub)  # the file's name is durable inside sub, but sub itself is not
    powerfs.power_cut()
    assert not sub.exists()
    sub.mkdir()
    write_file(sub / "f", b"data", sync=True)
    fsync_dir(sub)
    fsync_dir(powerfs.mountpoint)
    powerfs.power_cut()
    assert (sub / "f").read_bytes() == b"data"


def test_rename_is_durable_after_directory_fsync(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    write_file(d / "target", b"old", sync=True)
    fsync_dir(d)
    # the atomic-replace pattern: write a temporary, fsync it, rename over, fsync the dir
    write_file(d / "target.tmp", b"new", sync=True)
    os.replace(d / "target.tmp", d / "target")
    fsync_dir(d)
    powerfs.power_cut()
    assert (d / "target").read_bytes() == b"new"
    assert sorted(os.listdir(d)) == ["target"]


def test_rename_without_directory_fsync_is_undone(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    write_file(d / "target", b"old", sync=True)
    write_file(d / "target.tmp", b"new", sync=True)
    fsync_dir(d)
    os.replace(d / "target.tmp", d / "target")
    assert (d / "target").read_bytes() == b"new"
    report = powerfs.power_cut()
    assert (d / "target").read_bytes() == b"old"
    assert (d / "target.tmp").read_bytes() == b"new"
    assert "d/target.tmp" in report["restored_names"]


def test_rename_across_directories_needs_both_synced(powerfs: PowerLossFS) -> None:
    a, b = durable_dir(powerfs, "a"), durable_dir(powerfs, "b")
    write_file(a / "f", b"data", sync=True)
    fsync_dir(a)
    os.rename(a / "f", b / "f")
    fsync_dir(b)  # only the new name is durable: the file has two names after the cut
    powerfs.power_cut()
    assert (a / "f").read_bytes() == (b / "f").read_bytes() == b"data"


def test_unlink_is_undone_without_directory_fsync(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    write_file(d / "f", b"kept", sync=True)
    fsync_dir(d)
    os.unlink(d / "f")
    powerfs.power_cut()
    assert (d / "f").read_bytes() == b"kept"
    os.unlink(d / "f")
    fsync_dir(d)
    powerfs.power_cut()
    assert not (d / "f").exists()


def test_rmdir_is_undone_without_directory_fsync(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    os.rmdir(d)
    powerfs.power_cut()
    assert d.is_dir()


def test_ftruncate_is_data(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    write_file(d / "f", b"0123456789", sync=True)
    fsync_dir(d)
    os.truncate(d / "f", 4)
    powerfs.power_cut()
    assert (d / "f").read_bytes() == b"0123456789"
    fd = os.open(d / "f", os.O_RDWR)
    os.ftruncate(fd, 4)
    os.pwrite(fd, b"xy", 8)  # grows again: bytes 4..8 read as zeros, durably
    os.fsync(fd)
    os.close(fd)
    powerfs.power_cut()
    assert (d / "f").read_bytes() == b"0123\0\0\0\0xy"


def test_failed_fsync_data_is_visible_until_the_power_cut(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    write_file(d / "seg.log", b"synced|", sync=True)
    fsync_dir(d)
    powerfs.fail_next_fsync("d/*.log")
    fd = os.open(d / "seg.log", os.O_RDWR | os.O_APPEND)
    os.write(fd, b"failed|")
    with pytest.raises(OSError) as info:
        os.fdatasync(fd)
    assert info.value.errno == errno.EIO
    # the page cache still serves it, and a second fsync "succeeds" (fsyncgate)...
    assert (d / "seg.log").read_bytes() == b"synced|failed|"
    os.fdatasync(fd)
    os.write(fd, b"later|")
    os.fdatasync(fd)
    os.close(fd)
    assert (d / "seg.log").read_bytes() == b"synced|failed|later|"
    assert powerfs.stats()["fsync_failures"] == 1
    powerfs.power_cut()
    # ...but what the failed one covered never reached the disk: a hole where it was
    assert (d / "seg.log").read_bytes() == b"synced|" + b"\0" * 7 + b"later|"


def test_fsync_fault_matches_only_its_pattern(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    powerfs.fail_next_fsync("d/*.log", count=2)
    write_file(d / "other.index", b"fine", sync=True)
    for _ in range(2):
        with pytest.raises(OSError):
            write_file(d / "x.log", b"x", sync=True)
    write_file(d / "x.log", b"y", sync=True)  # the faults are used up
    assert powerfs.stats()["pending_fsync_faults"] == []


def test_directory_fsync_can_fail(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    powerfs.fail_next_fsync("d")
    write_file(d / "f", b"x", sync=True)
    with pytest.raises(OSError):
        fsync_dir(d)
    powerfs.power_cut()
    assert not (d / "f").exists()


def test_enospc_at_the_set_size(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "d")
    powerfs.set_free_bytes(10_000)
    fd = os.open(d / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert os.pwrite(fd, b"a" * 8000, 0) == 8000
        assert os.pwrite(fd, b"b" * 4000, 8000) == 2000  # the part that fits
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"c", 10_000)
        assert info.value.errno == errno.ENOSPC
        os.pwrite(fd, b"z" * 100, 0)  # overwriting takes no space
        with pytest.raises(OSError) as info:
            os.ftruncate(fd, 20_000)
        assert info.value.errno == errno.ENOSPC
        vfs = os.statvfs(d)
        assert vfs.f_bavail * vfs.f_frsize < 4096
        # a file that is removed gives its space back
        write_file(d / "g", b"")
        os.ftruncate(fd, 5000)
        assert os.pwrite(fd, b"d" * 5000, 5000) == 5000
        with pytest.raises(OSError):
            os.pwrite(fd, b"e", 10_000)
        powerfs.unlimited()
        assert os.pwrite(fd, b"e" * 100_000, 10_000) == 100_000
        powerfs.set_free_bytes(0)
        os.unlink(d / "f")  # frees 110 kB once closed
    finally:
        os.close(fd)
    write_file(d / "h", b"h" * 100_000)
    assert powerfs.stats()["enospc"] >= 2


def test_lmdb_through_the_mount(powerfs: PowerLossFS) -> None:
    """LMDB reads through mmap and writes with pwrite; env.sync() is its fdatasync."""
    path = powerfs.mountpoint / "state"
    env = lmdb.open(str(path), map_size=1 << 26, sync=False, metasync=False, readahead=False)
    with env.begin(write=True) as txn:
        for i in range(500):
            txn.put(b"synced-%04d" % i, b"v" * 300)
    env.sync(True)
    powerfs.sync_all()  # the directory entries too (LMDB never fsyncs its directory)
    with env.begin(write=True) as txn:
        txn.put(b"lost", b"x")
    with env.begin() as txn:
        assert txn.get(b"lost") == b"x" and txn.get(b"synced-0499") == b"v" * 300
    env.close()
    powerfs.power_cut()
    env = lmdb.open(str(path), map_size=1 << 26, readahead=False)
    try:
        with env.begin() as txn:
            assert txn.get(b"lost") is None
            assert txn.stat()["entries"] == 500
            assert txn.get(b"synced-0123") == b"v" * 300
    finally:
        env.close()


def test_random_program_keeps_exactly_the_synced_prefix(powerfs: PowerLossFS) -> None:
    """Appends of random sizes, fdatasync after some: after the cut, the file is exactly
    what the last fdatasync covered."""
    rng = random.Random(1234)
    d = durable_dir(powerfs, "d")
    write_file(d / "log", b"")
    fsync_dir(d)
    for _trial in range(20):
        fd = os.open(d / "log", os.O_RDWR | os.O_APPEND)
        synced = os.fstat(fd).st_size
        written = synced
        for _ in range(rng.randint(1, 30)):
            written += os.write(fd, rng.randbytes(rng.randint(1, 70_000)))
            if rng.random() < 0.3:
                os.fdatasync(fd)
                synced = written
        expected = os.pread(fd, synced, 0)
        os.close(fd)
        powerfs.power_cut()
        assert (d / "log").read_bytes() == expected


def test_close_leaves_no_mount(tmp_path: Path) -> None:
    fs = PowerLossFS.start(tmp_path / "fs")
    assert is_mounted(str(fs.mountpoint))
    assert fs.proc is not None
    fs.proc.kill()  # even a daemon that died leaves nothing mounted after close
    fs.proc.wait()
    fs.close()
    assert not is_mounted(str(fs.mountpoint))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=30))
def test_ranges_merge_like_a_set_of_bytes(adds: list[tuple[int, int]]) -> None:
    r = Ranges()
    expected: set[int] = set()
    for start, length in adds:
        r.add(start, start + length)
        expected.update(range(start, start + length))
    got = [(s, e) for s, e in r]
    assert sorted(got) == got
    assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(got))
    assert {b for s, e in got for b in range(s, e)} == expected
    assert r.total() == len(expected)


def test_more_files_than_the_daemon_keeps_open(powerfs: PowerLossFS) -> None:
    d = durable_dir(powerfs, "many")
    for i in range(700):
        write_file(d / f"f{i}", b"%d" % i, sync=True)
    fsync_dir(d)
    powerfs.power_cut()
    assert all((d / f"f{i}").read_bytes() == b"%d" % i for i in range(700))
