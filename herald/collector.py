"""The cyclic garbage collector, set for a node that makes many short-lived objects.

CPython collects its youngest generation every 700 net allocations of container objects
and, every 100 of those, the whole heap. A fan-out of 10,000 recipients allocates a few
hundred thousand tuples, lists and structs that die young (none of them in cycles): about
400 young collections and several full ones, each full one walking every object the node
made at start-up (modules, config, topic metadata). Measured on the 10,000-recipient fan-out
(``python -m bench.notify fanout``, 2 shared cores): the fan-out stage's CPU went from 40 to
22 ms with the settings below.

- :func:`tune_collector`: a young collection every ``YOUNG`` allocations (the memory it may
  hold back is that many objects' worth of garbage in cycles, a few MiB at most), a middle
  one every ``MIDDLE`` young ones;
- :func:`freeze_startup`: once the node is ready, what start-up made moves to the permanent
  generation (``gc.freeze``), which no collection walks again (about 53,000 objects; a full
  collection walking them took 20 ms or more on the busy VM, 97 ms once when it was
  overloaded);
- :class:`PauseLog`: a collection runs holding the GIL, so the event loop and every
  connection wait for it; one of :data:`LONG_PAUSE_MS` or more (the stall budget of issue
  12, section 3) is logged (``event=gc_pause``, with its generation), so a stall in the
  latency figures can be matched to one, or ruled out.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Final

log = logging.getLogger("herald.node")

YOUNG: Final = 50_000
MIDDLE: Final = 20
OLD: Final = 100
LONG_PAUSE_MS: Final = 20.0


def tune_collector(young: int = YOUNG, middle: int = MIDDLE, old: int = OLD) -> None:
    """Collect less often (see the module's docstring for why and what it costs)."""
    gc.set_threshold(young, middle, old)


def freeze_startup() -> None:
    """Exclude every object alive now from later collections (call once started)."""
    gc.collect()
    gc.freeze()


class PauseLog:
    """A :data:`gc.callbacks` entry that logs collections of ``threshold_ms`` or more.
    Cost: two Python calls per collection."""

    def __init__(self, threshold_ms: float = LONG_PAUSE_MS) -> None:
        self.threshold_s = threshold_ms / 1000
        self._started = 0.0
        self.logged = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        # collections never overlap (each holds the GIL throughout), so one start time does
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        if seconds >= self.threshold_s:
            self.logged += 1
            log.warning(
                "event=gc_pause generation=%d ms=%.1f collected=%d uncollectable=%d",
                info.get("generation", -1),
                seconds * 1000,
                info.get("collected", 0),
                info.get("uncollectable", 0),
            )

    def install(self) -> PauseLog:
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        return self

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
