"""The console channel: one structured log line per delivery (``make serve``'s default, so a
node run by hand shows its notifications without any receiver).

::

    event=delivery channel=console delivery_id=9f2c... tenant=default user=u1 topic=orders
    event_id=e-17 attempt=1 payload={"order":42}

(one line; wrapped here). Values holding spaces, quotes or ``=`` are written as JSON strings,
so the line stays ``key=value`` pairs; the payload is compacted and cut at
``max-payload-bytes``.
"""

from __future__ import annotations

import logging

import msgspec

from channels.base import Delivered, Delivery, Outcome
from channels.config import ConsoleConfig
from channels.errors import ChannelClosed

_DELIVERED = Delivered(provider_message_id=None, detail="console")


def logfmt_value(value: str) -> str:
    """``value`` as it can stand after ``key=`` in a logfmt line."""
    if value and not any(c.isspace() or c in '"=\\' for c in value):
        return value
    return msgspec.json.encode(value).decode()


def compact_payload(delivery: Delivery, limit: int) -> str:
    """The payload (and a digest's activity count) on one line, cut at ``limit`` bytes."""
    raw = bytes(delivery.payload)
    try:
        text = msgspec.json.format(raw, indent=-1).decode()
    except msgspec.DecodeError:
        text = raw.decode("utf-8", "replace")
    if len(text) > limit:
        text = text.encode()[:limit].decode("utf-8", "ignore") + "..."
    return text


class ConsoleChannel:
    """Logs each delivery at INFO on ``herald.channels.console`` and answers ``delivered``."""

    name = "console"

    def __init__(
        self, config: ConsoleConfig | None = None, *, logger: logging.Logger | None = None
    ) -> None:
        self.config = config or ConsoleConfig()
        self._log = logger or logging.getLogger("herald.channels.console")
        self._closed = False

    async def send(self, delivery: Delivery) -> Outcome:
        if self._closed:
            raise ChannelClosed("the console channel is closed")
        d = delivery
        fields = [
            ("delivery_id", d.delivery_id),
            ("tenant", d.tenant),
            ("user", d.user),
            ("topic", d.topic),
            ("event_id", d.event_id),
            ("attempt", str(d.attempt)),
        ]
        if d.category is not None:
            fields.append(("category", d.category))
        if d.activities is not None:
            fields.append(("activities", str(len(d.activities))))
        fields.append(("payload", compact_payload(d, self.config.max_payload_bytes)))
        pairs = " ".join(f"{k}={logfmt_value(v)}" for k, v in fields)
        self._log.info("event=delivery channel=console %s", pairs)
        return _DELIVERED

    async def close(self) -> None:
        self._closed = True
