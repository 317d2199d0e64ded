"""Test support for the notifications engine: a webhook receiver that verifies every
signature with the ``standardwebhooks`` package (a verifier nobody here wrote), and one
test-only directory (the engine's registry/policy seam, ``notify.ports.Directory``):

- :class:`SyntheticDirectory`: an endless, computed audience (topic ``crowd-<n>`` has users
  ``u0000000`` .. ``u<n-1>``, each with a webhook at ``<base>/hook/<user>``), for the crash
  tests (``tests/system/test_notify_crash.py``). Every other test sets its users up through
  the HTTP API; this one stays because the crash tests need 10,000 recipients, and registering
  them through the API would cost 20,000 requests before each test (about half a minute on
  this machine, measured from 1,000) for nothing the test is about.

No pytest in here: the system tests and the node entry (``node_main.py``) import it too.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook

from channels.base import WebhookAddress
from notify.model import Workflow
from notify.ports import Occasion, Ruling, Subscriber
from notify.runs import Go, Verdict
from notify.workflows import Send

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # base64 of 24 bytes: a test secret


# ----------------------------------------------------------------------- the receiver
@dataclass
class Hook:
    user: str
    webhook_id: str
    body: dict[str, Any]
    at: float
    attempt_ts: int


@dataclass
class Receiver:
    """POST /hook/<user>: verifies the signature (standardwebhooks), records, answers.

    ``down`` answers 503 to everyone; ``status[user]`` answers that status to one user.
    Every request is recorded in ``attempts``; accepted ones (2xx) in ``hooks``."""

    secret: str = SECRET
    hooks: list[Hook] = field(default_factory=list)
    attempts: list[tuple[str, str, float, int]] = field(default_factory=list)
    bad_signatures: int = 0
    down: bool = False
    status: dict[str, int] = field(default_factory=dict)
    fail_first: dict[str, int] = field(default_factory=dict)  # user -> 503s still to answer
    port: int = 0
    _runner: web.AppRunner | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, user: str) -> str:
        return f"{self.base}/hook/{user}"

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/hook/{user}", self._hook)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        user = request.match_info["user"]
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            payload = Webhook(self.secret).verify(body, headers)
        except Exception:
            self.bad_signatures += 1
            return web.Response(status=401, text="bad signature")
        wid = headers["webhook-id"]
        code = 503 if self.down else self.status.get(user, 200)
        if code < 300 and self.fail_first.get(user, 0) > 0:
            self.fail_first[user] -= 1
            code = 503
        self.attempts.append((user, wid, time.monotonic(), code))
        if 200 <= code < 300:
            self.hooks.append(
                Hook(user, wid, payload, time.monotonic(), int(headers["webhook-timestamp"]))
            )
        self._changed.set()
        return web.Response(status=code, text="ok" if code < 300 else "no")

    def ids(self) -> Counter[str]:
        return Counter(h.webhook_id for h in self.hooks)

    def for_user(self, user: str) -> list[Hook]:
        return [h for h in self.hooks if h.user == user]

    async def wait_for(
        self, check: Callable[[], bool], within: float = 10.0, what: str = "condition"
    ) -> None:
        deadline = time.monotonic() + within
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}: {len(self.hooks)} hooks")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.2))
            except TimeoutError:
                pass

    async def settle(self, quiet_s: float = 0.5) -> None:
        """Wait until nothing arrives for ``quiet_s``."""
        n = -1
        while n != len(self.attempts):
            n = len(self.attempts)
            await asyncio.sleep(quiet_s)


# ------------------------------------------------------------------------- rulings
class Person:
    __slots__ = ("user",)

    def __init__(self, user: str) -> None:
        self.user = user

    def fields(self) -> dict[str, Any]:
        return {"id": self.user}


@dataclass
class SyntheticDirectory:
    """A computed audience: topic ``crowd-<n>`` has the ``n`` subscribers ``u0000000`` ..,
    each on the webhook channel at ``<base>/hook/<user>``; every user has that webhook.
    Topics ``slow-<n>`` have the same audience behind a 1 h ``delay`` workflow (parked
    timers). Nothing is stored: paging computes the page."""

    base: str
    secret: str = SECRET

    @staticmethod
    def _size(topic: str) -> int | None:
        for prefix in ("crowd-", "slow-", "soon-"):
            if topic.startswith(prefix):
                try:
                    return int(topic[len(prefix) :])
                except ValueError:
                    return None
        return None

    def workflow(self, tenant: str, topic: str) -> Workflow | None:
        if topic.startswith("slow-"):
            return Workflow(steps=[{"delay": "1h"}, {"channel": "webhook"}])
        if topic.startswith("soon-"):
            return Workflow(steps=[{"delay": "3s"}, {"channel": "webhook"}])
        return None

    def subscribers(
        self, tenant: str, topic: str, after: str | None, limit: int
    ) -> Sequence[Subscriber]:
        n = self._size(topic)
        if n is None:
            return []
        start = int(after[1:]) + 1 if after is not None else 0
        return [Subscriber(f"u{i:07d}", ("webhook",)) for i in range(start, min(n, start + limit))]

    def subscriptions(
        self, tenant: str, users: Sequence[str], topic: str
    ) -> Mapping[str, Subscriber]:
        return {u: Subscriber(u, ("webhook",)) for u in users}

    def rulings(self, tenant: str, users: Sequence[str]) -> Mapping[str, Ruling]:
        return {u: Person(u) for u in users}

    def decide(
        self, occasion: Occasion, ruling: Ruling, step: Send, now_ms: int, tag: str
    ) -> Verdict:
        return Go()

    def throttle(
        self, tenant: str, user: str, key: str, max_: int, per_ms: int, now_ms: int, tag: str
    ) -> bool:
        return True

    def record(
        self, tenant: str, user: str, charges: Sequence[object], now_ms: int, tag: str
    ) -> None:
        return None

    def address(self, tenant: str, user: str, channel: str) -> object | None:
        return WebhookAddress(url=f"{self.base}/hook/{user}", secrets=(self.secret,))

    def legal_opt_out(
        self,
        tenant: str,
        user: str,
        channel: str,
        *,
        topic: str | None = None,
        category: str | None = None,
    ) -> str | None:
        return None

    def invalidate(
        self,
        tenant: str,
        user: str,
        channel: str,
        what: str,
        detail: str,
        *,
        tokens: Sequence[str] = (),
    ) -> None:
        return None


class FakeClock:
    """Wall-clock Unix ms that tests move by hand."""

    def __init__(self, start_ms: int | None = None) -> None:
        self.now = start_ms if start_ms is not None else time.time_ns() // 1_000_000
        self.start = self.now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms
