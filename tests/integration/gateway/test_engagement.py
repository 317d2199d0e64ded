"""What the gateway tells the notifications core and what the core decides with it: ``seen``
from the socket in the event's status and stopping a ``wait_seen`` escalation; presence
deciding a push fallback (a webhook receiver on loopback stands in for the push provider)."""

from __future__ import annotations

import asyncio
from typing import Any

from notify.model import User, WebhookEndpoint
from tests.integration.notify.support import SECRET, FakeClock, Receiver

from .conftest import TENANT, Running

MINUTE = 60_000


async def _webhook_user(node: Running, user: str, receiver: Receiver, now_ms: int) -> None:
    await node.registry.put_user(
        TENANT,
        user,
        User(webhook=WebhookEndpoint(url=receiver.url(user), secret=SECRET)),
        now_ms=now_ms,
    )


async def test_seen_from_the_socket_reaches_the_event_status_and_stops_wait_seen(
    start_node: Any, receiver: Receiver
) -> None:
    clock = FakeClock()
    node: Running = await start_node(clock=clock)
    for user in ("alice", "bob"):
        await _webhook_user(node, user, receiver, clock())
    await node.registry.put_workflow(
        TENANT,
        "alerts",
        {"steps": [{"channel": "inapp"}, {"wait_seen": "10m", "else": [{"channel": "webhook"}]}]},
        now_ms=clock(),
    )
    alice = await node.connect("alice")
    bob = await node.connect("bob")
    event_id = await node.publish(topic="alerts", users=["alice", "bob"], payload={"x": 1})
    for d in (alice, bob):
        await d.wait_for(lambda d: len(d.notifications) == 1)
    await alice.send(type="seen", ids=[alice.notifications[0]["id"]])
    # the counts after the mark (the ones after the delivery said (1, 1))
    await alice.wait_for(lambda d: any(f.get("unseen") == 0 for f in d.of("counts")[1:]))
    assert node.node.engine is not None
    status = {s["user"]: s for s in node.node.engine.event_status(TENANT, event_id)}
    assert status["alice"]["engagement"] == ["seen"]
    assert status["bob"]["engagement"] == []
    # the wait_seen deadline passes: only bob, who did not look, is escalated
    clock.advance(11 * MINUTE)
    node.node.engine.poke()
    await receiver.wait_for(lambda: len(receiver.hooks) >= 1, what="bob's escalation")
    await asyncio.sleep(0.5)
    assert [h.user for h in receiver.hooks] == ["bob"]


async def test_an_offline_user_gets_the_push_fallback_and_an_online_one_does_not(
    start_node: Any, receiver: Receiver
) -> None:
    node: Running = await start_node()
    now = node.node.gateway.clock() if node.node.gateway else 0
    for user in ("online", "offline"):
        await _webhook_user(node, user, receiver, now)
    await node.registry.put_workflow(
        TENANT,
        "chat",
        {
            "steps": [
                {"channel": "inapp"},
                {"channel": "webhook", "if": {"recipient.online": False}},
            ]
        },
        now_ms=now,
    )
    here = await node.connect("online")
    event_id = await node.publish(topic="chat", users=["online", "offline"], payload={"m": "hi"})
    await receiver.wait_for(lambda: len(receiver.hooks) == 1, what="the fallback")
    await here.wait_for(lambda d: len(d.notifications) == 1)
    await asyncio.sleep(0.5)
    (hook,) = receiver.hooks
    assert hook.user == "offline"
    assert hook.body["data"]["event_id"] == event_id
    assert node.node.engine is not None
    status = {(s["user"], s["channel"]): s for s in node.node.engine.event_status(TENANT, event_id)}
    assert status[("online", "webhook")]["status"] == "suppressed"
    assert status[("online", "webhook")]["reason"] == "condition"
    assert "offline" in status[("offline", "inapp")]["detail"]
    # the offline user finds the message when they come back
    back = await node.connect("offline")
    assert [n["event_id"] for n in back.notifications] == [event_id]
