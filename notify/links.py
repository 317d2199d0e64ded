"""Signed links and references Herald puts into the mail it sends. Pure but for
:func:`node_secret`, which keeps the node's secret in the state store.

A token is ``<payload>.<signature>``: the payload is base64url (no padding) of a compact JSON
array naming what the token is about, the signature base64url of the first 16 bytes of
HMAC-SHA256 over ``<kind>.<payload>`` with the node's secret (the kind keeps a bounce
reference from passing as an unsubscribe token). Anyone can read a payload (it holds the
tenant and user ids, which the recipient's mail provider sees anyway); nobody without the
secret can make one. Tokens do not expire: an unsubscribe link must keep working as long as
the mail is in a mailbox. Changing the secret voids every link sent before.

- **unsubscribe** (``POST /unsubscribe/{token}``, RFC 8058): tenant, user, channel and scope
  (``category:<name>``, ``topic:<name>``, or None for the whole channel).
- **ref** (the ``X-Herald-Ref`` header, handed back to ``POST /hooks/email/bounce``): tenant
  and user.
- **receipt** (in an SMS's ``StatusCallback`` URL, handed back to ``POST /hooks/sms/status``):
  the delivery it is about: tenant, user, event, run, delivery and topic.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Final, TypeVar

import msgspec

from notify.model import AuditRecord
from storage.kv import KV

MAX_TOKEN_CHARS: Final = 2048
SIG_BYTES: Final = 16  # 128 bits: forging one costs 2^128 guesses, and the links stay short
SECRET_BYTES: Final = 32
_VERSION: Final = 1
_T = TypeVar("_T", bound=msgspec.Struct)


class BadToken(ValueError):
    """A token that is malformed, or not signed with this node's secret."""


class Unsubscribe(msgspec.Struct, frozen=True, array_like=True):
    """What a one-click unsubscribe link stops: ``channel`` for ``user`` of ``tenant``,
    within ``scope`` (None: the whole channel)."""

    version: int
    tenant: str
    user: str
    channel: str
    scope: str | None = None


class Ref(msgspec.Struct, frozen=True, array_like=True):
    """Whom a message went to (a bounce processor hands it back)."""

    version: int
    tenant: str
    user: str


class Receipt(msgspec.Struct, frozen=True, array_like=True):
    """The delivery a provider's receipt is about (it hands the reference back)."""

    version: int
    tenant: str
    user: str
    event_id: str
    run_id: str
    delivery_id: str
    topic: str


def reported(
    receipt: Receipt,
    channel: str,
    status: str,
    reason: str | None,
    detail: str | None,
    at_ms: int,
) -> AuditRecord:
    """The transition a provider's later report makes of the delivery ``receipt`` names:
    ``delivered`` (it reached the recipient) or ``bounced`` (it did not: a bounce, a
    failed receipt)."""
    return AuditRecord(
        tenant=receipt.tenant,
        event_id=receipt.event_id,
        user=receipt.user,
        run_id=receipt.run_id,
        channel=channel,
        delivery_id=receipt.delivery_id,
        status=status,
        reason=reason,
        detail=detail,
        topic=receipt.topic,
        at_ms=at_ms,
    )


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Makes and checks tokens with one secret (see the module docstring). Cost: one
    HMAC-SHA256 over ~100 bytes per token, about 2 us."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a link secret needs at least 16 bytes")
        self._secret = secret

    def _sign(self, kind: str, payload: str) -> str:
        mac = hmac.new(self._secret, f"{kind}.{payload}".encode(), hashlib.sha256)
        return _b64(mac.digest()[:SIG_BYTES])

    def _make(self, kind: str, value: msgspec.Struct) -> str:
        payload = _b64(msgspec.json.encode(value))
        return f"{payload}.{self._sign(kind, payload)}"

    def _open(self, kind: str, token: str) -> bytes:
        # A token is base64url: anything else is refused before compare_digest, which raises
        # TypeError on a str holding non-ASCII characters.
        if len(token) > MAX_TOKEN_CHARS or not token.isascii() or token.count(".") != 1:
            raise BadToken("not a Herald token")
        payload, sig = token.split(".")
        if not hmac.compare_digest(sig, self._sign(kind, payload)):
            raise BadToken("the signature does not match")
        try:
            return _unb64(payload)
        except (binascii.Error, ValueError):
            raise BadToken("not a Herald token") from None

    def unsubscribe_token(
        self, tenant: str, user: str, channel: str, scope: str | None = None
    ) -> str:
        return self._make("unsubscribe", Unsubscribe(_VERSION, tenant, user, channel, scope))

    def _claim(self, kind: str, token: str, type: type[_T], what: str) -> _T:
        """The claim of a valid token of ``kind``; raises :class:`BadToken` otherwise."""
        raw = self._open(kind, token)
        try:
            return msgspec.json.decode(raw, type=type)
        except msgspec.DecodeError:
            raise BadToken(f"not {what}") from None

    def open_unsubscribe(self, token: str) -> Unsubscribe:
        """The claim of a valid token; raises :class:`BadToken` otherwise."""
        return self._claim("unsubscribe", token, Unsubscribe, "an unsubscribe token")

    def ref(self, tenant: str, user: str) -> str:
        return self._make("ref", Ref(_VERSION, tenant, user))

    def open_ref(self, token: str) -> Ref:
        return self._claim("ref", token, Ref, "a Herald reference")

    def receipt(
        self, tenant: str, user: str, event_id: str, run_id: str, delivery_id: str, topic: str
    ) -> str:
        return self._make(
            "receipt", Receipt(_VERSION, tenant, user, event_id, run_id, delivery_id, topic)
        )

    def open_receipt(self, token: str) -> Receipt:
        return self._claim("receipt", token, Receipt, "a Herald receipt reference")


def unsubscribe_scope(category: str | None, topic: str) -> str:
    """What an unsubscribe link of a notification stops: its category when it has one (a
    marketing mail's link stops marketing mail), else its topic."""
    return f"category:{category}" if category else f"topic:{topic}"


class _Secret(msgspec.Struct, array_like=True):
    value: bytes


def node_secret(kv: KV, configured: str = "") -> bytes:
    """The node's link secret: ``configured`` (``notify.link-secret``; give every node of a
    deployment the same one) when set, else a random one made on first start and kept in the
    state store (``notify.secrets``), so links stay valid across restarts."""
    if configured:
        return configured.encode()
    table = kv.table("notify.secrets", _Secret)
    found = table.get("links")
    if found is not None:
        return found.value
    value = secrets.token_bytes(SECRET_BYTES)
    table.put("links", _Secret(value))
    return value
