"""Every write of the notification API that was answered survives a SIGKILL of the node: the
node is killed right after the last answer and restarted on the same data directory, and
each write reads back. (A killed process keeps the page cache: this proves that each write
is in the state store or the log before its answer, not the fsync discipline, which
``tests/system/powercut`` covers.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.herald_process import HeraldProcess, Nodes

from .api_client import ApiClient
from .support import SECRET, Receiver
from .test_api import ADMIN, CONFIG, eventually, status_of


@pytest.fixture
def node(tmp_path: Path) -> Iterator[HeraldProcess]:
    nodes = Nodes(tmp_path)
    try:
        yield nodes(config=CONFIG)
    finally:
        nodes.close()


@pytest.fixture
async def api(node: HeraldProcess) -> AsyncIterator[ApiClient]:
    async with aiohttp.ClientSession() as s:
        yield ApiClient(s, node.http_url, ADMIN)


async def test_acknowledged_api_writes_survive_sigkill(
    node: HeraldProcess, api: ApiClient, receiver: Receiver
) -> None:
    # what the writes below act on: a delivered notification, two dead letters
    hook = {"url": receiver.url("dana"), "secret": SECRET}
    await api.ok("PUT", "/users/dana", {"webhook": hook})
    await api.ok("PUT", "/workflows/hook", {"steps": [{"channel": "webhook"}]})
    receiver.status["dana"] = 400
    dead = [await api.ok("POST", "/events", {"topic": "hook", "payload": {"n": n},
                                             "users": ["dana"]}) for n in (1, 2)]  # fmt: skip
    for ack in dead:
        await status_of(api, ack["event_id"], lambda r: r[0]["status"] == "dead_lettered")
    letters = (await api.ok("GET", "/dlq/webhook"))["dead_letters"]
    replay_id, purge_id = sorted(x["delivery_id"] for x in letters)
    seen = await api.ok("POST", "/events", {"topic": "news", "payload": {}, "users": ["bob"]})
    await status_of(api, seen["event_id"], lambda r: r and r[0]["status"] == "delivered")
    (item,) = (await api.ok("GET", "/users/bob/notifications"))["items"]
    await api.ok("PUT", "/workflows/later", {"steps": [{"delay": "1h"}, {"channel": "console"}]})
    parked = await api.ok("POST", "/events", {"topic": "later", "payload": {}, "users": ["cy"],
                                              "cancellation_key": "k1"})  # fmt: skip
    await status_of(api, parked["event_id"], lambda r: len(r) == 1)
    await api.ok("PUT", "/users/eve", {"email": "eve@example.com"})
    await api.ok("PUT", "/users/ann/devices/gone", {"platform": "fcm"})
    await api.ok("PUT", "/users/ann/subscriptions/gone", {"channels": ["console"]})
    await api.ok("PUT", "/workflows/gone", {"steps": [{"channel": "console"}]})
    await api.ok("PUT", "/admin/mandatory/gone")

    # the writes, then SIGKILL right after the last answer
    receiver.status.pop("dana")
    await api.ok("PUT", "/users/ann", {"email": "ann@example.com", "timezone": "Europe/Paris"})
    await api.ok("PUT", "/users/ann/devices/tok", {"platform": "apns"})
    await api.ok("DELETE", "/users/ann/devices/gone")
    await api.ok("PUT", "/users/ann/subscriptions/orders", {"channels": ["console"]})
    await api.ok("DELETE", "/users/ann/subscriptions/gone")
    await api.ok("PUT", "/users/ann/preferences", {"rules": [{"topic": "promo", "allow": False}]})
    await api.ok("POST", "/users/ann/consent", {"channel": "sms", "opted_in": False})
    await api.ok("PUT", "/admin/defaults", {"rules": [{"channel": "sms", "allow": False}]})
    await api.ok("PUT", "/admin/mandatory/security")
    await api.ok("DELETE", "/admin/mandatory/gone")
    await api.ok("PUT", "/workflows/orders", {"steps": [{"channel": "console"}]})
    await api.ok("DELETE", "/workflows/gone")
    await api.ok("POST", f"/users/bob/notifications/{item['id']}/read")
    assert (await api.ok("POST", "/events/cancel", {"cancellation_key": "k1"}))["cancelled"] == 1
    await api.ok("POST", "/dlq/webhook/replay", {"ids": [replay_id]})
    await api.ok("DELETE", f"/dlq/webhook/{purge_id}")
    await api.ok("DELETE", "/users/eve")
    await asyncio.to_thread(node.kill)
    await asyncio.to_thread(node.start)

    ann = await api.ok("GET", "/users/ann")
    assert (ann["email"], ann["timezone"]) == ("ann@example.com", "Europe/Paris")
    assert [d["token"] for d in ann["devices"]] == ["tok"]
    subs = (await api.ok("GET", "/users/ann/subscriptions"))["subscriptions"]
    assert [s["topic"] for s in subs] == ["orders"]
    assert (await api.ok("GET", "/users/ann/preferences"))["rules"][0]["topic"] == "promo"
    assert (await api.ok("GET", "/users/ann/consent"))["channels"]["sms"]["opted_in"] is False
    assert (await api.ok("GET", "/admin/defaults"))["rules"][0]["channel"] == "sms"
    assert (await api.ok("GET", "/admin/mandatory"))["topics"] == ["security"]
    assert (await api.ok("GET", "/workflows/orders"))["version"] == 1
    await api.error("GET", "/workflows/gone", status=404, code="unknown_workflow", field="topic")
    feed = await api.ok("GET", "/users/bob/notifications")
    assert feed["items"][0]["read"] is True and feed["unread"] == 0
    st = await api.ok("GET", f"/events/{parked['event_id']}")
    assert [r["status"] for r in st["recipients"]] == ["cancelled"]
    assert (await api.ok("GET", "/users/cy/export"))["parked_runs"] == []
    await api.error("GET", f"/dlq/webhook/{purge_id}", status=404,
                    code="unknown_dead_letter", field="delivery_id")  # fmt: skip
    await receiver.wait_for(lambda: len(receiver.for_user("dana")) >= 1, what="the replay")
    assert receiver.for_user("dana")[0].webhook_id == replay_id
    await eventually(lambda: _not_dead(api, replay_id))
    await api.error("GET", "/users/eve", status=404, code="unknown_user", field="user")


async def _not_dead(api: ApiClient, delivery_id: str) -> bool:
    code, _ = await api.call("GET", f"/dlq/webhook/{delivery_id}")
    return code == 404
