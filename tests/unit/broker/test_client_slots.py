"""The producer's in-flight bound (``broker.client._Slots``): a semaphore that can also be
taken from a plain callback, first come first served."""

from __future__ import annotations

import asyncio

from broker.client import _Slots


async def test_slots_are_taken_without_awaiting_until_none_is_free() -> None:
    slots = _Slots(2)
    assert slots.take() and slots.take()
    assert not slots.take()
    slots.release()
    assert slots.take()


async def test_a_released_slot_goes_to_the_first_waiter_before_any_take() -> None:
    slots = _Slots(1)
    assert slots.take()
    order: list[str] = []

    async def waiter(name: str) -> None:
        await slots.acquire()
        order.append(name)

    first = asyncio.ensure_future(waiter("first"))
    second = asyncio.ensure_future(waiter("second"))
    await asyncio.sleep(0)
    slots.release()
    assert not slots.take(), "a take jumped the queue of waiters"
    await asyncio.sleep(0)
    assert order == ["first"]
    slots.release()
    await asyncio.wait_for(second, 1)
    assert order == ["first", "second"]
    await first


async def test_a_cancelled_waiter_does_not_keep_a_slot() -> None:
    slots = _Slots(1)
    assert slots.take()
    waiting = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    slots.release()
    assert slots.take()
    assert not slots.take()


async def test_a_slot_handed_to_a_waiter_cancelled_before_it_ran_is_given_back() -> None:
    slots = _Slots(1)
    assert slots.take()
    waiting = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # handed over: the waiter's future is resolved
    waiting.cancel()  # ...but it is cancelled before it resumes
    await asyncio.gather(waiting, return_exceptions=True)
    assert slots.take()
