"""Events in through ``POST /events``, signed webhooks out to a real receiver on 127.0.0.1:
1:1 and 1:N delivery, filters, a repeated event id, retries with growing delays, the
dead-letter queue and its replay, the legal opt-out re-check, tenants kept apart. Users,
subscriptions and workflows go in, and statuses and dead letters come out, through the
node's HTTP API."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import msgspec

from broker.config import ApiKey, AuthConfig

from .conftest import NodeFactory, node_config
from .support import Receiver

T = "default"


async def test_one_event_to_one_user_is_a_signed_webhook(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await start_node()
    await node.user("alice", receiver, "orders")
    ack = await node.publish(topic="orders", payload={"order": 42}, users=["alice"])
    await receiver.wait_for(lambda: len(receiver.hooks) == 1, what="one webhook")
    (hook,) = receiver.hooks
    assert receiver.bad_signatures == 0  # verified by the standardwebhooks package
    assert hook.body["type"] == "orders"
    assert hook.body["data"]["event_id"] == ack["event_id"]
    assert hook.body["data"]["payload"] == {"order": 42}
    await node.drained()
    (status,) = await node.statuses(ack["event_id"])
    assert (status["user"], status["channel"], status["status"]) == (
        "alice",
        "webhook",
        "delivered",
    )
    assert status["delivery_id"] == hook.webhook_id
    assert len(status["attempts"]) == 1


async def test_one_event_to_a_thousand_subscribers(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    users = [f"user{i:04d}" for i in range(1000)]
    node = await start_node(fanout_page=100)
    for i in range(0, len(users), 50):
        await asyncio.gather(*(node.user(u, receiver, "news") for u in users[i : i + 50]))
    assert (await node.api.ok("GET", "/subscribers/news?limit=1"))["count"] == 1000
    await node.publish(topic="news", payload={"headline": "hi"})
    await receiver.wait_for(lambda: len(receiver.hooks) >= 1000, within=60, what="1000 hooks")
    await receiver.settle(0.3)
    assert sorted(h.user for h in receiver.hooks) == users
    assert len(receiver.ids()) == 1000 and receiver.bad_signatures == 0


async def test_a_filter_selects_which_subscribers_hear_an_event(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await start_node()
    for u, region in (("eu1", "eu"), ("us1", "us"), ("any", None)):
        await node.user(u, receiver, "deals", filter={"data.region": region} if region else None)
    await node.publish(topic="deals", payload={"region": "eu", "pct": 10})
    await receiver.wait_for(lambda: len(receiver.hooks) == 2, what="two hooks")
    await receiver.settle(0.3)
    assert sorted(h.user for h in receiver.hooks) == ["any", "eu1"]


async def test_a_repeated_event_id_is_delivered_once(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await start_node(default_channels=["webhook"])
    await node.user("alice", receiver)
    eid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    first = await node.publish(topic="orders", event_id=eid, users=["alice"])
    again = await node.publish(topic="orders", event_id=eid, users=["alice"])
    assert again.get("duplicate") is True and again["offset"] == first["offset"]
    await receiver.wait_for(lambda: len(receiver.hooks) == 1)
    await receiver.settle(0.5)
    assert len(receiver.hooks) == 1


async def test_a_receiver_down_for_a_while_gets_retries_with_growing_delays(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await start_node(default_channels=["webhook"], retry_delays_ms=[300, 600, 1200, 2400])
    await node.user("alice", receiver)
    receiver.down = True
    ack = await node.publish(topic="orders", users=["alice"])
    await receiver.wait_for(lambda: len(receiver.attempts) >= 3, within=10, what="3 attempts")
    receiver.down = False
    await receiver.wait_for(lambda: len(receiver.hooks) == 1, within=10, what="success")
    times = [t for _u, _w, t, _c in receiver.attempts]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.28 and gaps[1] >= 0.58 and gaps[1] > gaps[0]
    assert len({w for _u, w, _t, _c in receiver.attempts}) == 1  # one webhook-id throughout
    await node.drained()
    (status,) = await node.statuses(ack["event_id"])
    assert status["status"] == "delivered"
    outcomes = [a["outcome"] for a in status["attempts"]]
    assert outcomes[-1] == "delivered" and outcomes.count("undelivered") >= 3


async def test_a_permanent_4xx_goes_to_the_dlq_and_a_replay_after_the_fix_delivers(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await start_node(default_channels=["webhook"])
    await node.user("alice", receiver)
    receiver.status["alice"] = 400
    ack = await node.publish(topic="orders", users=["alice"])
    await receiver.wait_for(lambda: len(receiver.attempts) == 1)
    await node.drained()
    (letter,) = (await node.api.ok("GET", "/dlq/webhook"))["dead_letters"]
    assert letter["reason"] == "http_400" and len(letter["attempts"]) == 1
    assert letter["event_id"] == ack["event_id"]
    assert await node.api.ok("GET", f"/dlq/webhook/{letter['delivery_id']}") == letter
    (status,) = await node.statuses(ack["event_id"])
    assert status["status"] == "dead_lettered" and status["reason"] == "http_400"
    receiver.status.pop("alice")  # the receiver is fixed
    replayed = await node.api.ok("POST", "/dlq/webhook/replay")
    assert replayed == {"replayed": [letter["delivery_id"]], "missing": []}
    await receiver.wait_for(lambda: len(receiver.hooks) == 1, what="the replayed delivery")
    assert receiver.hooks[0].webhook_id == letter["delivery_id"]
    assert (await node.api.ok("GET", "/dlq/webhook"))["dead_letters"] == []
    await node.drained()
    (status,) = await node.statuses(ack["event_id"])
    assert status["status"] == "delivered"


async def test_purge_removes_a_dead_letter(start_node: NodeFactory, receiver: Receiver) -> None:
    node = await start_node(default_channels=["webhook"])
    await node.user("alice", receiver)
    receiver.status["alice"] = 404
    await node.publish(topic="orders", users=["alice"])
    await receiver.wait_for(lambda: len(receiver.attempts) == 1)
    await node.drained()
    (letter,) = (await node.api.ok("GET", "/dlq/webhook"))["dead_letters"]
    await node.api.ok("DELETE", f"/dlq/webhook/{letter['delivery_id']}")
    assert (await node.api.ok("GET", "/dlq/webhook"))["dead_letters"] == []


async def test_a_legal_opt_out_wins_over_critical(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await start_node(default_channels=["webhook"])
    await node.user("alice", receiver)
    stop = {"channel": "webhook", "opted_in": False, "legal": True}
    await node.api.ok("POST", "/users/alice/consent", stop)
    ack = await node.publish(topic="orders", users=["alice"], priority="critical")
    await node.drained()
    await asyncio.sleep(0.2)
    await node.drained()
    assert receiver.attempts == []
    (status,) = await node.statuses(ack["event_id"])
    assert (status["status"], status["reason"]) == ("suppressed", "legal_opt_out")


async def test_a_second_tenant_sees_nothing_of_the_first(
    start_node: NodeFactory, receiver: Receiver, tmp_path: Path
) -> None:
    scopes: list[Any] = ["produce", "consume", "admin"]
    acme_key, globex_key = "acme-key-0123456789", "globex-key-0123456789"
    keys = [
        ApiKey(key=acme_key, tenant="acme", scopes=scopes),
        ApiKey(key=globex_key, tenant="globex", scopes=scopes),
    ]
    cfg = node_config(tmp_path / "tenants", default_channels=["webhook"])
    cfg = msgspec.structs.replace(cfg, auth=AuthConfig(keys=keys))
    node = await start_node(config=cfg)
    acme, globex = node.api_as(acme_key), node.api_as(globex_key)
    # the same user name in both tenants: only acme's has an endpoint, and workflows
    await node.user("alice", receiver, key=acme_key)
    later = {"steps": [{"delay": "1h"}, {"channel": "webhook"}]}
    await acme.ok("PUT", "/workflows/orders", later)
    await acme.ok("PUT", "/workflows/now", {"steps": [{"channel": "webhook"}]})
    parked = await node.publish(acme_key, topic="orders", users=["alice"], cancellation_key="k")
    receiver.status["alice"] = 410
    dead = await node.publish(acme_key, topic="now", users=["alice"])
    await receiver.wait_for(lambda: len(receiver.attempts) == 1)
    await node.drained()
    theirs = await node.publish(globex_key, topic="orders", users=["alice"])
    await node.drained()
    assert await node.statuses(parked["event_id"], globex_key) == []
    assert await node.statuses(dead["event_id"], globex_key) == []
    assert (await globex.ok("GET", "/dlq/webhook"))["dead_letters"] == []
    (letter,) = (await acme.ok("GET", "/dlq/webhook"))["dead_letters"]
    await globex.error("GET", f"/dlq/webhook/{letter['delivery_id']}", status=404,
                       code="unknown_dead_letter", field="delivery_id")  # fmt: skip
    assert (await globex.ok("POST", "/dlq/webhook/replay"))["replayed"] == []
    assert (await globex.ok("GET", "/users/alice/notifications"))["items"] == []
    await globex.error("GET", "/workflows/orders", status=404, code="unknown_workflow",
                       field="topic")  # fmt: skip
    await globex.error("GET", "/users/alice", status=404, code="unknown_user", field="user")
    assert (await globex.ok("POST", "/events/cancel", {"cancellation_key": "k"}))["cancelled"] == 0
    assert node.engine.timers.next_due() is not None  # acme's run is still parked
    # globex's event went by globex's (empty) registry: no workflow, no endpoint
    (g,) = await node.statuses(theirs["event_id"], globex_key)
    assert (g["status"], g["reason"]) == ("suppressed", "no_channel_data")
    assert len((await acme.ok("GET", "/dlq/webhook"))["dead_letters"]) == 1
    assert (await acme.ok("POST", "/events/cancel", {"cancellation_key": "k"}))["cancelled"] == 1


async def test_a_broadcast_goes_once_to_the_broadcast_topic_and_fans_out_to_nobody(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    node = await start_node()
    await node.user("alice", receiver, "outage")
    ack = await node.publish(topic="outage", payload={"region": "eu"}, broadcast=True)
    await node.drained()
    client = node.engine.client
    assert client is not None
    found = []
    for p in range(node.engine.ncfg.partitions):
        for part in await client.fetch([("__broadcast", p, 0)]):
            if part.records:
                found.append(part.records)
    assert len(found) == 1 and ack["event_id"].encode() in found[0]
    assert receiver.attempts == []
    assert await node.statuses(ack["event_id"]) == []


async def test_a_topic_nobody_follows_reaches_nobody_until_someone_subscribes(
    start_node: NodeFactory, receiver: Receiver
) -> None:
    """The fan-out keeps a small topic's subscriber list (and a topic's having none) between
    changes of the subscriptions: a subscription made over the API is seen by the next
    event."""
    node = await start_node()
    before = await node.publish(topic="quiet", payload={"n": 1})
    await node.drained()
    assert await node.statuses(before["event_id"]) == []
    await node.user("alice", receiver, "quiet")
    after = await node.publish(topic="quiet", payload={"n": 2})
    await receiver.wait_for(lambda: len(receiver.hooks) == 1, what="one webhook")
    assert receiver.hooks[0].body["data"]["event_id"] == after["event_id"]
    assert receiver.hooks[0].user == "alice"
