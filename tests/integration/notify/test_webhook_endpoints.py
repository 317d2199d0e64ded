"""A user's webhook endpoint on a real node, through the HTTP API: a rotated secret signs
beside the new one for its overlap (both verified by ``standardwebhooks``, a verifier nobody
here wrote) and stops after it; an endpoint the channel gives up (410 Gone) is disabled with
a contact-log record, later events are suppressed with ``endpoint_disabled`` without a
request, and an explicit enable brings it back. The consent ledger takes scoped entries and
shows them with time, source and channel, beside the contact log, and the export holds both."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks import Webhook

from .conftest import NodeFactory
from .support import SECRET, FakeClock, Receiver

NEW_SECRET = "whsec_" + "c2Vjb25kLXNlY3JldC1vZi10aGlydHktdHdvLWJ5dGVz"  # 32 bytes, base64
HOUR_MS = 3600 * 1000


class RawReceiver:
    """Records each request's raw body and headers, answers 200; verifies nothing itself."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, dict[str, str]]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook/{user}", self._hook)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def _hook(self, request: web.Request) -> web.Response:
        self.got.append((await request.read(), {k.lower(): v for k, v in request.headers.items()}))
        return web.Response(text="ok")

    async def wait(self, n: int, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while len(self.got) < n:
                await asyncio.sleep(0.02)


@pytest.fixture
async def raw() -> AsyncIterator[RawReceiver]:
    r = RawReceiver()
    await r.start()
    try:
        yield r
    finally:
        assert r._runner is not None
        await r._runner.cleanup()


def verifies(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    try:
        Webhook(secret).verify(body, headers)
    except Exception:
        return False
    return True


async def test_a_rotated_secret_signs_beside_the_new_one_until_its_overlap_ends(
    start_node: NodeFactory, raw: RawReceiver
) -> None:
    clock = FakeClock()
    node = await start_node(clock=clock, default_channels=["webhook"])
    url = f"http://127.0.0.1:{raw.port}/hook/ada"
    await node.api.ok("PUT", "/users/ada", {"webhook": {"url": url, "secret": SECRET}})
    await node.publish(topic="orders", users=["ada"])
    await raw.wait(1)
    body, headers = raw.got[0]
    assert len(headers["webhook-signature"].split()) == 1
    assert verifies(SECRET, body, headers) and not verifies(NEW_SECRET, body, headers)

    # the tenant rotates: for the overlap (24 h by default) every request carries both
    shown = await node.api.ok("PUT", "/users/ada", {"webhook": {"url": url, "secret": NEW_SECRET}})
    assert shown["webhook"]["secret"] == NEW_SECRET
    assert shown["webhook"]["previous_secret_until_ms"] == clock.now + 24 * HOUR_MS
    await node.publish(topic="orders", users=["ada"])
    await raw.wait(2)
    body, headers = raw.got[1]
    signatures = headers["webhook-signature"].split()
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    # a receiver still on the old secret and one already on the new both verify
    assert verifies(SECRET, body, headers) and verifies(NEW_SECRET, body, headers)

    # the overlap is over: the old secret no longer signs
    node.tick(24 * HOUR_MS + 1)
    await node.publish(topic="orders", users=["ada"])
    await raw.wait(3)
    body, headers = raw.got[2]
    assert len(headers["webhook-signature"].split()) == 1
    assert verifies(NEW_SECRET, body, headers) and not verifies(SECRET, body, headers)


async def test_410_disables_the_endpoint_with_a_record_until_it_is_enabled(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await start_node(default_channels=["webhook"])
    await node.user("bo", receiver)
    receiver.status["bo"] = 410
    gone = await node.publish(topic="orders", users=["bo"])
    await receiver.wait_for(lambda: len(receiver.attempts) == 1)
    await node.drained()
    (status,) = await node.statuses(gone["event_id"])
    assert (status["status"], status["reason"]) == ("dead_lettered", "gone")

    user = await node.api.ok("GET", "/users/bo")
    assert user["webhook"]["disabled_ms"] is not None
    assert "410" in user["webhook"]["disabled_reason"]
    consent = await node.api.ok("GET", "/users/bo/consent")
    (record,) = consent["contact_log"]
    assert (record["channel"], record["kind"], record["source"]) == (
        "webhook",
        "disabled",
        "delivery",
    )
    assert (
        record["address"] == receiver.url("bo")
        and record["at_ms"] == user["webhook"]["disabled_ms"]
    )

    # later events are suppressed without a request, even after the receiver recovered
    receiver.status.pop("bo")
    later = await node.publish(topic="orders", users=["bo"], priority="critical")
    await node.drained()
    await asyncio.sleep(0.2)
    await node.drained()
    assert len(receiver.attempts) == 1
    (status,) = await node.statuses(later["event_id"])
    assert (status["status"], status["reason"]) == ("suppressed", "endpoint_disabled")
    # the same URL given again stays disabled
    again = {"webhook": {"url": receiver.url("bo"), "secret": SECRET}}
    assert (await node.api.ok("PUT", "/users/bo", again))["webhook"]["disabled_ms"] is not None

    # the tenant enables it: the next event is delivered, and the log says who did
    enabled = await node.api.ok("POST", "/users/bo/webhook/enable")
    assert enabled["webhook"]["disabled_ms"] is None
    await node.publish(topic="orders", users=["bo"])
    await receiver.wait_for(lambda: len(receiver.for_user("bo")) == 1, what="after enabling")
    kinds = [e["kind"] for e in (await node.api.ok("GET", "/users/bo/consent"))["contact_log"]]
    assert kinds == ["disabled", "enabled"]
    await node.api.error("POST", "/users/nobody/webhook/enable", status=404,
                         code="unknown_user", field="user")  # fmt: skip


async def test_the_consent_ledger_has_scoped_entries_with_time_source_and_channel(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    clock = FakeClock()
    node = await start_node(clock=clock, default_channels=["webhook"])
    await node.user("cy", receiver)
    news = {"channel": "webhook", "opted_in": False, "scope": "category:marketing"}
    await node.api.ok("POST", "/users/cy/consent", news)
    clock.advance(1000)
    back = {"channel": "webhook", "opted_in": True}
    got: dict[str, Any] = await node.api.ok("POST", "/users/cy/consent", back)
    assert got["ledger"] == [
        {
            "channel": "webhook",
            "opted_in": False,
            "at_ms": clock.now - 1000,
            "source": "api",
            "legal": False,
            "scope": "category:marketing",
        },
        {
            "channel": "webhook",
            "opted_in": True,
            "at_ms": clock.now,
            "source": "api",
            "legal": False,
            "scope": None,
        },
    ]
    assert got["channels"]["webhook/category:marketing"]["opted_in"] is False
    assert got["channels"]["webhook"]["opted_in"] is True

    # the scoped opt-out stops marketing, not the rest
    ad = await node.publish(topic="deals", users=["cy"], category="marketing")
    receipt = await node.publish(topic="orders", users=["cy"], category="billing")
    await receiver.wait_for(lambda: len(receiver.for_user("cy")) == 1)
    await node.drained()
    assert receiver.for_user("cy")[0].body["data"]["event_id"] == receipt["event_id"]
    (status,) = await node.statuses(ad["event_id"])
    assert status["status"] == "suppressed"

    # the export carries the ledger and the contact log
    export = await node.api.ok("GET", "/users/cy/export")
    assert export["consent_ledger"] == got["ledger"]
    assert export["contact_log"] == []
    bad = {"channel": "webhook", "opted_in": False, "scope": "colour:blue"}
    await node.api.error("POST", "/users/cy/consent", bad, status=400, code="invalid_request",
                         field="scope")  # fmt: skip
