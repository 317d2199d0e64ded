"""Directories: the answers to the engine's questions (``notify.ports.Directory``).

:class:`RegistryDirectory` is what a node uses: it answers from ``notify.registry`` (who,
where) and ``notify.policy`` (whether, when). :class:`EmptyDirectory` knows nobody (no
workflows, subscribers, contact data or preferences): explicit recipients still get the
default channels, e.g. the console; for engines run without a registry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import msgspec

from channels.base import PushAddress, PushDevice, SmsAddress, WebhookAddress
from notify import policy, windows
from notify.conditions import parse_filter
from notify.model import Consent, StoredPreferences, Workflow
from notify.policy import ZoneLookup, system_zones
from notify.ports import Occasion, Ruling, Subscriber
from notify.registry import Registry
from notify.runs import Go, Hold, Skip, Verdict
from notify.workflows import Send

log = logging.getLogger("herald.notify")
_GO: Final = Go()


class _Nobody:
    __slots__ = ("user",)

    def __init__(self, user: str) -> None:
        self.user = user

    def fields(self) -> dict[str, Any]:
        return {"id": self.user}


class EmptyDirectory:
    def workflow(self, tenant: str, topic: str) -> Workflow | None:
        return None

    def subscribers(
        self, tenant: str, topic: str, after: str | None, limit: int
    ) -> Sequence[Subscriber]:
        return []

    def subscriptions(
        self, tenant: str, users: Sequence[str], topic: str
    ) -> Mapping[str, Subscriber]:
        return {}

    def rulings(self, tenant: str, users: Sequence[str]) -> Mapping[str, Ruling]:
        return {u: _Nobody(u) for u in users}

    def decide(
        self, occasion: Occasion, ruling: Ruling, step: Send, now_ms: int, tag: str
    ) -> Verdict:
        return Go()

    def throttle(
        self, tenant: str, user: str, key: str, max_: int, per_ms: int, now_ms: int, tag: str
    ) -> bool:
        return True

    def record(
        self, tenant: str, user: str, charges: Sequence[object], now_ms: int, tag: str
    ) -> None:
        return None

    def address(self, tenant: str, user: str, channel: str) -> object | None:
        return None

    def legal_opt_out(
        self,
        tenant: str,
        user: str,
        channel: str,
        *,
        topic: str | None = None,
        category: str | None = None,
    ) -> str | None:
        return None

    def invalidate(
        self,
        tenant: str,
        user: str,
        channel: str,
        what: str,
        detail: str,
        *,
        tokens: Sequence[str] = (),
    ) -> None:
        return None


class RegistryDirectory:
    """The directory of a node: ``notify.registry`` for who and where, ``notify.policy``
    for whether and when. The only place the engine meets their APIs."""

    def __init__(
        self,
        registry: Registry,
        *,
        zones: ZoneLookup = system_zones,
        presence: Callable[[str, str], int] | None = None,
        clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.registry = registry
        self.zones = zones
        # the gateway's connected devices per user: ``recipient.online`` in conditions (a
        # workflow's push fallback: {"channel": "push", "if": {"recipient.online": false}})
        self.presence = presence
        self.clock = clock  # wall-clock Unix ms: a rotated secret's overlap, invalidations
        self._workflows: dict[tuple[str, str], tuple[int, Workflow]] = {}
        # the policy's view of the event being fanned out (one per event, reused per user)
        self._occasion: tuple[Occasion, policy.Occasion, StoredPreferences | None] | None = None

    def workflow(self, tenant: str, topic: str) -> Workflow | None:
        row = self.registry.workflow(tenant, topic)
        if row is None:
            return None
        hit = self._workflows.get((tenant, topic))
        if hit is None or hit[0] != row.version:
            if len(self._workflows) > 4096:
                self._workflows.clear()
            hit = (row.version, msgspec.convert(row.body, Workflow))
            self._workflows[(tenant, topic)] = hit
        return hit[1]

    def subscribers(
        self, tenant: str, topic: str, after: str | None, limit: int
    ) -> Sequence[Subscriber]:
        page = self.registry.subscribers(tenant, topic, after=after, limit=limit)
        return [Subscriber(*s) for s in page.subscribers]

    def subscriptions(
        self, tenant: str, users: Sequence[str], topic: str
    ) -> Mapping[str, Subscriber]:
        out = {}
        for user in users:
            row = self.registry.subscription(tenant, user, topic)
            if row is not None:
                out[user] = Subscriber(user, tuple(row.channels), parse_filter(row.filter))
        return out

    def rulings(self, tenant: str, users: Sequence[str]) -> Mapping[str, Ruling]:
        found = self.registry.recipients(tenant, users)
        presence = self.presence
        if presence is None:
            return {r.id: r for r in found}
        replace = msgspec.structs.replace
        return {r.id: replace(r, online=presence(tenant, r.id) > 0) for r in found}

    def _policy_occasion(
        self, occasion: Occasion
    ) -> tuple[policy.Occasion, StoredPreferences | None]:
        last = self._occasion
        if last is not None and last[0] is occasion:
            return last[1], last[2]
        made = policy.Occasion(
            topic=occasion.topic,
            category=occasion.category,
            priority=occasion.priority,
            mandatory=self.registry.is_mandatory(occasion.tenant, occasion.topic),
            data=occasion.data,
            fields=occasion.fields,
        )
        defaults = self.registry.defaults(occasion.tenant)
        self._occasion = (occasion, made, defaults)
        return made, defaults

    def decide(
        self, occasion: Occasion, ruling: Ruling, step: Send, now_ms: int, tag: str
    ) -> Verdict:
        made, defaults = self._policy_occasion(occasion)
        recipient = (
            ruling
            if isinstance(ruling, policy.Recipient)
            else policy.Recipient(ruling.fields()["id"])
        )
        decision = policy.decide(step, made, recipient, defaults, now_ms=now_ms, zones=self.zones)
        if isinstance(decision, policy.Deliver):
            return Go(decision.charges) if decision.charges else _GO
        if isinstance(decision, policy.Suppress):
            return Skip(decision.reason.code, decision.reason.detail)
        return Hold(decision.until_ms, decision.reason.code, decision.reason.detail)

    def throttle(
        self, tenant: str, user: str, key: str, max_: int, per_ms: int, now_ms: int, tag: str
    ) -> bool:
        (recipient,) = self.registry.recipients(tenant, [user])
        state = recipient.windows.logs.get(key) if recipient.windows is not None else None
        ok, _log = windows.admit(
            state, max=max_, per_ms=per_ms, now_ms=now_ms, tag=windows.tag_of(tag)
        )
        if ok:
            self.registry.record_charges(
                tenant,
                [(user, [windows.Charge(key, max_, per_ms)], windows.tag_of(tag))],
                now_ms=now_ms,
            )
        return ok

    def record(
        self, tenant: str, user: str, charges: Sequence[object], now_ms: int, tag: str
    ) -> None:
        typed = [c for c in charges if isinstance(c, windows.Charge)]
        if typed:
            self.registry.record_charges(
                tenant, [(user, typed, windows.tag_of(tag))], now_ms=now_ms
            )

    def address(self, tenant: str, user: str, channel: str) -> object | None:
        if channel == "push":
            devices = tuple(
                PushDevice(token=token, platform=d.platform)  # type: ignore[arg-type]
                for token, d in self.registry.devices(tenant, user).items()
                if d.invalid_since_ms is None and d.platform in ("apns", "fcm")
            )
            return PushAddress(devices=devices) if devices else None
        if channel not in ("webhook", "sms"):
            return None
        contact = self.registry.contact(tenant, user)
        if channel == "sms":
            if contact is None or not contact.phone or contact.phone_invalid_ms is not None:
                return None
            return SmsAddress(to=contact.phone)
        hook = contact.webhook if contact is not None else None
        if hook is None or hook.disabled_ms is not None:
            return None
        # the current secret first, then a rotation's retired ones still in their overlap
        now = self.clock()
        secrets = [hook.secret] if hook.secret else []
        secrets += [r.secret for r in hook.retired if r.until_ms > now]
        return WebhookAddress(url=hook.url, secrets=tuple(secrets))

    def legal_opt_out(
        self,
        tenant: str,
        user: str,
        channel: str,
        *,
        topic: str | None = None,
        category: str | None = None,
    ) -> str | None:
        why = policy.legal_opt_out(self.registry.profile(tenant, user), channel, topic, category)
        return None if why is None else why.detail

    def invalidate(
        self,
        tenant: str,
        user: str,
        channel: str,
        what: str,
        detail: str,
        *,
        tokens: Sequence[str] = (),
    ) -> None:
        # An email address is marked dead in the profile (the policy and the worker then
        # suppress email with address_invalid) and logged in the contact log; the worker
        # syncs the state store before it commits. A webhook endpoint given up (410, failing
        # for disable-after-ms, a refused address) is disabled the same way. A phone number
        # the SMS provider refused is marked dead like an email address; dead push tokens are
        # marked invalid on the device; a provider's "unsubscribed" (Twilio 21610: the number
        # sent STOP there) is a legal opt-out in the consent ledger, so nothing is sent to it
        # again until the user opts back in.
        now_ms = self.clock()
        if channel == "email" and what == "address":
            self.registry.invalidate_email(
                tenant, user, at_ms=now_ms, reason=detail, source="delivery"
            )
        elif channel == "webhook" and what == "endpoint":
            self.registry.disable_webhook(
                tenant, user, at_ms=now_ms, reason=detail, source="delivery"
            )
        elif channel == "sms" and what == "address":
            self.registry.invalidate_phone(tenant, user, at_ms=now_ms, reason=detail)
        elif what == "consent":
            self.registry.note_consent(
                tenant,
                user,
                Consent(
                    channel=channel,
                    opted_in=False,
                    at_ms=now_ms,
                    source="provider_unsubscribed",
                    legal=True,
                ),
            )
        if tokens:
            self.registry.mark_devices_invalid(tenant, user, tokens, at_ms=now_ms, reason=detail)
        log.warning(
            "event=contact_invalid tenant=%s user=%s channel=%s what=%s detail=%s",
            tenant,
            user,
            channel,
            what,
            detail.replace(" ", "_")[:200],
        )
