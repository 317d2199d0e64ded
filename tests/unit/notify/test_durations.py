"""Durations and clock times (``notify/durations.py``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import InvalidRequest
from notify.durations import (
    DAY,
    HOUR,
    MINUTE,
    SECOND,
    WEEK,
    format_clock,
    format_duration,
    parse_clock,
    parse_duration,
)


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("30s", 30 * SECOND),
        ("10m", 10 * MINUTE),
        ("1h", HOUR),
        ("7d", 7 * DAY),
        ("2w", 2 * WEEK),
        ("1h30m", 90 * MINUTE),
        ("1d12h", 36 * HOUR),
        ("90m", 90 * MINUTE),
    ],
)
def test_durations(text: str, ms: int) -> None:
    assert parse_duration(text, field="f", max_ms=30 * DAY) == ms


@pytest.mark.parametrize(
    "text", ["", "10", "m", "1.5h", "10 m", "-1h", "30m1h", "1h1h", "1H", "10ms", "1y", "1" * 10]
)
def test_not_durations_are_refused_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_duration(text, field="steps[2].batch.window", max_ms=DAY)
    assert caught.value.field == "steps[2].batch.window"


def test_bounds_are_inclusive_and_named() -> None:
    assert parse_duration("1s", field="f", max_ms=DAY) == SECOND
    assert parse_duration("1d", field="f", max_ms=DAY) == DAY
    with pytest.raises(InvalidRequest, match=r"outside 1s\.\.1d"):
        parse_duration("25h", field="f", max_ms=DAY)
    with pytest.raises(InvalidRequest, match=r"outside 1m\.\.1d"):
        parse_duration("30s", field="f", min_ms=MINUTE, max_ms=DAY)
    with pytest.raises(InvalidRequest):
        parse_duration(60, field="f", max_ms=DAY)


@given(st.integers(min_value=1, max_value=10**6).map(lambda s: s * SECOND))
def test_format_then_parse_is_the_identity(ms: int) -> None:
    assert parse_duration(format_duration(ms), field="f", max_ms=10**7 * SECOND) == ms


def test_clock_times() -> None:
    assert parse_clock("00:00", field="q") == 0
    assert parse_clock("22:30", field="q") == 22 * 60 + 30
    assert parse_clock("23:59", field="q") == 23 * 60 + 59
    assert format_clock(7 * 60 + 5) == "07:05"
    for bad in ("24:00", "7:00", "07:60", "0700", "", None, 700):
        with pytest.raises(InvalidRequest) as caught:
            parse_clock(bad, field="quiet_hours.start")
        assert caught.value.field == "quiet_hours.start"
