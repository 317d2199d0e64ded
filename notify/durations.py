"""Durations and clocks as the API writes them: ``"30s"``, ``"10m"``, ``"1h30m"``, ``"7d"``,
``"2w"``; ``"22:00"``. Pure: no clock, no I/O.

A duration is one or more ``<integer><unit>`` parts, units in decreasing order and each at
most once (``w``, ``d``, ``h``, ``m``, ``s``); every use bounds it (a delay of 40 years is a
typo, not a plan), and an error names the field it came from.
"""

from __future__ import annotations

import functools
import re
from typing import Final

from broker.errors import InvalidRequest

SECOND: Final = 1_000
MINUTE: Final = 60 * SECOND
HOUR: Final = 60 * MINUTE
DAY: Final = 24 * HOUR
WEEK: Final = 7 * DAY

_UNITS: Final = (("w", WEEK), ("d", DAY), ("h", HOUR), ("m", MINUTE), ("s", SECOND))
_DURATION: Final = re.compile(
    r"(?:(\d{1,9})w)?(?:(\d{1,9})d)?(?:(\d{1,9})h)?(?:(\d{1,9})m)?(?:(\d{1,9})s)?"
)
_CLOCK: Final = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
_MAX_TEXT: Final = 64


@functools.lru_cache(maxsize=4096)
def duration_ms(text: str) -> int | None:
    """Milliseconds of a duration text, None if it is not one. Unbounded and cached: for
    texts already validated by :func:`parse_duration` (stored preferences, workflows)."""
    if len(text) > _MAX_TEXT:
        return None
    m = _DURATION.fullmatch(text)
    if m is None or not text:
        return None
    return sum(int(n) * unit for n, (_u, unit) in zip(m.groups(), _UNITS, strict=True) if n)


def parse_duration(text: object, *, field: str, min_ms: int = SECOND, max_ms: int) -> int:
    """Milliseconds of ``text``, which must be a duration between ``min_ms`` and ``max_ms``
    inclusive. Raises :class:`InvalidRequest` naming ``field`` otherwise."""
    if not isinstance(text, str):
        raise InvalidRequest(
            f'{field}: a duration is text such as "30s", "10m", "1h" or "7d"', field=field
        )
    ms = duration_ms(text)
    if ms is None:
        raise InvalidRequest(
            f"{field}: {text[:_MAX_TEXT]!r} is not a duration "
            '(e.g. "30s", "10m", "1h30m", "7d", "2w")',
            field=field,
        )
    if ms < min_ms or ms > max_ms:
        raise InvalidRequest(
            f"{field}: {text} is outside {format_duration(min_ms)}..{format_duration(max_ms)}",
            field=field,
        )
    return ms


def format_duration(ms: int) -> str:
    """The canonical text of a duration of whole seconds (``5400000`` -> ``"1h30m"``); a
    remainder below a second is shown as ``"<n>ms"``."""
    if ms <= 0:
        return "0s"
    parts = []
    for unit, size in _UNITS:
        n, ms = divmod(ms, size)
        if n:
            parts.append(f"{n}{unit}")
    if ms:
        parts.append(f"{ms}ms")
    return "".join(parts)


def parse_clock(text: object, *, field: str) -> int:
    """Minutes since midnight of a wall-clock time ``"HH:MM"`` (``"00:00"`` to ``"23:59"``).
    Raises :class:`InvalidRequest` naming ``field`` otherwise."""
    m = _CLOCK.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise InvalidRequest(f'{field}: a time of day is "HH:MM", 00:00 to 23:59', field=field)
    return int(m.group(1)) * 60 + int(m.group(2))


def format_clock(minutes: int) -> str:
    """``"HH:MM"`` for minutes since midnight."""
    return f"{minutes // 60:02d}:{minutes % 60:02d}"
