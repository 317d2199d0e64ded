"""Run a client workload in a fresh child process (``spawn``) on uvloop and get its result.

Why a child per workload: each measurement starts from a clean interpreter (no state left by
another system's client library), runs on its own core when the scheduler allows, and its CPU
time is its own. Children ignore SIGINT: on Ctrl-C the runner stops them (and the servers)
itself, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import signal
import traceback
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any

_ctx = mp.get_context("spawn")
Event = _ctx.Event


class WorkerFailed(Exception):
    """The workload raised in the child; the message carries its traceback."""


def _entry(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Every system's client alike keeps freed memory instead of returning it to the kernel
    # (glibc thresholds, as `herald serve` sets them): on this VM a client that receives
    # MiB replies otherwise spends a third of its time in page faults (broker/malloc.py).
    from herald.malloc import keep_freed_memory

    keep_freed_memory()
    try:
        result = fn(*args)
        if asyncio.iscoroutine(result):
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                result = runner.run(result)
        conn.send(("ok", result))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Child:
    """One workload in its own process. ``fn`` must be a module-level function (it is
    pickled by name); it may be a coroutine function."""

    def __init__(
        self, fn: Callable[..., Coroutine[Any, Any, Any] | Any], *args: Any, name: str = ""
    ) -> None:
        recv, send = _ctx.Pipe(duplex=False)
        self._conn = recv
        self.process = _ctx.Process(
            target=_entry, args=(send, fn, args), name=name or fn.__name__, daemon=True
        )
        self.process.start()
        send.close()

    @property
    def pid(self) -> int:
        pid = self.process.pid
        assert pid is not None
        return pid

    def result(self, timeout: float) -> Any:
        """Wait up to ``timeout`` seconds; raises :class:`WorkerFailed` if the workload
        raised, died or timed out (the child is then terminated)."""
        try:
            if not self._conn.poll(timeout):
                raise WorkerFailed(f"{self.process.name} did not finish within {timeout:.0f} s")
            status, value = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise WorkerFailed(
                f"{self.process.name} died with exit code {self.process.exitcode}"
            ) from None
        except BaseException:  # timeout, Ctrl-C: do not wait for a workload still running
            self.process.terminate()
            raise
        finally:
            self.stop()
        if status != "ok":
            raise WorkerFailed(f"{self.process.name} failed:\n{value}")
        return value

    def stop(self) -> None:
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        with contextlib.suppress(OSError):
            self._conn.close()


def run(fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
    """Run one workload in a child and return its result."""
    return Child(fn, *args).result(timeout)


def run_many(calls: list[tuple[Callable[..., Any], tuple[Any, ...]]], timeout: float) -> list[Any]:
    """Run workloads concurrently, one child each; results in order. If one fails the others
    are stopped and the first failure is raised."""
    children = [Child(fn, *args) for fn, args in calls]
    try:
        return [c.result(timeout) for c in children]
    finally:
        for c in children:
            if c.process.is_alive():
                c.process.terminate()
            c.stop()
