"""What a channel sees and what it answers: pure types, no I/O.

The notifications core's delivery worker turns a record of ``__deliver.<channel>`` (plus the
recipient's address, looked up at send time so a retry goes to the current address) into a
:class:`Delivery`, awaits ``channel.send(delivery)`` and acts on the :class:`Outcome`:

- :class:`Delivered`: done; ``provider_message_id`` is the provider's id for the message, when
  the provider gives one.
- :class:`Retry`: a transient failure (throttled, provider down, timeout, connection lost, the
  endpoint's breaker open). ``after_s`` is the provider's own wish (Retry-After, already capped)
  or a breaker's remaining cool-down; ``None`` leaves the delay to the core's backoff schedule.
- :class:`Permanent`: retrying cannot help (a 4xx, a redirect, a refused address).
  ``invalidates`` names the contact data the core must mark invalid so later deliveries are not
  attempted: ``"endpoint"`` (a webhook URL), ``"token"`` (a push device token), ``"address"``
  (an e-mail address or phone number) or ``"consent"`` (the provider says the recipient
  revoked consent, e.g. Twilio's 21610 after a STOP: the core records a legal opt-out);
  ``None`` when the contact itself is fine. Any outcome may carry ``dead_tokens``: push
  device tokens found dead while sending to a user's several devices (one device got the
  notification, another's token is gone); the core invalidates each.

Every outcome carries a short, stable ``reason`` code (``http_503``, ``timeout``,
``circuit_open``, ``ssrf_refused``...) for the dead-letter record and the audit, and a
``detail`` with the provider's answer, shortened, for a human.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import msgspec

Invalidates = Literal["endpoint", "token", "address", "consent"]

JSON_NULL = msgspec.Raw(b"null")


class WebhookAddress(msgspec.Struct, frozen=True, kw_only=True, tag="webhook"):
    """Where a webhook goes: the user's endpoint URL and every secret that signs it.

    ``secrets`` are ``whsec_<base64>`` strings, newest first. During a rotation the endpoint
    holds the old and the new secret; each one signs, and the ``webhook-signature`` header
    carries one ``v1,`` signature per secret, so the receiver may switch at its own pace.
    """

    url: str
    secrets: tuple[str, ...]


class EmailAddress(msgspec.Struct, frozen=True, kw_only=True, tag="email"):
    """Where an e-mail goes: the user's address, and the links Herald serves for it.

    ``unsubscribe_url`` is the signed one-click URL (RFC 8058) for this user and this kind of
    mail, set by the core only for the categories that must carry one (marketing, subscribed
    mail); the channel then sends ``List-Unsubscribe`` and ``List-Unsubscribe-Post``. ``ref``
    is an opaque signed reference to the recipient (``X-Herald-Ref``), which a bounce
    processor hands back to ``POST /hooks/email/bounce``.
    """

    to: str
    unsubscribe_url: str | None = None
    ref: str | None = None


class EmailContent(msgspec.Struct, frozen=True, kw_only=True, tag="email"):
    """A rendered e-mail (the core renders the tenant's template): the subject, the plain
    text part and, when the template has one, the HTML part (already escaped)."""

    subject: str
    text: str
    html: str | None = None


class PushContent(msgspec.Struct, frozen=True, kw_only=True, tag="push"):
    """A rendered push notification: title and body, already cut to the limits."""

    title: str
    body: str


class SmsContent(msgspec.Struct, frozen=True, kw_only=True, tag="sms"):
    """A rendered text message: ``text`` fits in ``segments`` segments of ``encoding``
    (``gsm7`` or ``ucs2``); ``truncated`` says the rendered text was cut to fit."""

    text: str
    segments: int
    encoding: str
    truncated: bool = False


# What the core rendered for the channel; None for channels that send the event's data as it
# is (webhooks) or when no template applies.
Content = EmailContent | PushContent | SmsContent


class SmsAddress(msgspec.Struct, frozen=True, kw_only=True, tag="sms"):
    """Where a text message goes: the user's phone number (E.164, ``+14155550100``). ``ref``
    is an opaque signed reference to the delivery, which the channel adds to the message's
    ``StatusCallback`` URL so that its receipts name it (``POST /hooks/sms/status``)."""

    to: str
    ref: str | None = None


class PushDevice(msgspec.Struct, frozen=True, kw_only=True):
    """One registered device: its token and the service that issued it."""

    token: str
    platform: Literal["apns", "fcm"]


class PushAddress(msgspec.Struct, frozen=True, kw_only=True, tag="push"):
    """Where a push notification goes: every device of the user not found dead."""

    devices: tuple[PushDevice, ...]


# Where a delivery goes, one kind per channel; each is a tagged struct, so a channel can tell
# them apart.
Address = WebhookAddress | EmailAddress | SmsAddress | PushAddress


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """One notification to one user on one channel, as the channel sees it.

    ``delivery_id`` is stable across retries, replays and a fan-out redone after a crash: a
    channel sends it to the receiver as its idempotency key (``webhook-id``, ``apns-id``,
    e-mail ``Message-ID``). ``attempt`` counts from 1. ``payload`` is the event's data as JSON
    bytes, passed through without re-encoding (JSON ``null`` when the event had none; a Raw
    field cannot be optional in msgspec); ``activities`` are a closed batch's events (a
    digest), each JSON. ``content`` is what the core rendered from the tenant's template for
    this channel (None: nothing to render, e.g. webhooks). Times are Unix milliseconds.
    """

    delivery_id: str
    tenant: str
    user: str
    topic: str
    event_id: str
    created_ms: int
    attempt: int = 1
    first_attempt_ms: int | None = None
    priority: str = "normal"
    category: str | None = None
    payload: msgspec.Raw = JSON_NULL
    activities: tuple[msgspec.Raw, ...] | None = None
    address: Address | None = None
    content: Content | None = None


class Outcome(msgspec.Struct, frozen=True, kw_only=True, tag_field="outcome"):
    """What became of one attempt: :class:`Delivered`, :class:`Retry` or :class:`Permanent`.

    Build one with :meth:`delivered`, :meth:`retry` or :meth:`permanent`; dispatch with
    ``match`` on the three classes. Encodable with msgspec (the ``outcome`` field is the tag),
    so the core can store it with the attempt.
    """

    detail: str = ""
    dead_tokens: tuple[str, ...] = ()

    @staticmethod
    def delivered(
        provider_message_id: str | None = None,
        *,
        detail: str = "",
        dead_tokens: tuple[str, ...] = (),
    ) -> Delivered:
        return Delivered(
            provider_message_id=provider_message_id, detail=detail, dead_tokens=dead_tokens
        )

    @staticmethod
    def retry(
        after_s: float | None, reason: str, *, detail: str = "", dead_tokens: tuple[str, ...] = ()
    ) -> Retry:
        return Retry(after_s=after_s, reason=reason, detail=detail, dead_tokens=dead_tokens)

    @staticmethod
    def permanent(
        reason: str,
        invalidates: Invalidates | None = None,
        *,
        detail: str = "",
        dead_tokens: tuple[str, ...] = (),
    ) -> Permanent:
        return Permanent(
            reason=reason, invalidates=invalidates, detail=detail, dead_tokens=dead_tokens
        )


class Delivered(Outcome, frozen=True, kw_only=True, tag="delivered"):
    provider_message_id: str | None = None
    # the provider took it and will say later whether it reached the recipient (an SMS
    # whose StatusCallback comes back to POST /hooks/sms/status): the core records "sent",
    # and the receipt "delivered" or "bounced"
    awaiting_receipt: bool = False


class Retry(Outcome, frozen=True, kw_only=True, tag="retry"):
    reason: str
    after_s: float | None = None


class Permanent(Outcome, frozen=True, kw_only=True, tag="permanent"):
    reason: str
    invalidates: Invalidates | None = None


# The three outcomes as a union: the type to decode a stored outcome with, and to ``match``
# over exhaustively.
AnyOutcome = Delivered | Retry | Permanent


@runtime_checkable
class Channel(Protocol):
    """A way out of Herald. One instance per channel per node, shared by all its workers.

    ``send`` answers every delivery failure as an :class:`Outcome`; it raises only
    ``asyncio.CancelledError`` (the caller gave up; the attempt's effect is unknown, so the
    core treats it as not delivered) and :class:`~channels.errors.ChannelClosed` after
    :meth:`close`. It is safe to call concurrently. ``close`` releases connections and is
    idempotent.
    """

    name: str

    async def send(self, delivery: Delivery) -> Outcome: ...

    async def close(self) -> None: ...


@runtime_checkable
class HasBreakers(Protocol):
    """A channel whose providers or endpoints have circuit breakers: their states, read by
    ``/metrics`` (``herald_channel_breakers{channel,state}``)."""

    def breaker_states(self) -> list[str]: ...


@runtime_checkable
class AcceptsAll(Protocol):
    """A channel that keeps nothing and answers every delivery alike (``null``): a worker
    may hand it a whole batch at once with :meth:`accept`, without a :class:`Delivery`
    view or an ``await`` per delivery. Raises :class:`~channels.errors.ChannelClosed`
    after ``close``, like ``send``."""

    def accept(self, count: int) -> Outcome: ...


@runtime_checkable
class AppendsToLog(Protocol):
    """A channel whose effect is a record of the node's own log (``inapp``: one record of
    ``__inapp`` per delivery). A worker appends that record with its batch's other outputs
    (``acks=all``, before the batch's commit: ``notify.stage``) rather than awaiting one
    append of its own per delivery: :meth:`record` gives the record (``topic, key,
    value``), :meth:`recorded` the outcome to record once it is appended. Both raise
    :class:`~channels.errors.ChannelClosed` after ``close``, like ``send``."""

    def record(self, delivery: Delivery) -> tuple[str, bytes, bytes]: ...

    def recorded(self, delivery: Delivery) -> Outcome: ...
