"""Standard Webhooks signatures (``v1``, HMAC-SHA256): secrets, signing, verification.

The spec (github.com/standard-webhooks/standard-webhooks, ``spec/standard-webhooks.md``):

- ``webhook-id``: the message id, stable across retries (Herald sends the delivery id), the
  receiver's idempotency key;
- ``webhook-timestamp``: integer Unix seconds of *this attempt*;
- ``webhook-signature``: space-separated ``v1,<base64 HMAC-SHA256>`` signatures, one per
  active secret, over the bytes ``{id}.{timestamp}.{body}`` (the raw body, as sent);
- secrets are shown as ``whsec_<base64>`` of 24 to 64 random bytes.

Secret rotation: while a receiver moves from an old secret to a new one, sign with both; the
receiver accepts any one matching signature. Pure: no I/O; the clock is an argument.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets as _random
from collections.abc import Mapping, Sequence

from channels.errors import InvalidSecret, SignatureError

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
DEFAULT_TOLERANCE_S = 300  # the reference libraries' +-5 minutes

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


def generate_secret(nbytes: int = 32) -> str:
    """A new random secret, ``whsec_<base64>`` of ``nbytes`` bytes from the OS CSPRNG."""
    if not MIN_SECRET_BYTES <= nbytes <= MAX_SECRET_BYTES:
        raise InvalidSecret(f"a secret has {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes")
    return encode_secret(_random.token_bytes(nbytes))


def encode_secret(key: bytes) -> str:
    """``whsec_<base64>`` for raw key bytes (how a secret is shown and stored)."""
    return SECRET_PREFIX + base64.b64encode(key).decode("ascii")


@functools.lru_cache(maxsize=4096)
def decode_secret(secret: str) -> bytes:
    """The key bytes of ``whsec_<base64>`` (the prefix may be left out; missing ``=`` padding
    is tolerated, as the reference libraries do). Cached: the same endpoints sign again and
    again. Raises :class:`InvalidSecret` for bad base64 or a key outside 24..64 bytes."""
    text = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecret("a webhook secret is whsec_ followed by base64") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise InvalidSecret(
            f"a webhook secret has {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, not {len(key)}"
        )
    return key


@functools.lru_cache(maxsize=4096)
def _keyed(key: bytes) -> hmac.HMAC:
    """An HMAC-SHA256 already keyed with ``key``, to copy: copying skips hashing the padded
    key again, which is a third of the cost of a signature over a small body."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _v1(key: bytes, signed: bytes) -> str:
    mac = _keyed(key).copy()
    mac.update(signed)
    return "v1," + binascii.b2a_base64(mac.digest(), newline=False).decode("ascii")


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``{msg_id}.{timestamp}.{body}``."""
    return _v1(key, b"%s.%d.%s" % (msg_id.encode(), timestamp, body))


def signature_header(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per key, space-separated."""
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    return " ".join([_v1(key, signed) for key in keys])


def webhook_headers(
    keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt."""
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature_header(keys, msg_id, timestamp, body),
    }


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[str],
    *,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> str:
    """Check a received webhook as a receiver would; answer its ``webhook-id``.

    ``headers`` may be any mapping with case-insensitive lookup (aiohttp's ``CIMultiDict``) or
    a dict with lower-case names. Passes when any ``v1`` signature in the header matches any
    of ``secrets`` (constant-time compare) and the timestamp is within ``tolerance_s`` of
    ``now``. Raises :class:`SignatureError` otherwise. Herald's own tests use this; receivers
    should use a Standard Webhooks library.
    """
    msg_id = headers.get(ID_HEADER)
    ts_text = headers.get(TIMESTAMP_HEADER)
    sig_text = headers.get(SIGNATURE_HEADER)
    if not msg_id or not ts_text or not sig_text:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    if not ts_text.isascii() or not ts_text.isdigit():
        raise SignatureError(f"webhook-timestamp is not integer seconds: {ts_text[:32]!r}")
    timestamp = int(ts_text)
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(f"webhook-timestamp {timestamp} is outside +-{tolerance_s}s of now")
    offered = [part[3:].encode() for part in sig_text.split(" ") if part.startswith("v1,")]
    for secret in secrets:
        expected = sign(decode_secret(secret), msg_id, timestamp, body)[3:].encode()
        if any(hmac.compare_digest(expected, sig) for sig in offered):
            return msg_id
    raise SignatureError("no webhook-signature matches a known secret")
