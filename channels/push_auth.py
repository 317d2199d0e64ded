"""Credentials of the push services: APNs provider tokens and FCM's OAuth2 access tokens.

**APNs** (token-based connection): every request carries ``authorization: bearer <JWT>``, a
JWT with header ``{"alg": "ES256", "kid": <key id>}`` and claims ``{"iss": <team id>, "iat":
<unix seconds>}``, signed with the team's P-256 key (the ``.p8`` file). Apple refuses a token
older than an hour (403 ``ExpiredProviderToken``) and one renewed more often than every 20
minutes (429 ``TooManyProviderTokenUpdates``), so :class:`ApnsTokens` keeps one token and signs
a new one when it reaches ``token-refresh-ms`` (40 minutes by default).

**FCM** (HTTP v1): every request carries ``Authorization: Bearer <access token>``, obtained
from the service account's JWT grant (RFC 7523): a JWT ``{"iss": client_email, "scope":
..., "aud": token_uri, "iat", "exp": iat + 3600}`` signed RS256 with the account's private
key, POSTed form-encoded as ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&
assertion=<JWT>`` to the token endpoint, which answers ``{"access_token", "expires_in",
"token_type": "Bearer"}``. :class:`OAuthTokens` keeps the token until ``token-margin-ms``
before it expires; concurrent sends share one fetch.

Signing uses PyJWT over ``cryptography``; the clock (wall-clock seconds) is injected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import msgspec

from channels.errors import ChannelError


class CredentialError(ChannelError):
    """A push credential is missing, unreadable, or the token endpoint would not grant one."""

    code = "credential_error"


class ApnsTokens:
    """The current APNs provider token, signed again at ``refresh_s`` of age."""

    def __init__(
        self,
        key_pem: bytes,
        key_id: str,
        team_id: str,
        refresh_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._key = key_pem
        self.key_id = key_id
        self.team_id = team_id
        self._refresh_s = refresh_s
        self._clock = clock
        self._token: str | None = None
        self._issued = 0.0
        self.signed = 0  # tokens signed so far (Apple throttles renewals)

    @classmethod
    def from_file(
        cls, path: str, key_id: str, team_id: str, refresh_s: float, clock: Callable[[], float]
    ) -> ApnsTokens:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise CredentialError(f"APNs key file {path!r}: {exc.strerror}") from None
        return cls(pem, key_id, team_id, refresh_s, clock)

    def token(self) -> str:
        now = self._clock()
        if self._token is None or now - self._issued >= self._refresh_s:
            self._issued = now
            self._token = jwt.encode(
                {"iss": self.team_id, "iat": int(now)},
                self._key,
                algorithm="ES256",
                headers={"kid": self.key_id},
            )
            self.signed += 1
        return self._token

    def expired(self, token: str) -> None:
        """APNs said ``token`` expired (a clock jump): sign a new one on the next call."""
        if token == self._token:
            self._token = None


class ServiceAccount(msgspec.Struct, kw_only=True):
    """The fields of a Google service account key file that the grant needs."""

    client_email: str
    private_key: str
    token_uri: str = "https://oauth2.googleapis.com/token"
    private_key_id: str = ""
    project_id: str = ""


class _Grant(msgspec.Struct):
    access_token: str
    expires_in: int = 3600
    token_type: str = "Bearer"


def load_service_account(path: str) -> ServiceAccount:
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=ServiceAccount)
    except OSError as exc:
        raise CredentialError(f"service account file {path!r}: {exc.strerror}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CredentialError(f"service account file {path!r}: {exc}") from None


class OAuthTokens:
    """An OAuth2 access token from a service account's JWT grant, cached until
    ``margin_s`` before it expires. :meth:`token` raises :class:`CredentialError`."""

    GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"

    def __init__(
        self,
        account: ServiceAccount,
        *,
        scope: str,
        token_uri: str = "",
        margin_s: float,
        timeout_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.account = account
        self.scope = scope
        self.token_uri = token_uri or account.token_uri
        self._margin_s = margin_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()
        self.fetched = 0  # grants asked for so far

    def assertion(self, now: float) -> str:
        """The signed JWT the token endpoint is asked to exchange."""
        claims: dict[str, Any] = {
            "iss": self.account.client_email,
            "scope": self.scope,
            "aud": self.token_uri,
            "iat": int(now),
            "exp": int(now) + 3600,
        }
        headers = {"kid": self.account.private_key_id} if self.account.private_key_id else None
        return jwt.encode(claims, self.account.private_key, algorithm="RS256", headers=headers)

    async def token(self, session: aiohttp.ClientSession) -> str:
        if self._token is not None and self._clock() < self._expires - self._margin_s:
            return self._token
        async with self._lock:  # one fetch for every send that found the token stale
            if self._token is not None and self._clock() < self._expires - self._margin_s:
                return self._token
            now = self._clock()
            form = {"grant_type": self.GRANT_TYPE, "assertion": self.assertion(now)}
            try:
                async with asyncio.timeout(self._timeout_s):
                    async with session.post(self.token_uri, data=form) as resp:
                        body = await resp.content.read(65_536)
                        status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise CredentialError(f"token endpoint: {str(exc) or type(exc).__name__}")
            self.fetched += 1
            if status != 200:
                text = " ".join(body[:200].decode("utf-8", "replace").split())
                raise CredentialError(f"token endpoint answered HTTP {status}: {text}")
            try:
                grant = msgspec.json.decode(body, type=_Grant)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise CredentialError(f"token endpoint's answer: {exc}") from None
            self._token, self._expires = grant.access_token, now + grant.expires_in
            return grant.access_token

    def rejected(self, token: str) -> None:
        """FCM refused ``token`` (401): fetch a new one next time."""
        if token == self._token:
            self._token = None
