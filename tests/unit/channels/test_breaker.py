"""The circuit breaker's transitions under an injected clock, and its invariants under any
sequence of calls (hypothesis state machine)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from channels.breaker import BreakerState, CircuitBreaker, Ticket
from channels.config import BreakerConfig
from channels.errors import TicketAlreadySettled


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**kw: int | float) -> tuple[CircuitBreaker, Clock, list[tuple[str, str, str]]]:
    clock = Clock()
    seen: list[tuple[str, str, str]] = []
    cfg = BreakerConfig(**kw)  # type: ignore[arg-type]
    breaker = CircuitBreaker(cfg, clock, lambda o, n, why: seen.append((o.value, n.value, why)))
    return breaker, clock, seen


def fail(b: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        t = b.admit()
        assert t is not None
        b.failure(t)


def succeed(b: CircuitBreaker) -> None:
    t = b.admit()
    assert t is not None
    b.success(t)


def test_opens_after_consecutive_failures_and_refuses_until_the_cool_down() -> None:
    b, clock, seen = make(failure_threshold=3, open_ms=1000)
    fail(b, 2)
    succeed(b)  # a success breaks the run
    fail(b, 2)
    assert b.state is BreakerState.CLOSED
    fail(b)
    assert b.state is BreakerState.OPEN and seen == [("closed", "open", "consecutive_failures:3")]
    assert b.admit() is None and b.retry_after() == pytest.approx(1.0)
    clock.now += 0.5
    assert b.admit() is None and b.retry_after() == pytest.approx(0.5)


def test_half_open_lets_one_probe_through_and_closes_on_its_success() -> None:
    b, clock, seen = make(failure_threshold=1, open_ms=1000)
    fail(b)
    clock.now += 1.0
    probe = b.admit()
    assert probe is not None and probe.probe and b.state is BreakerState.HALF_OPEN
    assert b.admit() is None  # one probe at a time
    b.success(probe)
    assert b.state is BreakerState.CLOSED
    assert [s[1] for s in seen] == ["open", "half_open", "closed"]
    assert b.admit() is not None


def test_a_failed_probe_reopens_with_a_doubled_cool_down_up_to_the_maximum() -> None:
    b, clock, _ = make(failure_threshold=1, open_ms=1000, max_open_ms=3000)
    fail(b)
    for expected in (2.0, 3.0, 3.0):
        clock.now += b.retry_after()
        probe = b.admit()
        assert probe is not None
        b.failure(probe)
        assert b.state is BreakerState.OPEN and b.retry_after() == pytest.approx(expected)
    clock.now += 3.0
    b.success(b.admit())  # type: ignore[arg-type]
    fail(b)  # closed, then a failure: the cool-down is back to open_ms
    assert b.retry_after() == pytest.approx(1.0)


def test_a_released_probe_frees_its_slot() -> None:
    b, clock, _ = make(failure_threshold=1, open_ms=1000)
    fail(b)
    clock.now += 1
    probe = b.admit()
    assert probe is not None and b.admit() is None
    b.release(probe)
    assert b.state is BreakerState.HALF_OPEN
    assert b.admit() is not None


def test_failure_rate_opens_a_breaker_that_never_sees_a_run_of_failures() -> None:
    b, _, seen = make(failure_threshold=5, failure_rate=0.5, rate_min_calls=10)
    for _ in range(4):
        fail(b)
        succeed(b)
    assert b.state is BreakerState.CLOSED  # 4 failures of 8 calls: under min calls
    fail(b)
    succeed(b)
    assert b.state is BreakerState.CLOSED  # 5 of 10 checked on failure only; this was a success
    fail(b)
    assert b.state is BreakerState.OPEN and seen[-1][2] == "failure_rate:6/11"


def test_the_rate_window_forgets_old_calls() -> None:
    b, clock, _ = make(
        failure_threshold=100, failure_rate=0.5, rate_min_calls=4, rate_window_ms=10_000
    )
    fail(b, 3)
    clock.now += 11
    assert b.failure_rate() == (0, 0)
    fail(b, 3)
    assert b.state is BreakerState.CLOSED
    fail(b)
    assert b.state is BreakerState.OPEN


def test_a_stale_ticket_does_not_count() -> None:
    b, clock, _ = make(failure_threshold=2, open_ms=1000)
    slow = b.admit()
    assert slow is not None
    fail(b, 2)
    b.success(slow)  # admitted while closed, answered after the breaker opened
    assert b.state is BreakerState.OPEN
    clock.now += 1
    probe = b.admit()
    late = Ticket(generation=0, probe=False)
    b.failure(late)
    assert b.state is BreakerState.HALF_OPEN
    assert probe is not None


def test_settling_a_ticket_twice_is_refused() -> None:
    b, _, _ = make()
    t = b.admit()
    assert t is not None
    b.success(t)
    with pytest.raises(TicketAlreadySettled):
        b.failure(t)


def test_failing_since_spans_failures_and_resets_on_success_or_after_a_long_gap() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=1000), clock, streak_gap_s=100)
    assert b.failing_since is None
    fail(b)
    start = clock.now
    clock.now += 60
    fail(b)
    assert b.failing_since == start
    clock.now += 101  # silence longer than the gap: a new span
    fail(b)
    assert b.failing_since == clock.now
    succeed(b)
    assert b.failing_since is None


class BreakerMachine(RuleBasedStateMachine):
    """Any interleaving of admits, settlements and time passing keeps the breaker sane."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.cfg = BreakerConfig(
            failure_threshold=3,
            open_ms=1000,
            max_open_ms=4000,
            half_open_probes=2,
            rate_min_calls=5,
        )
        self.b = CircuitBreaker(self.cfg, self.clock)
        self.open: list[Ticket] = []

    @rule()
    def admit(self) -> None:
        state = self.b.state
        t = self.b.admit()
        if state is BreakerState.CLOSED:
            assert t is not None and not t.probe
        elif state is BreakerState.OPEN:
            assert t is None
        if t is not None:
            self.open.append(t)

    @rule(data=st.data(), how=st.sampled_from(["success", "failure", "release"]))
    def settle(self, data: st.DataObject, how: str) -> None:
        if not self.open:
            return
        t = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        getattr(self.b, how)(t)

    @rule(seconds=st.floats(0, 5))
    def wait(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def probes_within_limit(self) -> None:
        assert 0 <= self.b._probes_out <= self.cfg.half_open_probes
        assert 0 <= self.b.retry_after() <= self.cfg.max_open_ms / 1000


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
