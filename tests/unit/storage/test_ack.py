"""The acknowledgement future (storage/ack.py): its direct callback runs when it resolves."""

from __future__ import annotations

import asyncio

import pytest

from storage.ack import Ack


async def test_the_direct_callback_runs_when_the_result_is_set_before_any_loop_callback() -> None:
    ack = Ack(loop=asyncio.get_running_loop())
    order: list[str] = []
    ack.add_done_callback(lambda f: order.append("loop callback"))
    ack.when_done(lambda f: order.append(f"direct, result {f.result()}"))
    ack.set_result(None)
    order.append("after set_result")
    assert order == ["direct, result None", "after set_result"]
    await asyncio.sleep(0)
    assert order[-1] == "loop callback"  # the ordinary callbacks keep their turn
    assert await ack is None


async def test_the_direct_callback_hears_of_a_failure_and_of_a_cancel() -> None:
    loop = asyncio.get_running_loop()
    seen: list[BaseException | None] = []
    failed, cancelled = Ack(loop=loop), Ack(loop=loop)
    failed.when_done(lambda f: seen.append(f.exception()))
    cancelled.when_done(lambda f: seen.append(None if f.cancelled() else f.exception()))
    error = OSError(28, "No space left on device")
    failed.set_exception(error)
    assert cancelled.cancel()
    assert seen == [error, None]
    assert cancelled.cancelled()
    with pytest.raises(OSError):
        await failed


async def test_a_direct_callback_given_to_a_resolved_ack_runs_at_once() -> None:
    ack = Ack(loop=asyncio.get_running_loop())
    ack.set_result(None)
    calls: list[Ack] = []
    ack.when_done(calls.append)
    assert calls == [ack]


async def test_a_direct_callback_runs_once_and_one_that_raises_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ack = Ack(loop=asyncio.get_running_loop())
    calls = 0

    def boom(f: Ack) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug in the callback")

    ack.when_done(boom)
    ack.set_result(None)  # the resolver goes on: the failure is the callback's alone
    assert ack.done() and ack.result() is None
    assert ack.cancel() is False  # already done: nothing is called again
    assert calls == 1
    assert "event=ack_callback_failed" in caplog.text
