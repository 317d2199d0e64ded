"""Events in through ``POST /events``, signed webhooks out to a real receiver on 127.0.0.1:
1:1 and 1:N delivery, filters, a repeated event id, retries with growing delays, the
dead-letter queue and its replay, the legal opt-out re-check, tenants kept apart."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import msgspec

from broker.config import ApiKey, AuthConfig

from .conftest import NodeFactory, node_config
from .support import DictDirectory, Receiver

T = "default"


async def test_one_event_to_one_user_is_a_signed_webhook(
    start_node: NodeFactory, directory: DictDirectory, receiver: Receiver
) -> None:
    directory.add_user(T, "alice", receiver.url("alice"))
    directory.subscribe(T, "alice", "orders", ["webhook"])
    node = await start_node(directory)
    ack = await node.publish(topic="orders", payload={"order": 42}, users=["alice"])
    await receiver.wait_for(lambda: len(receiver.hooks) == 1, what="one webhook")
    (hook,) = receiver.hooks
    assert receiver.bad_signatures == 0  # verified by the standardwebhooks package
    assert hook.body["type"] == "orders"
    assert hook.body["data"]["event_id"] == ack["event_id"]
    assert hook.body["data"]["payload"] == {"order": 42}
    await node.drained()
    (status,) = node.engine.event_status(T, ack["event_id"])
    assert (status["user"], status["channel"], status["status"]) == (
        "alice",
        "webhook",
        "delivered",
    )
    assert status["delivery_id"] == hook.webhook_id
    assert len(status["attempts"]) == 1


async def test_one_event_to_a_thousand_subscribers(
    start_node: NodeFactory, directory: DictDirectory, receiver: Receiver
) -> None:
    users = [f"user{i:04d}" for i in range(1000)]
    for u in users:
        directory.add_user(T, u, receiver.url(u))
        directory.subscribe(T, u, "news", ["webhook"])
    node = await start_node(directory, fanout_page=100)
    await node.publish(topic="news", payload={"headline": "hi"})
    await receiver.wait_for(lambda: len(receiver.hooks) >= 1000, within=60, what="1000 hooks")
    await receiver.settle(0.3)
    assert sorted(h.user for h in receiver.hooks) == users
    assert len(receiver.ids()) == 1000 and receiver.bad_signatures == 0


async def test_a_filter_selects_which_subscribers_hear_an_event(
    start_node: NodeFactory, directory: DictDirectory, receiver: Receiver
) -> None:
    for u, region in (("eu1", "eu"), ("us1", "us"), ("any", None)):
        directory.add_user(T, u, receiver.url(u))
        directory.subscribe(T, u, "deals", ["webhook"], {"data.region": region} if region else None)
    node = await start_node(directory)
    await node.publish(topic="deals", payload={"region": "eu", "pct": 10})
    await receiver.wait_for(lambda: len(receiver.hooks) == 2, what="two hooks")
    await receiver.settle(0.3)
    assert sorted(h.user for h in receiver.hooks) == ["any", "eu1"]


async def test_a_repeated_event_id_is_delivered_once(
    start_node: NodeFactory, directory: DictDirectory, receiver: Receiver
) -> None:
    directory.add_user(T, "alice", receiver.url("alice"))
    node = await start_node(directory, default_channels=["webhook"])
    eid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    first = await node.publish(topic="orders", event_id=eid, users=["alice"])
    again = await node.publish(topic="orders", event_id=eid, users=["alice"])
    assert again.get("duplicate") is True and again["offset"] == first["offset"]
    await receiver.wait_for(lambda: len(receiver.hooks) == 1)
    await receiver.settle(0.5)
    assert len(receiver.hooks) == 1


async def test_a_receiver_down_for_a_while_gets_retries_with_growing_delays(
    start_node: NodeFactory, directory: DictDirectory, receiver: Receiver
) -> None:
    directory.add_user(T, "alice", receiver.url("alice"))
    node = await start_node(
        directory, default_channels=["webhook"], retry_delays_ms=[300, 600, 1200, 2400]
    )
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
    (status,) = node.engine.event_status(T, ack["event_id"])
    assert status["status"] == "delivered"
    outcomes = [a["outcome"] for a in status["attempts"]]
    assert outcomes[-1] == "delivered" and outcomes.count("undelivered") >= 3


async def test_a_permanent_4xx_goes_to_the_dlq_and_a_replay_after_the_fix_delivers(
    start_node: NodeFactory, directory: DictDirectory, receiver: Receiver
) -> None:
    directory.add_user(T, "alice", receiver.url("alice"))
    node = await start_node(directory, default_channels=["webhook"])
    receiver.status["alice"] = 400
    ack = await node.publish(topic="orders", users=["alice"])
    await receiver.wait_for(lambda: len(receiver.attempts) == 1)
    await node.drained()
    (letter,) = node.engine.dlq_list(T, "webhook")
    assert letter.reason == "http_400" and len(letter.attempts) == 1
    assert letter.delivery.event_id == ack["event_id"]
    assert node.engine.dlq_show(T, "webhook", letter.delivery.delivery_id) is not None
    (status,) = node.engine.event_status(T, ack["event_id"])
    assert status["status"] == "dead_lettered" and status["reason"] == "http_400"
    receiver.status.pop("alice")  # the receiver is fixed
    replayed = await node.engine.dlq_replay(T, "webhook")
    assert replayed == [letter.delivery.delivery_id]
    await receiver.wait_for(lambda: len(receiver.hooks) == 1, what="the replayed delivery")
    assert receiver.hooks[0].webhook_id == letter.delivery.delivery_id
    assert node.engine.dlq_list(T, "webhook") == []
    await node.drained()
    (status,) = node.engine.event_status(T, ack["event_id"])
    assert status["status"] == "delivered"


async def test_purge_removes_a_dead_letter(
    start_node: NodeFactory, directory: DictDirectory, receiver: Receiver
) -> None:
    directory.add_user(T, "alice", receiver.url("alice"))
    node = await start_node(directory, default_channels=["webhook"])
    receiver.status["alice"] = 404
    await node.publish(topic="orders", users=["alice"])
    await receiver.wait_for(lambda: len(receiver.attempts) == 1)
    await node.drained()
    (letter,) = node.engine.dlq_list(T, "webhook")
    assert await node.engine.dlq_purge(T, "webhook", letter.delivery.delivery_id)
    assert node.engine.dlq_list(T, "webhook") == []


async def test_a_legal_opt_out_is_checked_again_just_before_the_send(
    start_node: NodeFactory, directory: DictDirectory, receiver: Receiver
) -> None:
    directory.add_user(T, "alice", receiver.url("alice"))
    directory.opted_out.add((T, "alice", "webhook"))
    node = await start_node(directory, default_channels=["webhook"])
    ack = await node.publish(topic="orders", users=["alice"], priority="critical")
    await node.drained()
    await asyncio.sleep(0.2)
    await node.drained()
    assert receiver.attempts == []
    (status,) = node.engine.event_status(T, ack["event_id"])
    assert (status["status"], status["reason"]) == ("suppressed", "legal_opt_out")


async def test_a_second_tenant_sees_nothing_of_the_first(
    start_node: NodeFactory, directory: DictDirectory, receiver: Receiver, tmp_path: Path
) -> None:
    keys = [
        ApiKey(key="acme-key-0123456789", tenant="acme"),
        ApiKey(key="globex-key-0123456789", tenant="globex"),
    ]
    cfg = node_config(tmp_path / "tenants", default_channels=["webhook"])
    cfg = msgspec.structs.replace(cfg, auth=AuthConfig(keys=keys))
    # the same user name in both tenants: only acme's has an endpoint, and a workflow
    directory.add_user("acme", "alice", receiver.url("alice"))
    directory.set_workflow("acme", "orders", {"steps": [{"delay": "1h"}, {"channel": "webhook"}]})
    node = await start_node(directory, config=cfg)
    parked = await node.publish(
        "acme-key-0123456789", topic="orders", users=["alice"], cancellation_key="k"
    )
    receiver.status["alice"] = 410
    directory.set_workflow("acme", "now", {"steps": [{"channel": "webhook"}]})
    dead = await node.publish("acme-key-0123456789", topic="now", users=["alice"])
    await receiver.wait_for(lambda: len(receiver.attempts) == 1)
    await node.drained()
    globex = await node.publish("globex-key-0123456789", topic="orders", users=["alice"])
    await node.drained()
    engine = node.engine
    assert engine.event_status("globex", parked["event_id"]) == []
    assert engine.event_status("globex", dead["event_id"]) == []
    assert engine.dlq_list("globex", "webhook") == []
    assert (
        engine.dlq_show(
            "globex", "webhook", engine.dlq_list("acme", "webhook")[0].delivery.delivery_id
        )
        is None
    )
    assert await engine.dlq_replay("globex", "webhook") == []
    assert engine.feed("globex", "alice")["items"] == []
    assert await engine.cancel("globex", "k") == 0
    assert engine.timers.next_due() is not None  # acme's run is still parked
    # globex's event went by globex's (empty) directory: no workflow, no endpoint
    (g,) = engine.event_status("globex", globex["event_id"])
    assert (g["status"], g["reason"]) == ("suppressed", "no_channel_data")
    assert len(engine.dlq_list("acme", "webhook")) == 1
    assert await engine.cancel("acme", "k") == 1


async def test_a_broadcast_goes_once_to_the_broadcast_topic_and_fans_out_to_nobody(
    start_node: NodeFactory, directory: DictDirectory, receiver: Receiver
) -> None:
    directory.add_user(T, "alice", receiver.url("alice"))
    directory.subscribe(T, "alice", "outage", ["webhook"])
    node = await start_node(directory)
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
    assert node.engine.event_status(T, ack["event_id"]) == []
