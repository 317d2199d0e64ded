"""The fan-out's pages through a channel that answers all alike (``null``), which the worker
takes a batch at a time (``DeliveryWorker._accept_all``): every subscriber's delivery once,
a redone page (a fan-out redone after a crash) deduplicated, a legal opt-out suppressed
with its reason, statuses and feeds as single records would have made them. The audience is set up
and the statuses and feeds read through the HTTP API, as in the other engine tests."""

from __future__ import annotations

import asyncio

from notify import ids, pages
from notify.model import CHANNELS
from storage import records

from .conftest import NodeFactory

T = "default"


async def test_pages_to_the_null_channel_deliver_each_once_with_statuses_and_feeds(
    start_node: NodeFactory,
) -> None:
    node = await start_node(channels=["null"], fanout_page=400)
    # 1,000 recipients in pages of 400: two full pages and a short one
    users = [f"u{i:04d}" for i in range(1000)]
    out = {"u0007", "u0500", "u0999"}
    sub = {"channels": ["null"]}
    stop = {"channel": "null", "opted_in": False, "legal": True}
    for first in range(0, len(users), 50):
        await asyncio.gather(
            *(
                node.api.ok("PUT", f"/users/{u}/subscriptions/crowd", sub)
                for u in users[first : first + 50]
            )
        )
    for u in out:
        await node.api.ok("POST", f"/users/{u}/consent", stop)
    worker = node.engine.workers["null"]
    ack = await node.publish(topic="crowd", payload={"sale": True})
    async with asyncio.timeout(30):
        while worker.delivered < len(users) - len(out):
            await asyncio.sleep(0.02)
    await node.drained()
    statuses = await node.statuses(ack["event_id"])
    assert len(statuses) == len(users)
    by_user = {s["user"]: s for s in statuses}
    assert {u for u, s in by_user.items() if s["status"] == "suppressed"} == out
    assert all(by_user[u]["reason"] == "legal_opt_out" for u in out)
    delivered = [s for s in statuses if s["status"] == "delivered"]
    assert len(delivered) == len(users) - len(out)
    assert all(len(s["attempts"]) == 1 for s in delivered)
    # the ids every path derives (notify.ids), as the pages carry them (the default plan's
    # step of a channel is indexed by its place in CHANNELS)
    eid, step = ack["event_id"], CHANNELS.index("null")
    assert all(
        s["delivery_id"] == ids.delivery_id(ids.run_id(T, eid, s["user"]), "null", step)
        for s in statuses
    )
    feed = await node.api.ok("GET", "/users/u0001/notifications")
    assert [i["event_id"] for i in feed["items"]] == [ack["event_id"]] and feed["unread"] == 1

    # the same pages appended again, as a fan-out redone after a crash would: nothing is
    # delivered twice and nothing new appears in the index
    client = node.engine.client
    assert client is not None
    again = []
    for p in range(node.engine.service.topics.partition_count("__deliver.null") or 0):
        for part in await client.fetch([("__deliver.null", p, 0)]):
            for pos, header in records.iter_batches(part.records):
                batch = part.records[pos : pos + header.batch_length]
                again += [(p, r.value) for r in records.decode_records(batch, header)]
    assert again and all(pages.is_page(v) for _p, v in again)
    producer = await client.producer(acks=-1)
    skipped = worker.skipped
    for p, value in again:
        await producer.send("__deliver.null", value, partition=p)
    async with asyncio.timeout(30):
        # every delivery the pages carry (the opted-out were suppressed by the fan-out and
        # are in no page)
        while worker.skipped < skipped + len(users) - len(out):
            await asyncio.sleep(0.02)
    await node.drained()
    assert worker.delivered == len(users) - len(out)
    assert await node.statuses(ack["event_id"]) == statuses
    assert (await node.api.ok("GET", "/users/u0001/notifications"))["unread"] == 1
