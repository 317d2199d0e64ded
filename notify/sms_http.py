"""``POST /hooks/sms/inbound``: texts people send to Herald's SMS senders (Twilio's inbound
message webhook), for STOP, START and HELP (``docs/CHANNELS.md`` § SMS: replies).

Twilio posts each inbound message form-encoded (``AccountSid``, ``From``, ``To``, ``Body``,
``MessageSid``...) and signs it with ``X-Twilio-Signature`` (HMAC-SHA1 with the account's
auth token over the URL and the sorted parameters). The hook finds the provider by
``AccountSid`` among ``[[channels.sms.providers]]``, checks the signature over
``[channels.sms] inbound-public-url`` (else the URL the request came to), and answers TwiML:

- **stop** (``STOP``, ``STOPALL``, ``UNSUBSCRIBE``, ``CANCEL``, ``END``, ``QUIT``, and the
  FCC's ``REVOKE`` and ``OPT OUT``, in any case, spacing or punctuation, or a text that says
  stop in so many words: :func:`channels.twilio.keyword`): every user with that phone number,
  in every tenant (the senders are the node's), gets a legal opt-out of SMS in the consent
  ledger (source ``sms_stop``), durable before the answer. From then on no SMS goes to them,
  not for a mandatory topic, not at ``critical`` priority: the policy at fan-out and the
  worker just before each send both check it. The answer is the one confirmation the TCPA
  allows (``stop-text``).
- **start** (``START``, ``YES``, ``UNSTOP``): an opt-in (source ``sms_start``), which lifts
  the legal opt-out; answered ``start-text``.
- **help** (``HELP``, ``INFO``): answered ``help-text`` (who sends, how often, rates, how to
  stop), nothing recorded.
- A STOP is also kept by number (``notify.phone_stops``): a user who is given that number
  later, or a number that had no user yet when it said STOP, starts opted out of SMS (a
  legal opt-out in their ledger, source ``sms_stop``). START from the number removes it.
- anything else: an empty TwiML answer (no reply).

A request with no valid signature, or from an account that is not configured, is refused
with 403 and changes nothing; an address that keeps sending them is answered 429 without a
check (``admission.auth-failures-per-minute``, as for API keys).
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Final

from aiohttp import web

from broker.admission import AuthThrottle
from broker.errors import InvalidRequest
from broker.openapi import Route
from channels.config import SmsConfig
from channels.twilio import keyword, signature_ok, twiml_message
from notify.model import Consent
from notify.registry import Registry

log = logging.getLogger("herald.notify.sms")

MAX_INBOUND_BYTES: Final = 16_384  # Twilio's inbound form is a few hundred bytes
_XML: Final = "text/xml"


def _xml(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=_XML, charset="utf-8")


def _refused(status: int, why: str) -> web.Response:
    text = why.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error>{text}</Error>'.encode()
    return _xml(body, status)


class SmsInbound:
    """The hook; see the module docstring. ``clock`` is wall-clock Unix ms."""

    def __init__(
        self,
        config: SmsConfig,
        registry: Registry,
        clock: Callable[[], int],
        failures_per_minute: int = 30,
    ) -> None:
        self.config = config
        self.registry = registry
        self.clock = clock
        self.tokens = {p.account_sid: p.auth_token for p in config.providers}
        # forged signatures count per source address, as failed API keys do
        self.throttle = AuthThrottle(failures_per_minute, time.monotonic)

    async def inbound(self, request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > MAX_INBOUND_BYTES:
            return _refused(413, "too large")
        raw = await request.content.read(MAX_INBOUND_BYTES + 1)
        if len(raw) > MAX_INBOUND_BYTES:
            return _refused(413, "too large")
        try:
            params = urllib.parse.parse_qsl(
                raw.decode(), keep_blank_values=True, strict_parsing=bool(raw)
            )
        except (UnicodeDecodeError, ValueError):
            raise InvalidRequest("the body is not a form (application/x-www-form-urlencoded)")
        form = dict(params)
        token = self.tokens.get(form.get("AccountSid", ""))
        url = self.config.inbound_public_url or str(request.url)
        given = request.headers.get("X-Twilio-Signature")
        address = request.remote or "-"
        if not self.throttle.allowed(address):
            log.warning("event=sms_inbound_refused why=throttled peer=%s", address)
            return _refused(429, "too many requests with no valid signature")
        if token is None or not signature_ok(token, url, params, given):
            self.throttle.failed(address)
            log.warning(
                "event=sms_inbound_refused account=%s why=%s",
                form.get("AccountSid", "")[:40] or "-",
                "unknown_account" if token is None else "bad_signature",
            )
            return _refused(403, "signature not valid")
        phone, body = form.get("From", ""), form.get("Body", "")
        kind = keyword(body)
        owners = self.registry.phone_owners(phone) if phone and kind in ("stop", "start") else []
        if kind in ("stop", "start") and phone:
            now = self.clock()
            if kind == "stop":
                self.registry.note_phone_stop(phone, at_ms=now, source="sms_stop")
            else:
                self.registry.clear_phone_stop(phone)
            for tenant, user in owners:
                self.registry.note_consent(
                    tenant,
                    user,
                    Consent(
                        channel="sms",
                        opted_in=kind == "start",
                        at_ms=now,
                        source=f"sms_{kind}",
                        legal=kind == "stop",
                    ),
                )
            await self.registry.sync()  # durable before Twilio hears back
        log.info(
            "event=sms_inbound keyword=%s message_sid=%s users=%d",
            kind or "none",
            form.get("MessageSid", "-")[:40],
            len(owners),
        )
        reply = {
            "stop": self.config.stop_text,
            "start": self.config.start_text,
            "help": self.config.help_text,
        }.get(kind or "")
        return _xml(twiml_message(reply))

    def routes(self) -> list[Route]:
        return [
            Route(
                "POST",
                "/hooks/sms/inbound",
                self.inbound,
                "Inbound SMS (Twilio's webhook): STOP, START, HELP",
                "consent",
                scopes=None,
                answer=bytes,
                media_type=_XML,
                errors=(403, 413, 429),
                body_types=("application/x-www-form-urlencoded",),
                description="Form-encoded as Twilio posts it, signed with X-Twilio-Signature. "
                "STOP (and the TCPA's revocation words) is a legal opt-out of SMS for every "
                "user with the sender's number, recorded in the consent ledger before the "
                "TwiML answer; START opts back in; HELP answers who sends.",
            )
        ]


def sms_routes(
    config: SmsConfig,
    registry: Registry,
    clock: Callable[[], int],
    failures_per_minute: int = 30,
) -> list[Route]:
    """The routes of this module, for the node to add to its HTTP app. ``failures_per_minute``:
    requests with no valid signature an address may send in a burst, then one every
    ``60 / failures_per_minute`` s (``admission.auth-failures-per-minute``); beyond it 429."""
    return SmsInbound(config, registry, clock, failures_per_minute).routes()
