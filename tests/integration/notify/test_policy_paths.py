"""The policy on a real node, through the registry (``notify.registry``) and the policy
(``notify.policy``) as a node uses them, with an injected clock: a muted topic is suppressed
with the rule as its reason, quiet hours defer to their end and ``critical`` overrides them, a
frequency cap, a mandatory topic, and a legal opt-out that nothing overrides. Events go in
through ``POST /events``; users, subscriptions, preferences, consent and workflows through the
notification API, and statuses come out of it. The clock is injected in-process (``tick``),
so quiet hours and cap windows are crossed without waiting."""

from __future__ import annotations

import asyncio
from typing import Any

from .conftest import NodeFactory, RunningNode
from .support import FakeClock, Receiver

# 2027-01-15T23:00:00Z: inside a 22:00-07:00 quiet window in UTC
NIGHT = 1_800_000_000_000 + 15 * 3_600_000


async def user(node: RunningNode, receiver: Receiver, name: str, *topics: str) -> None:
    await node.user(name, receiver, *topics)


async def preferences(node: RunningNode, name: str, **body: Any) -> None:
    await node.api.ok("PUT", f"/users/{name}/preferences", body)


async def quiet(node: RunningNode) -> None:
    await node.drained()
    await asyncio.sleep(0.15)
    await node.drained()


async def status_of(node: RunningNode, event_id: str, who: str) -> dict[str, Any]:
    rows = [s for s in await node.statuses(event_id) if s["user"] == who]
    assert len(rows) == 1, rows
    return rows[0]


async def test_a_muted_topic_is_suppressed_with_the_rule_as_reason(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await start_node(clock=FakeClock())
    await user(node, receiver, "alice", "promo", "orders")
    await preferences(node, "alice", rules=[{"topic": "promo", "channel": "*", "allow": False}])
    muted = await node.publish(topic="promo", payload={"pct": 50})
    await node.publish(topic="orders", payload={"order": 1})
    await receiver.wait_for(lambda: len(receiver.hooks) == 1)
    await quiet(node)
    assert [h.body["type"] for h in receiver.hooks] == ["orders"]
    st = await status_of(node, muted["event_id"], "alice")
    assert st["status"] == "suppressed" and st["reason"] == "preference"
    assert "promo" in str(st["detail"])


async def test_quiet_hours_defer_to_their_end_and_critical_overrides(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    clock = FakeClock(NIGHT)
    node = await start_node(clock=clock)
    await user(node, receiver, "owl", "ops")
    await preferences(node, "owl", quiet_hours={"start": "22:00", "end": "07:00"})
    normal = await node.publish(topic="ops", payload={"n": 1})
    await node.publish(topic="ops", payload={"n": 2}, priority="critical")
    await receiver.wait_for(lambda: len(receiver.hooks) == 1, what="the critical one")
    await quiet(node)
    assert receiver.hooks[0].body["data"]["payload"] == {"n": 2}
    st = await status_of(node, normal["event_id"], "owl")
    assert (st["status"], st["reason"]) == ("deferred", "quiet_hours")
    assert st["until_ms"] == NIGHT + 8 * 3_600_000  # 07:00 the next morning
    node.tick(8 * 3_600_000 - 60_000)
    await quiet(node)
    assert len(receiver.hooks) == 1
    node.tick(60_000)
    await receiver.wait_for(lambda: len(receiver.hooks) == 2, what="the deferred one at 07:00")
    assert receiver.hooks[1].body["data"]["payload"] == {"n": 1}


async def test_a_frequency_cap(start_node: NodeFactory, receiver: Receiver) -> None:
    node = await start_node(clock=FakeClock())
    await user(node, receiver, "alice", "news")
    await preferences(node, "alice", caps=[{"topic": "news", "max": 2, "per": "1h"}])
    acks = []
    for i in range(4):
        acks.append(await node.publish(topic="news", payload={"n": i}))
        await quiet(node)
    assert [h.body["data"]["payload"]["n"] for h in receiver.hooks] == [0, 1]
    st = await status_of(node, acks[2]["event_id"], "alice")
    assert (st["status"], st["reason"]) == ("suppressed", "cap")
    node.tick(3_600_000 + 1)
    await node.publish(topic="news", payload={"n": 9})
    await receiver.wait_for(lambda: len(receiver.hooks) == 3, what="the cap's next window")


async def test_mandatory_skips_preferences_but_a_legal_opt_out_wins_over_everything(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await start_node(clock=FakeClock())
    await user(node, receiver, "alice", "security")
    await user(node, receiver, "bob", "security")
    for who in ("alice", "bob"):
        await preferences(node, who, rules=[{"topic": "security", "allow": False}])
    await node.api.ok("PUT", "/admin/mandatory/security")
    unsubscribe = {"channel": "webhook", "opted_in": False, "legal": True}
    await node.api.ok("POST", "/users/bob/consent", unsubscribe)
    ack = await node.publish(topic="security", payload={"login": "new device"}, priority="critical")
    await receiver.wait_for(lambda: len(receiver.hooks) == 1)
    await quiet(node)
    assert [h.user for h in receiver.hooks] == ["alice"]
    st = await status_of(node, ack["event_id"], "bob")
    assert (st["status"], st["reason"]) == ("suppressed", "legal_opt_out")


async def test_an_opt_out_after_the_fanout_is_honoured_at_send_time(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    """A delivery parked behind a delay when the user sends STOP is not sent."""
    node = await start_node(clock=FakeClock())
    await user(node, receiver, "alice", "digest")
    await node.api.ok(
        "PUT", "/workflows/digest", {"steps": [{"delay": "1h"}, {"channel": "webhook"}]}
    )
    ack = await node.publish(topic="digest")
    await quiet(node)
    stop = {"channel": "*", "opted_in": False, "legal": True}
    await node.api.ok("POST", "/users/alice/consent", stop)
    node.tick(3_600_000)
    await quiet(node)
    await asyncio.sleep(0.2)
    await quiet(node)
    assert receiver.attempts == []
    st = await status_of(node, ack["event_id"], "alice")
    assert (st["status"], st["reason"]) == ("suppressed", "legal_opt_out")
