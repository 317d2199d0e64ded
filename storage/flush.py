"""The write -> sync pipeline of one partition: a named state machine and a thin asyncio shell.

An append accounts its batches on the event loop and queues their bytes (:class:`WriteRun`).
Two stages then move them to disk in worker threads, each stage one job at a time:

- *write*: ``pwritev`` the queued runs into the page cache (one call per segment run), then
  the new index entries. ``acks=1`` waiters are answered when it completes.
- *sync*: ``fdatasync`` what completed writes put in the page cache, seal the rolled-away
  segments it completes, fsync the directory after a roll, drop old pages from the page
  cache. ``acks=all`` waiters are answered and the high watermark advances when it
  completes. A recovery checkpoint due with it is written afterwards by a job of its own
  (:meth:`Flusher._write_checkpoint`), never inside an acknowledged round.

The stages overlap (batches that arrive while a sync runs are written meanwhile; the next
sync starts as soon as this one ends); when nothing is syncing one job writes and then
syncs, so a lone append is handed to a thread once and answered from one report, or, when
the I/O threads are idle and allow it, run on the loop with no hand-off at all
(:meth:`Pipeline.lone_append`, :meth:`Flusher._run_inline`).

Three layers, h11 style:

- :class:`FlushState` names the states of the two stages (:class:`Stage`) and of the
  pipeline (:class:`Health`) and moves between them on :class:`Event` s by a transition
  table; any other move raises :class:`~storage.errors.IllegalTransition`. Pure.
- :class:`Pipeline` is the bookkeeping: the queue, which segments are written but unsynced,
  being sealed, written or synced, how far the log is written and synced. It decides which
  jobs start and applies their outcomes. Pure: no threads, no files, no clock (``now_ms`` is
  an argument); segments are only handles here.
- :class:`Flusher` is the shell: it runs the pipeline's jobs on dedicated I/O threads
  (:class:`~storage.io_threads.IoThreads`; :func:`write_runs`, :func:`sync_files` do the
  I/O), or, for a small round whose sync is only fdatasyncs, writes on the loop and has the
  kernel sync (:mod:`storage.aio`, :meth:`Flusher._run_aio`); it hears back through their
  reports and resolves the futures of ``acks=1`` and ``acks=all`` waiters.

Failure model: a failed *write* (ENOSPC, EIO) is reported to the partition, which cuts the
log back (:meth:`Flusher.fail_waiters_past`). A failed *sync* cannot be retried and trusted
(the kernel may have dropped the dirty pages): the pipeline goes :attr:`Health.OFFLINE` and
every waiter fails with :class:`~storage.errors.LogOffline`.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

from storage.ack import Ack
from storage.checkpoint import Checkpoint, write_checkpoint
from storage.errors import IllegalTransition, LogOffline, StorageError
from storage.io_threads import IoThreads
from storage.segment import FILL_STEP, Segment, fsync_dir

log = logging.getLogger("herald.storage")

FsyncFn = Callable[[int], None]

# the largest lone append a job on the loop writes and syncs (when the I/O threads allow
# inline jobs): a few records' worth, a write of microseconds; a larger one goes to a thread
INLINE_MAX_BYTES: Final = 64 * 1024
# a sync round (data fdatasync, seals, directory) that took at least this long is logged
# (event=sync_slow): the latency budget of the node (no stall above 20 ms), so a slow round
# in the latency figures can be told apart from the node's own pauses (event=gc_pause)
SLOW_SYNC_MS: Final = 20.0
Mark = tuple[int, int, int]  # offset, segment base offset, position in that segment


# ----------------------------------------------------------------------------- states
class Stage(enum.Enum):
    """State of one stage (the writer or the syncer)."""

    # members are singletons compared by identity: hash them by identity too, in C (Enum's
    # own __hash__ is a Python call, ~17 of them per round in the state tables' lookups)
    __hash__ = object.__hash__

    IDLE = "idle"
    WRITING = "writing"  # writer: a job's write runs in a thread
    AWAITING_WRITE = "awaiting_write"  # syncer: held by a write-then-sync job still writing
    SYNCING = "syncing"  # syncer: a job's sync runs in a thread


class Health(enum.Enum):
    """State of the pipeline as a whole."""

    __hash__ = object.__hash__  # as Stage's

    OPEN = "open"
    OFFLINE = "offline"  # a sync (or a cut-back) failed: no job starts again
    SHUT = "shut"  # closed and idle: the files are closing, no job starts again


class Event(enum.Enum):
    __hash__ = object.__hash__  # as Stage's

    WRITE = "write"  # start a write-only job
    WRITE_THEN_SYNC = "write_then_sync"  # start a job that writes, then syncs
    SYNC = "sync"  # start a sync-only job
    WRITTEN = "written"  # the running write completed
    WRITE_FAILED = "write_failed"  # the running write failed (or crashed)
    SYNCED = "synced"  # the running sync completed
    SYNC_FAILED = "sync_failed"  # the running sync failed: the pipeline goes offline
    FAIL = "fail"  # go offline for another reason (a crashed job, a failed cut-back)
    SHUT = "shut"  # close: only when both stages are idle


# event -> {state before: state after} for each stage; an event missing from a stage's
# table leaves that stage as it is, whatever its state; a state missing from an event's
# row is an illegal move.
_WRITER: Final[dict[Event, dict[Stage, Stage]]] = {
    Event.WRITE: {Stage.IDLE: Stage.WRITING},
    Event.WRITE_THEN_SYNC: {Stage.IDLE: Stage.WRITING},
    Event.WRITTEN: {Stage.WRITING: Stage.IDLE},
    Event.WRITE_FAILED: {Stage.WRITING: Stage.IDLE},
    Event.SHUT: {Stage.IDLE: Stage.IDLE},
}
_SYNCER: Final[dict[Event, dict[Stage, Stage]]] = {
    Event.WRITE_THEN_SYNC: {Stage.IDLE: Stage.AWAITING_WRITE},
    Event.SYNC: {Stage.IDLE: Stage.SYNCING},
    # the write that completes is the write-then-sync job's own when the syncer waits for it
    Event.WRITTEN: {
        Stage.AWAITING_WRITE: Stage.SYNCING,
        Stage.IDLE: Stage.IDLE,
        Stage.SYNCING: Stage.SYNCING,
    },
    Event.WRITE_FAILED: {
        Stage.AWAITING_WRITE: Stage.IDLE,  # its sync is off
        Stage.IDLE: Stage.IDLE,
        Stage.SYNCING: Stage.SYNCING,
    },
    Event.SYNCED: {Stage.SYNCING: Stage.IDLE},
    Event.SYNC_FAILED: {Stage.SYNCING: Stage.IDLE},
    Event.SHUT: {Stage.IDLE: Stage.IDLE},
}
_HEALTH: Final[dict[Event, dict[Health, Health]]] = {
    Event.WRITE: {Health.OPEN: Health.OPEN},
    Event.WRITE_THEN_SYNC: {Health.OPEN: Health.OPEN},
    Event.SYNC: {Health.OPEN: Health.OPEN},
    Event.WRITTEN: {Health.OPEN: Health.OPEN, Health.OFFLINE: Health.OFFLINE},
    Event.WRITE_FAILED: {Health.OPEN: Health.OPEN, Health.OFFLINE: Health.OFFLINE},
    Event.SYNCED: {Health.OPEN: Health.OPEN, Health.OFFLINE: Health.OFFLINE},
    Event.SYNC_FAILED: {Health.OPEN: Health.OFFLINE, Health.OFFLINE: Health.OFFLINE},
    Event.FAIL: {Health.OPEN: Health.OFFLINE, Health.OFFLINE: Health.OFFLINE},
    Event.SHUT: {Health.OPEN: Health.SHUT, Health.OFFLINE: Health.SHUT},
}


class FlushState:
    """The states of the writer, the syncer and the pipeline, moved only by :meth:`process`.

    Pure and small on purpose: every rule about what may happen when is in the three tables
    above, and a move they do not allow raises :class:`IllegalTransition` naming the event
    and the states (a bug in the pipeline, never a disk condition)."""

    __slots__ = ("health", "syncer", "writer")

    def __init__(self) -> None:
        self.writer = Stage.IDLE
        self.syncer = Stage.IDLE
        self.health = Health.OPEN

    def process(self, event: Event) -> None:
        moved = _MOVES.get((event, self.writer, self.syncer, self.health))
        if moved is None:
            raise IllegalTransition(
                f"flush: {event.value} is not allowed with writer={self.writer.value} "
                f"syncer={self.syncer.value} health={self.health.value}"
            )
        self.writer, self.syncer, self.health = moved

    @property
    def idle(self) -> bool:
        return self.writer is Stage.IDLE and self.syncer is Stage.IDLE

    def __repr__(self) -> str:
        return f"FlushState(writer={self.writer.value}, syncer={self.syncer.value}, " + (
            f"health={self.health.value})"
        )


_S = TypeVar("_S", Stage, Health)


def _step(table: dict[Event, dict[_S, _S]], event: Event, state: _S) -> _S | None:
    row = table.get(event)
    if row is None:
        return state  # this event does not concern that part
    return row.get(state)


def _moves() -> dict[tuple[Event, Stage, Stage, Health], tuple[Stage, Stage, Health]]:
    """The three tables joined: (event, writer, syncer, health) -> the states after, for
    every allowed move. :meth:`FlushState.process` runs three times per lone append; one
    lookup instead of six."""
    moves = {}
    for event in Event:
        for writer in Stage:
            for syncer in Stage:
                for health in Health:
                    w = _step(_WRITER, event, writer)
                    s = _step(_SYNCER, event, syncer)
                    h = _step(_HEALTH, event, health)
                    if w is not None and s is not None and h is not None:
                        moves[(event, writer, syncer, health)] = (w, s, h)
    return moves


_MOVES: Final = _moves()


# ------------------------------------------------------------------------------- jobs
class WriteRun:
    """Batches accounted at the end of one segment and not yet written: the write stage
    writes them with one ``pwritev`` (per 1024 buffers). Appends made while the previous
    write runs extend the same run, so a round of many small appends costs one system call
    and not one each: on ext4 every size-extending ``pwritev`` pays ~50 us of journal and
    inode work, which made 55 separate 20 KiB writes take 3 ms against 0.3 ms for one."""

    __slots__ = ("end", "iov", "position", "segment")

    def __init__(
        self, segment: Segment, position: int, iov: list[bytes | memoryview], end: int
    ) -> None:
        self.segment = segment
        self.position = position
        self.iov = iov  # stamped header, body, header, body, ...
        self.end = end  # offset after the last record


class SyncPlan:
    """What one sync does, in order: for each of ``segments``, cut it to its batches if it
    is in ``seal`` (rolled away and complete: its preallocated fill goes), fsync it, seal
    it; then fsync the directory if a roll created a file, and drop cached pages."""

    __slots__ = ("dir_dirty", "drop", "seal", "segments")

    def __init__(
        self,
        segments: list[Segment],
        seal: list[Segment],
        dir_dirty: bool,
        drop: list[tuple[Segment, int]],
    ) -> None:
        self.segments = segments
        self.seal = seal
        self.dir_dirty = dir_dirty
        self.drop = drop  # (segment, position): drop its cached pages below position


class Job:
    """One job for the I/O threads: a write (``kind`` WRITE), a sync (SYNC), or a write then
    a sync (WRITE_THEN_SYNC: both ``runs`` and ``plan``).

    A write-then-sync job reports once, when its sync is done, unless the loop asks to hear
    of its write (``report_written``: an ``acks=1`` waiter, or appends queued behind it that
    could be written during the sync). Whichever side sees the completed write first takes
    the one ``WRITTEN`` outcome (:meth:`claim_written`): the thread reports it, or the loop
    applies it itself when it finds the write done; never both."""

    __slots__ = (
        "_unclaimed",
        "checkpoint",
        "end",
        "grow",
        "handed_checkpoint",
        "kind",
        "plan",
        "report_written",
        "runs",
        "target",
        "write_finished",
    )

    def __init__(
        self,
        kind: Event,
        runs: list[WriteRun],
        end: Mark,
        *,
        plan: SyncPlan | None = None,
        checkpoint: Checkpoint | None = None,
        handed_checkpoint: Checkpoint | None = None,
    ) -> None:
        self.kind = kind
        self.runs = runs  # written by this job
        self.end = end  # offset, segment, position after them (the sync target of a sync)
        self.plan = plan  # the sync part, if any
        self.target = end  # durable once the sync is done
        self.checkpoint = checkpoint  # written by this job's sync
        # a write-only job's checkpoint of ``end``, handed to the sync that will cover it
        self.handed_checkpoint = handed_checkpoint
        # (segment, start, end, reach): the fill its write puts after its runs
        # (Pipeline._growth)
        self.grow: tuple[Segment, int, int, int] | None = None
        self.report_written = False  # set by the loop: report the write before the sync
        self.write_finished = False  # set by the thread: the write succeeded
        self._unclaimed = [True]  # the WRITTEN outcome, until one side takes it

    def claim_written(self) -> bool:
        """Take this job's ``WRITTEN`` outcome; True exactly once, whichever thread asks
        (``list.pop`` is atomic under the GIL)."""
        try:
            return self._unclaimed.pop()
        except IndexError:
            return False


# --------------------------------------------------------------------------- pipeline
class Pipeline:
    """The flush bookkeeping of one partition (pure; see the module docstring).

    ``segments`` is the partition's own list (oldest first), shared: the partition rolls,
    retains and cuts it; the pipeline reads it to plan page-cache drops and to find the log
    end. Everything below ``flushed`` is synced; everything below ``written`` is in the
    file (the page cache)."""

    def __init__(
        self,
        segments: list[Segment],
        *,
        checkpoint_interval_ms: int,
        cache_window_bytes: int,
        now_ms: int,
        preallocate_bytes: int = 0,
        segment_bytes: int = 0,
    ) -> None:
        self.segments = segments
        self.checkpoint_interval_ms = checkpoint_interval_ms
        self.cache_window_bytes = cache_window_bytes
        # the active segment's file is kept up to this far ahead of its batches (0: off),
        # never past ``segment_bytes`` (the segment rolls there)
        self.preallocate_bytes = preallocate_bytes
        self.segment_bytes = segment_bytes
        self.state = FlushState()
        active = segments[-1]
        self.flushed_offset = active.next_offset
        self.flushed_segment = active.base_offset
        self.flushed_position = active.size
        self.written_offset = active.next_offset
        self.written_segment = active.base_offset
        self.written_position = active.size
        self.queue: list[WriteRun] = []  # accounted, not yet written: one run per segment
        self.queued_appends = 0  # appends in ``queue``
        self.queued_while_busy = False  # one of them arrived while a job ran
        self.unsynced: list[Segment] = []  # written by completed writes, not yet synced
        self.sealing: list[Segment] = []  # rolled away; sealed by the sync that completes them
        self.writing: list[Segment] = []  # in the running write job
        self.syncing: list[Segment] = []  # handed to the sync thread
        self.dir_dirty = False
        self.rolled = False
        self.ready_checkpoint: Checkpoint | None = None  # of a completed write, to sync
        self.writer: Job | None = None  # the job whose write is not finished
        self.syncer: Job | None = None  # the job whose sync is not finished
        self.failure: BaseException | None = None
        self.last_checkpoint_ms = now_ms

    # ---------------------------------------------------------------------- accounting
    def queue_run(self, segment: Segment, position: int, end: int) -> list[bytes | memoryview]:
        """The buffer list to which an append adds the stamped batches it accounted at
        ``position`` of ``segment`` (its end), for the next write: the last run's when it
        is on the same segment (appends extend one run), else a new run's. ``end`` is the
        offset after them."""
        self.queued_appends += 1
        if self.writer is not None or self.syncer is not None:
            self.queued_while_busy = True
        queue = self.queue
        if queue and queue[-1].segment is segment:
            run = queue[-1]  # contiguous: the segment accounts at its end
            run.end = end
        else:
            run = WriteRun(segment, position, [], end)
            queue.append(run)
        return run.iov

    def rolled_away(self, old: Segment) -> None:
        """``old`` stopped being the active segment: the sync that completes it seals it,
        the next sync fsyncs the directory (a new file) and a checkpoint follows."""
        self.sealing.append(old)
        self.rolled = True
        self.dir_dirty = True

    def holds(self, seg: Segment) -> bool:
        """Whether a job uses or will use ``seg``'s file (retention must leave it)."""
        return (
            seg in self.sealing
            or seg in self.unsynced
            or seg in self.syncing
            or seg in self.writing
        )

    @property
    def idle(self) -> bool:
        return self.writer is None and self.syncer is None

    @property
    def shut(self) -> bool:
        return self.state.health is Health.SHUT

    def log_end(self) -> Mark:
        active = self.segments[-1]
        return active.next_offset, active.base_offset, active.size

    def lone_append(self, max_bytes: int) -> bool:
        """Whether what is queued is one append of at most ``max_bytes``, made while no job
        ran, with nothing else to sync: the next job is a write-then-sync job that nobody
        else waits for, a candidate to run on the loop. Appends that arrive during a job, or
        several in one turn, mean concurrent producers: their jobs go to the threads, so
        that the loop keeps reading requests while the disk syncs (group commit)."""
        if self.queued_appends != 1 or self.queued_while_busy or not self.idle:
            return False
        if len(self.queue) != 1 or self.sync_wanted():
            return False
        size = 0
        for buf in self.queue[0].iov:
            size += len(buf)
        return size <= max_bytes

    def sync_wanted(self) -> bool:
        # asked two or three times per lone append: no generator unless a segment is sealing
        sealing = self.sealing
        return (
            self.written_offset > self.flushed_offset
            or bool(self.unsynced)
            or self.dir_dirty
            or (bool(sealing) and any(s.next_offset <= self.written_offset for s in sealing))
        )

    # ----------------------------------------------------------------------- decisions
    def start_jobs(self, now_ms: int, checkpoint_of: Callable[[Mark], Checkpoint]) -> list[Job]:
        """The jobs that may start now (none, a write, a sync, or both), moved to their
        running states. ``checkpoint_of(mark)`` builds the checkpoint of a point that covers
        the log end (the producer table then matches it)."""
        started: list[Job] = []
        if self.state.health is not Health.OPEN:
            return started
        if self.writer is None and self.queue:
            runs, self.queue = self.queue, []
            self.queued_appends = 0
            self.queued_while_busy = False
            end = self.log_end()
            checkpoint = self._checkpoint_due(now_ms, end, checkpoint_of)
            self.writing = [run.segment for run in runs]
            if self.syncer is None and not self.sync_wanted():
                plan = self._take_sync_plan(end, self.writing)
                job = Job(Event.WRITE_THEN_SYNC, runs, end, plan=plan, checkpoint=checkpoint)
                self.state.process(Event.WRITE_THEN_SYNC)
                self.writer = self.syncer = job
            else:
                job = Job(Event.WRITE, runs, end, handed_checkpoint=checkpoint)
                self.state.process(Event.WRITE)
                self.writer = job
            job.grow = self._growth(runs)
            started.append(job)
        if self.syncer is None and self.sync_wanted():
            checkpoint, self.ready_checkpoint = self.ready_checkpoint, None
            if self.writer is None and not self.queue:
                target = self.log_end()
                checkpoint = self._checkpoint_due(now_ms, target, checkpoint_of) or checkpoint
            else:
                target = (self.written_offset, self.written_segment, self.written_position)
            plan = self._take_sync_plan(target, [])
            job = Job(Event.SYNC, [], target, plan=plan, checkpoint=checkpoint)
            self.state.process(Event.SYNC)
            self.syncer = job
            started.append(job)
        return started

    def _checkpoint_due(
        self, now_ms: int, end: Mark, checkpoint_of: Callable[[Mark], Checkpoint]
    ) -> Checkpoint | None:
        """A checkpoint of the log end, if one is due (after a roll, or every
        ``checkpoint_interval_ms``). Only taken for a job that covers the log end: the
        producer table already holds every queued batch."""
        if not self.rolled and now_ms - self.last_checkpoint_ms < self.checkpoint_interval_ms:
            return None
        self.rolled = False
        self.last_checkpoint_ms = now_ms
        return checkpoint_of(end)

    def _segment_index(self, base_offset: int) -> int:
        for i in range(len(self.segments) - 1, -1, -1):
            if self.segments[i].base_offset <= base_offset:
                return i
        return 0

    def _cache_drops(self, segment: int, position: int) -> list[tuple[Segment, int]]:
        """Page-cache drops once the log is synced to ``position`` of ``segment``: every
        byte more than ``cache_window_bytes`` behind that point, walking back over the
        segments until one that was dropped entirely before (those before it were too)."""
        keep = self.cache_window_bytes
        if keep <= 0:
            return []
        drops = []
        i = self._segment_index(segment)
        end = position
        while i >= 0:
            seg = self.segments[i]
            if seg.cache_dropped >= end:
                break
            if end > keep:
                drops.append((seg, end - keep))
            keep = max(0, keep - end)
            i -= 1
            if i >= 0:
                end = self.segments[i].size
        return drops

    def _take_sync_plan(self, target: Mark, written_now: list[Segment]) -> SyncPlan:
        """What a sync that makes everything below ``target`` durable must do: fsync the
        segments completed writes touched (and ``written_now``, for a write-then-sync job),
        seal the rolled-away segments it completes, fsync the directory after a roll."""
        segments, self.unsynced = self.unsynced, []
        for seg in written_now:
            if seg not in segments:
                segments.append(seg)
        seal = [s for s in self.sealing if s.next_offset <= target[0]] if self.sealing else []
        if seal:
            self.sealing = [s for s in self.sealing if s not in seal]
            segments.extend(s for s in seal if s not in segments)
        dir_dirty, self.dir_dirty = self.dir_dirty, False
        drop = self._cache_drops(target[1], target[2])
        self.syncing = [*segments, *(seg for seg, _pos in drop)] if drop else segments[:]
        return SyncPlan(segments, seal, dir_dirty, drop)

    def _growth(self, runs: list[WriteRun]) -> tuple[Segment, int, int, int] | None:
        """The fill a write job writes after its runs, if it writes a small round to the
        active segment and that segment's fill reaches less than ``preallocate_bytes``
        minus one step past its batches: ``(segment, start, end, reach)``, at most
        :data:`~storage.segment.FILL_STEP` bytes from the fill's end towards
        ``preallocate_bytes`` past the batches, capped at ``segment_bytes``. Why: on ext4
        an fdatasync after a write that grows the file commits the journal every round
        (~40 us of round trip and ~20 us of CPU more per lone append on the VM than one
        that overwrites bytes the file already has). In steps: a round's fill write is
        part of its fdatasync (a 512 KiB step made that round ~0.3 ms longer on the idle
        VM, and once 210 ms under disk load; a 64 KiB step ~0.05 ms), so the reach is
        built up and kept by many small writes rather than a few large ones. Only for small
        rounds (at most a sixteenth of ``preallocate_bytes``): a large round amortises its
        journal commit, and filling ahead of it would double what the disk writes. In the
        write job, after its runs: the batches accounted later are written by later write
        jobs, so they land over the fill, never under it. The segment remembers the
        planned end (``prealloc_end``), so each range is written once."""
        chunk = self.preallocate_bytes
        if chunk <= 0 or not runs:
            return None
        active = self.segments[-1]
        run = runs[-1]
        if run.segment is not active:
            return None
        size = active.size
        step = min(chunk // 2, FILL_STEP)
        if size + chunk - step <= active.prealloc_end or size - run.position > chunk // 16:
            return None
        end = size + chunk
        if self.segment_bytes > 0:
            end = min(end, self.segment_bytes)
        # on from the fill written so far, or from the batches: never a hole between
        start = max(active.filled_end, size)
        end = min(end, start + FILL_STEP)
        if end <= start:
            return None
        active.prealloc_end = end
        return active, start, end, chunk

    def _restore_sync_plan(self, plan: SyncPlan) -> None:
        self.unsynced = [*plan.segments, *(s for s in self.unsynced if s not in plan.segments)]
        self.sealing = [*plan.seal, *self.sealing]
        self.dir_dirty = self.dir_dirty or plan.dir_dirty

    # ------------------------------------------------------------------------ outcomes
    def write_succeeded(self, job: Job) -> int | None:
        """The job's write completed. Returns the offset now written (None when the
        pipeline is offline: nothing advances)."""
        self.state.process(Event.WRITTEN)
        self.writer = None
        self.writing = []
        if self.failure is not None:
            return None
        offset, segment, position = job.end
        self.written_segment, self.written_position = segment, position
        if job.kind is Event.WRITE:  # a write-only job: the next sync picks its segments up
            for run in job.runs:
                if run.segment not in self.unsynced:
                    self.unsynced.append(run.segment)
            if job.handed_checkpoint is not None:
                self.ready_checkpoint = job.handed_checkpoint
        return self.advance_written(offset)

    def write_failed(self, job: Job) -> None:
        """The job's write failed or crashed: it ends, and so does its sync part."""
        self.state.process(Event.WRITE_FAILED)
        self.writer = None
        self.writing = []
        if self.syncer is job:  # a write-then-sync job: its sync is off
            assert job.plan is not None
            self._restore_sync_plan(job.plan)
            self.syncer = None
            self.syncing = []

    def advance_written(self, offset: int) -> int:
        if offset > self.written_offset:
            self.written_offset = offset
        return self.written_offset

    def sync_finished(self, job: Job, error: BaseException | None) -> bool:
        """The job's sync ended (``error``: it failed, and the pipeline goes offline).
        Returns whether the high watermark (``flushed_offset``) advanced."""
        self.syncer = None
        self.syncing = []
        if error is not None:
            self.state.process(Event.SYNC_FAILED)
            self.failure = error
            return False
        self.state.process(Event.SYNCED)
        if self.failure is not None:
            return False
        return self._advance_flushed(*job.target)

    def _advance_flushed(self, offset: int, segment: int, position: int) -> bool:
        self.advance_written(offset)  # synced implies written
        if offset == self.flushed_offset and segment > self.flushed_segment:
            # a roll with nothing after it: the synced point moves to the new, empty segment,
            # so a checkpoint never names a segment retention may delete
            self.flushed_segment, self.flushed_position = segment, position
        if offset > self.flushed_offset:
            self.flushed_offset = offset
            self.flushed_segment = segment
            self.flushed_position = position
            return True
        return False

    def fail(self, exc: BaseException) -> None:
        """Go offline: no job starts again (a sync failed, a job crashed, a cut failed)."""
        self.state.process(Event.FAIL)
        self.failure = exc

    def forget_after(self, kept: list[Segment]) -> None:
        """A write failed and the log is being cut back to the segments ``kept``: drop the
        queue (every append queued from the failed one on) and what referred to segments
        that are gone."""
        self.queue = []
        self.queued_appends = 0
        self.queued_while_busy = False
        self.sealing = [s for s in self.sealing if s in kept[:-1]]
        self.unsynced = [s for s in self.unsynced if s in kept]

    def cut_written(self, end_offset: int) -> None:
        """The log now ends at ``end_offset``: nothing past it is written."""
        self.written_offset = min(self.written_offset, end_offset)

    def shut_down(self) -> None:
        """Close: both stages are idle and none may start again."""
        self.state.process(Event.SHUT)

    def mark_all_synced(self) -> None:
        """A synchronous close wrote and synced everything itself."""
        self.flushed_offset, self.flushed_segment, self.flushed_position = self.log_end()


# -------------------------------------------------------------------------- the I/O
def write_runs(
    runs: list[WriteRun], grow: tuple[Segment, int, int, int] | None = None
) -> tuple[int, OSError] | None:
    """Worker thread: write the runs, then the fill ahead of them (``grow``, see
    :meth:`Pipeline._growth`), then their index entries. A failed write returns ``(index of
    the failed run, error)``; the runs before it are written."""
    for i, run in enumerate(runs):
        try:
            run.segment.write_at(run.position, run.iov)
        except OSError as exc:
            return i, exc
    if grow is not None:
        seg, start, end, reach = grow
        seg.preallocate(start, end, reach)
    for run in runs:
        run.segment.flush_index()
    return None


def sync_files(
    plan: SyncPlan, checkpoint: Checkpoint | None, fsync: FsyncFn, directory: Path, name: str
) -> None:
    """Worker thread. Order: data (a segment being sealed cut to its batches first), then
    seals, then the directory, then the checkpoint.
    Raises ``OSError`` if a sync fails; a failed checkpoint write is only logged (the data
    is synced; only the recovery point did not move)."""
    for seg in plan.segments:
        if seg.closed:
            continue
        sealing = seg in plan.seal
        if sealing:
            # before its fsync, which then makes the cut durable with the data: a checkpoint
            # naming a later segment never follows a sealed segment still holding zeros
            seg.trim()
        fsync(seg.fd)
        if sealing:
            seg.seal()
    if plan.dir_dirty:
        fsync_dir(directory)
    for seg, position in plan.drop:
        if not seg.closed:
            seg.drop_cache(position)
    if checkpoint is not None:
        try:
            write_checkpoint(directory, checkpoint)
        except OSError as exc:
            log.warning("event=checkpoint_failed partition=%s error=%r", name, exc)


def _at_most(runs: list[WriteRun], limit: int) -> bool:
    """Whether ``runs`` hold at most ``limit`` bytes (stops counting past it)."""
    size = 0
    for run in runs:
        for buf in run.iov:
            size += len(buf)
            if size > limit:
                return False
    return True


def _within_fill(runs: list[WriteRun]) -> bool:
    """Whether every run lands inside its segment's file as it is (over the fill written
    ahead of the batches), so that writing it does not grow the file."""
    for run in runs:
        end = run.position
        for buf in run.iov:
            end += len(buf)
        if end > run.segment.filled_end:
            return False
    return True


Waiters = list[tuple[int, asyncio.Future[None]]]


def _resolve(waiters: Waiters, offset: int) -> Waiters:
    """Resolve the waiters for offsets up to ``offset``; return the others."""
    keep = []
    for want, fut in waiters:
        if want <= offset:
            if not fut.done():
                fut.set_result(None)
        else:
            keep.append((want, fut))
    return keep


class Flusher:
    """The asyncio shell around a :class:`Pipeline`: starts its jobs on the partition's
    :class:`~storage.io_threads.IoThreads`, applies their outcomes on the loop, and answers
    waiters.

    Driven by callbacks, not a task. A job reports through :meth:`IoThreads.report` straight
    to :meth:`_write_done` / :meth:`_sync_done`, which start what may start next. A lone
    append costs one hand-off to a thread and one report back: its write-then-sync job
    reports once, after the sync, unless the loop asked to hear of the write sooner (see
    :class:`Job`); or none, when it runs on the loop (:meth:`_run_inline`, only while the
    I/O threads are idle and allow it: :meth:`IoThreads.may_run_inline`).

    The partition supplies: ``checkpoint_of`` (a checkpoint of a log-end mark),
    ``on_high_watermark`` (called when the synced offset advanced, before the ``acks=all``
    waiters are answered) and ``on_write_failed`` (a write failed: cut the log back)."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        threads: IoThreads,
        directory: Path,
        name: str,
        fsync: FsyncFn,
        clock: Callable[[], int],
        checkpoint_of: Callable[[Mark], Checkpoint],
        on_high_watermark: Callable[[], None],
        on_write_failed: Callable[[list[WriteRun], OSError], None],
    ) -> None:
        self.pipeline = pipeline
        self.threads = threads
        self.directory = directory
        self.name = name
        self._fsync = fsync
        self._clock = clock
        self._checkpoint_of = checkpoint_of
        self._on_high_watermark = on_high_watermark
        self._on_write_failed = on_write_failed
        # the loop, kept once: asyncio.get_running_loop() costs a getpid() system call
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self.durable_waiters: Waiters = []
        self.written_waiters: Waiters = []
        self.closed = False  # no kick starts a job; running jobs still finish
        # the checkpoint a completed sync hands on: written by a job of its own on a thread,
        # after the acknowledgements of that sync went out; one at a time (one .tmp file)
        self._checkpointing = False
        self._next_checkpoint: Checkpoint | None = None
        self.checkpoints = 0  # checkpoint jobs completed (written or failed and logged)
        self.syncs = 0  # sync rounds completed (counters for metrics)
        self.inline_syncs = 0  # of which run on the loop (:meth:`_run_inline`)
        self.aio_syncs = 0  # of which the kernel ran as AIO (:meth:`_run_aio`)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    # -------------------------------------------------------------------------- waiting
    def durable_future(self, offset: int) -> Ack:
        """An :class:`~storage.ack.Ack` resolved once every record below ``offset`` is
        synced (failed with :class:`~storage.errors.LogOffline` or the write's error). Its
        direct callback runs in the loop turn that resolves it."""
        fut = Ack(loop=self.loop)
        self.durable_waiters.append((offset, fut))
        self.kick()
        return fut

    def written_future(self, offset: int) -> Ack:
        """As :meth:`durable_future`, once every record below ``offset`` is written."""
        fut = Ack(loop=self.loop)
        self.written_waiters.append((offset, fut))
        self.kick()
        return fut

    def fail_waiters_past(self, offset: int, error: StorageError) -> None:
        """Fail the waiters for offsets past ``offset`` (the log was cut back there)."""
        for name in ("durable_waiters", "written_waiters"):
            keep = []
            for want, fut in getattr(self, name):
                if want > offset:
                    if not fut.done():
                        fut.set_exception(error)
                else:
                    keep.append((want, fut))
            setattr(self, name, keep)

    async def wait_idle(self) -> None:
        """Until no write or sync job runs and none is about to start."""
        while not self.pipeline.idle or self._scheduled or self._checkpointing:
            fut: asyncio.Future[None] = self.loop.create_future()
            self._idle_waiters.append(fut)  # resolved by _pump once nothing runs
            await fut

    # ------------------------------------------------------------------------- driving
    def kick(self) -> None:
        """There may be something to write or sync: run :meth:`_pump` at the end of this
        loop turn (once however many appends the turn makes, so they share one job)."""
        if not self._scheduled and not self.closed:
            self._scheduled = True
            self.threads.starts_due += 1
            self.loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Start whatever job may start now; wake :meth:`wait_idle` once nothing runs."""
        if self._scheduled:
            self._scheduled = False
            self.threads.starts_due -= 1
        pipeline = self.pipeline
        if pipeline.shut:
            return
        writer = pipeline.writer
        if (
            writer is not None
            and writer.kind is Event.WRITE_THEN_SYNC
            and (pipeline.queue or self.written_waiters)
        ):
            # appends wait to be written, or acks=1 waiters to be answered: hear of this
            # job's write as soon as it is done, so the next write overlaps its sync
            writer.report_written = True
            if writer.write_finished and writer.claim_written():
                self._apply_written(writer)
        threads = self.threads
        inline = pipeline.lone_append(INLINE_MAX_BYTES) and threads.may_run_inline()
        jobs = pipeline.start_jobs(self._clock(), self._checkpoint_of)
        if inline and len(jobs) == 1 and jobs[0].kind is Event.WRITE_THEN_SYNC:
            self._run_inline(jobs[0])
            return  # its outcome ran _pump again
        for job in jobs:
            if not self._run_aio(job):
                threads.submit(self._run_job, job)
        if pipeline.idle and not self._checkpointing and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _apply_written(self, job: Job) -> None:
        """Loop: ``job``'s write succeeded: advance what is written, answer acks=1."""
        written = self.pipeline.write_succeeded(job)
        if written is not None and self.written_waiters:
            self.written_waiters = _resolve(self.written_waiters, written)

    def _write_done(self, job: Job, failed: tuple[int, OSError] | BaseException | None) -> None:
        """Loop: a job's write finished (``failed``: ``(index of the failed run, error)``)."""
        pipeline = self.pipeline
        if isinstance(failed, BaseException):  # not an I/O error: a bug; stop writing
            log.error("event=write_crashed partition=%s error=%r", self.name, failed)
            pipeline.write_failed(job)
            self.go_offline(failed)
        elif failed is not None:
            pipeline.write_failed(job)
            self._on_write_failed(job.runs[failed[0] :], failed[1])
        else:
            self._apply_written(job)
        self._pump()

    def _sync_done(self, job: Job, error: BaseException | None) -> None:
        """Loop: a job's sync finished (for a write-then-sync job whose write was not
        reported, its write too)."""
        pipeline = self.pipeline
        if job.kind is Event.WRITE_THEN_SYNC and job.claim_written():
            self._apply_written(job)
        advanced = pipeline.sync_finished(job, error)
        if error is None:
            self.syncs += 1
        if error is not None:
            self._offline(error)
        elif pipeline.failure is None:
            offset = job.target[0]
            if self.written_waiters:
                self.written_waiters = _resolve(self.written_waiters, pipeline.written_offset)
            if advanced:
                self._on_high_watermark()
            if self.durable_waiters:
                self.durable_waiters = _resolve(self.durable_waiters, offset)
            if job.checkpoint is not None:
                self._write_checkpoint(job.checkpoint)
        if (
            pipeline.queue
            or pipeline.writer is not None
            or self.written_waiters
            or self._idle_waiters
            or pipeline.sync_wanted()
        ):
            self._pump()
        # else nothing may start and nobody waits for the pipeline to be idle: a lone
        # append's round ends here without a pass that would find nothing to do

    # ------------------------------------------------------------------- checkpoints
    def _write_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Loop: write ``checkpoint`` (of a point the sync that just completed made durable)
        on a thread, by a job of its own. Not in the sync's job: its two fsyncs (the file,
        then the directory after the rename) would hold back the acknowledgements of that
        round, ~0.5 ms once a second on an idle disk and tens of ms on a busy one. The
        recovery point only moves later; what it names is synced already. One checkpoint
        job at a time (they share one temporary file); a newer one due meanwhile replaces
        the waiting one."""
        if self._checkpointing:
            self._next_checkpoint = checkpoint
            return
        self._checkpointing = True
        self.threads.submit(self._run_checkpoint, checkpoint)

    def _run_checkpoint(self, checkpoint: Checkpoint) -> None:
        """I/O thread: write the checkpoint (a failure is logged: the recovery point stays
        at the previous one), then report."""
        try:
            write_checkpoint(self.directory, checkpoint)
        except OSError as exc:
            log.warning("event=checkpoint_failed partition=%s error=%r", self.name, exc)
        except BaseException as exc:  # a bug: log it, and still report, or close would hang
            log.error("event=checkpoint_crashed partition=%s error=%r", self.name, exc)
        self.threads.report(self._checkpoint_done)

    def _checkpoint_done(self) -> None:
        self._checkpointing = False
        self.checkpoints += 1
        checkpoint, self._next_checkpoint = self._next_checkpoint, None
        if checkpoint is not None and self.pipeline.failure is None:
            self._write_checkpoint(checkpoint)
        else:
            self._pump()  # wakes wait_idle once nothing runs

    def go_offline(self, exc: BaseException) -> None:
        """Stop for good: no job starts again and every waiter fails with LogOffline."""
        self.pipeline.fail(exc)
        self._offline(exc)

    def _offline(self, exc: BaseException) -> None:
        log.error("event=partition_offline partition=%s error=%r", self.name, exc)
        err = LogOffline(f"partition {self.name}: sync failed ({exc}); the log is offline")
        waiters, self.durable_waiters = self.durable_waiters + self.written_waiters, []
        self.written_waiters = []
        for _want, fut in waiters:
            if not fut.done():
                fut.set_exception(err)

    def _run_inline(self, job: Job) -> None:
        """Loop: run a lone write-then-sync job here rather than on a thread (nothing else
        runs on this partition's files, so no write lands during its fsync) and apply its
        outcome at once: the same I/O and the same outcomes as :meth:`_run_job`, without
        the two hand-offs."""
        started = time.perf_counter()
        failed: tuple[int, OSError] | BaseException | None
        try:
            failed = write_runs(job.runs, job.grow)
        except Exception as exc:  # a bug, as on a thread; anything else ends the process
            failed = exc
        if failed is not None:
            self.threads.ran_inline(time.perf_counter() - started)
            self._write_done(job, failed)
            return
        job.write_finished = True
        error: BaseException | None = None
        assert job.plan is not None
        try:
            self._sync(job.plan, inline=True)
        except Exception as exc:
            error = exc
        self.threads.ran_inline(time.perf_counter() - started)
        self.inline_syncs += 1
        self._sync_done(job, error)

    # ----------------------------------------------------------------------- kernel AIO
    def _run_aio(self, job: Job) -> bool:
        """Loop: run ``job`` without a thread if it is a plain one (True), else leave it to
        the threads (False). Plain: its writes are small (at most :data:`INLINE_MAX_BYTES`,
        written here: a copy into the page cache, microseconds), a write-only job's (one
        made while this partition syncs) only over the fill the file already has, and its
        sync, if any, only fdatasyncs (no seal, no directory, no cache drop), which the
        kernel runs as AIO (:mod:`storage.aio`) while the loop goes on. The outcomes arrive
        as a thread's would, through :meth:`_write_done` and :meth:`_sync_done`, in a later
        callback."""
        if self._fsync is not os.fdatasync:
            # only the real fdatasync: a test that injects one, to count, fail or hold
            # syncs, gets the threads, which call it
            return False
        kind = job.kind
        plan = job.plan
        if plan is not None and (plan.seal or plan.dir_dirty or plan.drop):
            return False
        if job.runs and not _at_most(job.runs, INLINE_MAX_BYTES):
            return False
        if kind is Event.WRITE and (job.grow is not None or not _within_fill(job.runs)):
            # a write-only job runs while this partition's sync does: one that would grow
            # the file (on ext4 that can wait for the sync, milliseconds) goes to a thread
            return False
        aio = self.threads.aio()
        if aio is None:
            return False
        loop = self.loop
        if kind is not Event.SYNC:
            failed: tuple[int, OSError] | BaseException | None
            try:
                failed = write_runs(job.runs, job.grow)
            except Exception as exc:  # a bug, as on a thread
                failed = exc
            if kind is Event.WRITE or failed is not None:
                loop.call_soon(self._write_done, job, failed)
                return True
            job.write_finished = True
        assert plan is not None
        segments = [seg for seg in plan.segments if not seg.closed]
        if not segments:
            loop.call_soon(self._sync_done, job, None)
            return True
        started = time.perf_counter()
        pending = len(segments)
        errors: list[int] = []
        on_threads = False

        def done(err: int) -> None:
            nonlocal pending
            if err:
                errors.append(err)
            pending -= 1
            if pending == 0:
                self._aio_synced(job, errors, started, len(segments), all_aio=not on_threads)

        for seg in segments:
            try:
                aio.fdatasync(seg.fd, done)
            except OSError:  # refused (e.g. the kernel's AIO limit): this one on a thread
                on_threads = True
                self.threads.submit(self._fsync_one, (seg, done))
        return True

    def _fsync_one(self, arg: tuple[Segment, Callable[[int], None]]) -> None:
        """I/O thread: one fdatasync the kernel's AIO refused; reported like an AIO one."""
        seg, done = arg
        err = 0
        try:
            self._fsync(seg.fd)
        except OSError as exc:
            err = exc.errno or errno.EIO
        self.threads.report(done, err)

    def _aio_synced(
        self, job: Job, errors: list[int], started: float, files: int, *, all_aio: bool
    ) -> None:
        """Loop: every fdatasync of ``job`` (``files`` of them) completed: its outcome, as
        :meth:`_run_job`'s."""
        self._timed_sync(started, files, inline=False, aio=True)
        error: OSError | None = None
        if errors:
            error = OSError(errors[0], f"fdatasync failed: {os.strerror(errors[0])}")
        elif all_aio:
            self.aio_syncs += 1
        self._sync_done(job, error)

    # ---------------------------------------------------------------------- I/O threads
    def _run_job(self, job: Job) -> None:
        """I/O thread: the job's write and/or sync, then its report. A write-then-sync job
        reports its write on its own only when the loop asked for it (:class:`Job`); a
        failed write reports at once and skips the sync."""
        report = self.threads.report
        if job.kind is not Event.SYNC:
            failed: tuple[int, OSError] | BaseException | None
            try:
                failed = write_runs(job.runs, job.grow)
            except BaseException as exc:
                failed = exc
            if job.kind is Event.WRITE or failed is not None:
                report(self._write_done, job, failed)
                return
            job.write_finished = True
            if job.report_written and job.claim_written():
                report(self._write_done, job, None)
        error: BaseException | None = None
        assert job.plan is not None
        try:
            self._sync(job.plan, inline=False)
        except BaseException as exc:
            error = exc
        report(self._sync_done, job, error)

    def _sync(self, plan: SyncPlan, *, inline: bool) -> None:
        """Loop (inline) or I/O thread: :func:`sync_files` for ``plan``; a round slower than
        :data:`SLOW_SYNC_MS` is logged with its length (the disk's share of a latency
        outlier)."""
        started = time.perf_counter()
        sync_files(plan, None, self._fsync, self.directory, self.name)
        self._timed_sync(started, len(plan.segments) + int(plan.dir_dirty), inline=inline)

    def _timed_sync(self, started: float, files: int, *, inline: bool, aio: bool = False) -> None:
        """Log a sync round that took :data:`SLOW_SYNC_MS` or more since ``started``
        (``event=sync_slow``: the disk's share of a latency outlier)."""
        ms = (time.perf_counter() - started) * 1000
        if ms >= SLOW_SYNC_MS:
            log.warning(
                "event=sync_slow partition=%s ms=%.1f inline=%d aio=%d files=%d",
                self.name,
                ms,
                int(inline),
                int(aio),
                files,
            )
