"""Gateway tokens: what verifies, and every way a token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path

import pytest

from gateway import auth

SECRET = b"s" * 64
NOW = 1_800_000_000


def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def _signed(header: dict[str, object], claims: dict[str, object], secret: bytes = SECRET) -> str:
    signing = _b64(json.dumps(header).encode()) + b"." + _b64(json.dumps(claims).encode())
    sig = _b64(hmac.new(secret, signing, hashlib.sha256).digest())
    return (signing + b"." + sig).decode()


def test_a_minted_token_verifies_to_its_claims() -> None:
    token = auth.mint(SECRET, "alice", tenant="acme", now_s=NOW, ttl_s=60)
    claims = auth.verify(SECRET, token, now_s=NOW + 59)
    assert (claims.sub, claims.tenant, claims.exp, claims.iat) == ("alice", "acme", NOW + 60, NOW)


def test_a_token_made_by_another_hs256_implementation_verifies() -> None:
    token = _signed({"alg": "HS256", "typ": "JWT"}, {"sub": "bob", "exp": NOW + 5, "x": [1]})
    assert auth.verify(SECRET, token, now_s=NOW).sub == "bob"
    assert auth.verify(SECRET, token, now_s=NOW).tenant == "default"


@pytest.mark.parametrize(
    ("token", "error"),
    [
        (None, auth.TokenMissing),
        ("", auth.TokenMissing),
        ("abc", auth.TokenInvalid),
        ("a.b.c", auth.TokenInvalid),
        ("x" * 5000, auth.TokenInvalid),
        (_signed({"alg": "none"}, {"sub": "a", "exp": NOW + 5}), auth.TokenInvalid),
        (_signed({"alg": "RS256"}, {"sub": "a", "exp": NOW + 5}), auth.TokenInvalid),
        (_signed({"alg": "HS256"}, {"sub": "a", "exp": NOW + 5}, b"other"), auth.TokenInvalid),
        (_signed({"alg": "HS256"}, {"exp": NOW + 5}), auth.TokenInvalid),
        (_signed({"alg": "HS256"}, {"sub": "", "exp": NOW + 5}), auth.TokenInvalid),
        (_signed({"alg": "HS256"}, {"sub": "a\u0000b", "exp": NOW + 5}), auth.TokenInvalid),
        (_signed({"alg": "HS256"}, {"sub": "a"}), auth.TokenInvalid),
        (_signed({"alg": "HS256"}, {"sub": "a", "exp": "soon"}), auth.TokenInvalid),
        (_signed({"alg": "HS256"}, {"sub": "a", "exp": NOW}), auth.TokenExpired),
        (_signed({"alg": "HS256"}, {"sub": "a", "exp": NOW - 1}), auth.TokenExpired),
    ],
)
def test_refused_tokens_name_why(token: str | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        auth.verify(SECRET, token, now_s=NOW)


def test_a_token_with_a_changed_claim_is_invalid() -> None:
    token = auth.mint(SECRET, "alice", tenant="acme", now_s=NOW, ttl_s=60)
    head, _body, sig = token.split(".")
    forged = _b64(json.dumps({"sub": "admin", "exp": NOW + 60, "tenant": "acme"}).encode())
    with pytest.raises(auth.TokenInvalid):
        auth.verify(SECRET, f"{head}.{forged.decode()}.{sig}", now_s=NOW)


def test_mint_refuses_what_verify_would() -> None:
    with pytest.raises(ValueError):
        auth.mint(SECRET, "", tenant="t", now_s=NOW, ttl_s=60)
    with pytest.raises(ValueError):
        auth.mint(SECRET, "a", tenant="t", now_s=NOW, ttl_s=0)


def test_the_secret_is_made_once_durably_and_kept(tmp_path: Path) -> None:
    first = auth.load_or_create_secret(tmp_path / "data", None)
    assert len(first) == 64
    path = tmp_path / "data" / auth.SECRET_FILE
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert not (tmp_path / "data" / (auth.SECRET_FILE + ".tmp")).exists()
    assert auth.load_or_create_secret(tmp_path / "data", None) == first
    assert auth.load_or_create_secret(tmp_path / "data", "c" * 32) == b"c" * 32
    path.write_text("short")
    with pytest.raises(ValueError):
        auth.load_or_create_secret(tmp_path / "data", None)
