"""The delivery workers' dedupe rows are keyed by event, then delivery id
(``notify.delivery.dedupe_key``), and rows of the older form (the delivery id alone, what a
node wrote before) still stop a repeat while any are left: a delivery handled before an
upgrade is not sent again when its batch is redone after it."""

from __future__ import annotations

import asyncio
from typing import Any

from notify import ids
from notify.delivery import dedupe_key
from notify.model import CHANNELS, DedupeRow

from .conftest import NodeFactory

T = "default"


async def test_dedupe_rows_sit_by_event_and_older_rows_still_stop_a_repeat(
    start_node: NodeFactory,
) -> None:
    node = await start_node(channels=["null", "console"])
    users = [f"u{i:03d}" for i in range(40)]
    for u in users:
        await node.api.ok("PUT", f"/users/{u}/subscriptions/crowd", {"channels": ["null"]})
        await node.api.ok("PUT", f"/users/{u}/subscriptions/quiet", {"channels": ["console"]})
    null, console = node.engine.workers["null"], node.engine.workers["console"]

    # an event delivered now: its rows are under its id, one per delivery
    ack = await node.publish(topic="crowd", payload={"n": 1})
    async with asyncio.timeout(20):
        while null.delivered < len(users):
            await asyncio.sleep(0.02)
    await node.drained()
    eid = ack["event_id"]
    rows = null.dedupe.scan_raw(f"\x01{eid}\0".encode())
    step = CHANNELS.index("null")
    assert sorted(k for k, _v in rows) == sorted(
        dedupe_key(eid, ids.delivery_id(ids.run_id(T, eid, u), "null", step)) for u in users
    )

    # events whose deliveries an older node already handled (rows keyed by delivery id
    # alone): neither the pages path (null) nor the one-by-one path (console) sends them
    done = DedupeRow(at_ms=node.engine.clock(), final=True)
    older = {
        "crowd": ("0123abcd-0000-4000-8000-00000000000a", "null"),
        "quiet": ("0123abcd-0000-4000-8000-00000000000b", "console"),
    }
    for event_id, channel in older.values():
        at = CHANNELS.index(channel)
        for u in users:
            did = ids.delivery_id(ids.run_id(T, event_id, u), channel, at)
            null.dedupe.put(did, done)
    for worker in (null, console):
        assert worker._has_legacy_rows()
        worker._legacy = True  # as a worker started on that store finds
    sent = (null.delivered, console.delivered)
    skipped = (null.skipped, console.skipped)
    for topic, (event_id, _channel) in older.items():
        await node.publish(topic=topic, payload={"n": 2}, event_id=event_id)
    async with asyncio.timeout(20):
        while (null.skipped, console.skipped) != (skipped[0] + 40, skipped[1] + 40):
            await asyncio.sleep(0.02)
    await node.drained()
    assert (null.delivered, console.delivered) == sent


async def test_dedupe_rows_past_the_ttl_are_swept_and_an_idle_worker_does_not_rescan(
    start_node: NodeFactory,
) -> None:
    """Rows older than ``dedupe-ttl-ms`` go, a slice at a time on the worker's idle turns,
    the fresh ones stay; slices that find nothing to forget, and whole passes, are paced
    (an idle turn comes between most batches: walking a slice at each was CPU for nothing)."""
    node = await start_node(channels=["null"])
    worker = node.engine.workers["null"]
    await node.drained()
    real_clock = worker.clock
    now = real_clock()
    ttl = worker.config.dedupe_ttl_ms
    old = [f"0123abcd-0000-4000-8000-{i:012d}" for i in range(5000)]
    fresh = [f"4567abcd-0000-4000-8000-{i:012d}" for i in range(3000)]
    for eid in old:
        worker.dedupe.put(dedupe_key(eid, f"{eid}-d"), DedupeRow(at_ms=now - ttl - 1, final=True))
    for eid in fresh:
        worker.dedupe.put(dedupe_key(eid, f"{eid}-d"), DedupeRow(at_ms=now, final=True))
    walked: list[int] = []
    scan_raw = worker.dedupe.scan_raw

    def counting_scan(*args: Any, **kwargs: Any) -> Any:
        rows = scan_raw(*args, **kwargs)
        walked.append(len(rows))
        return rows

    clock = [now]
    worker.clock = lambda: clock[0]
    worker.dedupe.scan_raw = counting_scan
    try:
        worker._sweep_after, worker._sweep_due = None, 0
        # the slices holding old rows follow one another at each idle turn
        for _ in range(3):
            await worker.idle()
        assert walked == [2000, 2000, 2000]
        # the next slice (the last 2,000 fresh rows) found nothing to forget: paced
        await worker.idle()
        assert walked == [2000, 2000, 2000, 2000]
        for _ in range(5):
            await worker.idle()
        assert len(walked) == 4, "a slice that forgot nothing is followed by a pause"
        clock[0] += 999
        await worker.idle()
        assert len(walked) == 4
        clock[0] += 1
        await worker.idle()  # the end of the pass: nothing left to walk
        assert walked[-1] == 0
        n = len(walked)
        for _ in range(5):
            await worker.idle()
        clock[0] += 9_999
        await worker.idle()
        assert len(walked) == n, "a new pass waits ten seconds"
        clock[0] += 1
        await worker.idle()
        assert len(walked) == n + 1
    finally:
        worker.clock = real_clock
        del worker.dedupe.scan_raw
    left = {k for k, _v in worker.dedupe.scan_raw(b"")}
    assert not any(dedupe_key(eid, f"{eid}-d") in left for eid in old)
    assert all(dedupe_key(eid, f"{eid}-d") in left for eid in fresh)
