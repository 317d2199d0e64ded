"""The gateway's wire protocol (``docs/GATEWAY.md``), sans I/O: JSON text messages in, typed
events out; typed messages in, bytes to send out. No sockets, no clock, no storage.

Server -> client (one JSON object per WebSocket text message, ``type`` first)::

    {"type": "notification", "id", "event_id", "topic", "payload", "ts", "cursor"}
    {"type": "retract", "id"}
    {"type": "counts", "unseen", "unread"}
    {"type": "ready", "cursor", "backfilled", "truncated"}   after the backfill, once
    {"type": "error", "code", "message"}                      a message refused, connection kept

Client -> server::

    {"type": "auth", "token"}                 the first message, when the URL has no token
    {"type": "seen" | "read" | "archived", "ids": [...]}

A ``notification``'s ``payload`` is the event's data passed through as the producer wrote it
(JSON, never re-encoded: :func:`notification` splices the raw bytes in). ``cursor`` is the
gateway's position after this message in the user's stream (in-app notifications and the
tenant's broadcasts, in one order): a client that reconnects with it gets exactly what came
after, see ``gateway/inbox.py``. A broadcast's message is the same bytes for every recipient.

Refusals close the connection with a code from :data:`CLOSE` and a short reason; every code is
in the 4000-4999 range the RFC leaves to applications, except the standard ones websockets
sends itself (1009 too big, 1011 internal error, 1001 going away).
"""

from __future__ import annotations

from typing import Final

import msgspec

MAX_IDS: Final = 500  # ids per seen/read/archived message


class ProtocolViolation(Exception):
    """A client message the gateway cannot accept: answered with an ``error`` message (the
    connection stays open) unless it is the authentication message."""

    code = "bad_message"

    def __init__(self, message: str, code: str = "bad_message") -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------- close codes
class Close(msgspec.Struct, frozen=True):
    """A close code and the reason sent with it (at most 123 bytes, the RFC's limit)."""

    code: int
    reason: str


CLOSE: Final = {
    "token_missing": Close(4001, "token missing: pass ?token= or send an auth message first"),
    "token_invalid": Close(4002, "token invalid"),
    "token_expired": Close(4003, "token expired"),
    "tenant_refused": Close(4004, "tenant refused"),
    "slow_consumer": Close(4008, "send buffer full: reconnect with your last cursor"),
    "rate_limited": Close(4009, "too many messages"),
    "protocol_error": Close(4010, "protocol error"),
    "idle_timeout": Close(4011, "idle timeout"),
    "going_away": Close(1001, "node stopping"),
}


# -------------------------------------------------------------------- client -> server
class Auth(msgspec.Struct, frozen=True, tag="auth", forbid_unknown_fields=True):
    token: str


class Seen(msgspec.Struct, frozen=True, tag="seen", forbid_unknown_fields=True):
    ids: list[str]


class Read(msgspec.Struct, frozen=True, tag="read", forbid_unknown_fields=True):
    ids: list[str]


class Archived(msgspec.Struct, frozen=True, tag="archived", forbid_unknown_fields=True):
    ids: list[str]


ClientMessage = Auth | Seen | Read | Archived
Engagement = Seen | Read | Archived

_decode_client = msgspec.json.Decoder(ClientMessage).decode


def decode_client(data: str | bytes) -> ClientMessage:
    """One client message, validated. Raises :class:`ProtocolViolation` naming what is wrong
    (not JSON, an unknown ``type``, a missing or mistyped field, too many ids)."""
    try:
        msg = _decode_client(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolViolation(str(exc)) from None
    if not isinstance(msg, Auth):
        if len(msg.ids) > MAX_IDS:
            raise ProtocolViolation(f"at most {MAX_IDS} ids per message")
        if any(not i or len(i) > 200 for i in msg.ids):
            raise ProtocolViolation("an id is 1-200 characters")
    return msg


def engagement_of(msg: Engagement) -> str:
    """The engagement a message records: ``seen``, ``read`` or ``archived``."""
    return type(msg).__struct_config__.tag  # type: ignore[return-value]


# -------------------------------------------------------------------- server -> client
class _Retract(msgspec.Struct, tag="retract", tag_field="type"):
    id: str


class _Counts(msgspec.Struct, tag="counts", tag_field="type"):
    unseen: int
    unread: int


class _Ready(msgspec.Struct, tag="ready", tag_field="type"):
    cursor: str
    backfilled: int
    truncated: bool


class _Error(msgspec.Struct, tag="error", tag_field="type"):
    code: str
    message: str


class _Notification(msgspec.Struct, tag="notification", tag_field="type"):
    id: str
    event_id: str
    topic: str
    payload: msgspec.Raw
    ts: int
    cursor: str


_encode = msgspec.json.Encoder().encode


def notification(id: str, event_id: str, topic: str, payload: bytes, ts: int, cursor: str) -> bytes:
    """A ``notification`` message. ``payload`` is JSON text and is copied in as it is (an
    empty one becomes ``null``); the caller vouches for it being JSON (it was validated
    when the event was accepted)."""
    return _encode(_Notification(id, event_id, topic, msgspec.Raw(payload or b"null"), ts, cursor))


def retract(id: str) -> bytes:
    return _encode(_Retract(id))


def counts(unseen: int, unread: int) -> bytes:
    return _encode(_Counts(unseen, unread))


def ready(cursor: str, backfilled: int, truncated: bool) -> bytes:
    return _encode(_Ready(cursor, backfilled, truncated))


def error(code: str, message: str) -> bytes:
    return _encode(_Error(code, message[:300]))


# ---------------------------------------------------------------------- wire framing
def text_frame(message: bytes) -> bytes:
    """The bytes of one WebSocket text frame carrying ``message`` as a server sends it
    (RFC 6455 section 5.2: FIN, opcode 1, unmasked, not fragmented, no extension: the gateway
    turns compression off). Built once per message, so a broadcast writes the very same bytes
    to every recipient's transport instead of framing it again per connection (websockets'
    ``send_text`` costs ~4 us a connection, 40 ms for 10,000)."""
    n = len(message)
    if n < 126:
        return bytes((0x81, n)) + message
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + message
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + message


# --------------------------------------------------------------------------- cursors
def format_cursor(seq: int) -> str:
    """A stream position as clients see it (opaque to them: today the decimal sequence)."""
    return str(seq)


def parse_cursor(text: str | None) -> int | None:
    """The position a client sent (None: it sent none). Raises :class:`ProtocolViolation`
    for one the gateway never issues."""
    if text is None or text == "":
        return None
    if not text.isdigit() or len(text) > 19:
        raise ProtocolViolation(f"cursor {text[:40]!r} was not issued by this gateway")
    return int(text)
