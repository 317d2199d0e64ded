"""Twilio's webhooks (``docs/CHANNELS.md`` § SMS): ``POST /hooks/sms/inbound``, texts people
send to Herald's SMS senders, for STOP, START and HELP; ``POST /hooks/sms/status``, the
delivery receipts of the messages Herald sent (their ``StatusCallback``).

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

Delivery receipts. With ``[channels.sms] status-callback`` set, each message carries it as
its ``StatusCallback``, with a signed reference to the delivery added to the query (``ref``,
:meth:`notify.links.Signer.receipt`); Twilio then posts the message's later statuses there,
signed as above (over ``status-callback``'s scheme and host and the path and query it was
posted to). With receipts on, Twilio taking a message is recorded as ``sent`` (with the
message sid), not ``delivered``: a ``delivered`` receipt records ``delivered``, and one that
the carrier did not deliver it (``undelivered`` or ``failed``) records ``bounced``
(``GET /events/{id}``; the reason ``invalid_number``, ``recipient_unsubscribed``,
``carrier_filtered`` or ``twilio_<code>``) and acts on the contact:

- ``undelivered`` or ``failed`` with a code that says the number is no good (30005 unknown
  handset, 30006 landline or unreachable carrier, 21211, 21614): the number is invalidated,
  as a 21211 at the send does (the contact log says so, source ``status_callback``): no SMS
  goes to it again until the user's number changes. Only if it is still the user's number.
- ``undelivered`` or ``failed`` with 21610 (the recipient had texted STOP): a legal opt-out
  of SMS (source ``provider_unsubscribed``), as at the send.
- any other ``undelivered`` or ``failed`` (30007 carrier filtering, which the brief calls
  hard to detect; 30003 handset off; 30008 unknown...): noted in the contact log
  (``carrier_filtered`` or ``sms_undelivered``, with the code) and logged; nothing is
  suppressed.
- ``delivered``: recorded as above (answer ``recorded``); the intermediate statuses
  (``queued``, ``sending``, ``sent``...): logged only.

A request with no valid signature, or from an account that is not configured, is refused
with 403 and changes nothing; an address that keeps sending them is answered 429 without a
check (``admission.auth-failures-per-minute``, as for API keys).
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Final, Literal

import msgspec
from aiohttp import web

from broker.admission import AuthThrottle
from broker.errors import InvalidRequest, NotFound
from broker.openapi import Route
from channels.config import SmsConfig
from channels.twilio import keyword, signature_ok, twiml_message
from notify.links import BadToken, Signer, reported
from notify.model import AuditRecord, Consent, ContactEvent
from notify.registry import Registry

log = logging.getLogger("herald.notify.sms")

MAX_INBOUND_BYTES: Final = 16_384  # Twilio's inbound form is a few hundred bytes
_XML: Final = "text/xml"
# receipt error codes that say the number cannot take SMS (Twilio's error dictionary)
DEAD_NUMBER_CODES: Final = frozenset({"30005", "30006", "21211", "21614"})
UNSUBSCRIBED_CODE: Final = "21610"
CARRIER_FILTERED_CODE: Final = "30007"
_FAILED: Final = ("undelivered", "failed")
# Twilio's message statuses: the label values of herald_sms_receipts_total (another is
# counted as "other", so a signed sender cannot grow the counters without bound)
STATUSES: Final = frozenset(
    {
        "accepted", "scheduled", "queued", "sending", "sent", "delivered", "undelivered",
        "failed", "read", "receiving", "received", "canceled", "partially_delivered",
    }
)  # fmt: skip


def _token(value: str, limit: int, extra: str = "") -> str:
    """``value`` cut to ``limit`` and to letters, digits, ``_``, ``-`` (and ``extra``)."""
    return "".join(c for c in value[:limit] if c.isascii() and (c.isalnum() or c in "_-" + extra))


def _xml(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=_XML, charset="utf-8")


def _refused(status: int, why: str) -> web.Response:
    text = why.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error>{text}</Error>'.encode()
    return _xml(body, status)


class ReceiptOut(msgspec.Struct, kw_only=True):
    """The answer to a delivery receipt (Twilio reads only the status code)."""

    status: str
    action: Literal["invalidated", "opted_out", "noted", "recorded", "none", "ignored"]


class SmsInbound:
    """The hooks; see the module docstring. ``clock`` is wall-clock Unix ms; ``signer``
    opens the receipts' ``ref`` and ``record`` appends a transition to the audit, durably
    (without both the receipt hook answers 404)."""

    def __init__(
        self,
        config: SmsConfig,
        registry: Registry,
        clock: Callable[[], int],
        failures_per_minute: int = 30,
        signer: Signer | None = None,
        record: Callable[[AuditRecord], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.clock = clock
        self.signer = signer
        self.record = record
        # (MessageStatus, action) -> receipts taken, for herald_sms_receipts_total
        self.receipts: dict[tuple[str, str], int] = {}
        self.tokens = {p.account_sid: p.auth_token for p in config.providers}
        # forged signatures count per source address, as failed API keys do
        self.throttle = AuthThrottle(failures_per_minute, time.monotonic)

    async def _signed_form(
        self, request: web.Request, url: str, hook: str
    ) -> dict[str, str] | web.Response:
        """The form Twilio posted, if signed by a configured account over ``url``; else the
        refusal to answer (413, 429, 403). Raises :class:`InvalidRequest` for a body that is
        not a form."""
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
        given = request.headers.get("X-Twilio-Signature")
        address = request.remote or "-"
        if not self.throttle.allowed(address):
            log.warning("event=sms_%s_refused why=throttled peer=%s", hook, address)
            return _refused(429, "too many requests with no valid signature")
        if token is None or not signature_ok(token, url, params, given):
            self.throttle.failed(address)
            log.warning(
                "event=sms_%s_refused account=%s why=%s",
                hook,
                form.get("AccountSid", "")[:40] or "-",
                "unknown_account" if token is None else "bad_signature",
            )
            return _refused(403, "signature not valid")
        return form

    async def inbound(self, request: web.Request) -> web.StreamResponse:
        url = self.config.inbound_public_url or str(request.url)
        form = await self._signed_form(request, url, "inbound")
        if isinstance(form, web.Response):
            return form
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

    def _receipt_url(self, request: web.Request) -> str:
        """The URL Twilio posted the receipt to, as it signed it: ``status-callback``'s scheme
        and host (a proxy may rewrite them) with the path and query the request came with."""
        public = urllib.parse.urlsplit(self.config.status_callback)
        if not public.scheme or not public.netloc:
            return str(request.url)
        return f"{public.scheme}://{public.netloc}{request.path_qs}"

    async def status(self, request: web.Request) -> web.StreamResponse:
        if self.signer is None or self.record is None or not self.config.status_callback:
            raise NotFound("delivery receipts are off ([channels.sms] status-callback is empty)")
        form = await self._signed_form(request, self._receipt_url(request), "status")
        if isinstance(form, web.Response):
            return form
        status = form.get("MessageStatus", "")
        if not status:
            raise InvalidRequest("MessageStatus: missing", field="MessageStatus")
        try:
            ref = self.signer.open_receipt(request.query.get("ref", ""))
        except BadToken:
            raise InvalidRequest("ref: not a reference this node made", field="ref") from None
        tenant, user = ref.tenant, ref.user
        profile = self.registry.profile(tenant, user)
        if profile is None:
            raise NotFound(f"no user {user!r}")
        # what goes into logs, the contact log and the audit: Twilio's shapes, nothing else
        # (a code of digits, a sid of letters and digits, a number E.164)
        code = _token(form.get("ErrorCode", ""), 16)
        to = _token(form.get("To", ""), 32, extra="+")
        sid = _token(form.get("MessageSid", ""), 40) or "-"
        action: Literal["invalidated", "opted_out", "noted", "recorded", "none", "ignored"] = "none"
        now = self.clock()
        if status in _FAILED:
            phone = profile.contact.phone if profile.contact is not None else None
            detail = f"twilio {status} {code or '-'} (message {sid})"
            reason = f"twilio_{code}" if code else f"twilio_{status}"
            if code in DEAD_NUMBER_CODES:
                reason = "invalid_number"
                if phone and phone == to:
                    done = self.registry.invalidate_phone(
                        tenant, user, at_ms=now, reason=detail, source="status_callback"
                    )
                    action = "invalidated" if done else "ignored"
                else:
                    action = "ignored"  # the user's number changed since: the new one is fine
            elif code == UNSUBSCRIBED_CODE:
                reason = "recipient_unsubscribed"
                self.registry.note_consent(
                    tenant,
                    user,
                    Consent(
                        channel="sms",
                        opted_in=False,
                        at_ms=now,
                        source="provider_unsubscribed",
                        legal=True,
                    ),
                )
                action = "opted_out"
            else:
                kind = "carrier_filtered" if code == CARRIER_FILTERED_CODE else "sms_undelivered"
                if code == CARRIER_FILTERED_CODE:
                    reason = "carrier_filtered"
                self.registry.note_contact(
                    tenant,
                    user,
                    ContactEvent(
                        at_ms=now,
                        channel="sms",
                        kind=kind,
                        source="status_callback",
                        address=to or None,
                        detail=detail,
                    ),
                )
                action = "noted"
            # both durable before Twilio hears back
            bounce = reported(ref, "sms", "bounced", reason, detail, now)
            await asyncio.gather(self.registry.sync(), self.record(bounce))
        elif status == "delivered":  # the carrier says it reached the handset
            await self.record(
                reported(ref, "sms", "delivered", None, f"twilio delivered (message {sid})", now)
            )
            action = "recorded"
        known = status if status in STATUSES else "other"
        counted = (known, action)
        self.receipts[counted] = self.receipts.get(counted, 0) + 1
        level = logging.WARNING if status in _FAILED else logging.INFO
        log.log(
            level,
            "event=sms_receipt tenant=%s user=%s message_sid=%s status=%s code=%s action=%s",
            tenant,
            user,
            sid,
            known,
            code or "-",
            action,
        )
        return web.Response(
            body=msgspec.json.encode(ReceiptOut(status=status[:20], action=action)),
            content_type="application/json",
        )

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
            ),
            Route(
                "POST",
                "/hooks/sms/status",
                self.status,
                "SMS delivery receipts (Twilio's StatusCallback)",
                "consent",
                scopes=None,
                answer=ReceiptOut,
                errors=(400, 403, 404, 413, 429),
                body_types=("application/x-www-form-urlencoded",),
                description="Form-encoded as Twilio posts it, signed with X-Twilio-Signature, "
                "to [channels.sms] status-callback with the recipient's signed ref in the "
                "query. undelivered or failed turns the delivery's status to bounced; with "
                "30005, 30006, 21211 or 21614 it also invalidates the number, with 21610 it "
                "is a legal opt-out of SMS, and other failures (30007 carrier filtering...) "
                "are noted in the contact log. Recorded before the answer.",
            ),
        ]


def sms_hooks(
    config: SmsConfig,
    registry: Registry,
    clock: Callable[[], int],
    failures_per_minute: int = 30,
    signer: Signer | None = None,
    record: Callable[[AuditRecord], Awaitable[None]] | None = None,
) -> SmsInbound:
    """The hooks, for the node to add their :meth:`SmsInbound.routes` to its HTTP app (and
    read their counters). ``failures_per_minute``: requests with no valid signature an
    address may send in a burst, then one every ``60 / failures_per_minute`` s
    (``admission.auth-failures-per-minute``); beyond it 429."""
    return SmsInbound(config, registry, clock, failures_per_minute, signer, record)
