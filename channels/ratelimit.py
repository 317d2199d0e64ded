"""A token bucket per sender: pure, over an injected monotonic clock.

Carriers and providers limit how fast one sender (a phone number, a short code) may send: a
US long code about one message a second, toll-free and short codes more. Past it the
provider queues (and later fails) the messages or the carrier filters them. The SMS channel
keeps its own bucket per provider so it never sends faster than the sender's rate.

:meth:`TokenBucket.reserve` takes a token now or books the next free one (the level may go
below zero), returning how long the caller must wait for it: concurrent callers are served in
the order they asked, each told its own wait, with no polling. A caller that will not wait
that long gives the token back with :meth:`refund`.
"""

from __future__ import annotations

from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up. O(1) per call, a few bytes."""

    __slots__ = ("_clock", "_last", "_level", "burst", "rate")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._level = float(burst)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.burst, self._level + (now - self._last) * self.rate)
        self._last = now

    def reserve(self) -> float:
        """Take one token; seconds until it is really available (0: now)."""
        self._refill()
        self._level -= 1.0
        return 0.0 if self._level >= 0 else -self._level / self.rate

    def refund(self) -> None:
        """Give back a token :meth:`reserve` took (the caller did not send after all)."""
        self._refill()
        self._level = min(self.burst, self._level + 1.0)

    @property
    def level(self) -> float:
        """Tokens available now (negative: booked ahead)."""
        self._refill()
        return self._level
