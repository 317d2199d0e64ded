"""In-app deliveries handed from the fan-out straight to the in-app worker (``Fanout``'s
*In-app at once*): a small event's in-app message skips ``__deliver.inapp`` when nothing
waits there, keeps its feed entry and statuses, is never shown twice when the fan-out's
batch is redone, and never overtakes a user's earlier message still on the topic."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from notify import fanout as fanout_module

from .conftest import TENANT, Running


def _deliver_inapp_records(node: Running) -> int:
    assert node.node.service is not None
    log = node.node.service.log
    return sum(
        p.log_end_offset for (topic, _i), p in log.partitions.items() if topic == "__deliver.inapp"
    )


async def _feed_unread(node: Running, user: str, n: int) -> None:
    assert node.node.engine is not None
    async with asyncio.timeout(10):
        while node.node.engine.feed(TENANT, user, limit=10)["unread"] < n:
            await asyncio.sleep(0.02)


async def test_a_small_event_is_handed_over_and_keeps_its_feed_and_statuses(
    start_node: Any,
) -> None:
    node: Running = await start_node()
    engine = node.node.engine
    assert engine is not None and engine.fanout is not None
    alice = await node.connect("alice")
    ids = [await node.publish(topic="orders", users=["alice"], payload={"n": i}) for i in range(3)]
    await alice.wait_for(lambda d: len(d.notifications) == 3)
    assert [n["event_id"] for n in alice.notifications] == ids
    assert engine.fanout.handed_over == 3
    assert _deliver_inapp_records(node) == 0  # nothing went through the delivery topic
    # the queued transition the delivery page stood for is in the audit: the feed has
    # each, unread, and the statuses read delivered
    await _feed_unread(node, "alice", 3)
    for event_id in ids:
        status = engine.event_status(TENANT, event_id)
        assert [(s["channel"], s["status"]) for s in status] == [("inapp", "delivered")]
    # an offline user's message is handed over too and waits in the feed
    later = await node.publish(topic="orders", users=["bob"], payload={"n": 9})
    await _feed_unread(node, "bob", 1)
    bob = await node.connect("bob")
    await bob.wait_for(lambda d: len(d.notifications) == 1)
    assert bob.notifications[0]["event_id"] == later
    assert engine.fanout.handed_over == 4


async def test_a_redone_fan_out_batch_does_not_show_a_handed_over_message_twice(
    start_node: Any,
) -> None:
    """The fan-out's commit fails once after its outputs (the in-app message among them)
    are durable: the batch is redone with the same ids, the in-app worker's dedupe rows
    (written with the fan-out's batch) skip the repeat, and the device has it once."""
    node: Running = await start_node()
    engine = node.node.engine
    assert engine is not None and engine.fanout is not None
    fanout = engine.fanout
    worker = engine.workers["inapp"]
    fanout.retry_pause_s = 0.05
    real = fanout.client
    failed: list[str] = []

    class FailingOnce:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def store_offsets(self, *args: Any, **kw: Any) -> Any:
            if not failed:
                failed.append("commit")
                raise OSError("the state store refused (test)")
            return real.store_offsets(*args, **kw)

    fanout.client = FailingOnce()  # type: ignore[assignment]
    alice = await node.connect("alice")
    skipped = worker.skipped
    event_id = await node.publish(topic="orders", users=["alice"], payload={"n": 1})
    async with asyncio.timeout(10):
        while worker.skipped == skipped:  # the redo found the delivery done
            await asyncio.sleep(0.02)
    assert failed == ["commit"]
    await asyncio.sleep(0.3)
    assert [n["event_id"] for n in alice.notifications] == [event_id]
    assert fanout.handed_over == 2  # handed over twice, shown once
    status = engine.event_status(TENANT, event_id)
    assert [(s["channel"], s["status"]) for s in status] == [("inapp", "delivered")]


async def test_a_message_never_overtakes_one_still_on_the_delivery_topic(
    start_node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fan-out above the hand-over size goes through ``__deliver.inapp``; the small
    events right behind it wait their turn there too (the worker has not drained the
    topic), so each user gets them in publish order; once it has, hand-over resumes."""
    monkeypatch.setattr(fanout_module, "HAND_OVER_MAX", 2)
    node: Running = await start_node()
    engine = node.node.engine
    assert engine is not None and engine.fanout is not None
    users = ["alice", "bob", "carol"]
    for u in users:
        url = f"{node.http_url}/users/{u}/subscriptions/news"
        async with node.session.put(url, json={"channels": ["inapp"]}) as resp:
            assert resp.status in (200, 201), await resp.text()
    devices = {u: await node.connect(u) for u in users}
    # the in-app worker holds the big fan-out's page until the small events are fanned out
    worker = engine.workers["inapp"]
    gate = asyncio.Event()
    handle = worker.handle

    async def held(recs: Any) -> Any:
        await gate.wait()
        return await handle(recs)

    worker.handle = held  # type: ignore[method-assign]
    events = engine.fanout.events
    big = await node.publish(topic="news", payload={"big": True})
    async with asyncio.timeout(10):
        while not worker._busy:
            await asyncio.sleep(0.01)
    small = [await node.publish(topic="dm", users=[u], payload={"to": u}) for u in users]
    async with asyncio.timeout(10):
        while engine.fanout.events < events + 4:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    gate.set()
    for u, device in devices.items():
        await device.wait_for(lambda d: len(d.notifications) == 2)
        assert [n["event_id"] for n in device.notifications] == [big, small[users.index(u)]]
    assert engine.fanout.handed_over == 0
    assert _deliver_inapp_records(node) >= 1
    # once the topic is drained, a small event is handed over again
    before = engine.fanout.handed_over
    async with asyncio.timeout(10):
        while engine.fanout.handed_over == before:
            await node.publish(topic="dm", users=["alice"], payload={"again": True})
            await asyncio.sleep(0.1)
