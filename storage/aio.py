"""fdatasync without a thread: the kernel runs it (io_uring, else Linux native AIO), and the
event loop reads its completion from an eventfd.

Why: a sync round on an I/O thread (:mod:`storage.io_threads`) costs the loop more than the
``fdatasync`` itself. The thread takes the GIL to start the job and again when the system
call returns, and the loop is woken by ``call_soon_threadsafe``; while the loop is busy each
of those waits for it. Measured on the 2-core VM at 1,000 notification events/s (about
1,900 sync rounds/s over 24 partitions): a round spent 0.8 ms p50 (5 ms p99) waiting for a
thread to start, 0.7 ms in the I/O, and 0.5 ms (3 ms p99) waiting for the loop to hear of
it; the loop thread spent 8% of its CPU in ``pthread_cond_signal``, handing the GIL over.
With the I/O threads replaced by calls on the loop and no fsync at all, the end-to-end p99
went from 75-150 ms to 20 ms, so it is the hand-offs, not the disk.

Here the loop asks the kernel for the sync and goes on; the kernel signals the completion on
an eventfd the loop watches (``add_reader``): no Python thread, no GIL, no
``call_soon_threadsafe``. Two engines, one interface (:class:`KernelSync`):

- :class:`UringSync` (preferred, x86-64): ``IORING_OP_FSYNC`` with
  ``IORING_FSYNC_DATASYNC``. An fsync cannot be done without blocking, so io_uring hands it
  to its io-wq workers, which are not bound to a CPU: the submit returns in ~7 us of wall
  time and the sync's kernel work can run on the other core.
- :class:`AioSync`: ``io_submit`` of ``IOCB_CMD_FDSYNC``. The kernel queues the sync on the
  *submitting CPU's* worker, which then preempts the loop on its own core (~40 us of wall
  time per submit for ~10 us of the loop's own CPU).

A/B at 1,000 events/s, three alternated pairs: io_uring p99 64.7, 82.0, 107.5 ms against
114.9, 100.8, 124.2 ms with native AIO. Both are the same ``vfs_fsync_range`` as
``fdatasync(2)``, with the same error reporting (a writeback error comes back as the
completion's negative errno).

Only ``fdatasync`` goes this way; the flusher's small writes are made by the loop itself
with ``pwritev`` (native AIO on a buffered file would be synchronous anyway).
:func:`open_kernel_sync` answers None where the kernel offers neither, and the caller uses
its threads. ctypes calls release the GIL; these never block (a submit only queues,
completions are read without waiting)."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import mmap
import os
import platform
import struct
from collections.abc import Callable
from typing import Final, Protocol

log = logging.getLogger("herald.storage")

_SYSCALLS: Final = {
    # io_setup, io_destroy, io_getevents, io_submit
    "x86_64": (206, 207, 208, 209),
    "aarch64": (0, 1, 4, 2),
}
IOCB_CMD_FDSYNC: Final = 3
IOCB_FLAG_RESFD: Final = 1
# completions gathered per io_getevents call; more are read by calling again
_EVENTS: Final = 64


class _Iocb(ctypes.Structure):
    """``struct iocb`` (linux/aio_abi.h), little-endian layout."""

    _fields_ = (
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    )


class _IoEvent(ctypes.Structure):
    """``struct io_event``."""

    _fields_ = (
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    )


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


Done = Callable[[int], None]  # called on the loop with 0 or the errno of the failed sync


class KernelSync(Protocol):
    """What the flusher asks of a kernel-side sync engine (:class:`UringSync`,
    :class:`AioSync`)."""

    closed: bool

    @property
    def in_flight(self) -> int: ...

    def fdatasync(self, fd: int, done: Done) -> None: ...

    def close(self) -> None: ...


def open_kernel_sync(loop: asyncio.AbstractEventLoop) -> KernelSync | None:
    """io_uring where the kernel offers it, else native AIO, else None (logged): the
    caller's threads then."""
    ring = UringSync.open(loop)
    if ring is not None:
        return ring
    return AioSync.open(loop)


class AioSync:
    """One kernel AIO context and its eventfd, driven by one event loop (loop only).

    :meth:`fdatasync` queues a sync of ``fd`` and calls ``done(0)`` (or ``done(errno)``) on
    the loop once the kernel finished it. At most ``depth`` syncs are in flight; the caller
    (the flush pipeline: at most one sync per partition at a time) stays below it, and a
    submit the kernel refuses raises ``OSError`` for the caller to run the sync another
    way."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, ctx: int, efd: int, calls: tuple[int, ...]
    ) -> None:
        self._loop = loop
        self._ctx = ctx
        self._efd = efd
        self._destroy, self._getevents, self._submit = calls[1], calls[2], calls[3]
        self._waiting: dict[int, tuple[_Iocb, Done]] = {}
        self._free: list[_Iocb] = []  # iocbs whose syncs completed, reused
        self._next = 1
        # built once: the system call's arguments that do not change (ctypes objects cost
        # microseconds each to make), and the one-pointer array io_submit reads
        self._syscall = _libc().syscall
        self._ctx_arg = ctypes.c_ulong(ctx)
        self._one = ctypes.c_long(1)
        self._ptrs = (ctypes.c_void_p * 1)()
        self._events = (_IoEvent * _EVENTS)()
        self._zero = _Timespec(0, 0)
        self.closed = False
        loop.add_reader(efd, self._completed)

    @classmethod
    def open(cls, loop: asyncio.AbstractEventLoop, depth: int = 1024) -> AioSync | None:
        """A context for ``depth`` syncs in flight, or None (logged) where the kernel or the
        machine does not offer native AIO."""
        calls = _SYSCALLS.get(platform.machine())
        if calls is None or not hasattr(os, "eventfd"):
            return None
        libc = _libc()
        ctx = ctypes.c_ulong(0)
        if libc.syscall(calls[0], ctypes.c_long(depth), ctypes.byref(ctx)) < 0:
            err = ctypes.get_errno()
            log.warning(
                "event=aio_unavailable error=%s fallback=threads", errno.errorcode.get(err, err)
            )
            return None
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return cls(loop, ctx.value, efd, calls)

    @property
    def in_flight(self) -> int:
        """Syncs submitted and not yet completed."""
        return len(self._waiting)

    def fdatasync(self, fd: int, done: Done) -> None:
        """Queue ``fdatasync(fd)``; ``done`` is called on the loop with 0 or an errno. Raises
        ``OSError`` if the kernel refuses the request (nothing was queued)."""
        if self.closed:
            raise OSError(errno.EBADF, "the AIO context is closed")
        token = self._next
        self._next = token + 1
        free = self._free
        iocb = free.pop() if free else _Iocb()
        iocb.aio_data = token
        iocb.aio_lio_opcode = IOCB_CMD_FDSYNC
        iocb.aio_fildes = fd
        iocb.aio_flags = IOCB_FLAG_RESFD
        iocb.aio_resfd = self._efd
        ptrs = self._ptrs
        ptrs[0] = ctypes.addressof(iocb)
        n = self._syscall(self._submit, self._ctx_arg, self._one, ptrs)
        if n != 1:
            free.append(iocb)
            err = ctypes.get_errno() if n < 0 else errno.EAGAIN
            raise OSError(err, f"io_submit of fdatasync refused: {os.strerror(err)}")
        self._waiting[token] = (iocb, done)

    def _completed(self) -> None:
        """Loop (the eventfd is readable): hand every finished sync to its caller."""
        try:
            os.read(self._efd, 8)
        except BlockingIOError:
            pass  # completions are read below whatever the counter said
        libc = _libc()
        events = self._events
        while self._waiting:
            n = libc.syscall(
                self._getevents,
                ctypes.c_ulong(self._ctx),
                ctypes.c_long(0),
                ctypes.c_long(_EVENTS),
                events,
                ctypes.byref(self._zero),
            )
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                log.error("event=aio_getevents_failed error=%s", errno.errorcode.get(err, err))
                return
            for i in range(n):
                ev = events[i]
                entry = self._waiting.pop(ev.data, None)
                if entry is None:
                    continue
                self._free.append(entry[0])
                try:
                    entry[1](0 if ev.res >= 0 else -ev.res)
                except Exception:
                    log.exception("event=aio_callback_failed")
            if n < _EVENTS:
                return

    def close(self) -> None:
        """Stop watching the eventfd and destroy the context. ``io_destroy`` waits for the
        syncs still in flight (their callbacks are not called: the caller is closing)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._loop.remove_reader(self._efd)
        except RuntimeError:  # the loop is closed already (a close without a loop)
            pass
        _libc().syscall(self._destroy, ctypes.c_ulong(self._ctx))
        os.close(self._efd)
        self._waiting.clear()


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        _LIBC = lib
    return _LIBC


# ----------------------------------------------------------------------------- io_uring
_URING_CALLS: Final = {"x86_64": (425, 426, 427)}  # io_uring_setup, _enter, _register
IORING_OP_FSYNC: Final = 3
IORING_FSYNC_DATASYNC: Final = 1
IORING_REGISTER_EVENTFD: Final = 4
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_U32 = struct.Struct("<I")
# opcode, flags, ioprio, fd, off, addr, len, fsync_flags, user_data, the rest zero
_SQE = struct.Struct("<BBHiQQIIQ24x")
_CQE = struct.Struct("<QiI")  # user_data, res, flags
_TRANSIENT: Final = (errno.EINTR, errno.EAGAIN, errno.EBUSY)


class _UringParams(ctypes.Structure):
    """``struct io_uring_params`` with its two offset structs inlined."""

    _fields_ = (
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_head", ctypes.c_uint32),
        ("sq_tail", ctypes.c_uint32),
        ("sq_ring_mask", ctypes.c_uint32),
        ("sq_ring_entries", ctypes.c_uint32),
        ("sq_flags", ctypes.c_uint32),
        ("sq_dropped", ctypes.c_uint32),
        ("sq_array", ctypes.c_uint32),
        ("sq_resv1", ctypes.c_uint32),
        ("sq_user_addr", ctypes.c_uint64),
        ("cq_head", ctypes.c_uint32),
        ("cq_tail", ctypes.c_uint32),
        ("cq_ring_mask", ctypes.c_uint32),
        ("cq_ring_entries", ctypes.c_uint32),
        ("cq_overflow", ctypes.c_uint32),
        ("cq_cqes", ctypes.c_uint32),
        ("cq_flags", ctypes.c_uint32),
        ("cq_resv1", ctypes.c_uint32),
        ("cq_user_addr", ctypes.c_uint64),
    )


class UringSync:
    """fdatasync through io_uring (``IORING_OP_FSYNC`` with ``IORING_FSYNC_DATASYNC``),
    completions on an eventfd registered with the ring; the same interface as
    :class:`AioSync` (loop only).

    Why both: native AIO queues an fsync on the *submitting CPU's* kernel worker, which then
    preempts the loop on its own core (``io_submit`` took ~40 us of wall time for ~10 us of
    its own CPU on the 2-core VM). io_uring hands an fsync (which cannot be done without
    blocking) to its io-wq workers, which are not bound to a CPU: the submit took ~7 us of
    wall time, and the sync's kernel work can run on another core.

    The rings are the kernel's shared memory (``mmap``), read and written with ``struct``
    in program order: correct on x86-64's total store order, which is why only x86-64 is
    offered (elsewhere :class:`AioSync`). A submission is never refused once queued: a
    transient ``io_uring_enter`` failure leaves it in the ring, entered again at the end of
    the loop turn. An fd the kernel cannot sync comes back as the completion's errno."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, params: _UringParams) -> None:
        self._loop = loop
        self._fd = fd
        self._p = params
        p = params
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        self._sq = mmap.mmap(
            fd, p.sq_array + p.sq_entries * 4, mmap.MAP_SHARED, rw, offset=_OFF_SQ_RING
        )
        self._cq = mmap.mmap(
            fd, p.cq_cqes + p.cq_entries * 16, mmap.MAP_SHARED, rw, offset=_OFF_CQ_RING
        )
        self._sqes = mmap.mmap(fd, p.sq_entries * 64, mmap.MAP_SHARED, rw, offset=_OFF_SQES)
        self._sq_mask = _U32.unpack_from(self._sq, p.sq_ring_mask)[0]
        self._cq_mask = _U32.unpack_from(self._cq, p.cq_ring_mask)[0]
        self._depth = p.sq_entries
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        calls = _URING_CALLS["x86_64"]
        self._enter, self._register = calls[1], calls[2]
        self._syscall = _libc().syscall
        self._fd_arg = ctypes.c_uint(fd)
        self._zero = ctypes.c_uint(0)
        self._no_sig = ctypes.c_size_t(0)
        efd = ctypes.c_int(self._efd)
        if (
            self._syscall(
                self._register,
                self._fd_arg,
                ctypes.c_uint(IORING_REGISTER_EVENTFD),
                ctypes.byref(efd),
                ctypes.c_uint(1),
            )
            < 0
        ):
            err = ctypes.get_errno()
            self._unmap()
            os.close(self._efd)
            os.close(fd)
            raise OSError(err, f"io_uring eventfd registration failed: {os.strerror(err)}")
        self._waiting: dict[int, Done] = {}
        self._next = 1
        self._unsubmitted = 0  # queued in the ring, not yet entered (a transient failure)
        self._retry_scheduled = False
        self._last_error_log = 0.0
        self.closed = False
        loop.add_reader(self._efd, self._completed)

    @classmethod
    def open(cls, loop: asyncio.AbstractEventLoop, depth: int = 1024) -> UringSync | None:
        """A ring for ``depth`` syncs in flight, or None (logged at debug: native AIO is
        tried next) where the kernel or the machine does not offer io_uring."""
        calls = _URING_CALLS.get(platform.machine())
        if calls is None or not hasattr(os, "eventfd"):
            return None
        params = _UringParams()
        fd = _libc().syscall(calls[0], ctypes.c_uint(depth), ctypes.byref(params))
        if fd < 0:
            err = ctypes.get_errno()
            log.info("event=io_uring_unavailable error=%s", errno.errorcode.get(err, err))
            return None
        try:
            return cls(loop, fd, params)
        except OSError as exc:
            log.info("event=io_uring_unavailable error=%r", exc)
            return None

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def fdatasync(self, fd: int, done: Done) -> None:
        """Queue ``fdatasync(fd)``; ``done`` is called on the loop with 0 or an errno. Raises
        ``OSError`` (nothing queued) when closed or when the ring is full."""
        if self.closed:
            raise OSError(errno.EBADF, "the io_uring is closed")
        if len(self._waiting) >= self._depth:
            raise OSError(errno.EAGAIN, "io_uring full")
        p = self._p
        sq = self._sq
        tail = _U32.unpack_from(sq, p.sq_tail)[0]
        index = tail & self._sq_mask
        token = self._next
        self._next = token + 1
        _SQE.pack_into(self._sqes, index * 64, IORING_OP_FSYNC, 0, 0, fd, 0, 0, 0,
                       IORING_FSYNC_DATASYNC, token)  # fmt: skip
        _U32.pack_into(sq, p.sq_array + index * 4, index)
        _U32.pack_into(sq, p.sq_tail, (tail + 1) & 0xFFFFFFFF)  # after the entry: x86 TSO
        self._waiting[token] = done
        self._unsubmitted += 1
        self._submit()

    def _submit(self) -> None:
        """Enter what the ring holds; a transient failure is retried at the end of the turn,
        any other every 10 ms (the entries stay queued: they are never given up once in the
        ring)."""
        self._retry_scheduled = False
        if not self._unsubmitted or self.closed:
            return
        n = self._syscall(
            self._enter, self._fd_arg, ctypes.c_uint(self._unsubmitted), self._zero,
            self._zero, None, self._no_sig,
        )  # fmt: skip
        if n > 0:
            self._unsubmitted -= n
        if self._unsubmitted and not self._retry_scheduled:
            err = ctypes.get_errno() if n < 0 else errno.EAGAIN
            self._retry_scheduled = True
            if err in _TRANSIENT:
                self._loop.call_soon(self._submit)
                return
            # should not happen (the ring itself refused): no spinning, and one line a
            # second at most; the entries stay queued and their syncs wait
            now = self._loop.time()
            if now - self._last_error_log >= 1.0:
                self._last_error_log = now
                log.error("event=io_uring_enter_failed error=%s", errno.errorcode.get(err, err))
            self._loop.call_later(0.01, self._submit)

    def _completed(self) -> None:
        """Loop (the eventfd is readable): hand every finished sync to its caller."""
        try:
            os.read(self._efd, 8)
        except BlockingIOError:
            pass
        p = self._p
        cq = self._cq
        head = _U32.unpack_from(cq, p.cq_head)[0]
        tail = _U32.unpack_from(cq, p.cq_tail)[0]
        waiting = self._waiting
        while head != tail:
            token, res, _flags = _CQE.unpack_from(cq, p.cq_cqes + (head & self._cq_mask) * 16)
            head = (head + 1) & 0xFFFFFFFF
            _U32.pack_into(cq, p.cq_head, head)  # the slot is ours no more
            done = waiting.pop(token, None)
            if done is None:
                continue
            try:
                done(0 if res >= 0 else -res)
            except Exception:
                log.exception("event=aio_callback_failed")

    def _unmap(self) -> None:
        for m in (self._sq, self._cq, self._sqes):
            m.close()

    def close(self) -> None:
        """Stop watching the eventfd and close the ring (the kernel finishes or cancels
        what is in flight; the callbacks are not called: the caller is closing)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._loop.remove_reader(self._efd)
        except RuntimeError:
            pass
        self._unmap()
        os.close(self._fd)
        os.close(self._efd)
        self._waiting.clear()
