"""Preferences: check a body (a user's, or a tenant's defaults) once, and answer which rule,
cap or quiet hours apply to a notification. Pure.

A rule allows or denies a scope x channel. The scope is a topic, a category or ``"*"``
(everything); the channel is one of ``CHANNELS`` or ``"*"``. Within one layer (the user's
rules, or the tenant's defaults) the most specific matching rule wins::

    topic x channel > topic x * > category x channel > category x * > * x channel > * x *

and a layer decides as a whole: any matching user rule beats every tenant default, so a user
who turned SMS off (``* x sms``) is not turned back on by a tenant's ``security x *``. No
matching rule in either layer: allowed.

Caps limit deliveries per sliding window for a scope x channel; all matching caps apply, and
a user's cap replaces the tenant's cap of the same scope x channel (it may raise or lower
it). Quiet hours are the user's if set, else the tenant's.

Checks (each an :class:`InvalidRequest` naming the field, e.g. ``rules[3].channel``): a rule
or cap names a topic or a category, not both; channels are known or ``"*"``; no two rules or
two caps share a scope x channel; quiet hours start and end differ; counts and durations
are bounded (``MAX_*``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final, NamedTuple

from broker.errors import InvalidRequest
from notify.durations import DAY, MINUTE, duration_ms, parse_clock, parse_duration
from notify.model import (
    CHANNELS,
    Cap,
    Preferences,
    Rule,
    StoredCap,
    StoredPreferences,
    StoredQuietHours,
    StoredRule,
)

MAX_RULES: Final = 100
MAX_CAPS: Final = 20
MAX_CAP_COUNT: Final = 1_000  # a cap's max (a window keeps this many send times)
CAP_PER_MS: Final = (MINUTE, 90 * DAY)
MAX_NAME: Final = 200  # characters of a topic or category in a rule or cap


class Scope(NamedTuple):
    """What a rule or cap is about: ``kind`` "topic", "category" or "*"."""

    kind: str
    name: str
    channel: str

    def text(self) -> str:
        what = "*" if self.kind == "*" else f"{self.kind}={self.name}"
        return f"{what}, channel={self.channel}"


def scope_of(rule: StoredRule | StoredCap | Rule | Cap) -> Scope:
    """The scope of a rule or cap (a topic or category of ``"*"`` is everything)."""
    if rule.topic is not None and rule.topic != "*":
        return Scope("topic", rule.topic, rule.channel)
    if rule.category is not None and rule.category != "*":
        return Scope("category", rule.category, rule.channel)
    return Scope("*", "*", rule.channel)


_KIND_RANK: Final = {"topic": 4, "category": 2, "*": 0}


def rank(scope: Scope, topic: str, category: str | None, channel: str) -> int:
    """How specifically ``scope`` matches (topic, category, channel): 5 for topic x channel
    down to 0 for * x *; -1 when it does not match."""
    if scope.channel != "*" and scope.channel != channel:
        return -1
    if scope.kind == "topic" and scope.name != topic:
        return -1
    if scope.kind == "category" and scope.name != category:
        return -1
    return _KIND_RANK[scope.kind] + (scope.channel != "*")


# ----------------------------------------------------------------------------- checking
def check_preferences(body: Preferences, *, now_ms: int) -> StoredPreferences:
    """Check a preferences body and answer its stored form. Raises :class:`InvalidRequest`
    naming the field at fault (see the module docstring)."""
    if len(body.rules) > MAX_RULES:
        raise InvalidRequest(f"rules: at most {MAX_RULES}", field="rules")
    if len(body.caps) > MAX_CAPS:
        raise InvalidRequest(f"caps: at most {MAX_CAPS}", field="caps")
    rules = []
    seen: dict[Scope, int] = {}
    for i, r in enumerate(body.rules):
        scope = _check_scope(r, f"rules[{i}]", seen, i)
        rules.append(
            StoredRule(
                topic=scope.name if scope.kind == "topic" else None,
                category=scope.name if scope.kind == "category" else None,
                channel=scope.channel,
                allow=r.allow,
            )
        )
    quiet = None
    if body.quiet_hours is not None:
        start = parse_clock(body.quiet_hours.start, field="quiet_hours.start")
        end = parse_clock(body.quiet_hours.end, field="quiet_hours.end")
        if start == end:
            raise InvalidRequest(
                "quiet_hours: start and end are the same time (leave quiet_hours out for none)",
                field="quiet_hours",
            )
        quiet = StoredQuietHours(start=body.quiet_hours.start, end=body.quiet_hours.end)
    caps = []
    seen = {}
    for i, c in enumerate(body.caps):
        where = f"caps[{i}]"
        scope = _check_scope(c, where, seen, i)
        if not 1 <= c.max <= MAX_CAP_COUNT:
            raise InvalidRequest(f"{where}.max: 1 to {MAX_CAP_COUNT}", field=f"{where}.max")
        parse_duration(c.per, field=f"{where}.per", min_ms=CAP_PER_MS[0], max_ms=CAP_PER_MS[1])
        caps.append(
            StoredCap(
                topic=scope.name if scope.kind == "topic" else None,
                category=scope.name if scope.kind == "category" else None,
                channel=scope.channel,
                max=c.max,
                per=c.per,
            )
        )
    return StoredPreferences(rules=rules, quiet_hours=quiet, caps=caps, updated_ms=now_ms)


def _check_scope(item: Rule | Cap, where: str, seen: dict[Scope, int], i: int) -> Scope:
    if item.topic is not None and item.category is not None:
        raise InvalidRequest(f"{where}: a topic or a category, not both", field=where)
    for name, value in (("topic", item.topic), ("category", item.category)):
        if value is not None and not 1 <= len(value) <= MAX_NAME:
            raise InvalidRequest(
                f"{where}.{name}: 1-{MAX_NAME} characters", field=f"{where}.{name}"
            )
    if item.channel != "*" and item.channel not in CHANNELS:
        raise InvalidRequest(
            f"{where}.channel: one of {', '.join(CHANNELS)} or *", field=f"{where}.channel"
        )
    scope = scope_of(item)
    if scope in seen:
        kind = where.split("[")[0]
        raise InvalidRequest(
            f"{where}: same scope as {kind}[{seen[scope]}] ({scope.text()})", field=where
        )
    seen[scope] = i
    return scope


# ---------------------------------------------------------------------------- resolving
@dataclass(frozen=True, slots=True)
class RuleMatch:
    """The rule that decided: its layer ("user" or "tenant") and index in that layer."""

    allow: bool
    layer: str
    index: int
    rule: StoredRule

    def text(self) -> str:
        verdict = "allow" if self.allow else "deny"
        where = "user rule" if self.layer == "user" else "tenant default rule"
        return f"{where} rules[{self.index}] ({scope_of(self.rule).text()}): {verdict}"


def best_rule(rules: list[StoredRule], topic: str, category: str | None, channel: str) -> int:
    """The index of the most specific rule of one layer matching, -1 if none does (on a
    tie, which checked bodies never have, the first)."""
    best, best_rank = -1, -1
    for i, r in enumerate(rules):
        k = _rank(r, topic, category, channel)
        if k > best_rank:
            best, best_rank = i, k
    return best


def _rank(r: StoredRule | StoredCap, topic: str, category: str | None, channel: str) -> int:
    """:func:`rank` of ``scope_of(r)`` without building the scope (the per-decision path)."""
    ch = r.channel
    if ch != "*" and ch != channel:
        return -1
    t = r.topic
    if t is not None and t != "*":
        return 4 + (ch != "*") if t == topic else -1
    c = r.category
    if c is not None and c != "*":
        return 2 + (ch != "*") if c == category else -1
    return int(ch != "*")


def resolve_rule(
    user: StoredPreferences | None,
    tenant: StoredPreferences | None,
    topic: str,
    category: str | None,
    channel: str,
) -> RuleMatch | None:
    """The rule deciding (topic, category, channel): the user's most specific matching rule,
    else the tenant's, else None (allowed)."""
    for layer, prefs in (("user", user), ("tenant", tenant)):
        if prefs is not None and prefs.rules:
            i = best_rule(prefs.rules, topic, category, channel)
            if i >= 0:
                rule = prefs.rules[i]
                return RuleMatch(rule.allow, layer, i, rule)
    return None


@dataclass(frozen=True, slots=True)
class CapMatch:
    """A cap that applies: its window key (``notify.windows``), limit and where it is."""

    key: str
    max: int
    per_ms: int
    layer: str
    index: int
    cap: StoredCap

    def text(self) -> str:
        where = "user cap" if self.layer == "user" else "tenant default cap"
        s = scope_of(self.cap)
        return f"{where} caps[{self.index}] ({s.text()}): {self.cap.max} per {self.cap.per}"


def cap_key(scope: Scope) -> str:
    """The window key of a cap's scope (one window per user and scope x channel)."""
    return f"cap\x00{scope.kind}\x00{scope.name}\x00{scope.channel}"


def matching_caps(
    user: StoredPreferences | None,
    tenant: StoredPreferences | None,
    topic: str,
    category: str | None,
    channel: str,
) -> list[CapMatch]:
    """Every cap applying to (topic, category, channel): the user's, and the tenant's whose
    scope x channel the user has no cap for."""
    found: dict[Scope, CapMatch] = {}
    for layer, prefs in (("tenant", tenant), ("user", user)):  # the user's replace
        if prefs is None:
            continue
        for i, cap in enumerate(prefs.caps):
            if _rank(cap, topic, category, channel) < 0:
                continue
            scope = scope_of(cap)
            per = duration_ms(cap.per)
            if per is None:  # a row written by a newer node with a syntax this one lacks
                continue
            found[scope] = CapMatch(cap_key(scope), cap.max, per, layer, i, cap)
    return list(found.values())


def quiet_hours_of(
    user: StoredPreferences | None, tenant: StoredPreferences | None
) -> tuple[StoredQuietHours, str] | None:
    """The quiet hours that apply and whose they are ("user" or "tenant")."""
    if user is not None and user.quiet_hours is not None:
        return user.quiet_hours, "user"
    if tenant is not None and tenant.quiet_hours is not None:
        return tenant.quiet_hours, "tenant"
    return None


@functools.lru_cache(maxsize=1024)
def clock_minutes(text: str) -> int:
    """Minutes since midnight of a stored ``"HH:MM"`` (already checked)."""
    return int(text[:2]) * 60 + int(text[3:5])
