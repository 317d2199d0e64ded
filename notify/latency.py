"""Time from an event's fan-out to its delivery, per channel, as fixed Prometheus buckets.

The brief's promises are latencies (in-app p99 under 5 s, email and SMS under 60 s), so a
channel's worker counts each first delivery into these buckets: from the delivery's
``created_ms`` (the fan-out made it, moments after the event was accepted) to the provider
taking it (or, in-app, the record appended and shown). Plain integers on the hot path (one
``bisect`` and two additions per delivery); ``/metrics`` turns them into a histogram
(``herald_notify_delivery_seconds``, ``herald/metrics.py``)."""

from __future__ import annotations

import bisect
from typing import Final

# seconds: tens of ms for in-app, seconds for push and webhooks, up to an hour for retries
BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
)  # fmt: skip


class Latency:
    """Counts per bucket (the last one: above every bound), the count and the sum."""

    __slots__ = ("count", "counts", "sum_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.count = 0
        self.sum_s = 0.0

    def observe(self, seconds: float, n: int = 1) -> None:
        seconds = max(seconds, 0.0)  # a clock step back reads as no wait, not a negative one
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += n
        self.count += n
        self.sum_s += seconds * n

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, count at or below it)`` pairs, ``+Inf`` last (Prometheus)."""
        out = []
        total = 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out
