"""HTTP answers become the right outcome, and Retry-After in both its forms is honoured,
capped, and never trusted blindly."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels.base import Delivered, Permanent, Retry
from channels.responses import classify, detail_of, parse_retry_after

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("status", "kind", "reason", "invalidates", "health"),
    [
        (200, Delivered, None, None, "success"),
        (202, Delivered, None, None, "success"),
        (204, Delivered, None, None, "success"),
        (301, Permanent, "redirect", None, "success"),
        (307, Permanent, "redirect", None, "success"),
        (400, Permanent, "http_400", None, "success"),
        (401, Permanent, "http_401", None, "success"),
        (404, Permanent, "http_404", None, "success"),
        (413, Permanent, "http_413", None, "success"),
        (410, Permanent, "gone", "endpoint", "success"),
        (408, Retry, "http_408", None, "failure"),
        (429, Retry, "http_429", None, "failure"),
        (500, Retry, "http_500", None, "failure"),
        (502, Retry, "http_502", None, "failure"),
        (503, Retry, "http_503", None, "failure"),
        (504, Retry, "http_504", None, "failure"),
        (599, Retry, "http_599", None, "failure"),
    ],
)
def test_status_classes(
    status: int, kind: type, reason: str | None, invalidates: str | None, health: str
) -> None:
    outcome, h = classify(status, None, now=NOW, max_retry_after_s=3600)
    assert type(outcome) is kind and h == health
    if isinstance(outcome, (Retry, Permanent)):
        assert outcome.reason == reason
    if isinstance(outcome, Permanent):
        assert outcome.invalidates == invalidates


def test_retry_after_is_honoured_on_429_and_503_and_capped() -> None:
    for status in (429, 503):
        outcome, _ = classify(status, "7", now=NOW, max_retry_after_s=3600)
        assert isinstance(outcome, Retry) and outcome.after_s == 7
    outcome, _ = classify(429, "86400", now=NOW, max_retry_after_s=3600)
    assert isinstance(outcome, Retry) and outcome.after_s == 3600


def test_a_redirect_names_its_location_and_is_not_followed() -> None:
    outcome, _ = classify(301, None, now=NOW, max_retry_after_s=1, location="https://x/y")
    assert isinstance(outcome, Permanent) and "https://x/y" in outcome.detail


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("1.5", 1.5),
        ("0", 0.0),
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),
        (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),  # in the past: now
        (email.utils.formatdate(NOW + 10**6, usegmt=True), 3600.0),  # capped
        ("99999999999999", 3600.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("inf", None),
        ("nan", None),
        ("1e3", None),
        ("Sun, 06 Nov 1994 08:49:37", None),  # no zone: not an HTTP-date
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW, cap_s=3600) == expected


@given(st.text(max_size=200))
def test_parse_retry_after_never_raises_and_stays_in_bounds(value: str) -> None:
    after = parse_retry_after(value, now=NOW, cap_s=60)
    assert after is None or 0 <= after <= 60


def test_detail_is_one_short_line() -> None:
    assert detail_of(503, b"") == "HTTP 503"
    assert detail_of(400, b'{"error":\n  "bad"}') == 'HTTP 400: {"error": "bad"}'
    long = detail_of(500, b"x" * 10_000)
    assert len(long) < 220 and long.endswith("...")
    assert detail_of(200, b"ok", truncated=True).endswith("ok...")
    assert "\ufffd" in detail_of(500, b"\xff\xfe")
