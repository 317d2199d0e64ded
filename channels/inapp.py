"""The in-app channel: a delivery becomes a record of the ``__inapp`` topic, which every
WebSocket gateway reads and streams to the user's connected devices.

This module knows no gateway and no broker: the node gives it two callables.

- ``append(key, value)``: append one record to ``__inapp`` (keyed ``tenant\\0user``, so one
  user's messages keep their order on one partition) and return once it is durable. The
  gateway's reader indexes it into the user's inbox (backfill) and pushes it to the user's
  sessions; a retried or redone delivery is appended again and dropped there by its id.
- ``show(messages)`` (optional): hand messages to the gateway as their records are handed
  to the log, so a connected device gets them without waiting for ``__inapp``'s sync; the
  gateway's reader drops each again by its id when it reads the durable record. Called once
  per loop turn with that turn's messages.
- ``presence(tenant, user)``: how many devices of the user are connected to this node now.
  It only shapes the outcome's detail (``shown on 2 devices`` / ``offline: kept for
  backfill``): the message is in the inbox either way, so the delivery is ``delivered``.
  Whether an offline user also gets a push is the workflow's decision, made at fan-out with
  the same presence (``recipient.online``; docs/GATEWAY.md § Push fallback).

A failed append (the log full or stopping) is a retry: the core's backoff applies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec

from channels.base import Delivery, Outcome
from channels.errors import ChannelClosed

INAPP_TOPIC: Final = "__inapp"

log = logging.getLogger("herald.channels.inapp")

Append = Callable[[bytes, bytes], Awaitable[None]]
Presence = Callable[[str, str], int]
Show = Callable[[list["InAppMessage"]], None]


class InAppMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A record of ``__inapp``: one in-app notification for one user. ``id`` is the
    delivery id (stable across retries: what the gateway dedupes on and what the client's
    ``seen``/``read``/``archived`` name); ``payload`` the event's data as JSON bytes."""

    id: str
    tenant: str
    user: str
    event_id: str
    topic: str
    ts: int
    category: str | None = None
    priority: str = "normal"
    payload: msgspec.Raw = msgspec.Raw(b"null")


_encode = msgspec.json.Encoder().encode


def user_key(tenant: str, user: str) -> bytes:
    return f"{tenant}\0{user}".encode()


class InAppChannel:
    """``inapp``: appends each delivery to ``__inapp`` through ``append``."""

    name = "inapp"

    def __init__(
        self, append: Append, presence: Presence | None = None, show: Show | None = None
    ) -> None:
        self._append = append
        self._presence = presence
        self._show = show
        self._shown: list[InAppMessage] = []  # this loop turn's, for ``show``
        self._closed = False
        self.sent = 0

    def record(self, delivery: Delivery) -> tuple[str, bytes, bytes]:
        """The delivery's ``__inapp`` record (``topic, key, value``), for a worker that
        appends it with its batch's outputs (:class:`~channels.base.AppendsToLog`); the
        message goes to ``show`` at the end of this loop turn, with the turn's others."""
        if self._closed:
            raise ChannelClosed("the in-app channel is closed")
        self.sent += 1
        message = self._message(delivery)
        if self._show is not None:
            if not self._shown:
                asyncio.get_running_loop().call_soon(self._show_turn)
            self._shown.append(message)
        return INAPP_TOPIC, user_key(delivery.tenant, delivery.user), _encode(message)

    def _show_turn(self) -> None:
        shown, self._shown = self._shown, []
        if self._show is None or self._closed:
            return
        try:
            self._show(shown)
        except Exception:  # the reader shows them once their records are durable
            log.exception("event=inapp_show_failed messages=%d", len(shown))

    def recorded(self, delivery: Delivery) -> Outcome:
        """The outcome of a delivery whose record is appended: ``delivered`` (the message is
        in the inbox whether or not a device is connected; the detail says which)."""
        if self._closed:
            raise ChannelClosed("the in-app channel is closed")
        return self._outcome(delivery)

    async def send(self, delivery: Delivery) -> Outcome:
        if self._closed:
            raise ChannelClosed("the in-app channel is closed")
        try:
            await self._append(
                user_key(delivery.tenant, delivery.user), _encode(self._message(delivery))
            )
        except ChannelClosed:
            raise
        except Exception as exc:  # the log refused (full disk, stopping): try again later
            return Outcome.retry(None, "inapp_append_failed", detail=repr(exc)[:200])
        self.sent += 1
        return self._outcome(delivery)

    @staticmethod
    def _message(delivery: Delivery) -> InAppMessage:
        return InAppMessage(
            id=delivery.delivery_id,
            tenant=delivery.tenant,
            user=delivery.user,
            event_id=delivery.event_id,
            topic=delivery.topic,
            ts=delivery.created_ms,
            category=delivery.category,
            priority=delivery.priority,
            payload=delivery.payload,
        )

    def _outcome(self, delivery: Delivery) -> Outcome:
        devices = self._presence(delivery.tenant, delivery.user) if self._presence else 0
        if devices:
            return Outcome.delivered(detail=f"shown on {devices} connected device(s)")
        return Outcome.delivered(detail="user offline: kept in the inbox for backfill")

    async def close(self) -> None:
        self._closed = True
