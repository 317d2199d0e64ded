"""HTTP routes of the email channel, templates and consent links (``docs/HTTP.md``):

- ``POST /unsubscribe/{token}``: RFC 8058 one-click unsubscribe. No API key (the mail
  provider posts ``List-Unsubscribe=One-Click`` with no cookies and no context); the token,
  HMAC-signed with the node's secret, is the proof. Recorded at once in the consent ledger as
  a legal opt-out (source ``unsubscribe_link``) of the channel within the token's scope (the
  mail's category, else its topic), so the next event's policy, and the worker's check just
  before each send, see it. Answers 200 with a short page, never a redirect (RFC 8058).
  Posting the same token again records nothing new.
- ``GET /unsubscribe/{token}``: a small page with a button that makes that POST. A GET never
  unsubscribes: link scanners and prefetchers fetch GETs.
- ``POST /hooks/email/bounce``: bounce and complaint intake, ``Authorization: Bearer
  <[channels.email] bounce-secret>``. A hard bounce invalidates the address (the profile
  says when and why; the contact log keeps it), a soft bounce is noted in the contact log, a
  complaint is a legal opt-out of email (source ``complaint``). The recipient is named by
  ``ref`` (the ``X-Herald-Ref`` header of the bounced mail) or by ``tenant`` and ``user``.
  The ref names the delivery too (a ``receipt`` token, ``notify/links.py``; an older mail's
  ref names only the recipient and is still taken): a hard bounce then also turns that
  delivery's status to ``bounced`` (reason ``hard_bounce``), durable with the address change.
- ``GET /templates``, ``PUT|GET|DELETE /templates/{topic}/{channel}``, ``POST
  /templates/{topic}/{channel}/preview``: the key's tenant's templates (``notify/templates.py``);
  reads need ``consume`` or ``admin``, writes ``admin``.

The broker's app serves them (``herald/node.py`` adds them); errors are the broker's JSON
errors, except the unsubscribe pages, which answer text/html for a person.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal

import msgspec
from aiohttp import web

from broker.admission import AuthThrottle
from broker.auth import Principal
from broker.config import Config
from broker.errors import AuthThrottled, Forbidden, InvalidRequest, NotFound, Unauthenticated
from broker.openapi import Route
from channels.base import EmailContent, PushContent, SmsContent
from notify import render
from notify.api_base import checked_id
from notify.compose import Composer
from notify.links import BadToken, Receipt, Signer, reported
from notify.model import AuditRecord, Consent, ContactEvent
from notify.registry import Registry
from notify.render import RenderError
from notify.templates import (
    PreviewIn,
    PreviewOut,
    TemplateIn,
    TemplateOut,
    Templates,
)

log = logging.getLogger("herald.notify.http")

# the bodies a one-click unsubscribe may come with (RFC 8058 section 3.1): the HTTP listener
# takes these on that route instead of JSON
ONE_CLICK_TYPES: Final = ("application/x-www-form-urlencoded", "multipart/form-data")

READ: Final = ("consume", "admin")
WRITE: Final = ("admin",)
MAX_FORM_BYTES: Final = 4096


class BounceIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /hooks/email/bounce``."""

    type: Literal["hard", "soft", "complaint"]
    ref: str | None = None  # the X-Herald-Ref header of the bounced mail
    tenant: str | None = None
    user: str | None = None
    email: str | None = None  # the address that bounced; a hard bounce of another is ignored
    detail: str = ""  # the provider's diagnostic, e.g. "550 5.1.1 user unknown"


class BounceOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    tenant: str
    user: str
    action: Literal["invalidated", "noted", "opted_out", "ignored"]
    # a hard bounce whose ref names the delivery (mail sent since 2026-12-07): its event,
    # whose status for this user on email is now "bounced"
    event_id: str | None = None


class TemplatesOut(msgspec.Struct, kw_only=True):
    templates: list[TemplateOut]


class TemplateDeleted(msgspec.Struct, kw_only=True):
    deleted: str  # "topic/channel"


_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport"
content="width=device-width, initial-scale=1"><title>{title}</title></head>
<body style="font-family: sans-serif; max-width: 32rem; margin: 3rem auto;">
<h1 style="font-size: 1.3rem">{title}</h1><p>{text}</p>{form}</body></html>
"""


def _page(title: str, text: str, form: str = "", status: int = 200) -> web.Response:
    body = _PAGE.format(title=html.escape(title), text=html.escape(text), form=form)
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )


def _describe(scope: str | None, channel: str) -> str:
    if scope is None:
        return f"all {channel}"
    kind, _, name = scope.partition(":")
    return f'{channel} of the {kind} "{name}"'


class EmailHttp:
    def __init__(
        self,
        config: Config,
        registry: Registry,
        templates: Templates,
        signer: Signer,
        composer: Composer,
        principal: Callable[[web.Request], Principal],
        clock: Callable[[], int],
        record: Callable[[AuditRecord], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.templates = templates
        self.signer = signer
        self.composer = composer
        self.principal = principal
        self.clock = clock
        self.record = record  # appends a transition to the audit, durably (Engine.record)
        self._enc = msgspec.json.Encoder()
        self.bounce_secret = config.channels.email.bounce_secret.encode()
        # wrong secrets count per source address, as failed API keys do
        self.throttle = AuthThrottle(config.admission.auth_failures_per_minute, time.monotonic)

    def json(self, body: Any, status: int = 200) -> web.Response:
        return web.Response(
            body=self._enc.encode(body), status=status, content_type="application/json"
        )

    # -------------------------------------------------------------------- unsubscribe
    async def unsubscribe_page(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        try:
            claim = self.signer.open_unsubscribe(token)
        except BadToken:
            return _page("Link not valid", "This unsubscribe link is not valid.", status=404)
        form = (
            f'<form method="post" action="{html.escape(token)}">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>'
        )
        what = _describe(claim.scope, claim.channel)
        return _page("Unsubscribe", f"Stop receiving {what}?", form)

    async def unsubscribe(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
            return _page("Too large", "The request is too large.", status=413)
        await request.content.read(MAX_FORM_BYTES)  # the one-click form; the token decides
        try:
            claim = self.signer.open_unsubscribe(token)
        except BadToken:
            return _page("Link not valid", "This unsubscribe link is not valid.", status=404)
        scope_key = claim.channel if claim.scope is None else f"{claim.channel}/{claim.scope}"
        state = self.registry.consent_state(claim.tenant, claim.user).get(scope_key)
        if state is None or state.opted_in or not state.legal:
            now = self.clock()
            await self.registry.record_consent(
                claim.tenant,
                claim.user,
                Consent(
                    channel=claim.channel,
                    scope=claim.scope,
                    opted_in=False,
                    legal=True,
                    at_ms=now,
                    source="unsubscribe_link",
                ),
            )
            log.info(
                "event=unsubscribed tenant=%s user=%s channel=%s scope=%s",
                claim.tenant,
                claim.user,
                claim.channel,
                msgspec.json.encode(claim.scope).decode(),
            )
        what = _describe(claim.scope, claim.channel)
        return _page("Unsubscribed", f"You will no longer receive {what}.")

    # ------------------------------------------------------------------------ bounces
    async def bounce(self, request: web.Request) -> web.StreamResponse:
        if not self.bounce_secret:
            raise NotFound("the bounce hook is off ([channels.email] bounce-secret is empty)")
        address = request.remote or "-"
        if not self.throttle.allowed(address):
            raise AuthThrottled("too many wrong bounce secrets from this address")
        given = request.headers.get("Authorization", "").encode()
        if not given.startswith(b"Bearer "):
            raise Unauthenticated("a bearer secret is required")
        if not hmac.compare_digest(given[7:].strip(), self.bounce_secret):
            self.throttle.failed(address)
            raise Forbidden("the bounce secret does not match")
        body = msgspec.json.decode(await request.read(), type=BounceIn)
        receipt: Receipt | None = None
        if body.ref is not None:
            try:
                receipt = self.signer.open_receipt(body.ref)
                tenant, user = receipt.tenant, receipt.user
            except BadToken:
                try:  # mail sent before the refs named the delivery
                    ref = self.signer.open_ref(body.ref)
                except BadToken:
                    raise InvalidRequest(
                        "ref: not a reference this node made", field="ref"
                    ) from None
                tenant, user = ref.tenant, ref.user
        elif body.tenant is not None and body.user is not None:
            tenant, user = body.tenant, body.user
        else:
            raise InvalidRequest("give ref, or tenant and user", field="ref")
        if self.registry.profile(tenant, user) is None:
            raise NotFound(f"no user {user!r}")
        now = self.clock()
        detail = " ".join(body.detail.split())[:200]
        bounced_event: str | None = None
        action: Literal["invalidated", "noted", "opted_out", "ignored"]
        if body.type == "hard":
            done = self.registry.invalidate_email(
                tenant,
                user,
                at_ms=now,
                reason=f"hard_bounce: {detail}" if detail else "hard_bounce",
                source="bounce_hook",
                address=body.email,
            )
            action = "invalidated" if done else "ignored"
            if receipt is not None and self.record is not None:
                # the delivery's status too, with the address change: both durable first
                bounce = reported(receipt, "email", "bounced", "hard_bounce", detail or None, now)
                await asyncio.gather(self.registry.sync(), self.record(bounce))
                bounced_event = receipt.event_id
            else:
                await self.registry.sync()
        elif body.type == "soft":
            self.registry.note_contact(
                tenant,
                user,
                ContactEvent(
                    at_ms=now,
                    channel="email",
                    kind="soft_bounce",
                    source="bounce_hook",
                    address=body.email,
                    detail=detail,
                ),
            )
            await self.registry.sync()
            action = "noted"
        else:
            self.registry.note_contact(
                tenant,
                user,
                ContactEvent(
                    at_ms=now,
                    channel="email",
                    kind="complaint",
                    source="bounce_hook",
                    address=body.email,
                    detail=detail,
                ),
            )
            entry = Consent(
                channel="email", opted_in=False, legal=True, at_ms=now, source="complaint"
            )
            await self.registry.record_consent(tenant, user, entry)
            action = "opted_out"
        log.warning(
            "event=email_bounce tenant=%s user=%s type=%s action=%s detail=%s",
            tenant,
            user,
            body.type,
            action,
            msgspec.json.encode(detail).decode(),
        )
        return self.json(BounceOut(tenant=tenant, user=user, action=action, event_id=bounced_event))

    # ---------------------------------------------------------------------- templates
    def _caller(self, request: web.Request, scopes: tuple[str, ...]) -> Principal:
        principal = self.principal(request)
        if not any(s in principal.scopes for s in scopes):
            raise Forbidden(f"this API key lacks the {' or '.join(map(repr, scopes))} scope")
        return principal

    @staticmethod
    def _ids(request: web.Request) -> tuple[str, str]:
        """The path's topic and channel, checked before the body is read (a bad id is a 400
        naming it, whatever the body)."""
        info = request.match_info
        return checked_id(info["topic"], "topic"), checked_id(info["channel"], "channel")

    def _out(self, topic: str, channel: str, row: Any) -> TemplateOut:
        return TemplateOut(
            topic=topic,
            channel=channel,
            locales=row.locales,
            version=row.version,
            updated_ms=row.updated_ms,
        )

    async def put_template(self, request: web.Request) -> web.StreamResponse:
        who = self._caller(request, WRITE)
        topic, channel = self._ids(request)
        body = msgspec.json.decode(await request.read(), type=TemplateIn)
        row = await self.templates.put(who.tenant, topic, channel, body, now_ms=self.clock())
        return self.json(self._out(topic, channel, row))

    async def get_template(self, request: web.Request) -> web.StreamResponse:
        who = self._caller(request, READ)
        topic, channel = self._ids(request)
        row = self.templates.get(who.tenant, topic, channel)
        if row is None:
            raise NotFound(f"no template for {topic}/{channel}")
        return self.json(self._out(topic, channel, row))

    async def delete_template(self, request: web.Request) -> web.StreamResponse:
        who = self._caller(request, WRITE)
        topic, channel = self._ids(request)
        if not await self.templates.delete(who.tenant, topic, channel):
            raise NotFound(f"no template for {topic}/{channel}")
        return self.json(TemplateDeleted(deleted=f"{topic}/{channel}"))

    async def list_templates(self, request: web.Request) -> web.StreamResponse:
        who = self._caller(request, READ)
        rows = self.templates.list(who.tenant)
        return self.json(TemplatesOut(templates=[self._out(t, c, r) for t, c, r in rows]))

    async def preview(self, request: web.Request) -> web.StreamResponse:
        who = self._caller(request, READ)
        topic, channel = self._ids(request)
        raw = await request.read()
        body = msgspec.json.decode(raw or b"{}", type=PreviewIn)
        recipient = {"id": "preview", **(body.recipient or {})}
        locale = body.locale or recipient.get("locale")
        context = {
            "data": body.data,
            "event": {
                "topic": topic,
                "event_id": "preview",
                "category": body.category,
                "priority": "normal",
            },
            "recipient": recipient,
            "activities": [],
            "unsubscribe_url": "https://example.invalid/unsubscribe/preview"
            if channel == "email"
            else None,
        }
        if body.template is not None:
            compiled = self.templates.check(channel, body.template)
            chain = render.locale_chain(locale)
            tag = next(t for t in chain if t in compiled)
            source, chosen = "given", compiled[tag]
        else:
            if channel not in render.PARTS:
                raise InvalidRequest(f"channel: no templates for {channel}", field="channel")
            source, tag, chosen = self.templates.choose(who.tenant, topic, channel, locale)
        try:
            content = render.render(
                channel,
                chosen,
                context,
                where=f"{topic}/{channel}/{tag}",
                max_output_chars=self.templates.config.max_output_chars,
                sms_max_segments=self.templates.config.sms_max_segments,
            )
        except RenderError as exc:
            raise InvalidRequest(f"render_error: {exc}", field="data") from None
        shown: dict[str, Any]
        if isinstance(content, EmailContent | PushContent | SmsContent):
            shown = msgspec.to_builtins(content)
        else:  # pragma: no cover - render returns one of the three
            shown = {}
        shown.pop("type", None)
        return self.json(PreviewOut(locale=tag, source=source, content=shown))

    # ----------------------------------------------------------------------- routes
    def routes(self) -> list[Route]:
        token = {"token": "the signed token of the mail's unsubscribe link"}
        tc = {
            "topic": "a topic name of your tenant, or * for the tenant's fallback template",
            "channel": "a channel name: email, sms, push or inapp",
        }
        html_page = "text/html"
        return [
            Route("GET", "/unsubscribe/{token}", self.unsubscribe_page,
                  "The unsubscribe page (a button that POSTs; a GET never unsubscribes)",
                  "consent", scopes=None, answer=bytes, media_type=html_page,
                  path_params=token, errors=(404,)),
            Route("POST", "/unsubscribe/{token}", self.unsubscribe,
                  "One-click unsubscribe (RFC 8058)", "consent", scopes=None, answer=bytes,
                  media_type=html_page, path_params=token, errors=(404, 413),
                  body_types=ONE_CLICK_TYPES,
                  description="Effective at once; recorded in the consent ledger with "
                  "source unsubscribe_link. The signed token is the proof. The body, if "
                  "any, is the RFC 8058 form (List-Unsubscribe=One-Click) as "
                  "application/x-www-form-urlencoded or multipart/form-data."),
            Route("POST", "/hooks/email/bounce", self.bounce, "Bounce and complaint intake",
                  "consent", scopes=None, body=BounceIn, answer=BounceOut,
                  errors=(401, 403, 404, 429), own_auth=True,
                  description="Authorization: Bearer <[channels.email] bounce-secret>. A hard "
                  "bounce invalidates the address; a complaint opts the user out of email. An "
                  "address that keeps giving wrong secrets is answered 429 without a check "
                  "(admission.auth-failures-per-minute)."),
            Route("GET", "/templates", self.list_templates, "List your templates", "templates",
                  scopes=READ, answer=TemplatesOut),
            Route("PUT", "/templates/{topic}/{channel}", self.put_template,
                  "Create or replace a template", "templates", scopes=WRITE, body=TemplateIn,
                  answer=TemplateOut, path_params=tc, errors=(507,)),
            Route("GET", "/templates/{topic}/{channel}", self.get_template, "Get a template",
                  "templates", scopes=READ, answer=TemplateOut, path_params=tc,
                  errors=(404,)),
            Route("DELETE", "/templates/{topic}/{channel}", self.delete_template,
                  "Delete a template", "templates", scopes=WRITE, answer=TemplateDeleted,
                  path_params=tc, errors=(404,)),
            Route("POST", "/templates/{topic}/{channel}/preview", self.preview,
                  "Render a template with sample data", "templates", scopes=READ,
                  body=PreviewIn, body_optional=True, answer=PreviewOut, path_params=tc,
                  errors=(404,),
                  description="The stored template (or the given one) as the locale would "
                  "see it; a missing field is a 400 render_error naming it."),
        ]  # fmt: skip


def email_routes(
    config: Config,
    registry: Registry,
    templates: Templates,
    signer: Signer,
    composer: Composer,
    principal: Callable[[web.Request], Principal],
    clock: Callable[[], int],
    record: Callable[[AuditRecord], Awaitable[None]] | None = None,
) -> list[Route]:
    """The routes of this module, for the node to add to its HTTP app."""
    return EmailHttp(
        config, registry, templates, signer, composer, principal, clock, record
    ).routes()
