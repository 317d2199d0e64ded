"""Fake APNs and FCM on 127.0.0.1, each speaking its service's documented wire format.

:class:`FakeApns`: an HTTP/2 server over TLS (Hypercorn, ALPN ``h2``, a certificate from the
test CA) serving ``POST /3/device/<token>``. It refuses anything but HTTP/2, verifies the
provider token's ES256 signature with the team's public key (PyJWT), its ``kid``, ``iss`` and
age (older than an hour: 403 ``ExpiredProviderToken``), and checks the headers Apple checks
(``apns-topic``, ``apns-push-type``, ``apns-priority``, ``apns-expiration``,
``apns-collapse-id`` <= 64 bytes, ``apns-id`` a UUID) and the payload (JSON with ``aps``, <=
4,096 bytes). Answers: 200 with ``apns-id``; 410 ``Unregistered`` (with ``timestamp``) for
``unregistered`` tokens; 400 ``BadDeviceToken`` for tokens not 64 hex digits or in ``bad``;
503 while ``down``; 429 ``TooManyRequests`` for tokens in ``throttled``.

:class:`FakeGoogle`: an aiohttp server with the OAuth2 token endpoint (``POST /token``,
verifies the RS256 JWT-bearer assertion with the service account's public key, its ``iss``,
``aud`` and ``scope``, and grants ``access_token``s valid ``expires_in`` seconds) and FCM HTTP
v1 (``POST /v1/projects/<project>/messages:send``: checks the bearer token is one it granted
and unexpired, and the message: ``token``, ``notification``, string-only ``data``). Answers
200 ``{"name": ...}``; 404 ``UNREGISTERED``; 400 ``INVALID_ARGUMENT`` with a field violation
on ``message.token``; 503 ``UNAVAILABLE`` while ``down``; 429 ``QUOTA_EXCEEDED`` while
``quota``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from tests.integration.smtp_sink import TestCA

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class ApnsRequest:
    http_version: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    claims: dict[str, Any]
    jwt_header: dict[str, Any]


@dataclass
class FakeApns:
    public_key_pem: bytes
    key_id: str
    team_id: str
    topic: str
    ca: TestCA
    bad: set[str] = field(default_factory=set)
    unregistered: set[str] = field(default_factory=set)
    throttled: set[str] = field(default_factory=set)
    down: bool = False
    hang: bool = False
    accepted: list[ApnsRequest] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    port: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        cfg = HypercornConfig()
        cfg.bind = [f"fd://{os.dup(sock.fileno())}"]
        sock.close()
        cfg.certfile, cfg.keyfile = str(self.ca.cert_pem), str(self.ca.key_pem)
        cfg.alpn_protocols = ["h2"]
        cfg.accesslog = cfg.errorlog = None
        cfg.graceful_timeout = 0.2
        cfg.keep_alive_timeout = 1
        self._task = asyncio.create_task(
            serve(self._app, cfg, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]
        )
        for _ in range(200):  # ready when it accepts a connection
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                await w.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.01)
        raise RuntimeError("the fake APNs did not start")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        status, reason, extra = await self._answer(scope, headers, body)
        if status != 200:
            self.refused.append((status, reason))
        out = [(b"apns-id", headers.get("apns-id", str(uuid.uuid4())).encode())]
        out += [(k.encode(), v.encode()) for k, v in extra.items()]
        payload = b""
        if status != 200:
            doc: dict[str, Any] = {"reason": reason}
            if status == 410:
                doc["timestamp"] = int(time.time() * 1000)
            payload = json.dumps(doc).encode()
            out.append((b"content-type", b"application/json"))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": payload})

    async def _answer(
        self, scope: dict[str, Any], h: dict[str, str], raw: bytes
    ) -> tuple[int, str, dict[str, str]]:
        if scope["http_version"] != "2":
            return 400, "HTTP2Required", {}
        m = re.fullmatch(r"/3/device/([^/]+)", scope["path"])
        if scope["method"] != "POST" or m is None:
            return 405, "MethodNotAllowed", {}
        token = m.group(1)
        auth = h.get("authorization", "")
        if not auth.startswith("bearer "):
            return 403, "MissingProviderToken", {}
        try:
            jwt_header = jwt.get_unverified_header(auth[7:])
            claims = jwt.decode(
                auth[7:],
                self.public_key_pem,
                algorithms=["ES256"],
                options={"require": ["iss", "iat"], "verify_iat": False},
            )
        except jwt.InvalidTokenError:
            return 403, "InvalidProviderToken", {}
        if jwt_header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return 403, "InvalidProviderToken", {}
        if time.time() - claims["iat"] > 3600:
            return 403, "ExpiredProviderToken", {}
        if h.get("apns-topic") != self.topic:
            return 400, "DeviceTokenNotForTopic" if h.get("apns-topic") else "MissingTopic", {}
        if h.get("apns-push-type") not in ("alert", "background"):
            return 400, "InvalidPushType", {}
        if h.get("apns-priority") not in ("5", "10"):
            return 400, "BadPriority", {}
        if not h.get("apns-expiration", "").isdigit():
            return 400, "BadExpirationDate", {}
        if len(h.get("apns-collapse-id", "").encode()) > 64:
            return 400, "BadCollapseId", {}
        try:
            uuid.UUID(h.get("apns-id", ""))
        except ValueError:
            return 400, "BadMessageId", {}
        if len(raw) > 4096:
            return 413, "PayloadTooLarge", {}
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, "PayloadEmpty" if not raw else "BadPayload", {}
        if not isinstance(body, dict) or "aps" not in body:
            return 400, "PayloadEmpty", {}
        if self.hang:
            await asyncio.Event().wait()
        if self.down:
            return 503, "ServiceUnavailable", {"retry-after": "3"}
        if not _HEX64.fullmatch(token) or token in self.bad:
            return 400, "BadDeviceToken", {}
        if token in self.unregistered:
            return 410, "Unregistered", {}
        if token in self.throttled:
            return 429, "TooManyRequests", {}
        self.accepted.append(
            ApnsRequest(scope["http_version"], scope["path"], h, body, claims, jwt_header)
        )
        return 200, "", {}


# ------------------------------------------------------------------------------- FCM
@dataclass
class FcmRequest:
    project: str
    bearer: str
    message: dict[str, Any]


@dataclass
class FakeGoogle:
    public_key_pem: bytes
    client_email: str
    scope: str = "https://www.googleapis.com/auth/firebase.messaging"
    expires_in: int = 3600
    leeway_s: float = 0.0  # clock skew accepted on the assertion's times
    unregistered: set[str] = field(default_factory=set)
    invalid: set[str] = field(default_factory=set)
    down: bool = False
    quota: bool = False
    granted: dict[str, float] = field(default_factory=dict)  # access token -> expiry
    assertions: list[dict[str, Any]] = field(default_factory=list)
    sent: list[FcmRequest] = field(default_factory=list)
    rejected_bearers: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post(r"/v1/projects/{project}/messages:send", self._send)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            claims = jwt.decode(
                str(form.get("assertion", "")),
                self.public_key_pem,
                algorithms=["RS256"],
                audience=self.token_uri,
                issuer=self.client_email,
                leeway=self.leeway_s,
                options={"require": ["iss", "aud", "iat", "exp", "scope"]},
            )
        except jwt.InvalidTokenError as exc:
            return web.json_response(
                {"error": "invalid_grant", "error_description": str(exc)}, status=400
            )
        if claims["scope"] != self.scope:
            return web.json_response({"error": "invalid_scope"}, status=400)
        self.assertions.append(claims)
        token = "ya29." + uuid.uuid4().hex
        self.granted[token] = time.time() + self.expires_in
        return web.json_response(
            {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        )

    async def _send(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:] if auth.startswith("Bearer ") else ""
        if self.granted.get(bearer, 0) < time.time():
            self.rejected_bearers += 1
            return _google_error(401, "UNAUTHENTICATED", "Request had invalid credentials.")
        if request.content_type != "application/json":
            return _google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        doc = await request.json()
        msg = doc.get("message") if isinstance(doc, dict) else None
        if not isinstance(msg, dict) or not isinstance(msg.get("token"), str):
            return _google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        data = msg.get("data", {})
        if not all(isinstance(v, str) for v in data.values()):
            return _google_error(400, "INVALID_ARGUMENT", "data must only contain string values")
        if self.down:
            return _google_error(503, "UNAVAILABLE", "The service is currently unavailable.")
        if self.quota:
            return _google_error(
                429, "RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED", {"Retry-After": "5"}
            )
        token = msg["token"]
        if token in self.unregistered:
            return _google_error(
                404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED"
            )
        if token in self.invalid:
            return _google_error(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                "INVALID_ARGUMENT",
                field="message.token",
            )
        project = request.match_info["project"]
        self.sent.append(FcmRequest(project, bearer, msg))
        return web.json_response({"name": f"projects/{project}/messages/0:{uuid.uuid4().hex}"})


def _google_error(
    code: int,
    status: str,
    message: str,
    fcm_code: str | None = None,
    headers: dict[str, str] | None = None,
    *,
    field: str | None = None,
) -> web.Response:
    details: list[dict[str, Any]] = []
    if fcm_code:
        details.append(
            {
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": fcm_code,
            }
        )
    if field:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": field, "description": message}],
            }
        )
    body = {"error": {"code": code, "message": message, "status": status, "details": details}}
    return web.json_response(body, status=code, headers=headers)
