"""The notification API's own bodies and answers (``notify/api.py``): the structs the handlers
decode and encode, and so the schemas of ``GET /openapi.json``. The bodies the registry keeps
as they are (``User``, ``Device``, ``Subscription``, ``Preferences``, ``Workflow``) live in
``notify/model.py`` with the rows they become.

Answers are plain structs with every field present (``null`` rather than absent), so a
client's generated types need no optional fields it cannot predict.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from notify.model import UserWindows

T = TypeVar("T")


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A request body: unknown fields are errors."""


class _Answer(msgspec.Struct, kw_only=True):
    """An answer."""


def answer(row: msgspec.Struct, as_type: type[T]) -> T:
    """A stored row (whose defaults are left out when stored) as an answer struct that shows
    every field."""
    return msgspec.convert(msgspec.to_builtins(row), as_type)


class AttemptOut(_Answer, kw_only=True):
    at_ms: int
    outcome: str  # delivered, undelivered (will retry), dead_lettered, ...
    detail: str = ""


class RuleOut(_Answer, kw_only=True):
    topic: str | None = None
    category: str | None = None
    channel: str = "*"
    allow: bool


class QuietHoursOut(_Answer, kw_only=True):
    start: str
    end: str


class CapOut(_Answer, kw_only=True):
    topic: str | None = None
    category: str | None = None
    channel: str = "*"
    max: int
    per: str


class PreferencesOut(_Answer, kw_only=True):
    """A user's preferences, or a tenant's defaults, as stored."""

    rules: list[RuleOut] = []
    quiet_hours: QuietHoursOut | None = None
    caps: list[CapOut] = []
    updated_ms: int = 0


class ConsentStateOut(_Answer, kw_only=True):
    opted_in: bool
    legal: bool = False
    at_ms: int
    source: str


class ConsentEntryOut(_Answer, kw_only=True):
    """One entry of the consent ledger: when, from where (``api``, ``unsubscribe_link``,
    ``complaint``, ``sms_stop``...), which channel and, for a scoped one, which kind of
    notification (``category:<name>`` or ``topic:<name>``)."""

    channel: str
    opted_in: bool
    at_ms: int
    source: str
    legal: bool = False
    scope: str | None = None


class ContactEventOut(_Answer, kw_only=True):
    """One entry of the contact log: an address invalidated, a webhook disabled or enabled,
    a bounce, a complaint."""

    at_ms: int
    channel: str
    kind: str
    source: str
    address: str | None = None
    detail: str = ""


# ------------------------------------------------------------------------------ users
class WebhookOut(_Answer, kw_only=True):
    url: str
    secret: str | None  # shown to admin keys only; null for the others
    # until when a rotation's replaced secret still signs requests (the latest), if one does
    previous_secret_until_ms: int | None = None
    disabled_ms: int | None = None  # the webhook channel gave the endpoint up (410, failing...)
    disabled_reason: str | None = None


class DeviceOut(_Answer, kw_only=True):
    token: str
    platform: str
    added_ms: int
    invalid_since_ms: int | None


class UserOut(_Answer, kw_only=True):
    """A user: contact data and devices (``GET /users/{id}``)."""

    id: str
    email: str | None
    phone: str | None
    timezone: str
    locale: str
    webhook: WebhookOut | None
    devices: list[DeviceOut]
    created_ms: int
    updated_ms: int
    email_invalid_ms: int | None = None  # the address found dead (a 550, a hard bounce)
    email_invalid_reason: str | None = None


class Deleted(_Answer, kw_only=True):
    deleted: str


class Erased(_Answer, kw_only=True):
    """What ``DELETE /users/{id}`` erased, by kind of row."""

    user: str
    registry_rows: int
    notifications: int
    statuses: int
    parked_runs: int
    batch_windows: int
    dead_letters: int


# ---------------------------------------------------------------------- subscriptions
class SubscriptionOut(_Answer, kw_only=True):
    topic: str
    channels: list[str]
    filter: dict[str, Any] | None
    created_ms: int
    updated_ms: int


class SubscriptionsPage(_Answer, kw_only=True):
    subscriptions: list[SubscriptionOut]
    next_after: str | None  # the ``after`` of the next page; null on the last


class SubscriberOut(_Answer, kw_only=True):
    user: str
    channels: list[str]
    filter: dict[str, Any] | None


class SubscribersPage(_Answer, kw_only=True):
    topic: str
    count: int  # every subscriber of the topic
    subscribers: list[SubscriberOut]
    next_after: str | None


# ------------------------------------------------------------------------ preferences
class MandatoryOut(_Answer, kw_only=True):
    topic: str
    mandatory: bool
    since_ms: int | None


class MandatoryTopics(_Answer, kw_only=True):
    topics: list[str]


class ConsentIn(_Body, kw_only=True):
    """``POST /users/{id}/consent``: an opt-in or opt-out recorded with source ``api``."""

    channel: str  # one of the channels, or "*" for every channel
    opted_in: bool
    legal: bool = False  # a legal opt-out (an unsubscribe or STOP the tenant received)
    scope: str | None = None  # "category:<name>" or "topic:<name>"; None: the whole channel


class ConsentOut(_Answer, kw_only=True):
    """The current consent per channel (and per ``channel/scope``), the whole ledger oldest
    first, and the contact log (what Herald learnt about the user's addresses)."""

    channels: dict[str, ConsentStateOut]
    ledger: list[ConsentEntryOut]
    contact_log: list[ContactEventOut] = []


# -------------------------------------------------------------------------- workflows
class WorkflowOut(_Answer, kw_only=True):
    topic: str
    version: int
    updated_ms: int
    workflow: dict[str, Any]  # the body as accepted


# ----------------------------------------------------------------------------- events
class CancelIn(_Body, kw_only=True):
    """``POST /events/cancel``."""

    cancellation_key: str
    users: list[str] | None = None


class Cancelled(_Answer, kw_only=True):
    cancellation_key: str
    cancelled: int  # runs cancelled (each recorded per recipient as ``cancelled``)


class StatusItem(_Answer, kw_only=True):
    """One (recipient, channel) of an event; channel ``*`` for run-level transitions (a
    delay, a throttle, a cancellation)."""

    user: str
    channel: str
    status: str
    delivery_id: str | None
    reason: str | None
    detail: str | None
    until_ms: int | None
    attempts: list[AttemptOut]
    updated_ms: int
    topic: str | None
    engagement: list[str]


class EventStatusOut(_Answer, kw_only=True):
    event_id: str
    recipients: list[StatusItem]


class FeedItem(_Answer, kw_only=True):
    id: str
    cursor: str
    event_id: str
    topic: str
    created_ms: int
    seen: bool
    read: bool
    archived: bool
    engagement: list[str]


class FeedOut(_Answer, kw_only=True):
    items: list[FeedItem]
    unread: int
    next_before: str | None  # the ``before`` of the next page; null on the last


class MarkOut(_Answer, kw_only=True):
    id: str
    engagement: list[str]


# ----------------------------------------------------------------------- dead letters
class DeadLetterOut(_Answer, kw_only=True):
    delivery_id: str
    channel: str
    event_id: str
    user: str
    topic: str
    priority: str
    category: str | None
    reason: str
    attempts: list[AttemptOut]
    created_ms: int
    dead_ms: int
    replay: int  # how many times it was replayed before
    data: msgspec.Raw  # the event's data


class DeadLettersPage(_Answer, kw_only=True):
    channel: str
    dead_letters: list[DeadLetterOut]
    next_after: str | None


class ReplayIn(_Body, kw_only=True):
    """``POST /dlq/{channel}/replay``: the ids, or every dead letter of the channel."""

    ids: list[str] | None = None


class Replayed(_Answer, kw_only=True):
    replayed: list[str]
    missing: list[str]  # asked for but not (or no longer) dead letters


# ----------------------------------------------------------------------------- export
class ParkedOut(_Answer, kw_only=True):
    timer_id: str
    kind: str
    due_ms: int
    event_id: str
    topic: str
    data: msgspec.Raw


class BatchOut(_Answer, kw_only=True):
    topic: str
    closes_ms: int
    events: list[str]


class ExportOut(_Answer, kw_only=True):
    """Everything Herald holds on one user (``GET /users/{id}/export``)."""

    user: str
    profile: UserOut | None
    preferences: PreferencesOut | None
    consent: dict[str, ConsentStateOut]
    consent_ledger: list[ConsentEntryOut]
    contact_log: list[ContactEventOut]
    subscriptions: list[SubscriptionOut]
    cap_windows: UserWindows | None
    notifications: list[FeedItem]
    statuses: list[dict[str, Any]]
    parked_runs: list[ParkedOut]
    batch_windows: list[BatchOut]
    dead_letters: list[DeadLetterOut]
