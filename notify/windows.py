"""Sliding-window counters for frequency caps and throttles. Pure: the caller passes the
time and stores the state.

A window of ``per_ms`` counts the sends at times ``t`` with ``now - per_ms < t``; a send is
allowed while fewer than ``max`` are counted (a send that left the window stays out of it,
even if a clock then moves back). The state (:class:`notify.model.SendLog`) keeps
only what can still matter: sends inside the window, at most ``max`` of them (once ``max``
are counted, older ones cannot change an answer). So a log costs at most ``max`` x ~10 bytes
and :func:`admit` O(``max``) time, whatever the traffic.

Each send carries a tag (32 bits of its delivery id, :func:`tag_of`): counting the same
delivery again, as a fan-out redone after a crash does, changes nothing.

A user's logs live in one :class:`notify.model.UserWindows` row keyed by a string (a cap's
scope, a throttle's step and key): :func:`charge` applies sends to it, drops logs whose
window is over, and keeps at most :data:`MAX_LOGS` logs (those expiring last).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Final, NamedTuple

import xxhash

from notify.model import SendLog, UserWindows

MAX_LOGS: Final = 64  # windows per user; beyond it the ones that expire first are dropped


def tag_of(delivery_id: str) -> int:
    """The 32-bit tag of a delivery id (collisions within one window are negligible)."""
    return xxhash.xxh32_intdigest(delivery_id.encode())


def _live(log: SendLog | None, per_ms: int, now_ms: int) -> tuple[list[int], list[int]]:
    if log is None:
        return [], []
    # a window narrowed since the log was written counts with the new width
    cut = bisect.bisect_right(log.times, now_ms - per_ms)
    return log.times[cut:], log.tags[cut:]


def count(log: SendLog | None, *, per_ms: int, now_ms: int) -> int:
    """How many sends of ``log`` fall in the window ending at ``now_ms``."""
    return len(_live(log, per_ms, now_ms)[0])


def next_slot_ms(log: SendLog | None, *, max: int, per_ms: int, now_ms: int) -> int:
    """The earliest time a send would be admitted (``now_ms`` if it would be now)."""
    times = _live(log, per_ms, now_ms)[0]
    if len(times) < max:
        return now_ms
    return times[-max] + per_ms


def admit(
    log: SendLog | None, *, max: int, per_ms: int, now_ms: int, tag: int | None = None
) -> tuple[bool, SendLog]:
    """Whether a send at ``now_ms`` fits under ``max`` per ``per_ms``, and the new state:
    with the send recorded if it fits, else only pruned. A ``tag`` already counted in the
    window answers True and records nothing (a repeat of the same delivery). Times may come
    out of order (clocks of different nodes): the log stays sorted."""
    times, tags = _live(log, per_ms, now_ms)
    if len(times) > max:
        times, tags = times[-max:], tags[-max:]
    if tag is not None and tag in tags:
        return True, SendLog(per_ms, times, tags)
    if len(times) >= max:
        return False, SendLog(per_ms, times, tags)
    at = bisect.bisect_right(times, now_ms)
    times = [*times[:at], now_ms, *times[at:]]
    tags = [*tags[:at], tag or 0, *tags[at:]]
    return True, SendLog(per_ms, times, tags)


class Charge(NamedTuple):
    """One window a send counts in: its key in :class:`UserWindows` and its limit."""

    key: str
    max: int
    per_ms: int


def charge(
    windows: UserWindows | None, charges: Iterable[Charge], *, now_ms: int, tag: int
) -> UserWindows:
    """``windows`` with one send at ``now_ms`` counted in each of ``charges`` (a window
    already full keeps its count: the send was decided on an older state, and the count
    cannot exceed ``max``). Logs whose window is over are dropped; at most :data:`MAX_LOGS`
    are kept, those that expire last."""
    logs = dict(windows.logs) if windows is not None else {}
    for c in charges:
        _ok, logs[c.key] = admit(
            logs.get(c.key), max=c.max, per_ms=c.per_ms, now_ms=now_ms, tag=tag
        )
    return UserWindows(logs=_prune(logs, now_ms))


def prune(windows: UserWindows, *, now_ms: int) -> UserWindows:
    """``windows`` without the logs whose window is over."""
    return UserWindows(logs=_prune(dict(windows.logs), now_ms))


def _expiry(log: SendLog) -> int:
    return log.times[-1] + log.per_ms if log.times else 0


def _prune(logs: dict[str, SendLog], now_ms: int) -> dict[str, SendLog]:
    live = {k: v for k, v in logs.items() if _expiry(v) > now_ms}
    if len(live) > MAX_LOGS:
        keep = sorted(live, key=lambda k: _expiry(live[k]), reverse=True)[:MAX_LOGS]
        live = {k: live[k] for k in sorted(keep)}
    return live
