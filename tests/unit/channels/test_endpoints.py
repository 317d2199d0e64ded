"""Per-endpoint guards: the concurrency limit queues and times out, and the endpoint map stays
bounded without forgetting a busy or failing endpoint."""

from __future__ import annotations

import asyncio

from channels.breaker import BreakerState
from channels.config import BreakerConfig
from channels.endpoints import ConcurrencyLimit, Endpoints


async def test_limit_admits_up_to_its_size_then_waits_then_times_out() -> None:
    limit = ConcurrencyLimit(2)
    assert await limit.acquire(0) and await limit.acquire(0)
    assert not await limit.acquire(0)  # full, no wait allowed
    assert not await limit.acquire(0.01)  # full, waited in vain
    waiter = asyncio.ensure_future(limit.acquire(5))
    await asyncio.sleep(0)
    assert limit.waiting == 1 and not limit.idle
    limit.release()
    assert await waiter
    assert limit.in_flight == 2 and limit.peak == 2 and limit.waiting == 0


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    limit = ConcurrencyLimit(1)
    assert await limit.acquire(0)
    waiter = asyncio.ensure_future(limit.acquire(5))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    limit.release()
    assert limit.idle and await limit.acquire(0)


async def test_the_map_forgets_the_least_recently_used_idle_endpoints_only() -> None:
    clock = [0.0]
    eps = Endpoints(BreakerConfig(failure_threshold=1), 4, 3, lambda: clock[0])
    busy = eps.get("a")
    assert await busy.limit.acquire(0)
    failing = eps.get("b")
    t = failing.breaker.admit()
    assert t is not None
    failing.breaker.failure(t)
    assert failing.breaker.state is BreakerState.OPEN
    eps.get("c")
    eps.get("d")  # over capacity: "c" is the only idle one
    assert len(eps) == 3 and eps.peek("c") is None
    assert eps.peek("a") is busy and eps.peek("b") is failing
    assert eps.get("a") is busy  # known endpoints keep their state


def test_transitions_are_reported_with_the_endpoint() -> None:
    seen: list[tuple[str, str]] = []
    eps = Endpoints(
        BreakerConfig(failure_threshold=1),
        1,
        10,
        lambda: 0.0,
        lambda key, old, new, why: seen.append((key, new.value)),
    )
    b = eps.get("http://x:80").breaker
    t = b.admit()
    assert t is not None
    b.failure(t)
    assert seen == [("http://x:80", "open")]
