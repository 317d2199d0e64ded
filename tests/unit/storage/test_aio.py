"""fdatasync as kernel AIO (storage/aio.py), and the partition's syncs running on it."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from storage.aio import AioSync, KernelSync, UringSync, open_kernel_sync
from storage.io_threads import IoThreads
from storage.partition import Acks, Partition, PartitionConfig
from tests.unit.storage.test_partition import batch, open_partition, read_all, values_for


@pytest.fixture(params=["io_uring", "native"])
async def aio(request: pytest.FixtureRequest) -> AsyncIterator[KernelSync]:
    loop = asyncio.get_running_loop()
    ctx: KernelSync | None = (
        UringSync.open(loop) if request.param == "io_uring" else AioSync.open(loop)
    )
    if ctx is None:
        pytest.skip(f"this kernel offers no {request.param} AIO")
    yield ctx
    ctx.close()


async def _sync(ctx: KernelSync, fd: int) -> int:
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    ctx.fdatasync(fd, done.set_result)
    return await asyncio.wait_for(done, 10)


async def test_an_fdatasync_completes_on_the_loop_with_no_error(
    aio: KernelSync, tmp_path: Path
) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
        assert await _sync(aio, fd) == 0
        assert aio.in_flight == 0
    finally:
        os.close(fd)


async def test_many_files_synced_at_once_all_complete(aio: KernelSync, tmp_path: Path) -> None:
    fds = [os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(100)]
    try:
        for i, fd in enumerate(fds):
            os.pwrite(fd, b"%d" % i, 0)
        results = await asyncio.gather(*(_sync(aio, fd) for fd in fds))
        assert results == [0] * 100
        assert aio.in_flight == 0
    finally:
        for fd in fds:
            os.close(fd)


async def test_a_bad_descriptor_is_refused_or_fails_and_nothing_is_left_waiting(
    aio: KernelSync,
) -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)  # a closed descriptor
    try:
        err = await _sync(aio, fd)  # io_uring: the completion's errno
    except OSError as exc:  # native AIO: io_submit refuses it, nothing queued
        err = exc.errno or 0
    assert err == errno.EBADF
    assert aio.in_flight == 0


async def test_the_node_prefers_io_uring_and_falls_back_to_native_aio() -> None:
    loop = asyncio.get_running_loop()
    ctx = open_kernel_sync(loop)
    try:
        ring = UringSync.open(loop)
        if ring is not None:
            ring.close()
            assert isinstance(ctx, UringSync)
        else:
            native = AioSync.open(loop)
            if native is not None:
                native.close()
                assert isinstance(ctx, AioSync)
    finally:
        if ctx is not None:
            ctx.close()


async def test_a_closed_context_refuses_syncs(aio: KernelSync) -> None:
    ctx = aio
    ctx.close()
    ctx.close()  # idempotent
    with pytest.raises(OSError):
        ctx.fdatasync(0, lambda _err: None)


def _aio_partition(directory: Path, **config: int) -> tuple[Partition, IoThreads]:
    io = IoThreads(2, sync_engine="aio")
    part = open_partition(directory, config=PartitionConfig(**config), io=io)
    return part, io


async def test_small_appends_are_synced_as_aio_and_survive_a_reopen(tmp_path: Path) -> None:
    part, io = _aio_partition(tmp_path / "p")
    try:
        for i in range(20):
            result = await part.append([batch(values_for(i * 5, 5))])
            assert part.high_watermark == result.last_offset + 1
        # and several partitions' worth at once: one sync in flight, the next behind it
        await asyncio.gather(*(part.append([batch(values_for(0, 5))]) for _ in range(30)))
        if io.aio() is None:
            pytest.skip("this kernel offers no native AIO")
        assert part._flusher.aio_syncs > 0
        assert part._flusher.aio_syncs + part.inline_syncs == part.syncs
        end = part.log_end_offset
    finally:
        await part.close()
        io.close()
    again = open_partition(tmp_path / "p")
    try:
        assert again.log_end_offset == again.high_watermark == end == 250
        assert sorted(read_all(again)) == list(range(250))
    finally:
        await again.close()


async def test_large_writes_and_rolls_go_to_the_threads_and_stay_correct(
    tmp_path: Path,
) -> None:
    # 1 MiB segments: 80 KiB appends (past what the loop writes itself) roll every 13th
    part, io = _aio_partition(tmp_path / "p", segment_bytes=1 << 20)
    big = b"y" * (80 * 1024)
    try:
        for i in range(30):
            await part.append([batch([big])])
            await part.append([batch([b"small %d" % i])])
        assert len(part.segments) > 1  # rolled: its seals ran on a thread
        assert part.syncs > part._flusher.aio_syncs  # the large rounds did too
        end = part.log_end_offset
    finally:
        await part.close()
        io.close()
    again = open_partition(tmp_path / "p", config=PartitionConfig(segment_bytes=1 << 20))
    try:
        assert again.log_end_offset == again.high_watermark == end == 60
        values = read_all(again, max_bytes=1 << 22)
        assert sorted(values) == list(range(60))
        assert values[1] == b"small 0" and values[59] == b"small 29"
    finally:
        await again.close()


async def test_acks_leader_and_none_complete_over_aio_too(tmp_path: Path) -> None:
    part, io = _aio_partition(tmp_path / "p")
    try:
        leader = await part.append([batch(values_for(0, 3))], Acks.LEADER)
        none = await part.append([batch(values_for(3, 3))], Acks.NONE)
        assert (leader.base_offset, none.base_offset) == (0, 3)
        await part.flush()
        assert part.high_watermark == 6
    finally:
        await part.close()
        io.close()


class HeldCompletions:
    """Wraps the partition's AIO context so that completed fdatasyncs are held back (the
    sync stays in flight for the pipeline) until :meth:`release`: appends made meanwhile
    are written by write-only jobs, deterministically."""

    def __init__(self, aio: AioSync, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held: list[tuple[Callable[[int], None], int]] = []
        real = aio.fdatasync

        def fdatasync(fd: int, done: Callable[[int], None]) -> None:
            real(fd, lambda err: self.held.append((done, err)))

        monkeypatch.setattr(aio, "fdatasync", fdatasync)

    async def release(self) -> None:
        while not self.held:
            await asyncio.sleep(0.001)
        held, self.held = self.held, []
        for done, err in held:
            done(err)


async def _writes_during_syncs(
    part: Partition, io: IoThreads, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(20):  # lone rounds: each writes a step of the fill ahead (1 MiB in all)
        await part.append([batch(values_for(0, 5))])
    aio = io.aio()
    if aio is None:
        pytest.skip("this kernel offers no native AIO")
    held = HeldCompletions(aio, monkeypatch)
    for _ in range(5):
        first = asyncio.ensure_future(part.append([batch(values_for(0, 5))]))
        while not held.held:  # its write-then-sync job is in flight
            await asyncio.sleep(0.001)
        # these come while it syncs: a write-only job, then a sync of their own
        rest = [asyncio.ensure_future(part.append([batch(values_for(0, 5))])) for _ in range(5)]
        await asyncio.sleep(0.01)  # the write-only job runs (and the writes are done)
        await held.release()
        await first
        await held.release()
        await asyncio.gather(*rest)


async def test_writes_made_during_a_sync_over_the_fill_need_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part, io = _aio_partition(tmp_path / "p")
    try:
        await _writes_during_syncs(part, io, monkeypatch)
        assert part.high_watermark == part.log_end_offset == 250
        # every thread job was a checkpoint's: writes and syncs ran on the loop and the kernel
        assert io._submitted == part._flusher.checkpoints
        assert part._flusher.aio_syncs == part.syncs == 30
    finally:
        await part.close()
        io.close()


async def test_writes_that_would_grow_the_file_during_a_sync_go_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part, io = _aio_partition(tmp_path / "p", preallocate_bytes=0)  # no fill: every write grows
    try:
        await _writes_during_syncs(part, io, monkeypatch)
        assert part.high_watermark == part.log_end_offset == 250
        # the five write-only jobs went to a thread; every sync still ran as AIO
        assert io._submitted == part._flusher.checkpoints + 5
        assert part._flusher.aio_syncs == part.syncs == 30
    finally:
        await part.close()
        io.close()


async def test_a_sync_the_kernel_refuses_runs_on_a_thread_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part, io = _aio_partition(tmp_path / "p")
    try:
        await part.append([batch(values_for(0, 5))])
        aio = io.aio()
        if aio is None:
            pytest.skip("this kernel offers no native AIO")

        def refuse(fd: int, done: Callable[[int], None]) -> None:
            raise OSError(errno.EAGAIN, "io_submit refused")

        monkeypatch.setattr(aio, "fdatasync", refuse)
        before = (part.syncs, part.aio_syncs, io._submitted)
        result = await asyncio.wait_for(part.append([batch(values_for(5, 5))]), 10)
        assert part.high_watermark == result.last_offset + 1 == 10
        # synced all the same, by a thread: a round, not an AIO one
        assert (part.syncs, part.aio_syncs) == (before[0] + 1, before[1])
        assert io._submitted > before[2]
    finally:
        await part.close()
        io.close()


async def test_a_refused_io_uring_enter_keeps_the_entry_and_retries_without_spinning(
    tmp_path: Path,
) -> None:
    ring = UringSync.open(asyncio.get_running_loop())
    if ring is None:
        pytest.skip("this kernel offers no io_uring")
    real = ring._syscall
    calls = []
    refuse_until = time.monotonic() + 0.05

    def flaky(*args: object) -> int:
        calls.append(args[0])
        if time.monotonic() < refuse_until:  # the ring refuses entries for 50 ms
            ctypes.set_errno(errno.EINVAL)
            return -1
        return int(real(*args))

    ring._syscall = flaky  # type: ignore[assignment]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x", 0)
        assert await _sync(ring, fd) == 0  # entered once the ring took it, then synced
        # retried every 10 ms (about 6 tries in 50 ms), not once per loop turn (thousands)
        assert 2 <= len(calls) <= 10
        assert ring.in_flight == 0
    finally:
        os.close(fd)
        ring.close()


async def test_a_lone_append_syncs_off_the_loop_while_the_state_store_syncs(
    tmp_path: Path,
) -> None:
    """One disk: an fdatasync issued while the state store's is in flight waits for the
    device to finish that one first, so while the store syncs a lone append's round goes to
    the kernel (or a thread) instead of holding the loop; once it is done, rounds run on the
    loop again."""
    import threading

    from storage.kv import KV

    kv = KV(tmp_path / "state", map_size=1 << 20)
    io = IoThreads(2, inline_max_ms=5, sync_engine="aio")
    io.busy_elsewhere.append(lambda: kv.syncing)
    part = open_partition(tmp_path / "p", io=io)
    release = threading.Event()
    real = kv.sync_now

    def held_sync() -> None:  # the store's fsync, on its thread, until released
        release.wait(10)
        real()

    kv.sync_now = held_sync  # type: ignore[method-assign]
    try:
        await part.append([batch(values_for(0, 1))])
        assert part.inline_syncs == 1  # a lone append, nothing else on the disk: inline
        kv.table("t", bytes).put(b"k", b"v")
        store_sync = asyncio.create_task(kv.sync())
        await asyncio.sleep(0)
        assert kv.syncing
        for i in range(3):
            await part.append([batch(values_for(i + 1, 1))])
        assert part.inline_syncs == 1 and part.syncs == 4  # not one more on the loop
        release.set()
        await asyncio.wait_for(store_sync, 10)
        assert not kv.syncing
        await part.append([batch(values_for(9, 1))])
        assert part.inline_syncs == 2
    finally:
        release.set()
        await part.close()
        io.close()
        kv.close()
