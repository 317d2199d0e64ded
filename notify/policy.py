"""Delivery policy: for one recipient and one channel step, deliver now, suppress or defer,
and why. Pure: the clock (Unix ms) and the time zone database are arguments.

:func:`decide` applies the checks in the order of ``docs/NOTIFY.md`` § Policy order; the
first that does not pass decides:

1. a legal opt-out of the channel, or of the channel for the event's topic or category
   (consent ledger)                                           -> Suppress ``legal_opt_out``
   (nothing overrides it: not a mandatory topic, not ``critical``);
2. the step's condition                                       -> Suppress ``condition``;
3. the user has an address / device / endpoint for the channel -> else Suppress
   ``no_channel_data`` (``address_invalid`` when the email address or the phone number
   was found dead);
4. a mandatory topic skips 5;
5. preferences: a (non-legal) opt-out of the channel in the consent ledger -> Suppress
   ``opt_out``; then the rules (``notify.preferences``)       -> Suppress ``preference``;
6. ``critical`` priority skips 7 and 8;
7. frequency caps (sliding windows, ``notify.windows``)       -> Suppress ``cap``;
8. quiet hours in the user's time zone                        -> Defer ``quiet_hours`` to
   the window's end.

Every answer that is not a plain delivery carries a :class:`Reason`: a short ``code`` (the
codes above) and a ``detail`` naming the rule, cap, window or consent entry, which is what
``GET /events/{id}`` shows. A :class:`Deliver` lists the cap windows the delivery counts in
(:attr:`Deliver.charges`): the caller records them (``notify.windows.charge`` through
``Registry.record_charges``) once the delivery is durably queued. A critical delivery counts
in no cap.

Quiet hours are a span of wall-clock time, ``start`` to ``end`` (crossing midnight when end
< start), each day in the user's zone (``Contact.timezone``; an unknown zone reads as UTC and
says so). Each boundary is the first instant the user's clock shows that time: on the night
the clocks go back it is the first of the two; when it falls in a gap (clocks forward) it is
the instant the gap ends. So a window is a fixed interval of instants per local day, a
repeated hour does not reopen it, and a deferral lands exactly at its end.
"""

from __future__ import annotations

import datetime as dt
import functools
import zoneinfo
from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec

from notify import preferences as prefs_
from notify import windows
from notify.conditions import Scope
from notify.model import ConsentState, Profile, StoredPreferences, UserWindows
from notify.windows import Charge
from notify.workflows import Send

ZoneLookup = Callable[[str], dt.tzinfo]
"""The time zone database: an IANA name to a ``tzinfo``; raises ``KeyError``,
``ValueError`` or ``zoneinfo.ZoneInfoNotFoundError`` for an unknown name."""

CRITICAL: Final = "critical"
# channels that need nothing of the user but their id
_NO_DATA_NEEDED: Final = frozenset({"inapp", "console", "null"})


@functools.lru_cache(maxsize=1024)
def system_zones(name: str) -> dt.tzinfo:
    """The system's time zone database (``zoneinfo``), the default :data:`ZoneLookup`."""
    return zoneinfo.ZoneInfo(name)


# ---------------------------------------------------------------------------- answers
# msgspec structs: immutable, compared by type and value, and cheap to build (a decision is
# made per recipient and channel)
class Reason(msgspec.Struct, frozen=True, gc=False):
    """Why a notification was not delivered now: a machine ``code`` and a human ``detail``."""

    code: str
    detail: str


class Deliver(msgspec.Struct, frozen=True):
    """Deliver now; the delivery counts in ``charges`` (cap windows) once queued."""

    charges: tuple[Charge, ...] = ()


class Suppress(msgspec.Struct, frozen=True, gc=False):
    reason: Reason


class Defer(msgspec.Struct, frozen=True, gc=False):
    """Decide again at ``until_ms`` (Unix ms)."""

    until_ms: int
    reason: Reason


Decision = Deliver | Suppress | Defer
_DELIVER: Final = Deliver()


# ---------------------------------------------------------------------------- inputs
class Recipient(msgspec.Struct, frozen=True):
    """What the registry holds on one recipient (``Registry.recipients``): their profile
    (None: no row; then only channels needing no data can reach them) and cap windows."""

    id: str
    profile: Profile | None = None
    windows: UserWindows | None = None
    # connected to the gateway when the run was decided (None: the node has no gateway)
    online: bool | None = None

    def fields(self) -> dict[str, Any]:
        """The ``recipient.*`` fields conditions see: id, email, phone, timezone, locale
        (those set), and ``online`` (a device connected to the gateway) where known."""
        out: dict[str, Any] = {"id": self.id}
        if self.online is not None:
            out["online"] = self.online
        contact = self.profile.contact if self.profile is not None else None
        if contact is not None:
            for name in ("email", "phone", "timezone", "locale"):
                value = getattr(contact, name)
                if value is not None:
                    out[name] = value
        return out


class Occasion(msgspec.Struct, frozen=True, kw_only=True):
    """What the policy knows of one event, built once per event by the caller: its topic,
    category (the event's, else the workflow's), priority, whether the topic is mandatory,
    its ``data`` and the ``event.*`` fields conditions see."""

    topic: str
    category: str | None = None
    priority: str = "normal"
    mandatory: bool = False
    data: Any = None
    fields: Mapping[str, Any] = {}


# ------------------------------------------------------------------------ the checks
def _consent_keys(channel: str, topic: str | None, category: str | None) -> tuple[str, ...]:
    """The consent states that bear on one notification: the channel's, every channel's,
    and the channel's scoped to the notification's topic and category."""
    keys = [channel, "*"]
    if topic is not None:
        keys.append(f"{channel}/topic:{topic}")
    if category is not None:
        keys.append(f"{channel}/category:{category}")
    return tuple(keys)


def legal_opt_out(
    profile: Profile | None,
    channel: str,
    topic: str | None = None,
    category: str | None = None,
) -> Reason | None:
    """A legal opt-out of ``channel`` (or of every channel, ``"*"``, or of the channel for
    this ``topic`` or ``category``) in the consent state."""
    if profile is None or not profile.consent:
        return None
    for key in _consent_keys(channel, topic, category):
        state = profile.consent.get(key)
        if state is not None and not state.opted_in and state.legal:
            return Reason("legal_opt_out", f"{_consent_text(key, state)}; it overrides all")
    return None


def plain_opt_out(
    profile: Profile | None,
    channel: str,
    topic: str | None = None,
    category: str | None = None,
) -> Reason | None:
    """A (non-legal) opt-out of ``channel``, ``"*"`` or the channel's topic or category
    scope in the consent state."""
    if profile is None or not profile.consent:
        return None
    for key in _consent_keys(channel, topic, category):
        state = profile.consent.get(key)
        if state is not None and not state.opted_in:
            return Reason("opt_out", _consent_text(key, state))
    return None


def _consent_text(channel: str, state: ConsentState) -> str:
    what = "legal opt-out" if state.legal else "opt-out"
    return f"{what} of channel {channel} ({state.source}) at {iso(state.at_ms)}"


def channel_data(profile: Profile | None, channel: str) -> Reason | None:
    """None if the user can be reached on ``channel``, else why not: email needs an
    address, sms a phone number, webhook an endpoint, push a device not invalidated;
    inapp, console and null need nothing."""
    if channel in _NO_DATA_NEEDED:
        return None
    contact = profile.contact if profile is not None else None
    if channel == "push":
        devices = profile.devices if profile is not None else {}
        if any(d.invalid_since_ms is None for d in devices.values()):
            return None
        dead = len(devices)
        detail = f"no valid push device ({dead} invalidated)" if dead else "no push device"
        return Reason("no_channel_data", detail)
    if channel == "email" and contact is not None and contact.email:
        if contact.email_invalid_ms is not None:
            return Reason(
                "address_invalid",
                f"email address {contact.email} invalidated at {iso(contact.email_invalid_ms)}"
                f" ({contact.email_invalid_reason or 'no reason given'})",
            )
        return None
    if channel == "sms" and contact is not None and contact.phone:
        if contact.phone_invalid_ms is not None:
            return Reason(
                "address_invalid",
                f"phone number {contact.phone} invalidated at {iso(contact.phone_invalid_ms)}"
                f" ({contact.phone_invalid_reason or 'no reason given'})",
            )
        return None
    if channel == "webhook" and contact is not None and contact.webhook is not None:
        hook = contact.webhook
        if hook.disabled_ms is not None:
            return Reason(
                "endpoint_disabled",
                f"webhook endpoint {hook.url} disabled at {iso(hook.disabled_ms)}"
                f" ({hook.disabled_reason or 'no reason given'})",
            )
        return None
    what = {"email": "email address", "sms": "phone number", "webhook": "webhook endpoint"}
    return Reason("no_channel_data", f"no {what.get(channel, channel + ' address')}")


def preference(
    user: StoredPreferences | None,
    tenant: StoredPreferences | None,
    topic: str,
    category: str | None,
    channel: str,
) -> Reason | None:
    """The deciding rule if it denies (``notify.preferences.resolve_rule``), else None."""
    match = prefs_.resolve_rule(user, tenant, topic, category, channel)
    if match is None or match.allow:
        return None
    return Reason("preference", match.text())


def caps(
    user: StoredPreferences | None,
    tenant: StoredPreferences | None,
    state: UserWindows | None,
    topic: str,
    category: str | None,
    channel: str,
    *,
    now_ms: int,
) -> tuple[Reason | None, tuple[Charge, ...]]:
    """The first cap already full (with when its next slot opens), else None and the cap
    windows a delivery now counts in."""
    found = prefs_.matching_caps(user, tenant, topic, category, channel)
    if not found:
        return None, ()
    logs = state.logs if state is not None else {}
    for cap in found:
        log = logs.get(cap.key)
        sent = windows.count(log, per_ms=cap.per_ms, now_ms=now_ms)
        if sent >= cap.max:
            free = windows.next_slot_ms(log, max=cap.max, per_ms=cap.per_ms, now_ms=now_ms)
            return Reason(
                "cap", f"{cap.text()} reached ({sent} sent; next slot at {iso(free)})"
            ), ()
    return None, tuple(Charge(c.key, c.max, c.per_ms) for c in found)


def quiet_hours(
    user: StoredPreferences | None,
    tenant: StoredPreferences | None,
    timezone: str,
    *,
    now_ms: int,
    zones: ZoneLookup = system_zones,
) -> Defer | None:
    """A deferral to the end of the quiet window ``now_ms`` is in, None if it is in none."""
    found = prefs_.quiet_hours_of(user, tenant)
    if found is None:
        return None
    window, layer = found
    zone, zone_note = _zone(timezone, zones)
    start, end = prefs_.clock_minutes(window.start), prefs_.clock_minutes(window.end)
    until = quiet_until(start, end, zone, now_ms)
    if until is None:
        return None
    whose = "user" if layer == "user" else "tenant default"
    return Defer(
        until,
        Reason(
            "quiet_hours",
            f"{whose} quiet hours {window.start}-{window.end} {timezone}{zone_note}; "
            f"deferred to {window.end} local ({iso(until)})",
        ),
    )


def _zone(name: str, zones: ZoneLookup) -> tuple[dt.tzinfo, str]:
    try:
        return zones(name), ""
    except (KeyError, ValueError, zoneinfo.ZoneInfoNotFoundError):
        return dt.UTC, " (unknown zone, read as UTC)"


# ------------------------------------------------------------------------ quiet hours
@functools.lru_cache(maxsize=8192)
def wall_instant_ms(day: dt.date, minutes: int, zone: dt.tzinfo) -> int:
    """The first instant (Unix ms) at which the clock of ``zone`` shows ``minutes`` past
    midnight on ``day``: of two such instants (clocks going back) the first; in a gap
    (clocks going forward) the instant the gap ends."""
    naive = dt.datetime(day.year, day.month, day.day, minutes // 60, minutes % 60)
    first = naive.replace(tzinfo=zone, fold=0).timestamp()
    if dt.datetime.fromtimestamp(first, zone).replace(tzinfo=None) == naive:
        return int(first * 1000)
    # a gap: no instant shows this time. The wall clock rises through the gap, so the
    # first instant showing a later time lies between the two readings of the offsets.
    other = naive.replace(tzinfo=zone, fold=1).timestamp()
    lo, hi = int(min(first, other)), int(max(first, other))
    while lo < hi:
        mid = (lo + hi) // 2
        if dt.datetime.fromtimestamp(mid, zone).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid + 1
    return lo * 1000


@functools.lru_cache(maxsize=4096)
def _local_date(zone: dt.tzinfo, minute: int) -> dt.date:
    """The date in ``zone`` during the minute ``minute`` (Unix ms // 60,000); zone changes
    fall on whole minutes. Cached: a fan-out asks for the same few (zone, minute) pairs."""
    return dt.datetime.fromtimestamp(minute * 60, zone).date()


def quiet_until(start: int, end: int, zone: dt.tzinfo, now_ms: int) -> int | None:
    """The end (Unix ms) of the quiet window containing ``now_ms``, None if none does.
    ``start`` and ``end`` are minutes past midnight in ``zone`` (``end < start``: the
    window crosses midnight; equal: refused by ``notify.preferences``)."""
    today = _local_date(zone, now_ms // 60_000)
    for day in (today - dt.timedelta(days=1), today):
        if wall_instant_ms(day, start, zone) <= now_ms:
            end_day = day if end > start else day + dt.timedelta(days=1)
            until = wall_instant_ms(end_day, end, zone)
            if now_ms < until:
                return until
    return None


# --------------------------------------------------------------------------- decide
def decide(
    step: Send,
    occasion: Occasion,
    recipient: Recipient,
    defaults: StoredPreferences | None,
    *,
    now_ms: int,
    zones: ZoneLookup = system_zones,
) -> Decision:
    """Deliver, suppress or defer ``step`` (a channel step) of ``occasion`` to
    ``recipient``, given the tenant's ``defaults``, in the documented order. Never raises
    for any stored data (an unknown time zone reads as UTC); costs a few microseconds, more
    when quiet hours must be computed."""
    profile = recipient.profile
    channel = step.channel
    why = legal_opt_out(profile, channel, occasion.topic, occasion.category)
    if why is not None:
        return Suppress(why)
    if step.condition is not None:
        cond = step.condition
        fields = recipient.fields() if "recipient" in cond.roots else {}
        scope = Scope(occasion.data, fields, occasion.fields)
        if not cond.matches(scope):
            return Suppress(Reason("condition", f"{step.path}.if: {cond.explain(scope)}"))
    why = channel_data(profile, channel)
    if why is not None:
        return Suppress(why)
    user = profile.preferences if profile is not None else None
    topic, category = occasion.topic, occasion.category
    if not occasion.mandatory:
        why = plain_opt_out(profile, channel, topic, category) or preference(
            user, defaults, topic, category, channel
        )
        if why is not None:
            return Suppress(why)
    if occasion.priority == CRITICAL:
        return _DELIVER
    why, charges = caps(user, defaults, recipient.windows, topic, category, channel, now_ms=now_ms)
    if why is not None:
        return Suppress(why)
    timezone = profile.contact.timezone if profile is not None and profile.contact else "UTC"
    deferral = quiet_hours(user, defaults, timezone, now_ms=now_ms, zones=zones)
    if deferral is not None:
        return deferral
    return Deliver(charges) if charges else _DELIVER


def iso(ms: int) -> str:
    """RFC 3339 UTC text of Unix ms, to the second."""
    return dt.datetime.fromtimestamp(ms // 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
