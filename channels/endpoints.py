"""Per-endpoint guards: a circuit breaker and a concurrency limit for each endpoint a channel
talks to, kept in a bounded map.

An *endpoint* is whatever fails and overloads as one: for webhooks the origin (scheme, host,
port), since every URL on one server shares its fate; for a provider channel (SMS, push) the
provider itself, one :class:`Endpoint` for the channel. Any channel can use these.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterator

from channels.breaker import BreakerState, CircuitBreaker
from channels.config import BreakerConfig


class ConcurrencyLimit:
    """At most ``limit`` calls in flight; others wait, first come first served, up to a
    deadline. ``peak`` is the most ever in flight at once (for tests and metrics).

    Waiting costs one future per waiter; the wait is bounded by the caller's timeout, so a slow
    endpoint cannot gather an unbounded queue for longer than that.
    """

    __slots__ = ("_sem", "in_flight", "limit", "peak", "waiting")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sem = asyncio.Semaphore(limit)
        self.in_flight = 0
        self.waiting = 0
        self.peak = 0

    async def acquire(self, timeout_s: float) -> bool:
        """Take a slot, waiting at most ``timeout_s``; False if none came free in time."""
        if self._sem.locked():
            if timeout_s <= 0:
                return False
            self.waiting += 1
            try:
                async with asyncio.timeout(timeout_s):
                    await self._sem.acquire()
            except TimeoutError:
                return False
            finally:
                self.waiting -= 1
        else:
            await self._sem.acquire()  # a free slot: returns without suspending
        self.in_flight += 1
        if self.in_flight > self.peak:
            self.peak = self.in_flight
        return True

    def release(self) -> None:
        self.in_flight -= 1
        self._sem.release()

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self.waiting == 0


class Endpoint:
    """One endpoint's breaker and concurrency limit."""

    __slots__ = ("breaker", "key", "limit")

    def __init__(self, key: str, breaker: CircuitBreaker, limit: ConcurrencyLimit) -> None:
        self.key = key
        self.breaker = breaker
        self.limit = limit

    @property
    def idle(self) -> bool:
        """Nothing in flight, nobody waiting, and the breaker closed: safe to forget."""
        return self.limit.idle and self.breaker.state is BreakerState.CLOSED


EndpointTransition = Callable[[str, BreakerState, BreakerState, str], None]
"""``on_transition(endpoint_key, old, new, why)``."""


class Endpoints:
    """A bounded map endpoint key -> :class:`Endpoint`, created on first use.

    Past ``capacity`` entries the least recently used *idle* endpoint is forgotten (its breaker
    was closed, so nothing is lost but the rate window); busy or open ones are kept even past
    the capacity, so an outage across many endpoints stays visible. Memory: ~1 KiB per entry.
    """

    def __init__(
        self,
        breaker: BreakerConfig,
        concurrency: int,
        capacity: int,
        clock: Callable[[], float],
        on_transition: EndpointTransition | None = None,
        *,
        streak_gap_s: float = float("inf"),
    ) -> None:
        self._breaker = breaker
        self._streak_gap = streak_gap_s
        self._concurrency = concurrency
        self._capacity = capacity
        self._clock = clock
        self._on_transition = on_transition
        self._map: OrderedDict[str, Endpoint] = OrderedDict()

    def get(self, key: str) -> Endpoint:
        ep = self._map.get(key)
        if ep is not None:
            self._map.move_to_end(key)
            return ep
        breaker = CircuitBreaker(
            self._breaker, self._clock, self._reporter(key), streak_gap_s=self._streak_gap
        )
        ep = Endpoint(key, breaker, ConcurrencyLimit(self._concurrency))
        self._map[key] = ep
        if len(self._map) > self._capacity:
            self._evict()
        return ep

    def peek(self, key: str) -> Endpoint | None:
        """The endpoint if known, without creating it or touching its recency."""
        return self._map.get(key)

    def breaker_states(self) -> list[str]:
        """The breaker state of each endpoint known now (at most ``capacity``)."""
        return [ep.breaker.state.value for ep in self._map.values()]

    def __len__(self) -> int:
        return len(self._map)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(list(self._map.values()))

    def _evict(self) -> None:
        excess = len(self._map) - self._capacity
        victims: list[str] = []
        for key, ep in self._map.items():  # oldest first; usually stops at the first
            if ep.idle:
                victims.append(key)
                if len(victims) >= excess:
                    break
        for key in victims:
            del self._map[key]

    def _reporter(self, key: str) -> Callable[[BreakerState, BreakerState, str], None] | None:
        report = self._on_transition
        if report is None:
            return None

        def on_transition(old: BreakerState, new: BreakerState, why: str) -> None:
            report(key, old, new, why)

        return on_transition
