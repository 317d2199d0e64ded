"""The backoff schedule (``notify/retry.py``): growing waits with bounded jitter, the tier
each wait goes to, Retry-After honoured, attempts exhausted after the last delay."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker.config import RetrySchedule
from notify.retry import max_attempts, next_attempt, tier_delays, tier_topic

DEFAULT = RetrySchedule()
NOW = 1_000_000


def test_the_default_is_8_attempts_over_about_a_day() -> None:
    assert max_attempts(DEFAULT) == 8
    total = sum(DEFAULT.delays_ms)
    assert 20 * 3_600_000 <= total <= 26 * 3_600_000


def test_waits_grow_and_the_tier_is_the_longest_delay_not_above_the_wait() -> None:
    waits = []
    for attempt in range(1, 8):
        found = next_attempt(DEFAULT, attempt, NOW, rand=0.0)
        assert found is not None
        tier, due = found
        waits.append(due - NOW)
        assert tier == DEFAULT.delays_ms[attempt - 1]
    assert waits == sorted(waits) and len(set(waits)) == 7
    assert next_attempt(DEFAULT, 8, NOW, rand=0.5) is None


@given(st.integers(1, 7), st.floats(0, 0.999))
def test_jitter_stretches_a_wait_by_at_most_its_fraction(attempt: int, rand: float) -> None:
    found = next_attempt(DEFAULT, attempt, NOW, rand)
    assert found is not None
    tier, due = found
    base = DEFAULT.delays_ms[attempt - 1]
    assert base <= due - NOW <= base * (1 + DEFAULT.jitter)
    assert tier in tier_delays(DEFAULT) and tier <= due - NOW


def test_a_longer_retry_after_wins_and_picks_a_later_tier() -> None:
    found = next_attempt(DEFAULT, 1, NOW, rand=0.0, after_s=7200)
    assert found is not None
    tier, due = found
    assert due == NOW + 7_200_000 and tier == 7_200_000
    shorter = next_attempt(DEFAULT, 3, NOW, rand=0.0, after_s=1)
    assert shorter is not None and shorter[1] == NOW + DEFAULT.delays_ms[2]


def test_tier_topics_are_named_by_their_delay() -> None:
    assert [tier_topic("webhook", d) for d in tier_delays(DEFAULT)][:3] == [
        "__retry.webhook.1m",
        "__retry.webhook.5m",
        "__retry.webhook.15m",
    ]
