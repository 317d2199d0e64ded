"""The built-in channels by name, for the node to open the ones its config names."""

from __future__ import annotations

from channels.base import Channel
from channels.config import ChannelsConfig
from channels.console import ConsoleChannel
from channels.email import EmailChannel
from channels.null import NullChannel
from channels.push import PushChannel
from channels.sms import SmsChannel
from channels.webhook import WebhookChannel

BUILT_IN: tuple[str, ...] = ("webhook", "console", "null", "email", "sms", "push")
# channels the node makes itself, wired to its log: inapp appends to __inapp (channels/inapp.py)
WIRED_BY_NODE: tuple[str, ...] = ("inapp",)


def make_channel(name: str, config: ChannelsConfig | None = None) -> Channel:
    """A new channel ``name`` configured from ``config`` (defaults when None); the caller owns
    it and must ``await channel.close()``. Opens no connection until the first send, so it can
    be made outside a running loop. Raises ``KeyError`` for a name not in :data:`BUILT_IN`."""
    cfg = config or ChannelsConfig()
    if name == "webhook":
        return WebhookChannel(cfg.webhook)
    if name == "console":
        return ConsoleChannel(cfg.console)
    if name == "null":
        return NullChannel()
    if name == "email":
        return EmailChannel(cfg.email)
    if name == "sms":
        return SmsChannel(cfg.sms)
    if name == "push":
        return PushChannel(cfg.apns, cfg.fcm)
    raise KeyError(f"no channel named {name!r} (built in: {', '.join(BUILT_IN)})")
