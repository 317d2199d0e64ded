"""The loop-stall log (herald/stalls.py): a loop kept from running is logged, with how much
of that time its thread spent on the CPU."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest

from herald.stalls import StallLog

# bounds on the node's CPU time or latency: run alone, after the parallel pass (make test)
pytestmark = pytest.mark.serial


def stall_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[float, float]]:
    out = []
    for r in caplog.records:
        m = re.fullmatch(r"event=loop_stall ms=([\d.]+) cpu_ms=([\d.]+)", r.getMessage())
        if m:
            out.append((float(m.group(1)), float(m.group(2))))
    return out


async def test_a_loop_blocked_off_the_cpu_is_logged_with_little_cpu_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="herald.node")
    stalls = StallLog(threshold_ms=20, tick_ms=5).start()
    try:
        await asyncio.sleep(0.03)  # ticks on time: nothing logged
        assert stall_lines(caplog) == []
        time.sleep(0.15)  # the loop thread blocked in a system call (as on a slow disk)
        await asyncio.sleep(0.03)
        # (a busy machine may add stalls of its own: look for this one)
        lines = [(ms, cpu) for ms, cpu in stall_lines(caplog) if ms >= 100]
        assert len(lines) == 1 and stalls.stalls >= 1 and stalls.worst_ms >= 100
        ms, cpu_ms = lines[0]
        assert cpu_ms < ms / 2  # not the node's own work
    finally:
        stalls.stop()


async def test_a_loop_busy_with_a_long_callback_is_logged_with_its_cpu_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="herald.node")
    stalls = StallLog(threshold_ms=20, tick_ms=5).start()
    try:
        await asyncio.sleep(0.02)
        cpu0 = time.thread_time()
        while time.thread_time() - cpu0 < 0.1:  # 100 ms of CPU on the loop
            pass
        await asyncio.sleep(0.03)
        lines = [(ms, cpu) for ms, cpu in stall_lines(caplog) if cpu >= 100]
        assert len(lines) == 1  # every CPU millisecond the callback spent is counted
        ms, _cpu_ms = lines[0]
        assert ms >= 100 - 5
    finally:
        stalls.stop()


async def test_stop_ends_the_ticks() -> None:
    stalls = StallLog(threshold_ms=20, tick_ms=5).start()
    stalls.stop()
    time.sleep(0.05)
    await asyncio.sleep(0.02)
    assert stalls.stalls == 0
