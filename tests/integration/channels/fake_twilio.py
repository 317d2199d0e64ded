"""A fake Twilio Messages API on 127.0.0.1: an aiohttp server speaking Twilio's wire format.

``POST /2010-04-01/Accounts/{sid}/Messages.json``, form-encoded, basic auth with the account
SID and its auth token. It checks what Twilio checks (auth, the form's content type, ``To``,
``Body``, one of ``From`` / ``MessagingServiceSid``) and answers as Twilio does: ``201`` with
the message resource (``sid`` ``SM`` + 32 hex), or an error JSON ``{code, message,
more_info, status}``. Behaviours a test can set:

- ``invalid``: numbers answered ``400`` code 21211 (invalid 'To' number);
- ``unsubscribed``: numbers answered ``400`` code 21610 (the number sent STOP);
- ``down``: every send answered ``503`` (with ``Retry-After`` when ``retry_after`` is set);
- ``hang``: every send waits forever (a Twilio that accepts connections and never answers).

Every request is recorded (``requests``); accepted messages in ``messages``.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Message:
    sid: str
    account: str
    form: dict[str, str]
    at: float


@dataclass
class FakeTwilio:
    accounts: dict[str, str]  # account sid -> auth token
    invalid: set[str] = field(default_factory=set)
    unsubscribed: set[str] = field(default_factory=set)
    down: bool = False
    hang: bool = False
    retry_after: str | None = None
    messages: list[Message] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str], str]] = field(default_factory=list)
    auth_failures: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None
    _hanging: set[asyncio.Task[object]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._messages)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def sent_to(self, number: str) -> list[Message]:
        return [m for m in self.messages if m.form.get("To") == number]

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        sid = request.match_info["sid"]
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append((sid, form, request.headers.get("Authorization", "")))
        if not self._authorized(sid, request.headers.get("Authorization")):
            self.auth_failures += 1
            return _error(401, 20003, "Authentication Error - invalid username")
        if self.hang:
            await asyncio.Event().wait()
        if self.down:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return _error(503, 20500, "Service Unavailable", headers)
        if request.content_type != "application/x-www-form-urlencoded":
            return _error(400, 20001, f"unexpected content type {request.content_type}")
        to = form.get("To", "")
        if not to or "Body" not in form:
            return _error(400, 21604, "A 'To' phone number and a 'Body' are required.")
        if not (form.get("From") or form.get("MessagingServiceSid")):
            return _error(400, 21603, "A 'From' phone number is required.")
        if to in self.invalid:
            return _error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if to in self.unsubscribed:
            return _error(400, 21610, "Attempt to send to unsubscribed recipient")
        msg = Message("SM" + uuid.uuid4().hex, sid, form, time.monotonic())
        self.messages.append(msg)
        return web.json_response(
            {
                "sid": msg.sid,
                "account_sid": sid,
                "to": to,
                "from": form.get("From"),
                "messaging_service_sid": form.get("MessagingServiceSid"),
                "body": form["Body"],
                "status": "queued",
                "num_segments": "1",
                "error_code": None,
                "error_message": None,
                "uri": f"/2010-04-01/Accounts/{sid}/Messages/{msg.sid}.json",
            },
            status=201,
        )

    def _authorized(self, sid: str, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == sid and self.accounts.get(sid) == password


def _error(
    status: int, code: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status=status,
        headers=headers,
    )
