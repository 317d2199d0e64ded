"""The partition's two flush stages (write, then sync) and its page-cache window."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from storage import records
from storage.errors import CorruptData
from storage.io_threads import IoThreads
from storage.partition import Acks, PartitionConfig
from tests.unit.storage.test_partition import batch, open_partition, read_all, values_for

PAGE = 4096


class GatedFsync:
    """An fsync that, once armed, blocks the sync thread until released."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.threads: list[int] = []  # the thread each call ran on

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.threads.append(threading.get_ident())
        if self.armed:
            self.entered.set()
            self.release.wait(10)
        os.fdatasync(fd)


async def test_batches_arriving_during_a_sync_are_written_before_it_ends(tmp_path: Path) -> None:
    gate = GatedFsync()
    part = open_partition(tmp_path / "p", fsync=gate)
    try:
        await part.append([batch(values_for(0, 5))])
        gate.armed = True
        first = part.append_nowait([batch(values_for(5, 5))])
        assert await asyncio.to_thread(gate.entered.wait, 5), "the sync never started"
        # the first sync is stuck in fdatasync; a new append must still reach the file
        second = part.append_nowait([batch(values_for(10, 5))])
        written = part.written_future(second.last_offset + 1)
        assert written is not None
        await asyncio.wait_for(written, 5)
        assert part.high_watermark == first.base_offset  # neither is durable yet
        gate.armed = False
        gate.release.set()
        await asyncio.wait_for(part.wait_durable(second.last_offset + 1), 5)
        assert part.high_watermark == 15
        assert read_all(part) == {o: v for o, v in enumerate(values_for(0, 15))}
    finally:
        gate.release.set()
        await part.close()


async def test_a_lone_append_is_written_and_synced_by_one_job(tmp_path: Path) -> None:
    gate = GatedFsync()
    part = open_partition(tmp_path / "p", fsync=gate)
    try:
        for i in range(5):
            await part.append([batch(values_for(i * 3, 3))])
        assert gate.calls == 5  # one fdatasync per append, none extra
    finally:
        await part.close()


class CountingIo(IoThreads):
    """I/O threads that count the reports their jobs send to the loop."""

    def __init__(self, *, inline_max_ms: float = 0) -> None:
        super().__init__(2, inline_max_ms=inline_max_ms)
        self.reports: list[str] = []

    def report(self, callback: Callable[..., None], *args: Any) -> None:
        self.reports.append(callback.__name__)
        super().report(callback, *args)


async def test_a_lone_append_is_answered_from_one_report(tmp_path: Path) -> None:
    io = CountingIo()
    part = open_partition(tmp_path / "p", io=io)
    try:
        for i in range(5):
            await part.append([batch(values_for(i * 3, 3))])
        # one hand-off to a thread and one report back per append: the write is not
        # reported on its own when nobody waits for it
        assert io.reports == ["_sync_done"] * 5
        result = await part.append([batch(values_for(15, 3))], Acks.LEADER)
        await part.wait_durable(result.last_offset + 1)
        assert io.reports[5:] in (["_write_done", "_sync_done"], ["_sync_done"])
    finally:
        await part.close()
        io.close()


async def test_an_append_queued_behind_a_write_then_sync_job_is_written_before_its_sync_ends(
    tmp_path: Path,
) -> None:
    gate = GatedFsync()
    part = open_partition(tmp_path / "p", fsync=gate)
    try:
        gate.armed = True
        first = part.append_nowait([batch(values_for(0, 5))])  # a write-then-sync job
        assert await asyncio.to_thread(gate.entered.wait, 5), "the sync never started"
        # the job's write was not reported (nobody asked); a new append makes the loop ask,
        # and finding the write done it goes on without waiting for the stuck sync
        second = part.append_nowait([batch(values_for(5, 5))])
        written = part.written_future(second.last_offset + 1)
        assert written is not None
        await asyncio.wait_for(written, 5)
        assert part.high_watermark == 0
        gate.armed = False
        gate.release.set()
        await asyncio.wait_for(part.wait_durable(second.last_offset + 1), 5)
        assert part.high_watermark == 10 and first.base_offset == 0
        assert read_all(part) == {o: v for o, v in enumerate(values_for(0, 10))}
    finally:
        gate.release.set()
        await part.close()


def resident_pages(path: Path) -> list[bool]:
    """Which pages of ``path`` are in the page cache (mincore(2) on a shared mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    # a private mapping is writable for ctypes and, untouched, reports the file's pages
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        buf = ctypes.c_char.from_buffer(m)
        try:
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), size, vec)
            assert rc == 0, os.strerror(ctypes.get_errno())
        finally:
            del buf
        return [bool(b & 1) for b in vec]


async def test_the_log_keeps_only_its_newest_window_in_the_page_cache(tmp_path: Path) -> None:
    window = 64 * 1024
    config = PartitionConfig(segment_bytes=256 * 1024, cache_window_bytes=window)
    part = open_partition(tmp_path / "p", config=config)
    try:
        for i in range(200):  # ~4 KiB batches: ~800 KiB over four segments
            await part.append([batch(values_for(i * 4, 4, size=1000))])
        await part.flush()
        segments = part.segments
        assert len(segments) >= 3
        files = [s.log_path for s in segments]
        # the log's pages, not the fill preallocated after its batches
        active = resident_pages(files[-1])[: (segments[-1].size + PAGE - 1) // PAGE]
        older = [resident_pages(f) for f in files[:-2]]
        # everything more than a window behind the end is out of the cache...
        for pages in older:
            assert not any(pages), "a segment wholly behind the window is still cached"
        behind = len(active) - window // PAGE - 1
        if behind > 0:
            assert not any(active[:behind])
        # ...and the newest window is still in it
        assert all(active[-(min(len(active), window // PAGE) - 1) :])
        # reads of dropped data still work (from disk)
        assert len(read_all(part)) == 800
    finally:
        await part.close()


async def test_a_zero_window_leaves_the_page_cache_alone(tmp_path: Path) -> None:
    config = PartitionConfig(segment_bytes=256 * 1024, cache_window_bytes=0)
    part = open_partition(tmp_path / "p", config=config)
    try:
        for i in range(100):
            await part.append([batch(values_for(i * 4, 4, size=1000))])
        first = part.segments[0].log_path
        assert all(resident_pages(first))
    finally:
        await part.close()


async def test_a_read_below_the_window_reads_the_next_chunks_ahead(tmp_path: Path) -> None:
    window = 64 * 1024
    config = PartitionConfig(segment_bytes=1024 * 1024, cache_window_bytes=window)
    part = open_partition(tmp_path / "p", config=config)
    try:
        for i in range(200):  # ~800 KiB in one segment
            await part.append([batch(values_for(i * 4, 4, size=1000))])
        await part.flush()
        (seg,) = part.segments
        pages = resident_pages(seg.log_path)
        assert not any(pages[:100]), "the start of the log should be out of the page cache"

        # the kernel's own readahead would blur what the partition asks for: switch it off
        os.posix_fadvise(seg.fd, 0, 0, os.POSIX_FADV_RANDOM)
        chunk = 64 * 1024
        data = part.read(0, chunk)  # from disk
        assert data
        # two and three fetches ahead: beyond anything the read itself brought in
        ahead = range((len(data) + 2 * chunk) // PAGE, (len(data) + 3 * chunk) // PAGE)
        for _ in range(100):  # the read-ahead runs in a worker thread
            pages = resident_pages(seg.log_path)
            if all(pages[i] for i in ahead):
                break
            await asyncio.sleep(0.01)
        assert all(pages[i] for i in ahead), "the next chunks were not read ahead"
        assert len(read_all(part)) == 800
    finally:
        await part.close()


async def test_reads_behind_the_window_run_in_a_thread_and_hold_the_file_open(
    tmp_path: Path,
) -> None:
    config = PartitionConfig(
        segment_bytes=256 * 1024, cache_window_bytes=64 * 1024, retention_bytes=1
    )
    part = open_partition(tmp_path / "p", config=config)
    closing: asyncio.Task[None] | None = None
    try:
        for i in range(200):
            await part.append([batch(values_for(i * 4, 4, size=1000))])
        await part.flush()
        first = part.segments[0]
        assert first.cache_dropped == first.size  # wholly behind the window
        expected = part.read(0, 16 * 1024)

        entered, release = threading.Event(), threading.Event()
        read_into = first.read_into
        threads: list[str] = []

        def gated(position: int, length: int) -> bytearray:
            threads.append(threading.current_thread().name)
            entered.set()
            release.wait(10)
            return read_into(position, length)

        first.read_into = gated  # type: ignore[method-assign]
        reading = asyncio.ensure_future(part.read_async(0, 16 * 1024))
        assert await asyncio.to_thread(entered.wait, 5)
        assert threads and threads[0] != threading.main_thread().name

        # the pinned segment outlives retention (which would delete it: retention_bytes=1)
        assert first.base_offset not in part.apply_retention()
        assert part.segments[0] is first
        # and close() waits for the read
        closing = asyncio.ensure_future(part.close())
        await asyncio.sleep(0.05)
        assert not closing.done() and not first.closed
        release.set()
        assert bytes(await asyncio.wait_for(reading, 5)) == bytes(expected)
        await asyncio.wait_for(closing, 5)
        assert first.closed
    finally:
        release.set()
        if closing is None:
            await part.close()


async def test_reads_within_the_window_are_served_on_the_loop(tmp_path: Path) -> None:
    part = open_partition(tmp_path / "p", config=PartitionConfig(cache_window_bytes=1 << 20))
    try:
        for i in range(20):
            await part.append([batch(values_for(i * 4, 4, size=1000))])
        (seg,) = part.segments
        threads: list[str] = []
        read_into = seg.read_into

        def spy(position: int, length: int) -> bytearray:
            threads.append(threading.current_thread().name)
            return read_into(position, length)

        seg.read_into = spy  # type: ignore[method-assign]
        assert await part.read_async(0, 1 << 20) == part.read(0, 1 << 20)
        assert threads == [threading.main_thread().name] * 2
    finally:
        await part.close()


async def test_a_read_from_where_the_last_one_ended_starts_there_and_still_checks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = open_partition(tmp_path / "p", config=PartitionConfig(index_interval_bytes=512))
    try:
        for i in range(20):
            await part.append([batch(values_for(i * 5, 5))])
        first = part.read(0, 1 << 20)
        tail = [h.next_offset for _p, h in records.iter_batches(first)][-1]
        assert tail == 100
        for i in range(20, 30):
            await part.append([batch(values_for(i * 5, 5))])
        (seg,) = part.segments

        def no_walk(*_args: object, **_kw: object) -> tuple[int, int]:
            raise AssertionError("a tailing read walked the headers")

        monkeypatch.setattr(seg, "find_batch", no_walk)
        nxt = part.read(tail, 1 << 20)
        assert next(h.base_offset for _p, h in records.iter_batches(nxt)) == 100
        monkeypatch.undo()
        assert read_all(part, 100) == {o: v for o, v in enumerate(values_for(0, 150)) if o >= 100}

        # damage where the next read starts is found all the same
        end = [h.next_offset for _p, h in records.iter_batches(part.read(100, 1 << 20))][-1]
        pos = seg.size
        await part.append([batch(values_for(end, 5))])
        fd = os.open(tmp_path / "p" / f"{0:020d}.log", os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xff", pos + records.HEADER_SIZE + 3)  # a byte of its records
        finally:
            os.close(fd)
        with pytest.raises(CorruptData):
            part.read(end, 1 << 20)
    finally:
        await part.close()


# ---------------------------------------------------------------- inline jobs (issue 12 § 3)
class ThreadRecordingFsync:
    """fdatasync that records the thread each call ran on, optionally after a pause (a slow
    disk)."""

    def __init__(self, pause: float = 0.0) -> None:
        self.threads: list[int] = []
        self.pause = pause

    def __call__(self, fd: int) -> None:
        self.threads.append(threading.get_ident())
        if self.pause:
            threading.Event().wait(self.pause)
        os.fdatasync(fd)


# checkpoints only when asked (a due checkpoint is a job of its own on a thread)
NO_TIMED_CHECKPOINT = PartitionConfig(checkpoint_interval_ms=3_600_000)


async def test_a_lone_append_is_written_and_synced_on_the_loop_with_no_hand_off(
    tmp_path: Path,
) -> None:
    io = CountingIo(inline_max_ms=10_000)
    fsync = ThreadRecordingFsync()
    part = open_partition(tmp_path / "p", io=io, fsync=fsync, config=NO_TIMED_CHECKPOINT)
    try:
        for i in range(5):
            await part.append([batch(values_for(i * 3, 3))])
            assert part.high_watermark == (i + 1) * 3
        # one fdatasync per append, each on the loop's own thread; no job went to a thread
        # and nothing was reported back
        assert fsync.threads == [threading.get_ident()] * 5
        assert io.reports == []
        assert io.threads == 0
        assert read_all(part) == {o: v for o, v in enumerate(values_for(0, 15))}
    finally:
        await part.close()
        io.close()


async def test_a_lone_appends_acknowledgement_is_answered_inside_the_turn_of_its_sync(
    tmp_path: Path,
) -> None:
    io = CountingIo(inline_max_ms=10_000)
    part = open_partition(tmp_path / "p", io=io, config=NO_TIMED_CHECKPOINT)
    loop = asyncio.get_running_loop()
    try:
        await part.append([batch(values_for(0, 1))])  # the segment exists, the fill is on
        events: list[str] = []
        appended = part.append_nowait([batch(values_for(1, 2))])
        ack = part.durable_future(appended.last_offset + 1)
        assert ack is not None
        # the direct callback (the TCP server's reply) sees the record durable and
        # visible: the high watermark moved first, so a fetch sent after the reply finds it
        ack.when_done(lambda f: events.append(f"answered, high watermark {part.high_watermark}"))
        ack.add_done_callback(lambda f: events.append("loop callback"))
        # the sync runs in the next turn, on the loop (a lone append), queued there by the
        # append; a callback queued behind it runs in that same turn, after it: the answer
        # is given by then (a future's done-callback would come a turn later)
        loop.call_soon(lambda: events.append("rest of the sync's turn"))
        await asyncio.wait_for(ack, 5)
        await asyncio.sleep(0)
        assert events == [
            "answered, high watermark 3",
            "rest of the sync's turn",
            "loop callback",
        ]
    finally:
        await part.close()
        io.close()


async def test_appends_made_together_share_one_fdatasync_on_a_thread(tmp_path: Path) -> None:
    io = CountingIo(inline_max_ms=10_000)
    fsync = ThreadRecordingFsync()
    part = open_partition(tmp_path / "p", io=io, fsync=fsync, config=NO_TIMED_CHECKPOINT)
    try:
        # ten producers' requests read in one loop turn: concurrent appends are not run on
        # the loop (it keeps reading requests while the disk syncs), and share one sync
        results = [part.append_nowait([batch(values_for(i * 2, 2))]) for i in range(10)]
        await asyncio.wait_for(part.wait_durable(results[-1].last_offset + 1), 5)
        assert len(fsync.threads) == 1
        assert fsync.threads[0] != threading.get_ident()
        assert io.reports == ["_sync_done"]
        assert part.high_watermark == 20
    finally:
        await part.close()
        io.close()


async def test_appends_that_arrive_during_a_sync_are_synced_by_a_thread_not_the_loop(
    tmp_path: Path,
) -> None:
    gate = GatedFsync()
    io = IoThreads(2, inline_max_ms=10_000)
    part = open_partition(tmp_path / "p", io=io, fsync=gate, config=NO_TIMED_CHECKPOINT)
    loop_thread = threading.get_ident()
    try:
        part.append_nowait([batch(values_for(0, 2))])
        await asyncio.sleep(0)  # its job starts: a lone append, no job running: on the loop
        assert gate.threads == [loop_thread]
        # two producers' appends in one turn: concurrent, so a thread writes and syncs them
        gate.armed = True
        part.append_nowait([batch(values_for(2, 2))])
        part.append_nowait([batch(values_for(4, 2))])
        assert await asyncio.to_thread(gate.entered.wait, 5), "the sync never started"
        # one more arrives while that sync runs: it is alone in its job once the sync
        # ends, but it came during a job, so it too is synced by a thread
        last = part.append_nowait([batch(values_for(6, 2))])
        gate.armed = False
        gate.release.set()
        await asyncio.wait_for(part.wait_durable(last.last_offset + 1), 5)
        assert len(gate.threads) == 3
        assert loop_thread not in gate.threads[1:]
        assert part.high_watermark == 8
        assert read_all(part) == {o: v for o, v in enumerate(values_for(0, 8))}
    finally:
        gate.release.set()
        await part.close()
        io.close()


async def test_after_a_slow_inline_sync_jobs_go_to_the_threads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    io = IoThreads(2, inline_max_ms=1)
    fsync = ThreadRecordingFsync(pause=0.05)  # a disk far slower than the 1 ms allowed
    part = open_partition(tmp_path / "p", io=io, fsync=fsync, config=NO_TIMED_CHECKPOINT)
    try:
        for i in range(3):
            await part.append([batch(values_for(i, 1))])
        loop_thread = threading.get_ident()
        # the first lone append ran on the loop and stalled it; the next ones did not
        assert fsync.threads[0] == loop_thread
        assert all(t != loop_thread for t in fsync.threads[1:])
        assert io.slow_inline_jobs == 1
        assert "event=inline_io_slow" in caplog.text
        assert part.high_watermark == 3
    finally:
        await part.close()
        io.close()


async def test_lone_appends_to_two_partitions_in_one_turn_do_not_wait_for_each_other(
    tmp_path: Path,
) -> None:
    io = IoThreads(2, inline_max_ms=10_000)
    fsync = ThreadRecordingFsync()
    a = open_partition(tmp_path / "a", io=io, fsync=fsync, config=NO_TIMED_CHECKPOINT)
    b = open_partition(tmp_path / "b", io=io, fsync=fsync, config=NO_TIMED_CHECKPOINT)
    try:
        ra = a.append_nowait([batch(values_for(0, 1))])
        rb = b.append_nowait([batch(values_for(0, 1))])
        await asyncio.wait_for(
            asyncio.gather(a.wait_durable(ra.last_offset + 1), b.wait_durable(rb.last_offset + 1)),
            5,
        )
        # one ran on the loop, the other on a thread meanwhile (not one after the other)
        loop_thread = threading.get_ident()
        assert sorted(t == loop_thread for t in fsync.threads) == [False, True]
    finally:
        await a.close()
        await b.close()
        io.close()


async def test_a_lone_inline_round_queues_no_turn_marker_but_two_partitions_in_a_turn_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = IoThreads(2, inline_max_ms=10_000)
    fsync = ThreadRecordingFsync()
    a = open_partition(tmp_path / "a", io=io, fsync=fsync, config=NO_TIMED_CHECKPOINT)
    b = open_partition(tmp_path / "b", io=io, fsync=fsync, config=NO_TIMED_CHECKPOINT)
    loop = asyncio.get_running_loop()
    queued: list[str] = []
    call_soon = loop.call_soon

    def recording_call_soon(callback: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        queued.append(getattr(callback, "__qualname__", repr(callback)))
        return call_soon(callback, *args, **kw)

    monkeypatch.setattr(loop, "call_soon", recording_call_soon)
    try:
        # a lone client: each round is inline, and nothing else can start in its turn, so
        # no callback is queued to end "the turn of an inline job" (one loop pass less)
        for i in range(3):
            await a.append([batch(values_for(i, 1))])
        assert io.inline_jobs == 3
        assert "IoThreads._next_turn" not in queued
        # two partitions' lone appends in one turn: the second is held back from the loop
        # until the next turn, so it syncs on a thread meanwhile
        ra = a.append_nowait([batch(values_for(3, 1))])
        rb = b.append_nowait([batch(values_for(0, 1))])
        await asyncio.gather(a.wait_durable(ra.last_offset + 1), b.wait_durable(rb.last_offset + 1))
        assert queued.count("IoThreads._next_turn") == 1
        assert io.inline_jobs == 4
        assert io.starts_due == 0
    finally:
        monkeypatch.undo()
        await a.close()
        await b.close()
        io.close()


async def test_inline_jobs_are_off_unless_asked_for(tmp_path: Path) -> None:
    fsync = ThreadRecordingFsync()
    part = open_partition(tmp_path / "p", fsync=fsync, config=NO_TIMED_CHECKPOINT)
    try:
        await part.append([batch(values_for(0, 1))])
        assert fsync.threads and threading.get_ident() not in fsync.threads
    finally:
        await part.close()


class GatedCheckpoints:
    """``write_checkpoint`` that, once armed, blocks its thread until released."""

    def __init__(self, real: Callable[..., None]) -> None:
        self.real = real
        self.armed = True
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[int] = []

    def __call__(self, directory: Path, checkpoint: Any) -> None:
        self.threads.append(threading.get_ident())
        if self.armed:
            self.entered.set()
            self.release.wait(10)
        self.real(directory, checkpoint)


EVERY_ROUND_CHECKPOINT = PartitionConfig(checkpoint_interval_ms=0)


@pytest.mark.parametrize("inline", [False, True], ids=["thread-job", "inline-job"])
async def test_a_due_checkpoint_is_written_after_the_round_is_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline: bool
) -> None:
    import storage.flush
    from storage.checkpoint import read_checkpoint, write_checkpoint

    gate = GatedCheckpoints(write_checkpoint)
    monkeypatch.setattr(storage.flush, "write_checkpoint", gate)
    io = CountingIo(inline_max_ms=10_000 if inline else 0)
    fsync = ThreadRecordingFsync()
    part = open_partition(tmp_path / "p", io=io, fsync=fsync, config=EVERY_ROUND_CHECKPOINT)
    loop_thread = threading.get_ident()
    try:
        # a checkpoint is due with every round; its write blocks: the append is still
        # acknowledged (its data synced), and the recovery point has not moved yet
        await asyncio.wait_for(part.append([batch(values_for(0, 3))]), 5)
        assert part.high_watermark == 3
        assert (fsync.threads[-1] == loop_thread) is inline  # the data sync ran where it did
        assert await asyncio.to_thread(gate.entered.wait, 5), "no checkpoint job started"
        assert all(t != loop_thread for t in gate.threads)  # never on the loop
        before = read_checkpoint(tmp_path / "p")
        assert before is None or before.next_offset < 3
        # more rounds while it is stuck: acknowledged too; their checkpoints wait, the newest
        # replacing the others (one checkpoint job at a time)
        for i in range(1, 4):
            await asyncio.wait_for(part.append([batch(values_for(i * 3, 3))]), 5)
        assert part.high_watermark == 12
        assert len(gate.threads) == 1
        gate.armed = False
        gate.release.set()
        await asyncio.wait_for(part.flush(), 5)  # waits for the checkpoint jobs too
        assert len(gate.threads) == 2  # the stuck one, then only the newest waiting one
        after = read_checkpoint(tmp_path / "p")
        assert after is not None and after.next_offset == 12
        assert "_checkpoint_done" in io.reports
    finally:
        gate.release.set()
        await part.close()
        io.close()
    assert read_all(open_partition(tmp_path / "p")) == {
        o: v for o, v in enumerate(values_for(0, 12))
    }


async def test_inline_jobs_come_back_once_the_cool_down_after_a_slow_one_is_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import storage.io_threads

    monkeypatch.setattr(storage.io_threads, "INLINE_COOLDOWN_S", 0.2)
    io = IoThreads(2, inline_max_ms=5)
    fsync = ThreadRecordingFsync(pause=0.03)  # slower than the 5 ms allowed
    part = open_partition(tmp_path / "p", io=io, fsync=fsync, config=NO_TIMED_CHECKPOINT)
    loop_thread = threading.get_ident()
    try:
        await part.append([batch(values_for(0, 1))])  # inline, and too slow
        fsync.pause = 0.0
        await part.append([batch(values_for(1, 1))])  # cooling down: a thread
        assert fsync.threads[0] == loop_thread and fsync.threads[1] != loop_thread
        await asyncio.sleep(0.25)  # the cool-down is over
        await part.append([batch(values_for(2, 1))])
        assert fsync.threads[2] == loop_thread  # on the loop again
        assert io.slow_inline_jobs >= 1  # (the disk itself may add one more)
        assert "event=inline_io_slow" in caplog.text
    finally:
        await part.close()
        io.close()


@pytest.mark.parametrize("inline", [False, True], ids=["thread-job", "inline-job"])
async def test_a_sync_round_slower_than_the_stall_budget_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, inline: bool
) -> None:
    from storage.flush import SLOW_SYNC_MS

    io = IoThreads(2, inline_max_ms=10_000 if inline else 0)
    fsync = ThreadRecordingFsync()
    part = open_partition(tmp_path / "p", io=io, fsync=fsync, config=NO_TIMED_CHECKPOINT)
    try:
        await part.append([batch(values_for(0, 1))])
        assert "event=sync_slow" not in caplog.text  # at the disk's own speed (tmpfs or not)
        fsync.pause = SLOW_SYNC_MS / 1000 + 0.01  # a disk that stalls past the budget
        await part.append([batch(values_for(1, 1))])
        lines = [r.getMessage() for r in caplog.records if "event=sync_slow" in r.getMessage()]
        assert len(lines) == 1
        assert f"inline={int(inline)}" in lines[0] and "partition=" in lines[0]
    finally:
        await part.close()
        io.close()
