"""A circuit breaker: a pure state machine over an injected monotonic clock.

::

    CLOSED --(N consecutive failures, or failure rate >= r over the window)--> OPEN
    OPEN --(cool-down elapsed; next admit)--> HALF_OPEN
    HALF_OPEN --(a probe succeeds, probes_to_close times)--> CLOSED
    HALF_OPEN --(a probe fails)--> OPEN (cool-down doubled, up to max_open_ms)

A caller asks :meth:`CircuitBreaker.admit` before each call and gets a :class:`Ticket`, or
``None`` when the breaker refuses (open, or half-open with its probes already out); it then
settles the ticket exactly once with :meth:`~CircuitBreaker.success`,
:meth:`~CircuitBreaker.failure` or :meth:`~CircuitBreaker.release` (the call said nothing
about the endpoint's health: cancelled, or refused before it left). Settling twice raises
:class:`~channels.errors.TicketAlreadySettled`. A ticket issued before the last transition is
stale: its result is not counted, so a slow call admitted while closed cannot close a breaker
that has since opened, nor re-open one that a probe has since closed.

No I/O, no asyncio: the clock is an argument, time moves only when the caller reads it, and
every transition is reported to ``on_transition`` (the webhook channel logs it).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from channels.config import BreakerConfig
from channels.errors import TicketAlreadySettled

_BUCKETS = 10


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Ticket:
    """Permission for one call; settle it exactly once."""

    __slots__ = ("generation", "probe", "settled")

    def __init__(self, generation: int, probe: bool) -> None:
        self.generation = generation
        self.probe = probe
        self.settled = False


Transition = Callable[[BreakerState, BreakerState, str], None]
"""``on_transition(old, new, why)``; ``why`` is one word: ``consecutive_failures:5``,
``failure_rate:12/20``, ``cool_down_elapsed``, ``probe_failed``, ``probe_succeeded``."""


class CircuitBreaker:
    """One breaker (one provider or one endpoint). See the module docstring.

    Memory: a few dozen bytes plus 10 rate buckets. Cost per call: O(1).
    """

    def __init__(
        self,
        config: BreakerConfig,
        clock: Callable[[], float],
        on_transition: Transition | None = None,
        *,
        streak_gap_s: float = float("inf"),
    ) -> None:
        self._cfg = config
        self._streak_gap = streak_gap_s
        self._last_failure = 0.0
        self._clock = clock
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._consecutive = 0
        self._opened_at = 0.0
        self._cool_down = config.open_ms / 1000
        self._probes_out = 0
        self._probe_successes = 0
        self._failing_since: float | None = None
        # rolling window: bucket index (time // width) -> [calls, failures]
        self._width = config.rate_window_ms / 1000 / _BUCKETS
        self._buckets: dict[int, list[int]] = {}
        self._bucket_index = -1  # the bucket calls are counted in now
        self._bucket = [0, 0]

    # ------------------------------------------------------------------- reading
    @property
    def state(self) -> BreakerState:
        """The state as of now (an open breaker whose cool-down has passed reads half-open)."""
        self._advance()
        return self._state

    @property
    def failing_since(self) -> float | None:
        """Clock time of the first failure of the current failing span, ``None`` when healthy.

        A span is a run of failures with no success between them and no gap longer than
        ``streak_gap_s`` between two failures (an idle endpoint that failed once last week and
        fails again now has not been failing for a week)."""
        return self._failing_since

    def retry_after(self) -> float:
        """Seconds until the breaker lets a probe through (0 when it would admit now)."""
        self._advance()
        if self._state is BreakerState.OPEN:
            # never more than the cool-down: opened_at + cool_down - now can round above it
            return min(self._cool_down, max(0.0, self._opened_at + self._cool_down - self._clock()))
        return 0.0

    def failure_rate(self) -> tuple[int, int]:
        """(calls, failures) in the rolling window."""
        self._expire(self._clock())
        calls = sum(b[0] for b in self._buckets.values())
        failures = sum(b[1] for b in self._buckets.values())
        return calls, failures

    # ----------------------------------------------------------------- admitting
    def admit(self) -> Ticket | None:
        """A ticket for one call, or ``None`` if the breaker refuses it now."""
        self._advance()
        if self._state is BreakerState.CLOSED:
            return Ticket(self._generation, probe=False)
        if self._state is BreakerState.HALF_OPEN and self._probes_out < self._cfg.half_open_probes:
            self._probes_out += 1
            return Ticket(self._generation, probe=True)
        return None

    # ------------------------------------------------------------------ settling
    def success(self, ticket: Ticket) -> None:
        """The call reached a healthy endpoint (any answer that is not a failure)."""
        if not self._settle(ticket):
            return
        self._failing_since = None
        if self._state is BreakerState.CLOSED:
            self._consecutive = 0
            self._count(failed=False)
        elif ticket.probe:  # HALF_OPEN, same generation
            self._probe_successes += 1
            if self._probe_successes >= self._cfg.probes_to_close:
                self._cool_down = self._cfg.open_ms / 1000
                self._move(BreakerState.CLOSED, "probe_succeeded")

    def failure(self, ticket: Ticket) -> None:
        """The call failed in a way that says the endpoint is unhealthy."""
        now = self._clock()
        if self._failing_since is None or now - self._last_failure > self._streak_gap:
            self._failing_since = now
        self._last_failure = now
        if not self._settle(ticket):
            return
        if self._state is BreakerState.CLOSED:
            self._consecutive += 1
            self._count(failed=True)
            calls, failures = self.failure_rate()
            if self._consecutive >= self._cfg.failure_threshold:
                self._open(now, f"consecutive_failures:{self._consecutive}")
            elif calls >= self._cfg.rate_min_calls and failures >= self._cfg.failure_rate * calls:
                self._open(now, f"failure_rate:{failures}/{calls}")
        elif ticket.probe:
            self._cool_down = min(self._cool_down * 2, self._cfg.max_open_ms / 1000)
            self._open(now, "probe_failed")

    def release(self, ticket: Ticket) -> None:
        """The call tells nothing about the endpoint's health (cancelled, or never sent)."""
        self._settle(ticket)

    # ------------------------------------------------------------------ internal
    def _settle(self, ticket: Ticket) -> bool:
        """Mark the ticket settled; True when its result counts (same generation)."""
        if ticket.settled:
            raise TicketAlreadySettled("a breaker ticket was settled twice")
        ticket.settled = True
        if ticket.generation != self._generation:
            return False
        if ticket.probe:
            self._probes_out -= 1
        return True

    def _advance(self) -> None:
        if self._state is BreakerState.OPEN and self._clock() >= self._opened_at + self._cool_down:
            self._move(BreakerState.HALF_OPEN, "cool_down_elapsed")

    def _open(self, now: float, why: str) -> None:
        self._opened_at = now
        self._move(BreakerState.OPEN, why)

    def _move(self, new: BreakerState, why: str) -> None:
        old = self._state
        self._state = new
        self._generation += 1
        self._probes_out = 0
        self._probe_successes = 0
        if new is BreakerState.CLOSED:
            self._consecutive = 0
            self._buckets.clear()
            self._bucket_index = -1
        if self._on_transition is not None:
            self._on_transition(old, new, why)

    def _count(self, *, failed: bool) -> None:
        now = self._clock()
        index = int(now // self._width)
        if index != self._bucket_index:  # a new bucket: the only time old ones can expire
            self._expire(now)
            self._bucket_index = index
            self._bucket = self._buckets.setdefault(index, [0, 0])
        self._bucket[0] += 1
        self._bucket[1] += failed

    def _expire(self, now: float) -> None:
        oldest = int(now // self._width) - _BUCKETS + 1
        for key in [k for k in self._buckets if k < oldest]:
            del self._buckets[key]
