"""HTTP answers to outcomes: pure classification any HTTP channel can share.

The table (Standard Webhooks' sender rules, and Courier's for 408):

========================  ============================================  ===============
status                    outcome                                       breaker
========================  ============================================  ===============
2xx                       delivered                                     success
3xx                       permanent ``redirect`` (never followed)       success
408                       retry ``http_408`` (the receiver timed out     failure
                          reading us: sending again can work)
410                       permanent ``gone``, invalidates the endpoint  success
429                       retry after Retry-After (capped)              failure
other 4xx                 permanent ``http_<status>``                   success
5xx                       retry after Retry-After if given (capped)     failure
anything else             retry ``http_<status>``                       failure
========================  ============================================  ===============

"breaker" says what the answer tells about the endpoint's health: a 404 comes from a live
server (the breaker stays closed), a 503 or a 429 from one that needs a rest.
"""

from __future__ import annotations

import email.utils
import re
from typing import Literal

from channels.base import Outcome

Health = Literal["success", "failure", "unknown"]
"""What one attempt says about the endpoint, for its circuit breaker: ``unknown`` when the
request never left (refused by policy, no free slot) or the caller was cancelled."""

_SECONDS = re.compile(r"\s*(\d{1,15}(?:\.\d{1,9})?)\s*")
DETAIL_CHARS = 200


def parse_retry_after(value: str | None, *, now: float, cap_s: float) -> float | None:
    """Seconds to wait from a Retry-After value: delay-seconds or an HTTP-date (RFC 9110
    section 10.2.3), clamped to ``[0, cap_s]``; ``None`` when absent or unreadable. ``now`` is
    wall-clock Unix seconds (an HTTP-date is wall-clock time)."""
    if not value:
        return None
    if m := _SECONDS.fullmatch(value):
        return min(float(m.group(1)), cap_s)
    if len(value) > 64:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    return min(max(0.0, when.timestamp() - now), cap_s)


def detail_of(status: int, body: bytes, *, truncated: bool = False) -> str:
    """``HTTP 503: <the body's first characters>``, on one line."""
    text = " ".join(body[: DETAIL_CHARS * 4].decode("utf-8", "replace").split())
    if len(text) > DETAIL_CHARS or truncated:
        text = text[:DETAIL_CHARS] + "..."
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def classify(
    status: int,
    retry_after: str | None,
    *,
    now: float,
    max_retry_after_s: float,
    detail: str = "",
    location: str | None = None,
) -> tuple[Outcome, Health]:
    """The outcome of one HTTP answer and what it says about the endpoint's health."""
    detail = detail or f"HTTP {status}"
    if 200 <= status < 300:
        return Outcome.delivered(None, detail=detail), "success"
    if 300 <= status < 400:
        if location:
            detail = f"{detail} (Location: {location[:DETAIL_CHARS]})"
        return Outcome.permanent("redirect", None, detail=detail), "success"
    if status == 410:
        return Outcome.permanent("gone", "endpoint", detail=detail), "success"
    if status == 429 or status == 408 or status >= 500 or status < 200:
        after = parse_retry_after(retry_after, now=now, cap_s=max_retry_after_s)
        return Outcome.retry(after, f"http_{status}", detail=detail), "failure"
    return Outcome.permanent(f"http_{status}", None, detail=detail), "success"
