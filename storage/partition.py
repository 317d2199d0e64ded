"""A partition: an ordered run of segments with group commit, reads by offset, retention and
crash recovery.

The facade over the parts that do the work: :mod:`storage.recovery` (opening),
:mod:`storage.flush` (the write -> sync state machine and its worker threads),
:mod:`storage.reads` (fetches, verified), :mod:`storage.quarantine` (damage),
:mod:`storage.retention`. Every method runs on the event loop thread; the flush jobs run on
the log's I/O threads (:class:`~storage.io_threads.IoThreads`), other blocking I/O in the
loop's default executor. An append validates, stamps and accounts its batches at once
(in the caller's turn of the loop, so offsets follow call order) and queues the bytes; the
loop never writes the file while a job on it runs (on ext4 a write that lands while an
fsync of the same file runs can stall for milliseconds, stalling every connection of the
node); it runs a lone append's job itself only when nothing else runs (inline jobs,
:mod:`storage.io_threads`).

Visibility: consumers read up to the **high watermark**, which on a single node is the
offset up to which the log is synced. A consumer therefore never sees a record that a power
failure could take back, and an offset is never handed out twice. (With replication the high
watermark will also wait for the in-sync followers.) Every write, whatever its ``acks``,
schedules a sync, so the high watermark trails the log end by one fsync at most.

Failure model: a failed write (ENOSPC, EIO) cuts the log back to what was written before it;
every append queued from that one on is dropped (its producer-table records undone) and its
``acks=1``/``acks=all`` waiters get :class:`StorageFull` (or :class:`StorageError`); their
offsets are given out again, so an ``acks=0`` producer, never told, may see them reused. A
failed *sync* cannot be retried and trusted, so the partition goes offline
(:class:`LogOffline`) until it is reopened and recovery reads the tail from the device. A
failed checkpoint write is only logged. Damaged bytes are quarantined, never served
(:class:`CorruptData`), never cut unless they are a torn tail.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from storage import records
from storage.ack import Ack
from storage.checkpoint import Checkpoint, new_checkpoint, write_checkpoint
from storage.errors import (
    CorruptBatch,
    LogClosed,
    LogOffline,
    StorageError,
    StorageFull,
)
from storage.flush import Flusher, FsyncFn, Mark, Pipeline, WriteRun
from storage.io_threads import IoThreads
from storage.producers import ProducerTable
from storage.quarantine import Quarantine, QuarantinedRange
from storage.reads import Reader
from storage.recovery import RecoveryReport as RecoveryReport
from storage.recovery import recover
from storage.retention import segments_to_delete
from storage.segment import Segment, fsync_dir

log = logging.getLogger("herald.storage")


class Acks(enum.IntEnum):
    """How far an append has gone when it is acknowledged. An append is validated, given
    its offsets and queued on the event loop; the *write* stage (a worker thread) then
    writes it into the file (the page cache) and the *sync* stage fdatasyncs it
    (:mod:`storage.flush`). Whatever ``acks`` says, every append is written and synced, and
    consumers see it only once it is synced (the high watermark)."""

    # queued in memory when the call returns: nothing is awaited and nothing is in the file
    # yet (the write stage writes it later); a failed write is never reported to this
    # producer, and a crash before the write loses it
    NONE = 0
    # written to the page cache by the write stage, not yet synced: survives a killed
    # process, not a power loss. In a cluster: written by the leader
    LEADER = 1
    # fdatasync'd by the sync stage: survives a power loss. In a cluster: also by the
    # in-sync replicas
    ALL = -1


class PartitionConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Per-partition storage settings (the topic's config maps onto these)."""

    segment_bytes: int = 128 * 1024 * 1024
    segment_ms: int = 7 * 24 * 3600 * 1000
    index_interval_bytes: int = 4096
    retention_ms: int | None = 7 * 24 * 3600 * 1000  # None: keep forever
    retention_bytes: int | None = None  # None: no size limit
    max_batch_bytes: int = 8 * 1024 * 1024
    checkpoint_interval_ms: int = 1000
    # After a sync, pages of the log more than this far behind the synced end are advised
    # out of the page cache (0: leave them all to the kernel). Tailing consumers read from
    # the window; the log's cold tail does not push LMDB's pages or other partitions' hot
    # tails out of memory, and new writes reuse freed pages instead of taking fresh ones.
    cache_window_bytes: int = 256 * 1024 * 1024
    # The active segment's file is kept up to this many bytes longer than its batches
    # (fallocate, by the sync job, never past segment_bytes; 0: off), so appends overwrite
    # space the file already has: on ext4 an fdatasync after a write that grows the file
    # commits the journal every round. Sealed and closed segments are cut back to their
    # batches; recovery reads zeros right after the last batch as the end of the log.
    preallocate_bytes: int = 1024 * 1024


class AppendResult(msgspec.Struct, frozen=True):
    base_offset: int
    last_offset: int
    duplicate: bool = False


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Partition:
    """An open partition. Create with :meth:`open`."""

    def __init__(
        self,
        directory: Path,
        config: PartitionConfig,
        segments: list[Segment],
        producers: ProducerTable,
        *,
        fsync: FsyncFn,
        clock: Callable[[], int],
        name: str,
        quarantine: Quarantine | None = None,
        io: IoThreads | None = None,
    ) -> None:
        self.directory = directory
        self.config = config
        self.name = name
        self._segments = segments
        self._bases = [s.base_offset for s in segments]
        self._producers = producers
        self._clock = clock
        self._active_created_ms = clock()
        self._pipeline = Pipeline(
            segments,
            checkpoint_interval_ms=config.checkpoint_interval_ms,
            cache_window_bytes=config.cache_window_bytes,
            now_ms=clock(),
            preallocate_bytes=config.preallocate_bytes,
            segment_bytes=config.segment_bytes,
        )
        # the log's shared I/O threads, or this partition's own when opened alone
        self._own_io = io is None
        self._io = io if io is not None else IoThreads(2, name=f"herald-io-{name}")
        self._flusher = Flusher(
            self._pipeline,
            threads=self._io,
            directory=directory,
            name=name,
            fsync=fsync,
            clock=clock,
            checkpoint_of=self._checkpoint_of,
            on_high_watermark=self._high_watermark_advanced,
            on_write_failed=self._undo_writes,
        )
        self._quarantine = quarantine if quarantine is not None else Quarantine(directory, [])
        self._reader = Reader(segments, self._bases, self._pipeline, self._quarantine, name=name)
        self._hw_waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self.on_high_watermark: Callable[[Partition], None] | None = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` began: a caller holding this object looks the partition up
        again (its topic may be gone, or made anew)."""
        return self._closed

    # ------------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        directory: Path,
        config: PartitionConfig | None = None,
        *,
        fsync: FsyncFn = os.fdatasync,
        clock: Callable[[], int] = _now_ms,
        name: str | None = None,
        io: IoThreads | None = None,
    ) -> tuple[Partition, RecoveryReport]:
        """Open (creating if needed) the partition in ``directory`` and recover it.

        Recovery (:func:`storage.recovery.recover`) trusts the bytes before the checkpoint
        and verifies, read from the device, every batch after it; a torn tail is cut,
        corruption quarantined; the report says which. Works on a full disk (the checkpoint
        written after recovery may fail: it is logged). Blocking: at start-up, call it
        before serving or from a thread. ``io``: the threads that run its write and sync
        jobs (a log shares one pool among its partitions); by default the partition starts
        two of its own and stops them when it closes.
        """
        config = config or PartitionConfig()
        label = name or directory.name
        recovered = recover(directory, index_interval_bytes=config.index_interval_bytes, name=label)
        try:
            part = cls(
                directory,
                config,
                recovered.segments,
                recovered.producers,
                fsync=fsync,
                clock=clock,
                name=label,
                quarantine=recovered.quarantine,
                io=io,
            )
            part._write_checkpoint_now()
        except BaseException:
            # e.g. out of descriptors for the checkpoint's file (a topic created past the
            # open-files limit): the segments' two each must not outlive the failed open
            for seg in recovered.segments:
                seg.abandon()
            raise
        return part, recovered.report

    def expire_producers(self, older_than_ms: int) -> int:
        """Forget idempotent producers idle since before ``older_than_ms`` (the node's
        clock). Returns how many; the next checkpoint no longer carries them."""
        return self._producers.expire(older_than_ms)

    @property
    def producer_count(self) -> int:
        return len(self._producers)

    # --------------------------------------------------------------------- properties
    @property
    def log_start_offset(self) -> int:
        return self._segments[0].base_offset

    @property
    def log_end_offset(self) -> int:
        """The offset the next appended record will get."""
        return self._segments[-1].next_offset

    @property
    def high_watermark(self) -> int:
        """Records below this offset are durable and visible to consumers."""
        return self._pipeline.flushed_offset

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    @property
    def segments(self) -> list[Segment]:
        return list(self._segments)

    @property
    def quarantined(self) -> list[QuarantinedRange]:
        """The damaged ranges of this partition (oldest first): bytes that failed their
        checks where valid batches should be, found by recovery or by a read. They are
        never served (a read of their offsets raises :class:`CorruptData`) and stay on disk.
        The broker reports a partition with any as degraded."""
        return self._quarantine.ranges

    @property
    def corruptions_detected(self) -> int:
        """Damaged ranges found since the partition was opened, recovery included (a
        counter for metrics)."""
        return self._quarantine.detected

    def next_readable_offset(self, offset: int) -> int:
        """The first offset at or after ``offset`` that is not quarantined: ``offset``
        itself, or the end offset of the range that holds it. The way past damage for an
        operator or an application that decides to skip it: reading from there works."""
        while (rng := self._quarantine.covering(offset)) is not None:
            offset = rng.end_offset
        return offset

    @property
    def offline(self) -> bool:
        return self._pipeline.failure is not None

    @property
    def syncs(self) -> int:
        """fdatasync rounds completed since the partition was opened, and of those, how
        many ran on the event loop (:mod:`storage.io_threads`, inline jobs): counters for
        metrics. Each round answers every append it covers."""
        return self._flusher.syncs

    @property
    def inline_syncs(self) -> int:
        return self._flusher.inline_syncs

    @property
    def aio_syncs(self) -> int:
        """Rounds whose fdatasyncs all ran as kernel AIO (:mod:`storage.aio`)."""
        return self._flusher.aio_syncs

    # ------------------------------------------------------------------------- append
    def _check_writable(self) -> None:
        if self._closed:
            raise LogClosed(f"partition {self.name} is closed")
        failure = self._pipeline.failure
        if failure is not None:
            raise LogOffline(f"partition {self.name} is offline after an I/O error: {failure}")

    def append_nowait(
        self, batches: Sequence[bytes | memoryview], *, leader_epoch: int = 0
    ) -> AppendResult:
        """Validate, stamp and queue ``batches`` (all or none) for the next write-and-sync.

        Returns the offsets given. An idempotent producer's duplicate batch is not written
        again: its original offsets come back with ``duplicate=True`` (only when the request
        holds that single batch; a duplicate inside a multi-batch request is refused).

        Raises :class:`CorruptBatch` for a batch that fails its checks or is larger than
        ``max_batch_bytes``, :class:`OutOfOrderSequence`, :class:`LogOffline`. A write that
        fails later (ENOSPC) fails the futures of :meth:`written_future` and
        :meth:`durable_future` with :class:`StorageFull`, and the log is cut back to what was
        written before it.
        """
        self._check_writable()
        if not batches:
            raise CorruptBatch("no batches to append")
        self._maybe_roll()
        active = self._segments[-1]
        next_offset = active.next_offset
        limit = self.config.max_batch_bytes
        heads: list[bytes] = []
        headers: list[records.BatchHeader] = []
        idempotent = False
        for batch in batches:
            size = len(batch)
            if size > limit:
                raise CorruptBatch(f"batch of {size} bytes exceeds max_batch_bytes={limit}")
            head, header = records.accept_batch(batch, next_offset, leader_epoch)
            if header.batch_length != size:
                raise CorruptBatch(f"batch length {header.batch_length} != {size} bytes given")
            if header.producer_id >= 0:
                idempotent = True
            heads.append(head)
            headers.append(header)
            next_offset += header.record_count
        if idempotent:  # nothing is accounted yet: a refusal or a duplicate changes nothing
            original = self._producers.check_request(headers)
            if original is not None:  # one batch, already in the log
                count = headers[0].record_count
                return AppendResult(original, original + count - 1, True)
        base = active.next_offset
        position = active.reserve(headers)
        iov = self._pipeline.queue_run(active, position, next_offset)
        for head, batch in zip(heads, batches, strict=True):
            iov.append(head)
            iov.append(memoryview(batch)[records.HEADER_SIZE :])
        if idempotent:
            producers = self._producers
            producers.settle(self._pipeline.written_offset)
            now = self._clock()  # last use, by the node's clock, not the batch's timestamps
            for h in headers:
                if h.producer_id >= 0:
                    producers.update(
                        h.producer_id,
                        h.base_sequence,
                        h.record_count,
                        h.base_offset,
                        now,
                        undo=True,
                    )
        self._flusher.kick()
        return AppendResult(base, next_offset - 1)

    async def append(
        self, batches: Sequence[bytes | memoryview], acks: Acks = Acks.ALL, *, leader_epoch: int = 0
    ) -> AppendResult:
        """Append and wait as ``acks`` says: NONE not at all (the batches are queued), LEADER
        until the write stage has written them to the file (the page cache), ALL until the
        sync stage has fdatasync'd them."""
        result = self.append_nowait(batches, leader_epoch=leader_epoch)
        if acks == Acks.ALL:
            await self.wait_durable(result.last_offset + 1)
        elif acks == Acks.LEADER:
            fut = self.written_future(result.last_offset + 1)
            if fut is not None:
                await fut
        return result

    def durable_future(self, offset: int) -> Ack | None:
        """A future resolved once every record below ``offset`` is synced (or failed with
        :class:`LogOffline`), or None if that is already so. For callers that answer from a
        callback rather than a task (the TCP server's pipelined produce path: an
        :class:`~storage.ack.Ack`, whose direct callback answers in the sync's own turn)."""
        if self._pipeline.flushed_offset >= offset:
            return None
        self._check_writable()
        return self._flusher.durable_future(offset)

    def written_future(self, offset: int) -> Ack | None:
        """Like :meth:`durable_future` but resolved once the records are written to the file
        (the page cache), before the sync: ``acks=1``."""
        if self._pipeline.written_offset >= offset:
            return None
        self._check_writable()
        return self._flusher.written_future(offset)

    async def wait_durable(self, offset: int) -> None:
        """Wait until every record below ``offset`` is synced. Raises :class:`LogOffline` if
        the sync fails."""
        fut = self.durable_future(offset)
        if fut is not None:
            await fut

    def _maybe_roll(self) -> None:
        active = self._segments[-1]
        if active.size == 0:
            return
        too_big = active.size >= self.config.segment_bytes
        too_old = self._clock() - self._active_created_ms >= self.config.segment_ms
        if too_big or too_old:
            self.roll()

    def roll(self) -> Segment:
        """Start a new active segment at the log end. The old one is sealed by the next sync;
        the new file's directory entry is synced before anything in it is acknowledged."""
        old = self._segments[-1]
        seg = Segment.create(
            self.directory, old.next_offset, index_interval_bytes=self.config.index_interval_bytes
        )
        self._pipeline.rolled_away(old)
        self._segments.append(seg)
        self._bases.append(seg.base_offset)
        self._active_created_ms = self._clock()
        self._flusher.kick()
        return seg

    # -------------------------------------------------------------------------- flush
    def _checkpoint_of(self, mark: Mark) -> Checkpoint:
        offset, segment, position = mark
        return new_checkpoint(segment, position, offset, self._producers.snapshot())

    def _high_watermark_advanced(self) -> None:
        hw_waiters, self._hw_waiters = self._hw_waiters, []
        for fut in hw_waiters:
            if not fut.done():
                fut.set_result(None)
        if self.on_high_watermark is not None:
            self.on_high_watermark(self)

    def _undo_writes(self, failed: list[WriteRun], exc: OSError) -> None:
        """A queued write failed: cut the log back to what was written before it. Every
        append queued from that one on (including those queued meanwhile) is dropped and
        its waiters fail; the producer table forgets their batches."""
        seg, position = failed[0].segment, failed[0].position
        idx = self._segments.index(seg)
        for later in self._segments[idx + 1 :]:
            later.delete()  # created by a roll after the failed write: nothing was written
        del self._segments[idx + 1 :]
        del self._bases[idx + 1 :]
        self._pipeline.forget_after(self._segments)
        try:
            seg.truncate_to(position)
        except OSError as trunc_exc:
            self._flusher.go_offline(trunc_exc)
            return
        self._producers.truncate(seg.next_offset)
        self._pipeline.cut_written(seg.next_offset)
        error: StorageError
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            error = StorageFull(f"partition {self.name}: disk full: {exc.strerror}")
        else:
            error = StorageError(f"partition {self.name}: write failed: {exc}")
        log.error(
            "event=append_failed partition=%s error=%r log_end_offset=%d",
            self.name,
            exc,
            seg.next_offset,
        )
        self._flusher.fail_waiters_past(seg.next_offset, error)

    def _close_files_clean(self) -> None:
        """At close, everything synced: cut the active segment's preallocated space (its
        file then ends at its last batch, and the next open finds nothing past the
        checkpoint), sync that, and write the checkpoint. Blocking. A failed cut is logged:
        recovery reads the zeros after the last batch as the end of the log anyway."""
        active = self._segments[-1]
        try:
            if active.trim():
                active.sync()
        except OSError as exc:
            log.warning("event=trim_failed partition=%s error=%r", self.name, exc)
        self._write_checkpoint_now()

    def _write_checkpoint_now(self) -> None:
        """Write a checkpoint of the synced end (at open, after recovery, and at close).
        Blocking. A failure (a full disk) is logged, never raised: the data is synced, only
        the recovery point stays where it was, so the next open verifies a little more.
        Opening, closing and deleting a partition must work on a full disk."""
        pipeline = self._pipeline
        try:
            write_checkpoint(
                self.directory,
                new_checkpoint(
                    pipeline.flushed_segment,
                    pipeline.flushed_position,
                    pipeline.flushed_offset,
                    self._producers.snapshot(),
                ),
            )
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            log.log(
                logging.WARNING if full else logging.ERROR,
                "event=checkpoint_failed partition=%s error=%r: the recovery point stays at "
                "the previous checkpoint",
                self.name,
                exc,
            )

    # --------------------------------------------------------------------------- read
    def read(self, offset: int, max_bytes: int) -> bytes | bytearray:
        """Raw batches from the one holding ``offset`` onward, up to ``max_bytes`` (but at
        least one whole batch) and never past the high watermark. The first batch may start
        before ``offset``; consumers skip records below the offset they asked for. Returns
        b"" at the high watermark. Raises :class:`OffsetOutOfRange`.

        The bytes are read once from the file into the buffer returned (a ``bytearray``
        when the read was cut back to whole batches, so cutting copies nothing). Blocking:
        on the loop, prefer :meth:`read_async`, which reads ranges likely on disk in a
        worker thread."""
        return self._reader.read(offset, max_bytes)

    async def read_async(self, offset: int, max_bytes: int) -> bytes | bytearray:
        """:meth:`read`, without blocking the loop on the disk: a read that starts below
        the page-cache window (the range was advised out, so it is probably on disk: a
        consumer catching up) runs in a worker thread, with the segment pinned so that
        retention and :meth:`close` leave its file open. A read within the window is
        served at once (it is in memory; a hand-off would cost more than the copy)."""
        return await self._reader.read_async(offset, max_bytes)

    def high_watermark_changed(
        self, fut: asyncio.Future[None] | None = None
    ) -> asyncio.Future[None]:
        """A future resolved the next time the high watermark advances (for long polls):
        ``fut`` if given (a long poll waiting on several partitions passes each the same
        one, woken by the first that advances), else a new one."""
        if fut is None:
            fut = self._flusher.loop.create_future()
        waiters = self._hw_waiters
        if len(waiters) >= 64 and len(waiters) & (len(waiters) - 1) == 0:
            # long polls that timed out leave cancelled futures behind; on an idle partition
            # nothing resolves them, so prune at each power of two (amortised O(1))
            waiters[:] = [w for w in waiters if not w.done()]
        waiters.append(fut)
        return fut

    def offset_for_timestamp(self, timestamp: int) -> int:
        """The first offset of the first batch whose max timestamp is >= ``timestamp``, or the
        high watermark if there is none (Kafka's ListOffsets by time)."""
        for seg in self._segments:
            found = seg.find_offset_by_timestamp(timestamp)
            if found is not None:
                return min(found, self._pipeline.flushed_offset)
        return self._pipeline.flushed_offset

    # ---------------------------------------------------------------------- retention
    def apply_retention(self, now_ms: int | None = None) -> list[int]:
        """Delete whole closed segments past the retention time or beyond the retention size
        (:mod:`storage.retention`); never the active segment, one not yet synced or one in
        use. Returns the base offsets deleted. Unlinks and syncs the directory on the calling
        thread: the node uses :meth:`apply_retention_off_loop`."""
        expired = self._detach_expired(now_ms)
        if expired:
            _remove_segments(expired, self.directory)
            self._retention_done(expired)
        return [seg.base_offset for seg in expired]

    async def apply_retention_off_loop(self) -> list[int]:
        """:meth:`apply_retention` with the unlinks and the directory's fsync (milliseconds
        each on a busy disk) in a worker thread, so they never stall the event loop. The
        segments leave the partition first, on the loop: no read or job can reach them
        while their files go."""
        expired = self._detach_expired(None)
        if expired:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _remove_segments, expired, self.directory)
            self._retention_done(expired)
        return [seg.base_offset for seg in expired]

    def _detach_expired(self, now_ms: int | None) -> list[Segment]:
        pipeline = self._pipeline
        count = segments_to_delete(
            self._segments,
            now_ms=self._clock() if now_ms is None else now_ms,
            retention_ms=self.config.retention_ms,
            retention_bytes=self.config.retention_bytes,
            # deleting it would close the fd a job or a read in a worker thread uses, or
            # hide the loss of data that was never durable
            in_use=lambda s: (
                pipeline.holds(s) or s.pins > 0 or s.next_offset > pipeline.flushed_offset
            ),
        )
        expired = self._segments[:count]
        del self._segments[:count]
        del self._bases[:count]
        return expired

    def _retention_done(self, expired: list[Segment]) -> None:
        if self._quarantine.drop_before(self.log_start_offset):
            self._reader._save()
        log.info(
            "event=retention_deleted partition=%s segments=%d log_start_offset=%d",
            self.name,
            len(expired),
            self.log_start_offset,
        )

    # -------------------------------------------------------------------------- close
    async def flush(self) -> None:
        """Sync everything written so far."""
        await self.wait_durable(self.log_end_offset)
        await self._flusher.wait_idle()

    async def close(self) -> None:
        """Sync, write a final checkpoint and close the files. Idempotent."""
        if self._closed:
            return
        if self._pipeline.failure is None:
            try:
                await self.flush()
            except StorageError:
                pass
        self._closed = True
        self._flusher.closed = True
        await self._flusher.wait_idle()
        self._pipeline.shut_down()
        await self._reader.wait_unpinned()  # reads in worker threads
        if self._pipeline.failure is None:
            await asyncio.get_running_loop().run_in_executor(None, self._close_files_clean)
        for seg in self._segments:
            seg.close()
        if self._own_io:
            self._io.close()
        err = LogClosed(f"partition {self.name} closed")
        for fut in self._hw_waiters:
            if not fut.done():
                fut.set_exception(err)
        self._hw_waiters = []

    def close_sync(self) -> None:
        """Close without an event loop (tests, tools). Syncs and checkpoints."""
        if self._closed:
            return
        self._closed = True
        self._flusher.closed = True
        pipeline = self._pipeline
        if pipeline.failure is None:
            queue, pipeline.queue = pipeline.queue, []
            for run in queue:
                run.segment.write_at(run.position, run.iov)
            for seg in {
                id(s): s for s in [*pipeline.unsynced, *pipeline.sealing, self._segments[-1]]
            }.values():
                seg.sync()
            pipeline.mark_all_synced()
            self._close_files_clean()
        for seg in self._segments:
            seg.close()
        if self._own_io:
            self._io.close()


def _remove_segments(expired: Sequence[Segment], directory: Path) -> None:
    """Close and unlink ``expired``, then make the deletions durable (or a crash could bring
    the segments back)."""
    for seg in expired:
        seg.delete()
    fsync_dir(directory)
