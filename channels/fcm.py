"""FCM HTTP v1: the request, and its answer as an outcome.

One request per device::

    POST <url>/v1/projects/<project-id>/messages:send
    Authorization: Bearer <OAuth2 access token>     (channels.push_auth.OAuthTokens)
    Content-Type: application/json

    {"message": {"token": <registration token>,
                 "notification": {"title": ..., "body": ...},
                 "data": {"event_id": ..., "topic": ..., "payload": <the event's data, JSON>},
                 "android": {"priority": "high" | "normal", "collapse_key": <delivery id>}}}

``data`` values must be strings (FCM's rule), hence the payload as JSON text. Answered ``200
{"name": "projects/<p>/messages/<id>"}`` (the name is the provider message id) or a Google
API error ``{"error": {"code", "message", "status", "details": [{"@type":
"...FcmError", "errorCode": "UNREGISTERED"}, {"@type": "...BadRequest", "fieldViolations":
[{"field": "message.token"}]}]}}``.

=======================================  =========================================  ========
answer                                   outcome                                    health
=======================================  =========================================  ========
200                                      delivered, ``name`` as the provider id     success
404 / ``UNREGISTERED``                   permanent ``unregistered``, invalidates    success
                                         the token
400 ``INVALID_ARGUMENT`` on the token    permanent ``invalid_token``, invalidates   success
403 ``SENDER_ID_MISMATCH``               permanent ``sender_id_mismatch``,          success
                                         invalidates the token (another project's)
other 400                                permanent ``fcm_invalid_argument``         success
401                                      the access token is dropped; retry         failure
429 ``QUOTA_EXCEEDED``                   retry after max(Retry-After, 60 s)         failure
500, 503 ``UNAVAILABLE`` / ``INTERNAL``  retry after Retry-After, fail over         failure
=======================================  =========================================  ========
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec

from channels.base import Delivery, Outcome
from channels.config import FcmConfig
from channels.failover import Attempt
from channels.push_auth import CredentialError, OAuthTokens
from channels.responses import Health, parse_retry_after

_encode = msgspec.json.Encoder().encode


class _Violation(msgspec.Struct):
    field: str = ""


class _Detail(msgspec.Struct, rename={"type": "@type", "error_code": "errorCode"}):
    type: str = ""
    error_code: str = ""
    field_violations: list[_Violation] = msgspec.field(default_factory=list, name="fieldViolations")


class _Error(msgspec.Struct):
    code: int = 0
    message: str = ""
    status: str = ""
    details: list[_Detail] = []


class _Answer(msgspec.Struct):
    name: str | None = None
    error: _Error | None = None


def message(delivery: Delivery, token: str, title: str, body: str) -> bytes:
    msg: dict[str, Any] = {
        "token": token,
        "notification": {"title": title, "body": body},
        "data": {
            "event_id": delivery.event_id,
            "topic": delivery.topic,
            "payload": bytes(delivery.payload).decode(),
        },
        "android": {
            "priority": "high" if delivery.priority in ("high", "critical") else "normal",
            "collapse_key": delivery.delivery_id,
        },
    }
    return _encode({"message": msg})


def classify(
    status: int,
    body: bytes,
    retry_after: str | None,
    *,
    now: float,
    cap_s: float,
    min_quota_s: float,
) -> tuple[Outcome, Health, bool]:
    """(outcome, health, failover) for one FCM answer (see the module docstring)."""
    try:
        answer = msgspec.json.decode(body, type=_Answer) if body else _Answer()
    except (msgspec.DecodeError, msgspec.ValidationError):
        answer = _Answer()
    if 200 <= status < 300:
        return Outcome.delivered(answer.name, detail=f"HTTP {status}"), "success", False
    err = answer.error or _Error()
    codes = {d.error_code for d in err.details if d.error_code}
    fields = {v.field for d in err.details for v in d.field_violations}
    what = next(iter(codes), err.status) or str(status)
    detail = f"HTTP {status} {what}: {' '.join(err.message.split())[:200]}"
    if status == 404 or "UNREGISTERED" in codes:
        return Outcome.permanent("unregistered", "token", detail=detail), "success", False
    if "SENDER_ID_MISMATCH" in codes:
        return Outcome.permanent("sender_id_mismatch", "token", detail=detail), "success", False
    if status == 400:
        on_token = "message.token" in fields or "registration token" in err.message.lower()
        if on_token:
            return Outcome.permanent("invalid_token", "token", detail=detail), "success", False
        return Outcome.permanent("fcm_invalid_argument", None, detail=detail), "success", False
    after = parse_retry_after(retry_after, now=now, cap_s=cap_s)
    if status == 429:
        after = max(after or 0.0, min_quota_s)
        return Outcome.retry(after, "quota_exceeded", detail=detail), "failure", False
    if status in (401, 403):
        return Outcome.retry(None, f"fcm_{what.lower()}", detail=detail), "failure", False
    if 400 <= status < 500:
        return Outcome.permanent(f"http_{status}", None, detail=detail), "success", False
    return Outcome.retry(after, f"http_{status}", detail=detail), "failure", True


class FcmEndpoint:
    """One FCM endpoint (a member of the push channel's FCM failover chain)."""

    def __init__(self, url: str, project_id: str) -> None:
        self.url = f"{url.rstrip('/')}/v1/projects/{project_id}/messages:send"


class FcmClient:
    """Sends to FCM over one shared ``aiohttp`` session, with the shared access token."""

    def __init__(
        self,
        config: FcmConfig,
        tokens: OAuthTokens,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.tokens = tokens
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_ms / 1000),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def send(
        self, endpoint: FcmEndpoint, delivery: Delivery, token: str, title: str, body: str
    ) -> Attempt:
        session = self.session()
        try:
            bearer = await self.tokens.token(session)
        except CredentialError as exc:
            # the token endpoint, not this FCM endpoint, failed: no verdict on its health
            return Attempt(Outcome.retry(None, "credential_error", detail=str(exc)), "unknown")
        headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"}
        try:
            async with session.post(
                endpoint.url,
                data=message(delivery, token, title, body),
                headers=headers,
                allow_redirects=False,
            ) as resp:
                answer = await resp.content.read(65_536)
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except aiohttp.ClientConnectorError as exc:
            return _transport("connect_error", exc, failover=True)
        except aiohttp.ConnectionTimeoutError as exc:
            return _transport("connect_timeout", exc, failover=True)
        except TimeoutError as exc:
            return _transport("timeout", exc, failover=False)
        except aiohttp.ClientError as exc:
            return _transport("connection_lost", exc, failover=False)
        if status == 401:
            self.tokens.rejected(bearer)
        outcome, health, failover = classify(
            status,
            answer,
            retry_after,
            now=self._clock(),
            cap_s=self.config.max_retry_after_ms / 1000,
            min_quota_s=self.config.min_quota_retry_ms / 1000,
        )
        return Attempt(outcome, health, failover)


def _transport(reason: str, exc: BaseException, *, failover: bool) -> Attempt:
    detail = " ".join((str(exc) or type(exc).__name__).split())[:200]
    return Attempt(Outcome.retry(None, reason, detail=detail), "failure", failover)
