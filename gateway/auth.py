"""Gateway tokens: HS256 JSON Web Tokens (RFC 7519) naming a user and a tenant, and the
node's secret that signs them.

Hand-rolled rather than a dependency: the gateway needs exactly one algorithm, and the
checks that matter are few and written out here, each with its failure: the header must say
``HS256`` (a token claiming ``none`` or an asymmetric algorithm is invalid, never "verified"
with the secret as a public key), the signature is compared in constant time
(:func:`hmac.compare_digest`), ``exp`` is required and checked against the clock the caller
passes (so tests inject time), ``sub`` is a non-empty user id. Pure: no I/O except
:func:`load_or_create_secret`.

Claims: ``sub`` (the user id), ``tenant`` (default ``default``), ``exp`` and ``iat`` (Unix
seconds). Other claims are ignored, so tokens minted elsewhere with the same secret work.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Final

import msgspec

from storage.durable import replace_file

SECRET_FILE: Final = "gateway.secret"
MAX_TOKEN_BYTES: Final = 4096
MAX_USER_BYTES: Final = 200


class TokenError(Exception):
    """A token the gateway refuses; ``code`` names the close reason (``gateway.frames.CLOSE``)."""

    code = "token_invalid"


class TokenMissing(TokenError):
    code = "token_missing"


class TokenInvalid(TokenError):
    code = "token_invalid"


class TokenExpired(TokenError):
    code = "token_expired"


class TenantRefused(TokenError):
    code = "tenant_refused"


class Claims(msgspec.Struct, frozen=True):
    sub: str
    exp: int
    tenant: str = "default"
    iat: int | None = None


class _Header(msgspec.Struct, frozen=True):
    alg: str
    typ: str | None = None


_HEADER: Final = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
_decode_claims = msgspec.json.Decoder(Claims).decode
_decode_header = msgspec.json.Decoder(_Header).decode
_encode = msgspec.json.Encoder().encode


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(part: bytes) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise TokenInvalid("token invalid: bad base64") from None


def mint(secret: bytes, user: str, *, tenant: str, now_s: int, ttl_s: int) -> str:
    """A token for ``user`` of ``tenant`` valid for ``ttl_s`` seconds from ``now_s``."""
    if not user or len(user.encode()) > MAX_USER_BYTES or "\0" in user:
        raise ValueError(f"a user id is 1-{MAX_USER_BYTES} bytes without NUL")
    if ttl_s <= 0:
        raise ValueError("the time to live must be positive")
    body = _b64(_encode(Claims(sub=user, exp=now_s + ttl_s, tenant=tenant, iat=now_s)))
    signing = _HEADER + b"." + body
    sig = _b64(hmac.new(secret, signing, hashlib.sha256).digest())
    return (signing + b"." + sig).decode()


def verify(secret: bytes, token: str | None, *, now_s: float) -> Claims:
    """The claims of ``token`` if it is signed with ``secret`` and not expired. Raises
    :class:`TokenMissing` (None or empty), :class:`TokenInvalid` (malformed, another
    algorithm, a bad signature, a bad ``sub``) or :class:`TokenExpired`."""
    if not token:
        raise TokenMissing("no token")
    raw = token.encode()
    if len(raw) > MAX_TOKEN_BYTES:
        raise TokenInvalid("token too long")
    parts = raw.split(b".")
    if len(parts) != 3:
        raise TokenInvalid("token invalid: not three parts")
    head, body, sig = parts
    try:
        header = _decode_header(_unb64(head))
    except (msgspec.ValidationError, msgspec.DecodeError):
        raise TokenInvalid("token invalid: bad header") from None
    if header.alg != "HS256":
        raise TokenInvalid(f"token invalid: algorithm {header.alg[:20]!r} is not HS256")
    expected = hmac.new(secret, head + b"." + body, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _unb64(sig)):
        raise TokenInvalid("token invalid: bad signature")
    try:
        claims = _decode_claims(_unb64(body))
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise TokenInvalid(f"token invalid: {exc}") from None
    if not claims.sub or len(claims.sub.encode()) > MAX_USER_BYTES or "\0" in claims.sub:
        raise TokenInvalid("token invalid: sub must be a user id")
    if "\0" in claims.tenant or not claims.tenant:
        raise TokenInvalid("token invalid: bad tenant")
    if claims.exp <= now_s:
        raise TokenExpired("token expired")
    return claims


def load_or_create_secret(data_dir: Path, configured: str | None) -> bytes:
    """The secret tokens are signed with: ``configured`` (the ``gateway.token-secret`` key)
    if set, else ``<data>/gateway.secret``, created on first use with 32 random bytes and
    written durably (temporary file, fsync, rename, directory fsync), so tokens minted
    before a crash stay valid after it. Blocking; call before the loop or in a thread."""
    if configured:
        return configured.encode()
    path = data_dir / SECRET_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        text = secrets.token_hex(32)
        replace_file(data_dir, SECRET_FILE, (text + "\n").encode())
        os.chmod(path, 0o600)
    if len(text) < 32:
        raise ValueError(f"{path}: the gateway secret is too short (at least 32 characters)")
    return text.encode()
