"""Sliding-window counters (``notify/windows.py``): agreement with a log of every send
(hypothesis), bounded state, idempotent repeats, pruning."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from notify import windows as w
from notify.model import SendLog, UserWindows

HOUR = 3_600_000


def test_a_cap_of_three_per_hour() -> None:
    log = None
    answers = []
    for t in (0, 10, 20, 30, HOUR - 1, HOUR, HOUR + 10, HOUR + 11):
        ok, log = w.admit(log, max=3, per_ms=HOUR, now_ms=t, tag=t + 1)
        answers.append(ok)
    # 0, 10, 20 fit; 30 and HOUR-1 do not; at HOUR the send at 0 has left the window
    assert answers == [True, True, True, False, False, True, True, False]
    assert log.times == [20, HOUR, HOUR + 10]
    assert w.next_slot_ms(log, max=3, per_ms=HOUR, now_ms=HOUR + 11) == 20 + HOUR


def test_the_same_delivery_counts_once() -> None:
    ok1, log = w.admit(None, max=2, per_ms=HOUR, now_ms=0, tag=7)
    ok2, log = w.admit(log, max=2, per_ms=HOUR, now_ms=5, tag=7)  # the fan-out redone
    assert ok1 and ok2
    assert w.count(log, per_ms=HOUR, now_ms=5) == 1
    ok3, log = w.admit(log, max=2, per_ms=HOUR, now_ms=6, tag=8)
    ok4, _ = w.admit(log, max=2, per_ms=HOUR, now_ms=7, tag=7)  # full, but already in
    assert ok3 and ok4


def test_charge_keeps_counts_and_drops_finished_windows() -> None:
    caps = [w.Charge("cap:a", 2, HOUR), w.Charge("cap:b", 1, 10)]
    state = w.charge(None, caps, now_ms=0, tag=1)
    assert set(state.logs) == {"cap:a", "cap:b"}
    state = w.charge(state, caps[:1], now_ms=100, tag=2)
    assert "cap:b" not in state.logs  # its 10 ms window ended
    state = w.charge(state, caps[:1], now_ms=200, tag=3)  # full: stays at its max
    assert state.logs["cap:a"].times == [0, 100]
    assert w.prune(state, now_ms=HOUR + 100).logs == {}


def test_logs_per_user_are_bounded() -> None:
    state: UserWindows | None = None
    for i in range(w.MAX_LOGS + 10):
        state = w.charge(state, [w.Charge(f"k{i}", 1, HOUR + i)], now_ms=0, tag=i)
    assert state is not None and len(state.logs) == w.MAX_LOGS
    assert "k0" not in state.logs and f"k{w.MAX_LOGS + 9}" in state.logs  # latest expiry kept


@settings(max_examples=300, deadline=None)
@given(
    max_=st.integers(1, 5),
    per=st.integers(1, 50),
    steps=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 6)), max_size=60),
)
def test_admit_agrees_with_a_log_of_every_send(
    max_: int, per: int, steps: list[tuple[int, int]]
) -> None:
    """Times mostly move forward (a gap of 0-20), sometimes back by a few ms; tags repeat.
    A send that left the window stays out of it even if the clock then moves back."""
    now = 1000
    log: SendLog | None = None
    every: list[tuple[int, int]] = []  # (time, tag) of every admitted send not yet expired
    for gap, tag in steps:
        now += gap - 3
        every = [(t, g) for t, g in every if now - per < t]
        in_window = every
        repeat = any(g == tag for _t, g in in_window)
        expected = repeat or len(in_window) < max_
        ok, log = w.admit(log, max=max_, per_ms=per, now_ms=now, tag=tag)
        assert ok is expected
        if ok and not repeat:
            every.append((now, tag))
        assert len(log.times) <= max_
        assert log.times == sorted(log.times)
        assert w.count(log, per_ms=per, now_ms=now) == min(
            max_, len([t for t, _g in every if now - per < t])
        )
