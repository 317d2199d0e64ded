"""Dedicated threads for the partitions' write and sync jobs, and their way back to the loop.

The partitions' blocking I/O (``pwritev``, ``fdatasync``, seals, checkpoints: the jobs of
:mod:`storage.flush`) runs here rather than in the loop's default executor. The executor costs
more than the I/O it runs for a small append: ``run_in_executor`` wraps each call in two
futures, chains them with an extra ``call_soon_threadsafe``, and its worker takes and releases
several Python-level locks per item, every one of them a turn of the GIL between the worker
and the loop (a lone acks=all append cost the node 16 context switches and ~29 system calls,
measured with ``perf stat`` in ``bench/RESULTS.md``). Here:

- :meth:`IoThreads.submit` (loop) puts ``(fn, arg)`` on one ``SimpleQueue``: a thread waiting
  on it is woken, nothing else is allocated. Threads start lazily, up to ``max_threads``.
- :meth:`IoThreads.report` (thread) queues ``callback(*args)`` for the loop and wakes the loop
  only if no wake-up is pending: jobs that finish close together are answered from one loop
  callback (:meth:`_drain`), one wake-up for all of them.

A thread never touches the loop's state: jobs report, and the loop applies the outcome.
Threads are daemons (a stuck ``fdatasync`` must not keep a dying process alive);
:meth:`close` stops and joins them.

Inline jobs. When the node is otherwise idle a hand-off is pure cost: a lone append waits
for two wake-ups (the loop wakes a thread, the thread wakes the loop) around an fdatasync of
~0.15 ms, about half the system calls and context switches of the round. A caller may then
run the job on the loop itself (Redis with ``appendfsync always`` does the same), when
:meth:`IoThreads.may_run_inline` says so: inline jobs are enabled (``inline_max_ms`` > 0),
no job is queued or running on a thread, none ran inline earlier in this loop turn (two
partitions' lone appends in one turn still sync in parallel: after an inline job, the
partitions whose job start is already queued on the loop, :attr:`IoThreads.starts_due`,
send theirs to the threads until the loop's next turn; when there are none, as for a
lone client, nothing needs marking and no callback is scheduled), and no inline job lately took
longer than ``inline_max_ms``. After one that did (a slow disk: the loop stalled for it
once), jobs go to the threads for a cool-down, then inline is tried again: one second
(:data:`INLINE_COOLDOWN_S`), doubled up to :data:`INLINE_COOLDOWN_MAX_S` each time an inline
job is slow again within one cool-down's length of the last one ending.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from storage.aio import KernelSync, open_kernel_sync

log = logging.getLogger("herald.storage")

_Item = tuple[Callable[[Any], None], Any] | None  # a job and its argument; None stops a thread

# how plain fdatasyncs run: by the kernel (io_uring or native AIO, storage/aio.py), or on
# these threads
SYNC_ENGINES: Final = ("aio", "threads")

# after an inline job slower than ``inline_max_ms``, how long jobs go to the threads only: a
# disk that stalls once tends to stall again soon (writeback, another tenant's burst), and
# each inline stall would stop every connection of the node for its length. One second
# first: a lone slow fdatasync then does not cost the round trips of the next ten seconds
# their inline job (on the idle VM an fdatasync over 5 ms came about every 10 s, so a fixed
# 10 s cool-down kept the threads on most of the time: ~50 us more node CPU and ~45 us more
# round trip per one-at-a-time append). Doubled, up to INLINE_COOLDOWN_MAX_S, when an inline
# job is slow again within one cool-down's length of the last one ending (a disk that stays
# busy: under another tenant's writes an inline sync over 5 ms came ~80 ms after each 1 s
# cool-down ended, a loop stall a second and inline jobs 8% of the time); back to one
# second when the slow one comes later than that.
INLINE_COOLDOWN_S = 1.0
INLINE_COOLDOWN_MAX_S = 32.0


class _Worker(threading.Thread):
    def __init__(self, jobs: queue.SimpleQueue[_Item], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._jobs = jobs
        self.finished = 0  # jobs this thread has run (written by this thread only)

    def run(self) -> None:
        get = self._jobs.get
        while True:
            item = get()
            if item is None:
                return
            fn, arg = item
            try:
                fn(arg)
            except BaseException:  # a job reports its own failures; this is a bug
                log.exception("event=io_job_crashed thread=%s", self.name)
            self.finished += 1


class IoThreads:
    """A small pool of threads for blocking storage jobs, shared by the partitions of a log.

    ``submit`` and ``close`` are called on the event loop; ``report`` from a job. A job must
    not raise (it reports its failures); one that does is logged. Cost: one thread (a few
    hundred KiB of stack in use, 8 MiB reserved) per concurrent job, at most ``max_threads``.
    ``inline_max_ms`` > 0 lets callers run a job on the loop when the threads are idle (see
    the module docstring; 0, the default, never); ``clock`` (seconds) times the cool-downs."""

    def __init__(
        self,
        max_threads: int,
        name: str = "herald-io",
        *,
        inline_max_ms: float = 0,
        sync_engine: str = "threads",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        if sync_engine not in SYNC_ENGINES:
            raise ValueError(f"sync_engine must be one of {', '.join(SYNC_ENGINES)}")
        if inline_max_ms < 0:
            raise ValueError("inline_max_ms must not be negative")
        self.max_threads = max_threads
        self.name = name
        self.inline_max_s = inline_max_ms / 1000
        # "aio": an fdatasync of the plain kind runs as kernel AIO with its completion read
        # on the loop (storage/aio.py), not on a thread; opened on first use, on the loop
        self.sync_engine = sync_engine
        self._aio: KernelSync | None = None
        self._aio_tried = False
        self._inline_this_turn = False
        # callers (partitions' flushers) whose job start is queued on the loop: kept by them
        # (Flusher.kick / _pump); an inline job only has to hold back those
        self.starts_due = 0
        # other writers to the same disk (the state store's sync, wired by the node): while
        # one of them says it is syncing, no job runs inline. An fdatasync issued then waits
        # for the device to finish the other's flush first: on the loop, that wait (up to ms
        # under load) would stop every connection, the consumers' fetches included
        self.busy_elsewhere: list[Callable[[], bool]] = []
        self._clock = clock
        self._inline_off_until = 0.0  # clock(): the end of the last cool-down
        self.inline_cooldown_s = 0.0  # the last cool-down's length
        self.inline_jobs = 0  # jobs run on the loop so far
        self.slow_inline_jobs = 0  # of which took longer than inline_max_ms
        self._jobs: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._workers: list[_Worker] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._drain_scheduled = False
        self._submitted = 0
        self.closed = False

    @property
    def threads(self) -> int:
        """Threads started so far."""
        return len(self._workers)

    def submit(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Run ``fn(arg)`` in a thread (loop only). The loop is the one ``report`` answers on."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._jobs.put((fn, arg))
        self._submitted += 1
        workers = self._workers
        busy = self._submitted - sum(w.finished for w in workers)  # queued or running
        if busy > len(workers) and len(workers) < self.max_threads:
            # more jobs than threads: one more, so a sync never queues behind another
            # partition's long write while a thread could run it
            worker = _Worker(self._jobs, f"{self.name}-{len(workers)}")
            workers.append(worker)
            worker.start()

    def aio(self) -> KernelSync | None:
        """The kernel-side engine that runs plain fdatasyncs (loop only: io_uring, else
        native AIO, :mod:`storage.aio`), or None: the engine is "threads", or the kernel
        offers neither (logged once; threads then)."""
        if self._aio_tried:
            return self._aio
        self._aio_tried = True
        if self.sync_engine == "aio" and not self.closed:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._aio = open_kernel_sync(self._loop)
        return self._aio

    def may_run_inline(self) -> bool:
        """Whether a job may run on the loop now instead of on a thread (loop only; see
        the module docstring). A caller that does so calls :meth:`ran_inline` after it."""
        if self.inline_max_s <= 0 or self._inline_this_turn or self.closed:
            return False
        if self._submitted != sum(w.finished for w in self._workers):
            return False  # a job is queued or running: the disk is busy, do not wait on it
        if self._aio is not None and self._aio.in_flight:
            return False  # so is a sync the kernel runs for us
        for busy in self.busy_elsewhere:
            if busy():
                return False  # another store syncs the same disk: ours would queue behind
        return not self._inline_off_until or self._clock() >= self._inline_off_until

    def ran_inline(self, seconds: float) -> None:
        """A job ran on the loop and took ``seconds``: none runs inline again in this loop
        turn, and none for a cool-down if it was slower than allowed (see
        :data:`INLINE_COOLDOWN_S`: one second, doubled while slow ones keep coming). Only
        the job starts already queued (:attr:`starts_due`) can come in this turn: with none,
        the turn is not marked (a lone client's round schedules no callback for it)."""
        self.inline_jobs += 1
        if not self._inline_this_turn and self.starts_due > 0:
            self._inline_this_turn = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._next_turn)
        if seconds <= self.inline_max_s:
            return
        self.slow_inline_jobs += 1
        now = self._clock()
        last = self.inline_cooldown_s
        if self._inline_off_until and now - self._inline_off_until < last:
            # slow again within one cool-down's length of the last one ending: the disk
            # stays busy; a longer one
            cooldown = min(last * 2, INLINE_COOLDOWN_MAX_S)
        else:
            cooldown = INLINE_COOLDOWN_S
        self.inline_cooldown_s = cooldown
        self._inline_off_until = now + cooldown
        log.warning(
            "event=inline_io_slow pool=%s ms=%.1f limit_ms=%g threads_only_s=%g",
            self.name,
            seconds * 1000,
            self.inline_max_s * 1000,
            cooldown,
        )

    def _next_turn(self) -> None:
        self._inline_this_turn = False

    def report(self, callback: Callable[..., None], *args: Any) -> None:
        """From a job: run ``callback(*args)`` on the loop. Reports made before the loop
        drains the previous ones share its wake-up."""
        self._done.append((callback, args))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            loop = self._loop
            assert loop is not None
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody is left to answer
                self._drain_scheduled = False

    def _drain(self) -> None:
        # reset first: a report made while this runs either lands in the deque before the
        # loop below empties it, or sees the flag down and schedules another drain
        self._drain_scheduled = False
        done = self._done
        while done:
            callback, args = done.popleft()
            try:
                callback(*args)
            except Exception:
                log.exception("event=io_report_failed callback=%r", callback)

    def close(self) -> None:
        """Stop the threads once the jobs queued are done, and wait for them. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._aio is not None:
            self._aio.close()
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join()
