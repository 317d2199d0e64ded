"""The null channel: accepts every delivery at once and keeps nothing (benchmarks, and the
fan-out's tests, where the channel must not be what is measured)."""

from __future__ import annotations

from channels.base import Delivered, Delivery, Outcome
from channels.errors import ChannelClosed

_DELIVERED = Delivered(provider_message_id=None, detail="null channel")


class NullChannel:
    """Answers ``delivered`` for everything; ``sent`` counts the deliveries it accepted."""

    name = "null"

    def __init__(self) -> None:
        self.sent = 0
        self._closed = False

    async def send(self, delivery: Delivery) -> Outcome:
        if self._closed:
            raise ChannelClosed("the null channel is closed")
        self.sent += 1
        return _DELIVERED

    def accept(self, count: int) -> Outcome:
        """Accept ``count`` deliveries at once (``channels.base.AcceptsAll``)."""
        if self._closed:
            raise ChannelClosed("the null channel is closed")
        self.sent += count
        return _DELIVERED

    async def close(self) -> None:
        self._closed = True
