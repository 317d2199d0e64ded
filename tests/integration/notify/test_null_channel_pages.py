"""The fan-out's pages through a channel that answers all alike (``null``), which the worker
takes a batch at a time (``DeliveryWorker._accept_all``): every subscriber's delivery once,
a redone page (a fan-out redone after a crash) deduplicated, the legal opt-out re-checked
per user, statuses and feeds as single records would have made them."""

from __future__ import annotations

import asyncio

from notify import ids, pages
from notify.model import CHANNELS
from storage import records

from .conftest import NodeFactory
from .support import DictDirectory

T = "default"


async def test_pages_to_the_null_channel_deliver_each_once_with_statuses_and_feeds(
    start_node: NodeFactory, directory: DictDirectory
) -> None:
    users = [f"u{i:04d}" for i in range(1500)]
    for u in users:
        directory.subscribe(T, u, "crowd", ["null"])
    out = {"u0007", "u0900", "u1499"}
    for u in out:
        directory.opted_out.add((T, u, "null"))
    node = await start_node(directory, channels=["null"], fanout_page=400)
    worker = node.engine.workers["null"]
    ack = await node.publish(topic="crowd", payload={"sale": True})
    async with asyncio.timeout(30):
        while worker.delivered < len(users) - len(out):
            await asyncio.sleep(0.02)
    await node.drained()
    statuses = node.engine.event_status(T, ack["event_id"])
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
    feed = node.engine.feed(T, "u0001")
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
        while worker.skipped < skipped + len(users):
            await asyncio.sleep(0.02)
    await node.drained()
    assert worker.delivered == len(users) - len(out)
    assert node.engine.event_status(T, ack["event_id"]) == statuses
    assert node.engine.feed(T, "u0001")["unread"] == 1
