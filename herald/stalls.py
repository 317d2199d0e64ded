"""Loop stalls: a timer that notices when the event loop was late, and says whose fault it was.

Every connection of a node waits while its event loop does not run: a long callback, a
collection (:mod:`herald.collector` logs those), a system call that blocks on the loop (an
inline fdatasync, :mod:`storage.flush` logs slow ones as ``event=sync_slow``), or a machine
that gives the process no core. :class:`StallLog` ticks every :data:`TICK_MS`; a tick that
comes :data:`STALL_MS` or more late (the stall budget of issue 12, section 3) is logged as
``event=loop_stall ms=<how late> cpu_ms=<the loop thread's CPU time since the tick before>``
(that span is the tick plus the lateness):

- ``cpu_ms`` about ``ms`` or more: the loop was busy with the node's own work (a callback, a
  collection);
- ``cpu_ms`` far below ``ms``: the loop thread was not running: blocked in a system call
  (a slow disk under an inline sync) or waiting for a core (other processes).

So a latency outlier in the benchmarks can be matched to a line of the node's log by its
time and told apart. Cost: a timer callback every 50 ms (a few microseconds each).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

log = logging.getLogger("herald.node")

TICK_MS: Final = 50.0
STALL_MS: Final = 20.0


class StallLog:
    """Logs the loop's stalls of ``threshold_ms`` or more (see the module's docstring).
    :meth:`start` on the loop, :meth:`stop` to end it."""

    def __init__(self, threshold_ms: float = STALL_MS, tick_ms: float = TICK_MS) -> None:
        self.threshold_s = threshold_ms / 1000
        self.tick_s = tick_ms / 1000
        self.stalls = 0  # logged so far
        self.worst_ms = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._cpu = 0.0

    def start(self) -> StallLog:
        self._loop = asyncio.get_running_loop()
        self._arm()
        return self

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self) -> None:
        loop = self._loop
        assert loop is not None
        self._due = time.monotonic() + self.tick_s
        self._cpu = time.thread_time()
        self._handle = loop.call_later(self.tick_s, self._tick)

    def _tick(self) -> None:
        late = time.monotonic() - self._due
        if late >= self.threshold_s:
            cpu = time.thread_time() - self._cpu
            self.stalls += 1
            self.worst_ms = max(self.worst_ms, late * 1000)
            log.warning("event=loop_stall ms=%.1f cpu_ms=%.1f", late * 1000, cpu * 1000)
        self._arm()
