"""Workflow steps on a real node with an injected clock: delay fires on time, deliver_at,
batch (one message per recipient and key per window, with every activity), throttle,
wait_seen (escalates only when unseen), cancellation by key (parked runs, one batch member
leaving the rest intact), strict order, shedding over the queue bound. Workflows, users and
subscriptions go in through the HTTP API; statuses, cancellation and marks too. The clock
moves in-process (``tick``): a 1 h window is tested without waiting an hour. (Suppression by
a preference and quiet hours are ``test_policy_paths.py``, on the real policy.)"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from .conftest import NodeFactory, RunningNode
from .support import FakeClock, Receiver

MIN = 60_000


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat()


async def started(
    start_node: NodeFactory,
    receiver: Receiver,
    users: list[str],
    topic: str,
    workflow: dict[str, Any] | None = None,
    **notify: Any,
) -> tuple[RunningNode, FakeClock]:
    clock = FakeClock()
    node = await start_node(clock=clock, **notify)
    for u in users:
        await node.user(u, receiver, topic)
    if workflow is not None:
        await node.api.ok("PUT", f"/workflows/{topic}", workflow)
    return node, clock


async def cancel(node: RunningNode, key: str, users: list[str] | None = None) -> int:
    body: dict[str, Any] = {"cancellation_key": key}
    if users is not None:
        body["users"] = users
    return int((await node.api.ok("POST", "/events/cancel", body))["cancelled"])


async def quiet(node: RunningNode, receiver: Receiver) -> None:
    await node.drained()
    await asyncio.sleep(0.15)
    await node.drained()


async def test_delay_fires_on_time_not_before(start_node: NodeFactory, receiver: Receiver) -> None:
    wf = {"steps": [{"delay": "10m"}, {"channel": "webhook"}]}
    node, clock = await started(start_node, receiver, ["alice"], "remind", wf)
    ack = await node.publish(topic="remind")
    await quiet(node, receiver)
    (status,) = await node.statuses(ack["event_id"])
    assert (status["status"], status["reason"]) == ("deferred", "delay")
    assert status["until_ms"] == clock.now + 10 * MIN
    node.tick(10 * MIN - 1000)
    await quiet(node, receiver)
    assert receiver.hooks == []
    node.tick(1000)
    await receiver.wait_for(lambda: len(receiver.hooks) == 1, what="the delayed webhook")
    # the timer's row goes once its outputs are durable (they may reach the receiver first)
    await receiver.wait_for(lambda: node.engine.timers.next_due() is None, what="row gone")


async def test_deliver_at_parks_the_event_until_then(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node, clock = await started(start_node, receiver, ["alice"], "report")
    at = clock.now + 2 * 3_600_000
    await node.publish(topic="report", deliver_at=iso(at))
    await quiet(node, receiver)
    assert receiver.hooks == [] and node.engine.timers.next_due() == at
    node.tick(2 * 3_600_000)
    await receiver.wait_for(lambda: len(receiver.hooks) == 1, what="the scheduled webhook")


async def test_batch_sends_one_message_per_user_and_key_per_window(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    wf = {
        "steps": [
            {"batch": {"window": "1h", "key": "data.thread"}},
            {"channel": "webhook"},
        ]
    }
    node, _clock = await started(start_node, receiver, ["alice", "bob"], "chat", wf)
    for i in range(5):
        await node.publish(topic="chat", payload={"thread": "t1", "n": i})
    await node.publish(topic="chat", payload={"thread": "t2", "n": 9})
    await quiet(node, receiver)
    assert receiver.hooks == []
    node.tick(3_600_000)
    await receiver.wait_for(lambda: len(receiver.hooks) == 4, what="4 batch messages")
    await receiver.settle(0.3)
    assert len(receiver.hooks) == 4
    got = {
        (h.user, h.body["data"]["activities"][0]["thread"]): [
            a["n"] for a in h.body["data"]["activities"]
        ]
        for h in receiver.hooks
    }
    assert got == {
        ("alice", "t1"): [0, 1, 2, 3, 4],
        ("bob", "t1"): [0, 1, 2, 3, 4],
        ("alice", "t2"): [9],
        ("bob", "t2"): [9],
    }
    # the next window is a new message
    await node.publish(topic="chat", payload={"thread": "t1", "n": 10})
    await quiet(node, receiver)
    node.tick(3_600_000)
    await receiver.wait_for(lambda: len(receiver.hooks) == 6, what="the next window")


async def test_throttle_lets_max_per_window_through(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    wf = {"steps": [{"throttle": {"max": 2, "per": "1h"}}, {"channel": "webhook"}]}
    node, _clock = await started(start_node, receiver, ["alice"], "alerts", wf)
    acks = [await node.publish(topic="alerts", payload={"n": i}) for i in range(4)]
    await receiver.wait_for(lambda: len(receiver.hooks) == 2)
    await quiet(node, receiver)
    assert [h.body["data"]["payload"]["n"] for h in receiver.hooks] == [0, 1]
    (status,) = await node.statuses(acks[3]["event_id"])
    assert (status["status"], status["reason"]) == ("suppressed", "throttle")
    node.tick(3_600_000 + 1)
    await node.publish(topic="alerts", payload={"n": 9})
    await receiver.wait_for(lambda: len(receiver.hooks) == 3, what="a new window")


async def test_wait_seen_escalates_only_when_unseen(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    wf = {
        "steps": [
            {"channel": "webhook"},
            {"wait_seen": "15m", "else": [{"channel": "console"}]},
        ]
    }
    node, _clock = await started(start_node, receiver, ["alice", "bob"], "invoice", wf)
    ack = await node.publish(topic="invoice")
    await receiver.wait_for(lambda: len(receiver.hooks) == 2)
    await quiet(node, receiver)
    feed = await node.api.ok("GET", "/users/alice/notifications")
    assert feed["unread"] == 1
    (item,) = feed["items"]
    await node.api.ok("POST", f"/users/alice/notifications/{item['id']}/seen")
    node.tick(15 * MIN)
    await quiet(node, receiver)
    await asyncio.sleep(0.2)
    await quiet(node, receiver)
    by = {(s["user"], s["channel"]): s["status"] for s in await node.statuses(ack["event_id"])}
    assert by[("bob", "console")] == "delivered"  # bob never saw it: escalated
    assert ("alice", "console") not in by  # alice saw it in time: no escalation
    assert (await node.api.ok("GET", "/users/alice/notifications"))["items"][0]["seen"] is True


async def test_cancellation_key_cancels_parked_runs(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    wf = {"steps": [{"delay": "30m"}, {"channel": "webhook"}]}
    node, _clock = await started(start_node, receiver, ["alice", "bob"], "cart", wf)
    ack = await node.publish(topic="cart", cancellation_key="cart-7")
    other = await node.publish(topic="cart", cancellation_key="cart-8")
    await quiet(node, receiver)
    assert await cancel(node, "cart-7", ["alice"]) == 1
    assert await cancel(node, "cart-7") == 1  # bob's run
    assert await cancel(node, "cart-7") == 0
    node.tick(30 * MIN)
    await receiver.wait_for(lambda: len(receiver.hooks) == 2, what="the other key's runs")
    await receiver.settle(0.3)
    assert {h.body["data"]["event_id"] for h in receiver.hooks} == {other["event_id"]}
    await node.drained()
    statuses = await node.statuses(ack["event_id"])
    assert {s["status"] for s in statuses} == {"cancelled"}


async def test_a_cancelled_batch_member_leaves_the_rest_intact(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    wf = {"steps": [{"batch": {"window": "10m"}}, {"channel": "webhook"}]}
    node, _clock = await started(start_node, receiver, ["alice"], "likes", wf)
    await node.publish(topic="likes", payload={"n": 1}, cancellation_key="k1")
    await node.publish(topic="likes", payload={"n": 2}, cancellation_key="k2")
    await node.publish(topic="likes", payload={"n": 3}, cancellation_key="k3")
    await quiet(node, receiver)
    assert await cancel(node, "k1") == 1  # the member that opened the window
    node.tick(10 * MIN)
    await receiver.wait_for(lambda: len(receiver.hooks) == 1, what="the batch")
    await receiver.settle(0.3)
    (hook,) = receiver.hooks
    assert [a["n"] for a in hook.body["data"]["activities"]] == [2, 3]


async def test_cancelling_every_member_sends_nothing(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    wf = {"steps": [{"batch": {"window": "10m"}}, {"channel": "webhook"}]}
    node, _clock = await started(start_node, receiver, ["alice"], "likes", wf)
    await node.publish(topic="likes", payload={"n": 1}, cancellation_key="same")
    await node.publish(topic="likes", payload={"n": 2}, cancellation_key="same")
    await quiet(node, receiver)
    assert await cancel(node, "same") == 2
    assert node.engine.timers.next_due() is None
    node.tick(10 * MIN)
    await quiet(node, receiver)
    assert receiver.hooks == []


async def test_strict_order_holds_later_deliveries_behind_one_in_retry(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await start_node(retry_delays_ms=[300, 300, 300])
    await node.user("alice", receiver, "ledger", "chatter")
    for topic, strict in (("ledger", True), ("chatter", False)):
        body = {"strict_order": strict, "steps": [{"channel": "webhook"}]}
        await node.api.ok("PUT", f"/workflows/{topic}", body)
    for topic in ("ledger", "chatter"):
        receiver.fail_first["alice"] = 1  # the first event's first attempt fails
        await node.publish(topic=topic, payload={"n": 1})
        await receiver.wait_for(lambda: receiver.fail_first["alice"] == 0)
        await node.publish(topic=topic, payload={"n": 2})
        await receiver.wait_for(
            lambda t=topic: len([h for h in receiver.hooks if h.body["type"] == t]) == 2,
            what=f"both {topic} events",
        )
    order = {
        t: [h.body["data"]["payload"]["n"] for h in receiver.hooks if h.body["type"] == t]
        for t in ("ledger", "chatter")
    }
    assert order["ledger"] == [1, 2]  # n=2 waited behind n=1's retry
    assert order["chatter"] == [2, 1]  # no strict order: n=2 went first


async def test_over_the_queue_bound_low_priority_is_shed_and_recorded(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    users = [f"u{i:02d}" for i in range(40)]
    node = await start_node(default_channels=["webhook"], deliver_batch=5, queue_depth_bound=10)
    await asyncio.gather(*(node.user(u, receiver) for u in users))
    low = await node.publish(topic="promo", users=users, priority="low")
    high = await node.publish(topic="alerts", users=users, priority="high")
    await receiver.wait_for(
        lambda: len([h for h in receiver.hooks if h.body["type"] == "alerts"]) == 40,
        within=30,
        what="every high priority delivery",
    )
    await node.drained()
    statuses = [s["status"] for s in await node.statuses(low["event_id"])]
    assert statuses.count("shed") > 0
    assert statuses.count("shed") + statuses.count("delivered") == 40
    shed = [s for s in await node.statuses(low["event_id"]) if s["status"] == "shed"]
    assert shed[0]["reason"] == "queue_depth"
    assert {s["status"] for s in await node.statuses(high["event_id"])} == {"delivered"}
