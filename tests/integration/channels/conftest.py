"""Fixtures: a recording webhook receiver on 127.0.0.1, and webhook channels that may reach
it (127.0.0.1 is allowed explicitly, as a node's config would have to)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from channels.base import Delivery, WebhookAddress
from channels.config import BreakerConfig, WebhookConfig
from channels.webhook import WebhookChannel

from .receiver import Receiver

ChannelFactory = Callable[..., WebhookChannel]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def webhook_factory() -> AsyncIterator[ChannelFactory]:
    """``webhook_factory(**WebhookConfig fields, clock=..., resolver=...)``; 127.0.0.1 is
    allowed unless ``allow_networks`` says otherwise. Every channel is closed at teardown."""
    made: list[WebhookChannel] = []

    def make(**kw: Any) -> WebhookChannel:
        extra = {k: kw.pop(k) for k in ("clock", "monotonic", "resolver") if k in kw}
        kw.setdefault("allow_networks", ["127.0.0.1/32"])
        if isinstance(kw.get("breaker"), dict):
            kw["breaker"] = BreakerConfig(**kw["breaker"])
        channel = WebhookChannel(WebhookConfig(**kw), **extra)
        made.append(channel)
        return channel

    try:
        yield make
    finally:
        for channel in made:
            await channel.close()


def delivery(url: str, *secrets: str, delivery_id: str = "dlv-1", **kw: Any) -> Delivery:
    import msgspec

    from channels.signing import generate_secret

    fields: dict[str, Any] = {
        "tenant": "acme",
        "user": "u-1",
        "topic": "orders.shipped",
        "event_id": "evt-1",
        "created_ms": 1_764_000_000_123,
        "payload": msgspec.Raw(b'{"order":42,"items":["a","b"]}'),
    }
    fields.update(kw)
    return Delivery(
        delivery_id=delivery_id,
        address=WebhookAddress(url=url, secrets=secrets or (generate_secret(),)),
        **fields,
    )
