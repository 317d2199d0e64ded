"""What a channel gets besides the delivery itself: the recipient's current address and the
content rendered from the tenant's template. Called by the delivery worker just before each
send (so a retry goes to the address the user has now, rendered in the locale they have now).

- **email**: the user's address (none, or one found dead, suppresses the delivery with
  ``no_channel_data`` / ``address_invalid``); the signed one-click unsubscribe URL when the
  event's category is one of ``[channels.email] list-unsubscribe-categories`` and
  ``notify.public-url`` is set; a signed reference (``X-Herald-Ref``) for bounce intake; the
  subject, text and HTML rendered.
- **push**, **sms**, **inapp**: the content rendered, the address from the directory (the
  user's phone number, their devices not found dead); none suppresses the delivery with
  the policy's reason (``no_channel_data``, ``address_invalid``).
- **webhook** and the others: the directory's address, nothing rendered (the event's data
  passes through); a webhook endpoint the channel gave up (disabled) suppresses the delivery
  with ``endpoint_disabled``.

A template that cannot be rendered (a missing field...) is a :class:`Refused` with
``render_error``: the worker dead-letters the delivery with that reason; nothing crashes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from broker.config import Config
from channels.base import Content, EmailAddress, SmsAddress
from notify import render
from notify.links import Signer, unsubscribe_scope
from notify.model import Delivery
from notify.policy import channel_data, iso
from notify.ports import Directory
from notify.registry import Registry
from notify.render import RenderError
from notify.templates import Templates

log = logging.getLogger("herald.notify")
_decode: Final = msgspec.json.Decoder().decode


@dataclass(frozen=True, slots=True)
class Prepared:
    address: Any
    content: Content | None


@dataclass(frozen=True, slots=True)
class Refused:
    """Not sent: ``suppressed`` (no usable address) or ``dead_lettered`` (render error)."""

    status: Literal["suppressed", "dead_lettered"]
    reason: str
    detail: str


class Composer:
    """See the module docstring. Without a registry (an engine on a test directory) every
    channel gets the directory's address and nothing rendered."""

    def __init__(
        self,
        directory: Directory,
        registry: Registry | None = None,
        templates: Templates | None = None,
        signer: Signer | None = None,
        config: Config | None = None,
    ) -> None:
        self.directory = directory
        self.registry = registry
        self.templates = templates
        self.signer = signer
        cfg = config or Config()
        self.public_url = cfg.notify.public_url.rstrip("/")
        self.unsubscribe_categories = frozenset(cfg.channels.email.list_unsubscribe_categories)

    def compose(self, d: Delivery) -> Prepared | Refused:
        channel = d.channel
        registry, templates = self.registry, self.templates
        if registry is not None and channel == "webhook":
            hook = registry.contact(d.tenant, d.user)
            hook_row = hook.webhook if hook is not None else None
            if hook_row is not None and hook_row.disabled_ms is not None:
                return Refused(
                    "suppressed",
                    "endpoint_disabled",
                    f"webhook endpoint {hook_row.url} disabled at "
                    f"{iso(hook_row.disabled_ms)} ({hook_row.disabled_reason})",
                )
        if registry is None or templates is None or channel not in render.PARTS:
            return Prepared(self.directory.address(d.tenant, d.user, channel), None)
        contact = registry.contact(d.tenant, d.user)
        unsubscribe_url = None
        if channel == "email":
            if contact is None or not contact.email:
                return Refused("suppressed", "no_channel_data", "no email address")
            if contact.email_invalid_ms is not None:
                return Refused(
                    "suppressed",
                    "address_invalid",
                    f"email address {contact.email} invalidated at "
                    f"{iso(contact.email_invalid_ms)} ({contact.email_invalid_reason})",
                )
            unsubscribe_url = self.unsubscribe_url(d)
            address: Any = EmailAddress(
                to=contact.email,
                unsubscribe_url=unsubscribe_url,
                ref=self._receipt(d),
            )
        else:
            address = self.directory.address(d.tenant, d.user, channel)
            if isinstance(address, SmsAddress) and self.signer is not None:
                # the StatusCallback names the delivery its receipts are about
                address = msgspec.structs.replace(address, ref=self._receipt(d))
            if address is None and channel in ("sms", "push"):
                # no number or device, or only dead ones: nothing to send to (the policy's
                # reason, as at the fan-out: no_channel_data or address_invalid)
                why = channel_data(registry.profile(d.tenant, d.user), channel)
                code, detail = (why.code, why.detail) if why else ("no_channel_data", channel)
                return Refused("suppressed", code, detail)
        recipient: dict[str, Any] = {"id": d.user}
        if contact is not None:
            for name in ("email", "phone", "timezone", "locale"):
                value = getattr(contact, name)
                if value is not None:
                    recipient[name] = value
        context = {
            "data": _json(d.data),
            "event": {
                "topic": d.topic,
                "event_id": d.event_id,
                "category": d.category,
                "priority": d.priority,
            },
            "recipient": recipient,
            "activities": [_json(a) for a in d.activities or ()],
            "unsubscribe_url": unsubscribe_url,
        }
        try:
            content = templates.render(
                d.tenant,
                d.topic,
                channel,
                context,
                locale=contact.locale if contact is not None else None,
            )
        except RenderError as exc:
            log.warning(
                "event=render_error tenant=%s delivery_id=%s topic=%s channel=%s error=%s",
                d.tenant,
                d.delivery_id,
                d.topic,
                channel,
                msgspec.json.encode(str(exc)[:300]).decode(),
            )
            return Refused("dead_lettered", "render_error", str(exc)[:300])
        return Prepared(address, content)

    def _receipt(self, d: Delivery) -> str | None:
        """The signed reference to ``d`` a provider hands back with a bounce or a receipt
        (``X-Herald-Ref``, an SMS's ``StatusCallback``): tenant, user and the delivery."""
        if self.signer is None:
            return None
        return self.signer.receipt(d.tenant, d.user, d.event_id, d.run_id, d.delivery_id, d.topic)

    def unsubscribe_url(self, d: Delivery) -> str | None:
        """The one-click link for this delivery, None when its category needs none or the
        node has no public URL."""
        if self.signer is None or not self.public_url:
            return None
        cats = self.unsubscribe_categories
        if "*" not in cats and (d.category is None or d.category not in cats):
            return None
        scope = unsubscribe_scope(d.category, d.topic)
        token = self.signer.unsubscribe_token(d.tenant, d.user, d.channel, scope)
        return f"{self.public_url}/unsubscribe/{token}"


def _json(raw: msgspec.Raw) -> Any:
    try:
        return _decode(bytes(raw))
    except msgspec.DecodeError:
        return None
