"""The notification registry: who can be notified, how, and what they asked for. LMDB through
``storage/kv.py``; every key starts with the tenant, so tenants never see each other's rows.

Tables (``\\0`` separates the parts of a key; ids cannot contain it):

==================== ============================ =========================================
``notify.profiles``  tenant, user                 :class:`Profile`: contact, devices,
                                                  preferences, consent state (one read per
                                                  recipient)
``notify.user_subs`` tenant, user, topic          :class:`StoredSubscription`
``notify.topic_subs`` tenant, topic, user         :class:`SubscriberEntry` (the index the
                                                  fan-out pages through, a few bytes each)
``notify.topic_counts`` tenant, topic             subscribers of the topic
``notify.consent``   tenant, user, channel, seq   :class:`Consent`, append-only (seq: 8
                                                  bytes big-endian, 1, 2, ...); a scoped
                                                  entry's channel part is ``email/category:x``
``notify.contact_log`` tenant, user, seq          :class:`ContactEvent`, append-only: an
                                                  address invalidated, a bounce, a complaint,
                                                  an SMS receipt; the newest
                                                  :data:`CONTACT_LOG_MAX` per user
``notify.phones``    phone, tenant, user          who has this phone number (an inbound text
                                                  from it: STOP, START, HELP)
``notify.windows``   tenant, user                 :class:`UserWindows` (cap counters)
``notify.defaults``  tenant                       :class:`StoredPreferences`
``notify.mandatory`` tenant, topic                :class:`Mandatory`
``notify.workflows`` tenant, topic                :class:`StoredWorkflow`
==================== ============================ =========================================

Both sides of a subscription, a consent entry and the state folded from it, an erasure's
every row: each is one LMDB transaction, so a crash leaves all of it or none.

**Durability.** The ``async`` write methods return only once their write is durable: they
await ``KV.sync()``, which group-commits (concurrent writers share one fsync). The few
synchronous writes (:meth:`Registry.subscribe_many`, :meth:`Registry.record_charges`) are for
callers that batch and sync themselves: they must await :meth:`Registry.sync` (or
``KV.sync``) before they acknowledge anything that depends on them.

**Costs** (bench/registry.py, bench/RESULTS.md § Notification registry): a page of a topic's
subscribers is one cursor seek plus a short decode per entry, so paging through a million
never holds more than one page; :meth:`Registry.recipients` reads two rows per recipient in
one snapshot. Nothing here loads a topic's subscribers into memory.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import msgspec

from broker.errors import InvalidRequest
from channels.errors import InvalidSecret
from channels.signing import decode_secret, generate_secret
from notify import windows as windows_
from notify.conditions import Predicate, never, parse_filter
from notify.model import (
    CHANNELS,
    Consent,
    ConsentState,
    Contact,
    ContactEvent,
    Device,
    Mandatory,
    Preferences,
    Profile,
    RetiredSecret,
    StoredDevice,
    StoredPreferences,
    StoredSubscription,
    StoredWebhook,
    StoredWorkflow,
    SubscriberEntry,
    Subscription,
    User,
    UserWindows,
    Workflow,
    consent_key,
)
from notify.policy import Recipient, ZoneLookup, system_zones
from notify.preferences import check_preferences
from notify.windows import Charge
from notify.workflows import Plan, parse_workflow
from storage.kv import KV, ReadCache, Txn

MAX_TENANT_BYTES: Final = 64
MAX_TOPIC_BYTES: Final = 200
MAX_USER_BYTES: Final = 200  # tenant + topic + user + 2 separators stay under LMDB's 511
MAX_TOKEN_CHARS: Final = 512
MAX_DEVICES: Final = 20  # per user; a new one evicts an invalidated one, else the oldest
MAX_PAGE: Final = 10_000
MAX_SOURCE: Final = 64  # characters of a consent entry's source
MAX_RETIRED_SECRETS: Final = (
    4  # per webhook: rotations within one overlap beyond this drop the oldest
)
FILTER_CACHE: Final = 4_096  # distinct subscription filters kept compiled
# what the fan-out reads for every event, kept while its table is unchanged (KV's
# Table.changes): workflow rows (or their absence) and the whole subscriber list of small
# topics (or their having none); emptied when full
READ_CACHE: Final = 4_096
SMALL_TOPIC: Final = 16  # subscribers at most, for a topic's list to be kept
# entries of a user's contact log kept (the oldest go): soft bounces and SMS receipts come
# with every message to a full mailbox or a filtered number, so it must not grow for ever;
# the consent ledger, the legal record, is not capped
CONTACT_LOG_MAX: Final = 200

_PHONE: Final = re.compile(r"\+[1-9]\d{6,14}")
_SCOPE: Final = re.compile(r"(?:category|topic):[^\x00/]{1,190}")
_SEQ: Final = struct.Struct(">Q")
_MASKS: Final = tuple(
    tuple(ch for i, ch in enumerate(CHANNELS) if m >> i & 1) for m in range(1 << len(CHANNELS))
)


class _Count(msgspec.Struct, array_like=True):
    n: int


class _PhoneOwner(msgspec.Struct, array_like=True):
    since_ms: int


class PhoneStop(msgspec.Struct, array_like=True):
    """A standing STOP texted from a phone number (``notify.phone_stops``): kept by number,
    not by user, so a user given that number later (or a number nobody had yet) starts
    opted out of SMS. A START from the number removes it."""

    at_ms: int
    source: str


class Subscriber(NamedTuple):
    """One entry of a topic's subscribers: the user, the channels they subscribed with, and
    their filter (None: every event of the topic)."""

    user: str
    channels: tuple[str, ...]
    filter: Predicate | None


@dataclass(frozen=True, slots=True)
class SubscriberPage:
    """A page of subscribers in user-id order; ``next_after`` is the ``after`` of the next
    page, None when this page is the last (a full page may be followed by an empty one)."""

    subscribers: list[Subscriber]
    next_after: str | None


class UserExport(msgspec.Struct, kw_only=True):
    """Everything the registry holds on one user (``GET /users/{id}/export``)."""

    user: str
    profile: Profile | None
    subscriptions: dict[str, StoredSubscription]
    consent_ledger: list[Consent]
    windows: UserWindows | None
    contact_log: list[ContactEvent] = []


def _small_topic(page: SubscriberPage) -> bool:
    """Whether a first page is a topic's whole list, small enough to keep."""
    return page.next_after is None and len(page.subscribers) <= SMALL_TOPIC


def by_time(entries: list[Consent]) -> list[Consent]:
    """A ledger read by key (channel, scope, then sequence) in the order it happened: by
    time, then by the order the entries were recorded in (entries of one millisecond on
    two channels; the sort is stable for rows older than ``Consent.order``)."""
    return sorted(entries, key=lambda e: (e.at_ms, e.order))


def apply_consent(current: ConsentState | None, entry: Consent) -> ConsentState:
    """The consent state after ``entry`` (see :class:`ConsentState`): an opt-in clears a
    legal opt-out; an opt-out is legal if it is, or if the opt-out it follows was."""
    legal = not entry.opted_in and (
        entry.legal or (current is not None and not current.opted_in and current.legal)
    )
    return ConsentState(
        opted_in=entry.opted_in, legal=legal, at_ms=entry.at_ms, source=entry.source
    )


def channel_mask(channels: Sequence[str]) -> int:
    """The bit set of ``channels`` over ``CHANNELS``."""
    return sum(1 << CHANNELS.index(ch) for ch in set(channels))


class Registry:
    """The registry over one :class:`KV`. Reads are synchronous and cheap; ``async`` writes
    return once durable. Ids are checked (non-empty, no NUL, bounded UTF-8 length) and a
    bad one raises :class:`InvalidRequest` naming ``tenant``, ``user``, ``topic`` or
    ``token``; bodies are checked as their modules say (``notify.conditions``,
    ``notify.preferences``, ``notify.workflows``)."""

    def __init__(
        self,
        kv: KV,
        *,
        zones: ZoneLookup = system_zones,
        webhook_secret_overlap_ms: int = 24 * 3600 * 1000,
    ) -> None:
        self._kv = kv
        self._zones = zones
        self._overlap_ms = webhook_secret_overlap_ms
        self._profiles = kv.table("notify.profiles", Profile)
        self._user_subs = kv.table("notify.user_subs", StoredSubscription)
        self._topic_subs = kv.table("notify.topic_subs", SubscriberEntry)
        self._counts = kv.table("notify.topic_counts", _Count)
        self._consent = kv.table("notify.consent", Consent)
        self._contact_log = kv.table("notify.contact_log", ContactEvent)
        self._phones = kv.table("notify.phones", _PhoneOwner)
        self._phone_stops = kv.table("notify.phone_stops", PhoneStop)
        self._windows = kv.table("notify.windows", UserWindows)
        self._defaults = kv.table("notify.defaults", StoredPreferences)
        self._mandatory = kv.table("notify.mandatory", Mandatory)
        self._workflows = kv.table("notify.workflows", StoredWorkflow)
        self._entry = msgspec.msgpack.Decoder(SubscriberEntry)
        self._enc = msgspec.msgpack.Encoder()
        self._plans: dict[tuple[str, str], tuple[int, Plan]] = {}
        # keyed by the names as given: a hit skips building (and checking) the key, and
        # only names that passed the check are ever stored
        self._workflow_rows: ReadCache[tuple[str, str], StoredWorkflow | None] = ReadCache(
            self._workflows, READ_CACHE
        )
        self._small_topics: ReadCache[tuple[str, str, int], SubscriberPage] = ReadCache(
            self._topic_subs, READ_CACHE
        )
        self._filter = functools.lru_cache(maxsize=FILTER_CACHE)(_compile_filter)

    async def sync(self) -> None:
        """Make every registry write made so far durable (group-committed fsync)."""
        await self._kv.sync()

    # --------------------------------------------------------------------------- users
    def contact(self, tenant: str, user: str) -> Contact | None:
        """The user's contact data, None if the user has none."""
        profile = self.profile(tenant, user)
        return None if profile is None else profile.contact

    def profile(self, tenant: str, user: str) -> Profile | None:
        """The user's whole profile row (contact, devices, preferences, consent state)."""
        return self._profiles.get(_user_key(tenant, user))

    async def put_user(self, tenant: str, user: str, body: User, *, now_ms: int) -> Contact:
        """Create or replace the user's contact data (devices, preferences and consent are
        kept). Checks: a known time zone, an ``@`` in the email, an E.164 phone, an http(s)
        webhook URL, a well-formed webhook secret. A webhook given without a secret keeps
        the one it had, or gets a new random one (a webhook is never sent unsigned).

        Webhook secret rotation: a new secret replaces the old one, which is still signed
        with for ``webhook_secret_overlap_ms`` (each request then carries both signatures,
        so the receiver can switch at its pace). A disabled webhook given again with the same
        URL stays disabled (``enable_webhook`` re-enables it); another URL starts clean."""
        key = _user_key(tenant, user)
        contact = self._check_user(body, now_ms)
        with self._kv.transaction() as txn:
            profile = self._profiles.get(key, txn=txn) or Profile(created_ms=now_ms)
            old = profile.contact.webhook if profile.contact is not None else None
            if contact.webhook is not None:
                contact = msgspec.structs.replace(
                    contact, webhook=self._carry_webhook(old, contact.webhook, now_ms)
                )
            was = profile.contact
            if was is not None and was.email_invalid_ms is not None and was.email == contact.email:
                # the same dead address given again stays invalid; a new one starts clean
                contact = msgspec.structs.replace(
                    contact,
                    email_invalid_ms=was.email_invalid_ms,
                    email_invalid_reason=was.email_invalid_reason,
                )
            if was is not None and was.phone_invalid_ms is not None and was.phone == contact.phone:
                contact = msgspec.structs.replace(
                    contact,
                    phone_invalid_ms=was.phone_invalid_ms,
                    phone_invalid_reason=was.phone_invalid_reason,
                )
            old_phone = was.phone if was is not None else None
            profile = msgspec.structs.replace(profile, contact=contact)
            if old_phone != contact.phone:
                if old_phone:
                    self._phones.delete(_phone_key(old_phone, key), txn=txn)
                if contact.phone:
                    self._phones.put(_phone_key(contact.phone, key), _PhoneOwner(now_ms), txn=txn)
                    stop = self._phone_stops.get(contact.phone.encode(), txn=txn)
                    if stop is not None:
                        # the number said STOP before this user had it: that still binds
                        entry = Consent(
                            channel="sms", opted_in=False, legal=True, at_ms=now_ms,
                            source=stop.source,
                        )  # fmt: skip
                        profile = self._append_consent(key, profile, entry, txn)
            self._profiles.put(key, profile, txn=txn)
        await self._kv.sync()
        return contact

    def invalidate_email(
        self,
        tenant: str,
        user: str,
        *,
        at_ms: int,
        reason: str,
        source: str,
        address: str | None = None,
    ) -> bool:
        """Mark the user's email address dead (with when and why) and log it in the contact
        log, in one transaction. With ``address``, only if that is still the user's address
        (a late bounce for an address since replaced changes nothing). Returns whether it
        was marked. Does **not** sync (the delivery worker syncs before it commits; the
        bounce hook awaits :meth:`sync`)."""
        key = _user_key(tenant, user)
        with self._kv.transaction() as txn:
            profile = self._profiles.get(key, txn=txn)
            contact = profile.contact if profile is not None else None
            if profile is None or contact is None or not contact.email:
                return False
            if address is not None and contact.email.lower() != address.lower():
                return False
            if contact.email_invalid_ms is None:
                contact = msgspec.structs.replace(
                    contact, email_invalid_ms=at_ms, email_invalid_reason=reason[:200]
                )
                self._profiles.put(key, msgspec.structs.replace(profile, contact=contact), txn=txn)
            self._log_contact(
                key,
                ContactEvent(
                    at_ms=at_ms,
                    channel="email",
                    kind="invalidated",
                    source=source,
                    address=contact.email,
                    detail=reason[:200],
                ),
                txn,
            )
        return True

    def _carry_webhook(
        self, old: StoredWebhook | None, new: StoredWebhook, now_ms: int
    ) -> StoredWebhook:
        """``new`` as given, with what the user's webhook keeps across a PUT: its secret when
        none is given, the rotation's retired secrets still in their overlap, and a disabled
        mark while the URL is the same."""
        secret = new.secret
        if secret is None:
            secret = old.secret if old is not None and old.secret else generate_secret()
        retired = [r for r in (old.retired if old is not None else []) if r.until_ms > now_ms]
        if old is not None and old.secret and old.secret != secret:
            retired.insert(0, RetiredSecret(secret=old.secret, until_ms=now_ms + self._overlap_ms))
        retired = [r for r in retired if r.secret != secret][:MAX_RETIRED_SECRETS]
        disabled_ms = disabled_reason = None
        if old is not None and old.url == new.url:
            disabled_ms, disabled_reason = old.disabled_ms, old.disabled_reason
        return StoredWebhook(
            url=new.url,
            secret=secret,
            retired=retired,
            disabled_ms=disabled_ms,
            disabled_reason=disabled_reason,
        )

    def disable_webhook(
        self, tenant: str, user: str, *, at_ms: int, reason: str, source: str
    ) -> bool:
        """Mark the user's webhook endpoint given up (with when and why) and log it in the
        contact log, in one transaction; the policy and the worker then suppress webhook
        deliveries with ``endpoint_disabled``. Returns whether the user has a webhook. Does
        **not** sync (the delivery worker syncs before it commits)."""
        key = _user_key(tenant, user)
        with self._kv.transaction() as txn:
            profile = self._profiles.get(key, txn=txn)
            contact = profile.contact if profile is not None else None
            if profile is None or contact is None or contact.webhook is None:
                return False
            hook = contact.webhook
            if hook.disabled_ms is None:
                hook = msgspec.structs.replace(
                    hook, disabled_ms=at_ms, disabled_reason=reason[:200]
                )
                contact = msgspec.structs.replace(contact, webhook=hook)
                self._profiles.put(key, msgspec.structs.replace(profile, contact=contact), txn=txn)
            self._log_contact(
                key,
                ContactEvent(
                    at_ms=at_ms,
                    channel="webhook",
                    kind="disabled",
                    source=source,
                    address=hook.url,
                    detail=reason[:200],
                ),
                txn,
            )
        return True

    async def enable_webhook(self, tenant: str, user: str, *, at_ms: int, source: str) -> bool:
        """Clear a disabled mark of the user's webhook (logged in the contact log); durable
        on return. Returns False if the user has no webhook; enabling an enabled one is a
        no-op that logs nothing."""
        key = _user_key(tenant, user)
        with self._kv.transaction() as txn:
            profile = self._profiles.get(key, txn=txn)
            contact = profile.contact if profile is not None else None
            if profile is None or contact is None or contact.webhook is None:
                return False
            hook = contact.webhook
            if hook.disabled_ms is None:
                return True
            hook = msgspec.structs.replace(hook, disabled_ms=None, disabled_reason=None)
            contact = msgspec.structs.replace(contact, webhook=hook)
            self._profiles.put(key, msgspec.structs.replace(profile, contact=contact), txn=txn)
            self._log_contact(
                key,
                ContactEvent(
                    at_ms=at_ms, channel="webhook", kind="enabled", source=source, address=hook.url
                ),
                txn,
            )
        await self._kv.sync()
        return True

    def invalidate_phone(
        self, tenant: str, user: str, *, at_ms: int, reason: str, source: str = "delivery"
    ) -> bool:
        """Mark the user's phone number dead (the SMS provider refused it as invalid, at the
        send, ``delivery``, or in a receipt, ``status_callback``) and log it in the contact
        log, in one transaction; False if the user has no number. No sync (the delivery
        worker syncs before it commits)."""
        key = _user_key(tenant, user)
        with self._kv.transaction() as txn:
            profile = self._profiles.get(key, txn=txn)
            contact = profile.contact if profile is not None else None
            if profile is None or contact is None or not contact.phone:
                return False
            if contact.phone_invalid_ms is None:
                contact = msgspec.structs.replace(
                    contact, phone_invalid_ms=at_ms, phone_invalid_reason=reason[:200]
                )
                self._profiles.put(key, msgspec.structs.replace(profile, contact=contact), txn=txn)
            self._log_contact(
                key,
                ContactEvent(
                    at_ms=at_ms,
                    channel="sms",
                    kind="invalidated",
                    source=source,
                    address=contact.phone,
                    detail=reason[:200],
                ),
                txn,
            )
        return True

    def mark_devices_invalid(
        self, tenant: str, user: str, tokens: Sequence[str], *, at_ms: int, reason: str
    ) -> int:
        """Mark these push tokens dead (APNs or FCM said so) and log each in the contact log,
        in one transaction; returns how many were marked (unknown tokens are skipped). No
        sync (the delivery worker syncs before it commits)."""
        key = _user_key(tenant, user)
        marked = 0
        with self._kv.transaction() as txn:
            profile = self._profiles.get(key, txn=txn)
            if profile is None:
                return 0
            devices = dict(profile.devices)
            for token in tokens:
                device = devices.get(token)
                if device is None:
                    continue
                if device.invalid_since_ms is None:
                    devices[token] = msgspec.structs.replace(device, invalid_since_ms=at_ms)
                marked += 1
                self._log_contact(
                    key,
                    ContactEvent(
                        at_ms=at_ms,
                        channel="push",
                        kind="invalidated",
                        source="delivery",
                        address=token,
                        detail=reason[:200],
                    ),
                    txn,
                )
            if marked:
                self._profiles.put(key, msgspec.structs.replace(profile, devices=devices), txn=txn)
        return marked

    def phone_owners(self, phone: str, limit: int = 1000) -> list[tuple[str, str]]:
        """(tenant, user) of every user whose phone number is ``phone``, at most ``limit``."""
        out: list[tuple[str, str]] = []
        prefix = phone.encode() + b"\0"
        for k in self._phones.keys(prefix):
            tenant, _, user = bytes(k)[len(prefix) :].partition(b"\0")
            out.append((tenant.decode(), user.decode()))
            if len(out) >= limit:
                break
        return out

    def note_contact(self, tenant: str, user: str, event: ContactEvent) -> None:
        """Append ``event`` to the user's contact log (no sync)."""
        key = _user_key(tenant, user)
        with self._kv.transaction() as txn:
            self._log_contact(key, event, txn)

    def contact_log(self, tenant: str, user: str) -> list[ContactEvent]:
        """The user's contact log, oldest first."""
        return [v for _k, v in self._contact_log.scan(_user_key(tenant, user) + b"\0")]

    def _log_contact(self, key: bytes, event: ContactEvent, txn: Txn) -> None:
        prefix = key + b"\0"
        last = self._contact_log.last(prefix, txn=txn)
        seq = 1 if last is None else _SEQ.unpack(last[0][len(prefix) :])[0] + 1
        self._contact_log.put(prefix + _SEQ.pack(seq), event, txn=txn)
        if seq > CONTACT_LOG_MAX:  # one in, one out: the log stays at the cap
            self._contact_log.delete(prefix + _SEQ.pack(seq - CONTACT_LOG_MAX), txn=txn)

    def _check_user(self, body: User, now_ms: int) -> Contact:
        try:
            if len(body.timezone) > 64:
                raise ValueError(body.timezone)
            self._zones(body.timezone)
        except (KeyError, ValueError, OSError):  # zoneinfo's ways of saying "no such zone"
            raise InvalidRequest(
                f"timezone: {body.timezone[:64]!r} is not an IANA time zone", field="timezone"
            ) from None
        if body.email is not None and ("@" not in body.email or len(body.email) > 254):
            raise InvalidRequest("email: an address with an @", field="email")
        if body.phone is not None and not _PHONE.fullmatch(body.phone):
            raise InvalidRequest("phone: E.164, e.g. +14155550100", field="phone")
        if not 1 <= len(body.locale) <= 35:
            raise InvalidRequest("locale: a BCP 47 tag such as en-GB", field="locale")
        hook = None
        if body.webhook is not None:
            url = body.webhook.url
            if not url.startswith(("https://", "http://")) or len(url) > 2048:
                raise InvalidRequest("webhook.url: an http(s) URL", field="webhook.url")
            if body.webhook.secret is not None:
                try:
                    decode_secret(body.webhook.secret)
                except InvalidSecret as exc:
                    raise InvalidRequest(f"webhook.secret: {exc}", field="webhook.secret") from None
            hook = StoredWebhook(url=url, secret=body.webhook.secret)
        return Contact(
            email=body.email,
            phone=body.phone,
            timezone=body.timezone,
            locale=body.locale,
            webhook=hook,
            updated_ms=now_ms,
        )

    # ------------------------------------------------------------------------- devices
    def devices(self, tenant: str, user: str) -> dict[str, StoredDevice]:
        """The user's devices by token (invalidated ones included, with the time)."""
        profile = self.profile(tenant, user)
        return {} if profile is None else dict(profile.devices)

    async def put_device(
        self, tenant: str, user: str, token: str, body: Device, *, now_ms: int
    ) -> StoredDevice:
        """Register (or register again: this clears an invalidation) a push token. Past
        :data:`MAX_DEVICES` an invalidated device goes first, else the oldest."""
        key = _user_key(tenant, user)
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise InvalidRequest(f"token: 1-{MAX_TOKEN_CHARS} characters", field="token")
        device = StoredDevice(platform=body.platform, added_ms=now_ms)
        with self._kv.transaction() as txn:
            profile = self._profiles.get(key, txn=txn) or Profile(created_ms=now_ms)
            devices = {t: d for t, d in profile.devices.items() if t != token}
            while len(devices) >= MAX_DEVICES:
                victim = min(devices, key=lambda t: _eviction_order(devices[t]))
                del devices[victim]
            devices[token] = device
            self._profiles.put(key, msgspec.structs.replace(profile, devices=devices), txn=txn)
        await self._kv.sync()
        return device

    async def delete_device(self, tenant: str, user: str, token: str) -> bool:
        """Forget a push token; False if the user had no such device."""
        return await self._edit_device(tenant, user, token, None)

    async def invalidate_device(self, tenant: str, user: str, token: str, *, at_ms: int) -> bool:
        """Mark a token dead (a provider's "unregistered"): it is kept, with the time, but no
        longer counts as a way to reach the user. False if there is no such device."""
        return await self._edit_device(tenant, user, token, at_ms)

    async def _edit_device(self, tenant: str, user: str, token: str, at_ms: int | None) -> bool:
        key = _user_key(tenant, user)
        with self._kv.transaction() as txn:
            profile = self._profiles.get(key, txn=txn)
            if profile is None or token not in profile.devices:
                return False
            devices = dict(profile.devices)
            if at_ms is None:
                del devices[token]
            else:
                devices[token] = msgspec.structs.replace(devices[token], invalid_since_ms=at_ms)
            self._profiles.put(key, msgspec.structs.replace(profile, devices=devices), txn=txn)
        await self._kv.sync()
        return True

    # ------------------------------------------------------------------- subscriptions
    async def subscribe(
        self, tenant: str, user: str, topic: str, body: Subscription, *, now_ms: int
    ) -> StoredSubscription:
        """Create or replace the user's subscription to ``topic`` (both the user's row and
        the topic's index entry, in one transaction). Checks: at least one channel (repeats
        are dropped), a valid filter (errors name ``filter...``)."""
        self.subscribe_many(tenant, topic, [(user, body)], now_ms=now_ms)
        await self._kv.sync()
        row = self.subscription(tenant, user, topic)
        assert row is not None
        return row

    def subscribe_many(
        self, tenant: str, topic: str, items: Sequence[tuple[str, Subscription]], *, now_ms: int
    ) -> int:
        """Subscribe many users to ``topic`` in one transaction; returns how many were new.
        Does **not** sync: await :meth:`sync` before acknowledging (bulk imports, tests,
        benchmarks). Raises :class:`InvalidRequest` before writing anything if any item is
        invalid."""
        topic_b = _part(topic, "topic", MAX_TOPIC_BYTES)
        tenant_b = _part(tenant, "tenant", MAX_TENANT_BYTES)
        prepared = []
        for user, body in items:
            user_b = _part(user, "user", MAX_USER_BYTES)
            if not body.channels:
                raise InvalidRequest("channels: at least one", field="channels")
            channels: list[str] = list(dict.fromkeys(body.channels))
            pred = parse_filter(body.filter, where="filter")
            filt = body.filter if pred is not None else None
            entry = SubscriberEntry(channel_mask(channels), self._enc.encode(filt) if filt else b"")
            prepared.append((user_b, channels, filt, entry))
        new = 0
        with self._kv.transaction() as txn:
            for user_b, channels, filt, entry in prepared:
                ukey = tenant_b + b"\0" + user_b + b"\0" + topic_b
                old = self._user_subs.get(ukey, txn=txn)
                row = StoredSubscription(
                    channels=channels,
                    filter=filt,
                    created_ms=old.created_ms if old is not None else now_ms,
                    updated_ms=now_ms,
                )
                self._user_subs.put(ukey, row, txn=txn)
                self._topic_subs.put(tenant_b + b"\0" + topic_b + b"\0" + user_b, entry, txn=txn)
                new += old is None
            if new:
                self._add_count(tenant_b + b"\0" + topic_b, new, txn)
        return new

    async def unsubscribe(self, tenant: str, user: str, topic: str) -> bool:
        """End the user's subscription to ``topic``; False if there was none."""
        tenant_b = _part(tenant, "tenant", MAX_TENANT_BYTES)
        user_b = _part(user, "user", MAX_USER_BYTES)
        topic_b = _part(topic, "topic", MAX_TOPIC_BYTES)
        with self._kv.transaction() as txn:
            if not self._user_subs.delete(tenant_b + b"\0" + user_b + b"\0" + topic_b, txn=txn):
                return False
            self._topic_subs.delete(tenant_b + b"\0" + topic_b + b"\0" + user_b, txn=txn)
            self._add_count(tenant_b + b"\0" + topic_b, -1, txn)
        await self._kv.sync()
        return True

    def _add_count(self, key: bytes, delta: int, txn: Txn) -> None:
        old = self._counts.get(key, txn=txn)
        n = (old.n if old is not None else 0) + delta
        if n > 0:
            self._counts.put(key, _Count(n), txn=txn)
        else:
            self._counts.delete(key, txn=txn)

    def subscription(self, tenant: str, user: str, topic: str) -> StoredSubscription | None:
        """The user's subscription to ``topic``, if any."""
        return self._user_subs.get(_key(tenant, user, topic))

    def subscriptions(
        self, tenant: str, user: str, *, after: str | None = None, limit: int = 100
    ) -> list[tuple[str, StoredSubscription]]:
        """The user's subscriptions as (topic, subscription), in topic order, after the topic
        ``after``; at most ``limit`` (<= :data:`MAX_PAGE`)."""
        prefix = _user_key(tenant, user) + b"\0"
        start = None if after is None else prefix + _part(after, "after", MAX_TOPIC_BYTES)
        rows = self._user_subs.scan(prefix, after=start, limit=_limit(limit))
        return [(k[len(prefix) :].decode(), v) for k, v in rows]

    def subscribers(
        self, tenant: str, topic: str, *, after: str | None = None, limit: int = 1000
    ) -> SubscriberPage:
        """A page of ``topic``'s subscribers in user-id order, starting after the user
        ``after``; at most ``limit`` (<= :data:`MAX_PAGE`). One cursor seek per page, and
        memory for one page only, however many subscribers the topic has. A subscription
        changed between pages shows its state when its page is read."""
        if after is None:  # a small topic's whole list, kept while nobody subscribes
            return self._small_topics.get(
                (tenant, topic, limit),
                lambda: self._subscriber_page(tenant, topic, None, limit),
                _small_topic,
            )
        return self._subscriber_page(tenant, topic, after, limit)

    def _subscriber_page(
        self, tenant: str, topic: str, after: str | None, limit: int
    ) -> SubscriberPage:
        prefix = _key(tenant, topic) + b"\0"
        start = None if after is None else prefix + _part(after, "after", MAX_USER_BYTES)
        rows = self._topic_subs.scan_raw(prefix, after=start, limit=_limit(limit))
        cut, decode, compiled = len(prefix), self._entry.decode, self._filter
        out = []
        for key, raw in rows:
            entry = decode(raw)
            filt = compiled(entry.filter) if entry.filter else None
            out.append(Subscriber(key[cut:].decode(), _MASKS[entry.channels], filt))
        more = len(out) == _limit(limit)
        return SubscriberPage(out, out[-1].user if more and out else None)

    def subscriber_rows(
        self, tenant: str, topic: str, *, after: str | None = None, limit: int = 100
    ) -> tuple[list[tuple[str, list[str], dict[str, Any] | None]], str | None]:
        """A page of ``topic``'s subscribers as stored, for listing: (user, channels, filter
        as given), and the ``after`` of the next page (None on the last). Paged like
        :meth:`subscribers`."""
        prefix = _key(tenant, topic) + b"\0"
        start = None if after is None else prefix + _part(after, "after", MAX_USER_BYTES)
        rows = self._topic_subs.scan_raw(prefix, after=start, limit=_limit(limit))
        out = []
        for key, raw in rows:
            entry = self._entry.decode(raw)
            filt = msgspec.msgpack.decode(entry.filter) if entry.filter else None
            out.append((key[len(prefix) :].decode(), list(_MASKS[entry.channels]), filt))
        more = len(out) == _limit(limit)
        return out, (out[-1][0] if more and out else None)

    def subscriber_count(self, tenant: str, topic: str) -> int:
        """How many users subscribe to ``topic`` (one read)."""
        row = self._counts.get(_key(tenant, topic))
        return 0 if row is None else row.n

    # --------------------------------------------------------------------- preferences
    def preferences(self, tenant: str, user: str) -> StoredPreferences | None:
        profile = self.profile(tenant, user)
        return None if profile is None else profile.preferences

    async def put_preferences(
        self, tenant: str, user: str, body: Preferences, *, now_ms: int
    ) -> StoredPreferences:
        """Replace the user's preferences (checked by ``notify.preferences``)."""
        key = _user_key(tenant, user)
        stored = check_preferences(body, now_ms=now_ms)
        with self._kv.transaction() as txn:
            profile = self._profiles.get(key, txn=txn) or Profile(created_ms=now_ms)
            self._profiles.put(key, msgspec.structs.replace(profile, preferences=stored), txn=txn)
        await self._kv.sync()
        return stored

    def defaults(self, tenant: str) -> StoredPreferences | None:
        """The tenant's default preferences (``PUT /admin/defaults``)."""
        return self._defaults.get(_part(tenant, "tenant", MAX_TENANT_BYTES))

    async def put_defaults(
        self, tenant: str, body: Preferences, *, now_ms: int
    ) -> StoredPreferences:
        """Replace the tenant's default preferences."""
        stored = check_preferences(body, now_ms=now_ms)
        self._defaults.put(_part(tenant, "tenant", MAX_TENANT_BYTES), stored)
        await self._kv.sync()
        return stored

    def mandatory(self, tenant: str, topic: str) -> Mandatory | None:
        """The topic's mandatory flag (since when), None if users may opt out."""
        return self._mandatory.get(_key(tenant, topic))

    def is_mandatory(self, tenant: str, topic: str) -> bool:
        """Whether users cannot opt out of ``topic`` (a legal opt-out still applies)."""
        return self._mandatory.get(_key(tenant, topic)) is not None

    def mandatory_topics(self, tenant: str) -> list[str]:
        """The tenant's mandatory topics, in order."""
        prefix = _part(tenant, "tenant", MAX_TENANT_BYTES) + b"\0"
        return [k[len(prefix) :].decode() for k in self._mandatory.keys(prefix)]

    async def set_mandatory(self, tenant: str, topic: str, mandatory: bool, *, now_ms: int) -> bool:
        """Make ``topic`` mandatory or not; returns whether it was before."""
        key = _key(tenant, topic)
        with self._kv.transaction() as txn:
            was = self._mandatory.get(key, txn=txn) is not None
            if mandatory and not was:
                self._mandatory.put(key, Mandatory(since_ms=now_ms), txn=txn)
            elif not mandatory and was:
                self._mandatory.delete(key, txn=txn)
        await self._kv.sync()
        return was

    # ------------------------------------------------------------------------- consent
    async def record_consent(self, tenant: str, user: str, entry: Consent) -> ConsentState:
        """Append ``entry`` to the user's consent ledger and fold it into the current state
        (:func:`apply_consent`), in one transaction; returns the new state of the channel.
        ``channel`` is one of ``CHANNELS`` or ``"*"``."""
        _user_key(tenant, user)  # the ids checked before the entry
        if entry.channel != "*" and entry.channel not in CHANNELS:
            raise InvalidRequest(f"channel: one of {', '.join(CHANNELS)} or *", field="channel")
        if not 1 <= len(entry.source) <= MAX_SOURCE:
            raise InvalidRequest(f"source: 1-{MAX_SOURCE} characters", field="source")
        if entry.scope is not None and not _SCOPE.fullmatch(entry.scope):
            raise InvalidRequest(
                "scope: category:<name> or topic:<name>, at most 200 bytes", field="scope"
            )
        state = self.note_consent(tenant, user, entry)
        await self._kv.sync()
        return state

    def note_consent(self, tenant: str, user: str, entry: Consent) -> ConsentState:
        """:meth:`record_consent` without the sync, for callers that sync themselves (the
        delivery worker, a batch of inbound STOPs). Checks nothing: the caller builds
        ``entry`` itself."""
        key = _user_key(tenant, user)
        with self._kv.transaction() as txn:
            profile = self._profiles.get(key, txn=txn) or Profile(created_ms=entry.at_ms)
            profile = self._append_consent(key, profile, entry, txn)
            self._profiles.put(key, profile, txn=txn)
        return profile.consent[consent_key(entry.channel, entry.scope)]

    def _append_consent(self, key: bytes, profile: Profile, entry: Consent, txn: Txn) -> Profile:
        """Append ``entry`` to the ledger of user ``key`` and return ``profile`` with the
        entry folded into its consent state (the caller puts the profile)."""
        state_key = consent_key(entry.channel, entry.scope)
        prefix = key + b"\0" + state_key.encode() + b"\0"
        last = self._consent.last(prefix, txn=txn)
        seq = 1 if last is None else _SEQ.unpack(last[0][len(prefix) :])[0] + 1
        order = profile.consent_entries + 1
        entry = msgspec.structs.replace(entry, order=order)
        self._consent.put(prefix + _SEQ.pack(seq), entry, txn=txn)
        state = apply_consent(profile.consent.get(state_key), entry)
        return msgspec.structs.replace(
            profile, consent={**profile.consent, state_key: state}, consent_entries=order
        )

    # ------------------------------------------------------------------- phone STOPs
    def note_phone_stop(self, phone: str, *, at_ms: int, source: str) -> None:
        """Remember that ``phone`` texted STOP (no sync; see :class:`PhoneStop`)."""
        self._phone_stops.put(phone.encode(), PhoneStop(at_ms, source))

    def clear_phone_stop(self, phone: str) -> bool:
        """``phone`` texted START: forget its STOP (no sync). Whether there was one."""
        return bool(self._phone_stops.delete(phone.encode()))

    def consent_state(self, tenant: str, user: str) -> dict[str, ConsentState]:
        """The current consent per channel (one read: the state is kept folded)."""
        profile = self.profile(tenant, user)
        return {} if profile is None else dict(profile.consent)

    def consent_ledger(self, tenant: str, user: str, channel: str | None = None) -> list[Consent]:
        """The user's consent entries (of ``channel`` only if given, its scoped ones
        included), oldest first (entries of the same millisecond in the order recorded)."""
        entries = [v for _k, v in self._consent.scan(_user_key(tenant, user) + b"\0")]
        if channel is not None:
            entries = [e for e in entries if e.channel == channel]
        return by_time(entries)

    # ----------------------------------------------------------------------- workflows
    def workflow(self, tenant: str, topic: str) -> StoredWorkflow | None:
        """The topic's workflow as stored (body as accepted, version), if any. Read once
        per change of the workflows table (the fan-out asks for every event)."""
        return self._workflow_rows.get(
            (tenant, topic), lambda: self._workflows.get(_key(tenant, topic))
        )

    def plan(self, tenant: str, topic: str) -> Plan | None:
        """The topic's workflow, checked and typed (``notify.workflows``); None when the
        topic has none (the caller then uses ``workflows.default_plan``). Parsed once per
        version and cached: one read per call."""
        row = self.workflow(tenant, topic)
        if row is None:
            self._plans.pop((tenant, topic), None)
            return None
        cached = self._plans.get((tenant, topic))
        if cached is not None and cached[0] == row.version:
            return cached[1]
        plan = parse_workflow(row.body)
        if len(self._plans) >= 4096:
            self._plans.clear()
        self._plans[(tenant, topic)] = (row.version, plan)
        return plan

    async def put_workflow(
        self, tenant: str, topic: str, body: Workflow | dict[str, Any], *, now_ms: int
    ) -> StoredWorkflow:
        """Check and store the topic's workflow (raises like ``parse_workflow``); its
        version grows by one."""
        key = _key(tenant, topic)
        plan = parse_workflow(body)
        assert plan.source is not None
        as_json = msgspec.to_builtins(plan.source)
        with self._kv.transaction() as txn:
            old = self._workflows.get(key, txn=txn)
            row = StoredWorkflow(
                body=as_json, version=(old.version if old else 0) + 1, updated_ms=now_ms
            )
            self._workflows.put(key, row, txn=txn)
        await self._kv.sync()
        return row

    async def delete_workflow(self, tenant: str, topic: str) -> bool:
        """Remove the topic's workflow (the default applies again); False if none."""
        found = self._workflows.delete(_key(tenant, topic))
        if found:
            await self._kv.sync()
        return found

    # ------------------------------------------------------------------------- fan-out
    def recipients(self, tenant: str, users: Sequence[str]) -> list[Recipient]:
        """What the policy needs of each of ``users``, in order: profile and cap windows,
        read in one snapshot (two reads per user). Users without rows come back with
        ``profile`` None. User ids are not checked here (the hot path): an id no row can
        have (one with a NUL) finds nothing."""
        tenant_b = _part(tenant, "tenant", MAX_TENANT_BYTES) + b"\0"
        profiles, windows = self._profiles, self._windows
        out = []
        with self._kv.snapshot() as snap:
            for user in users:
                key = tenant_b + user.encode()
                out.append(Recipient(user, profiles.get(key, txn=snap), windows.get(key, txn=snap)))
        return out

    def record_charges(
        self, tenant: str, sends: Sequence[tuple[str, Sequence[Charge], int]], *, now_ms: int
    ) -> None:
        """Count deliveries in their users' cap windows: ``sends`` holds (user, charges from
        ``policy.Deliver``, tag of the delivery id). Read-modify-write in one transaction,
        so concurrent deciders cannot lose a count; counting a delivery twice is a no-op.
        Does **not** sync: the caller syncs before committing its input."""
        tenant_b = _part(tenant, "tenant", MAX_TENANT_BYTES) + b"\0"
        with self._kv.transaction() as txn:
            for user, charges, tag in sends:
                if not charges:
                    continue
                key = tenant_b + user.encode()
                state = self._windows.get(key, txn=txn)
                self._windows.put(
                    key, windows_.charge(state, charges, now_ms=now_ms, tag=tag), txn=txn
                )

    # ---------------------------------------------------------------------------- GDPR
    def export_user(self, tenant: str, user: str) -> UserExport:
        """Everything the registry holds on the user, read in one snapshot."""
        key = _user_key(tenant, user)
        with self._kv.snapshot() as snap:
            profile = self._profiles.get(key, txn=snap)
            subs = self._user_subs.scan(key + b"\0", txn=snap)
            subscriptions = {k[len(key) + 1 :].decode(): v for k, v in subs}
            ledger = by_time([v for _k, v in self._consent.scan(key + b"\0", txn=snap)])
            windows = self._windows.get(key, txn=snap)
            contact_log = [v for _k, v in self._contact_log.scan(key + b"\0", txn=snap)]
        return UserExport(
            user=user,
            profile=profile,
            subscriptions=subscriptions,
            consent_ledger=ledger,
            windows=windows,
            contact_log=contact_log,
        )

    async def erase_user(self, tenant: str, user: str) -> int:
        """Erase every row held on the user: profile, subscriptions and their entries in the
        topics' indexes (and counts), the consent ledger, cap windows; in one transaction.
        Returns how many rows went. Note: the consent ledger goes too, so a legal opt-out is
        forgotten with the user."""
        tenant_b = _part(tenant, "tenant", MAX_TENANT_BYTES)
        user_b = _part(user, "user", MAX_USER_BYTES)
        key = tenant_b + b"\0" + user_b
        n = 0
        with self._kv.transaction() as txn:
            for sub_key in self._user_subs.keys(key + b"\0", txn=txn):
                topic_b = sub_key[len(key) + 1 :]
                n += self._topic_subs.delete(tenant_b + b"\0" + topic_b + b"\0" + user_b, txn=txn)
                self._add_count(tenant_b + b"\0" + topic_b, -1, txn)
            n += self._user_subs.delete_prefix(key + b"\0", txn=txn)
            n += self._consent.delete_prefix(key + b"\0", txn=txn)
            n += self._contact_log.delete_prefix(key + b"\0", txn=txn)
            held = self._profiles.get(key, txn=txn)
            phone = held.contact.phone if held and held.contact else None
            if phone:
                n += self._phones.delete(_phone_key(phone, key), txn=txn)
            n += self._profiles.delete(key, txn=txn)
            n += self._windows.delete(key, txn=txn)
        await self._kv.sync()
        return n


# ------------------------------------------------------------------------------- keys
def _phone_key(phone: str, user_key: bytes) -> bytes:
    return phone.encode() + b"\0" + user_key


def _part(value: str, field: str, max_bytes: int) -> bytes:
    raw = value.encode() if isinstance(value, str) else b""
    if not raw or len(raw) > max_bytes or b"\0" in raw:
        raise InvalidRequest(f"{field}: 1-{max_bytes} bytes of UTF-8 text without NUL", field=field)
    return raw


def _user_key(tenant: str, user: str) -> bytes:
    return _part(tenant, "tenant", MAX_TENANT_BYTES) + b"\0" + _part(user, "user", MAX_USER_BYTES)


def _key(tenant: str, name: str, topic: str | None = None) -> bytes:
    """tenant\\0name (a topic) or tenant\\0name (a user)\\0topic."""
    head = _part(tenant, "tenant", MAX_TENANT_BYTES) + b"\0"
    if topic is None:
        return head + _part(name, "topic", MAX_TOPIC_BYTES)
    return (
        head + _part(name, "user", MAX_USER_BYTES) + b"\0" + _part(topic, "topic", MAX_TOPIC_BYTES)
    )


def _eviction_order(device: StoredDevice) -> tuple[bool, int]:
    """Invalidated devices first, then the oldest."""
    return device.invalid_since_ms is None, device.added_ms


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit: 1 to {MAX_PAGE}", field="limit")
    return limit


def _compile_filter(raw: bytes) -> Predicate:
    source = msgspec.msgpack.decode(raw)
    try:
        pred = parse_filter(source)
    except InvalidRequest:  # written by a newer node with syntax this one lacks
        return never(source if isinstance(source, dict) else {})
    return pred if pred is not None else never({})
