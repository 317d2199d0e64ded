"""The I/O threads of the partitions' flush jobs (``storage/io_threads.py``): jobs run off the
loop, their reports run on it, and reports that pile up share one wake-up of the loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest

from storage.flush import Event, Job
from storage.io_threads import IoThreads


async def test_a_job_runs_on_a_thread_and_its_report_on_the_loop() -> None:
    io = IoThreads(2)
    loop_thread = threading.get_ident()
    seen: list[tuple[str, int]] = []
    done = asyncio.get_running_loop().create_future()

    def job(arg: int) -> None:
        seen.append(("job", threading.get_ident()))
        io.report(reported, arg + 1)

    def reported(value: int) -> None:
        seen.append(("report", threading.get_ident()))
        done.set_result(value)

    try:
        io.submit(job, 41)
        assert await asyncio.wait_for(done, 5) == 42
        assert seen[0][0] == "job" and seen[0][1] != loop_thread
        assert seen[1] == ("report", loop_thread)
    finally:
        io.close()


async def test_reports_made_before_the_loop_drains_them_share_one_wake_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    wakeups = 0
    real = loop.call_soon_threadsafe

    def counting(*args: Any) -> asyncio.Handle:
        nonlocal wakeups
        wakeups += 1
        return real(*args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    io = IoThreads(4)
    reported: list[int] = []
    reports = threading.Semaphore(0)

    def job(arg: int) -> None:
        io.report(reported.append, arg)
        reports.release()

    try:
        for i in range(4):
            io.submit(job, i)
        # hold the loop until the four have reported: none of them can be drained yet
        for _ in range(4):
            assert reports.acquire(timeout=5)
        assert reported == []
        for _ in range(3):
            await asyncio.sleep(0)
        assert sorted(reported) == [0, 1, 2, 3]
        assert wakeups == 1
    finally:
        io.close()


async def test_threads_start_only_when_all_are_busy_and_never_past_the_limit() -> None:
    io = IoThreads(3)
    release = threading.Event()
    started = threading.Semaphore(0)

    def blocked(_arg: None) -> None:
        started.release()
        release.wait(5)

    try:
        assert io.threads == 0  # nothing started before the first job
        for _ in range(5):
            io.submit(blocked, None)
        for _ in range(3):
            assert await asyncio.to_thread(started.acquire, True, 5)
        assert io.threads == 3  # five jobs, three threads: two jobs wait for one
        release.set()
        for _ in range(2):
            assert await asyncio.to_thread(started.acquire, True, 5)
        assert io.threads == 3
    finally:
        release.set()
        io.close()


async def test_close_runs_the_queued_jobs_then_stops_every_thread() -> None:
    io = IoThreads(2)
    ran: list[int] = []
    for i in range(6):
        io.submit(ran.append, i)
    io.close()
    assert sorted(ran) == list(range(6))
    assert all(not w.is_alive() for w in io._workers)
    io.close()  # idempotent


async def test_a_job_that_raises_is_logged_and_its_thread_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    io = IoThreads(1)
    done = threading.Event()

    def broken(_arg: None) -> None:
        raise RuntimeError("a bug")

    try:
        with caplog.at_level(logging.ERROR, logger="herald.storage"):
            io.submit(broken, None)
            io.submit(lambda _arg: done.set(), None)
            assert await asyncio.to_thread(done.wait, 5)
        assert "event=io_job_crashed" in caplog.text
        assert io.threads == 1
    finally:
        io.close()


def test_a_write_then_sync_jobs_write_outcome_is_taken_exactly_once() -> None:
    for _ in range(200):
        job = Job(Event.WRITE_THEN_SYNC, [], (0, 0, 0))
        wins: list[bool] = []
        go = threading.Barrier(2)

        def claim(job: Job = job, wins: list[bool] = wins, go: threading.Barrier = go) -> None:
            go.wait(5)
            wins.append(job.claim_written())

        threads = [threading.Thread(target=claim) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(wins) == [False, True]
        assert not job.claim_written()


async def test_the_inline_cool_down_doubles_while_slow_jobs_keep_coming(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from storage.io_threads import INLINE_COOLDOWN_MAX_S, INLINE_COOLDOWN_S

    now = [100.0]
    io = IoThreads(1, inline_max_ms=5, clock=lambda: now[0])

    def cool_down() -> float:
        return float(caplog.records[-1].getMessage().rsplit("=", 1)[1])

    try:
        assert io.may_run_inline()
        lengths = []
        for _ in range(8):  # each time, a slow job soon after the cool-down ended
            io.ran_inline(0.010)
            lengths.append(cool_down())
            await asyncio.sleep(0)  # the next loop turn
            assert not io.may_run_inline()  # cooling down
            now[0] += lengths[-1]
            assert io.may_run_inline()  # over
            io.ran_inline(0.001)  # fast ones in between change nothing
            now[0] += 0.08
        assert lengths == [min(INLINE_COOLDOWN_S * 2**i, INLINE_COOLDOWN_MAX_S) for i in range(8)]
        assert lengths[0] == 1 and lengths[-1] == INLINE_COOLDOWN_MAX_S
        # a slow one a whole cool-down after the last ended: the disk was fine meanwhile
        now[0] += INLINE_COOLDOWN_MAX_S
        io.ran_inline(0.010)
        assert cool_down() == INLINE_COOLDOWN_S
        assert io.slow_inline_jobs == 9
    finally:
        io.close()
