"""SIGKILL a real node in the middle of the notification engine's work, restart it on the same
data directory, and check what the receiver (a real HTTP server on 127.0.0.1) got:

- a 10,000-recipient fan-out killed twice (while fanning out, then while delivering): every
  delivery of the acknowledged event reaches the receiver at least once and, deduplicating on
  ``webhook-id``, exactly once (the ids are the ones ``notify.ids`` derives);
- 1,000 parked timers killed while parked and again while firing: none is lost, none fires
  twice in effect (one ``webhook-id`` per timer, each seen once after deduplication).

The node runs ``tests/integration/notify/node_main.py`` (``herald serve`` with a computed
test audience) so nothing of the audience lives in this process. A killed process keeps the
page cache: this proves the engine's redo logic and stable ids, not fsync discipline
(``tests/system/powercut`` is for that).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from notify import ids
from notify.model import CHANNELS
from tests.integration.herald_process import HeraldProcess, herald_command
from tests.integration.notify.support import Receiver

CONFIG = """
[notify]
channels = ["webhook"]
partitions = 4
fanout-page = 500
fanout-flush-records = 2000
deliver-concurrency = 64

[notify.retry]
delays-ms = [500, 1000, 2000]
jitter = 0.1

[channels.webhook]
allow-networks = ["127.0.0.1/32"]
concurrency-per-endpoint = 64
"""
STEP = CHANNELS.index("webhook")  # the default plan's step index of the webhook send


class NotifyNode(HeraldProcess):
    def __init__(self, data_dir: Path, work_dir: Path, receiver_base: str) -> None:
        super().__init__(data_dir, work_dir, config=CONFIG)
        self.receiver_base = receiver_base

    def command(self) -> list[str]:
        serve = super().command()
        at = serve.index("serve")
        python = sys.executable if herald_command()[0] != sys.executable else herald_command()[0]
        return [
            python,
            "-m",
            "tests.integration.notify.node_main",
            self.receiver_base,
            *serve[at + 1 :],
        ]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
def node(tmp_path: Path, receiver: Receiver) -> AsyncIterator[NotifyNode]:
    n = NotifyNode(tmp_path / "data", tmp_path, receiver.base)
    try:
        yield n  # type: ignore[misc]
    finally:
        n.close()


async def publish(node: NotifyNode, **event: object) -> dict[str, object]:
    import aiohttp
    import msgspec

    event.setdefault("payload", {})
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{node.http_url}/events",
            data=msgspec.json.encode(event),
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        assert resp.status in (200, 201, 202)
        return dict(await resp.json())


def expected_ids(event_id: str, users: int, step: int = STEP) -> set[str]:
    return {
        ids.delivery_id(ids.run_id("default", event_id, f"u{i:07d}"), "webhook", step)
        for i in range(users)
    }


async def test_sigkill_during_a_10000_recipient_fanout_delivers_each_once(
    node: NotifyNode, receiver: Receiver
) -> None:
    await asyncio.to_thread(node.start)
    ack = await publish(node, topic="crowd-10000", payload={"sale": True})
    # the first deliveries arrive once the fan-out's first chunk is durable: kill it then,
    # while it is still fanning out (it flushes and marks its progress every 1,000 users)
    await receiver.wait_for(lambda: len(receiver.hooks) >= 1, within=30, what="a first hook")
    await asyncio.to_thread(node.kill)
    mid_fanout = "event=fanout_done" not in node.log_text()
    first = len(receiver.ids())
    await asyncio.to_thread(node.start)
    await receiver.wait_for(lambda: len(receiver.hooks) >= 3000, within=60, what="3000 hooks")
    await asyncio.to_thread(node.kill)  # and again while it delivers
    second = len(receiver.ids())
    await asyncio.to_thread(node.start)
    want = expected_ids(str(ack["event_id"]), 10_000)
    await receiver.wait_for(lambda: set(receiver.ids()) >= want, within=120, what="10000 ids")
    await receiver.settle(1.0)
    got = receiver.ids()
    assert set(got) == want, "every delivery arrives, and nothing else"
    assert receiver.bad_signatures == 0
    users = {h.user for h in receiver.hooks}
    assert len(users) == 10_000
    dupes = sum(n - 1 for n in got.values())
    print(f"\nkilled after {first} and {second} distinct; duplicates before dedupe: {dupes}")
    # killed before its first mark, the fan-out is redone from the start; after one, it
    # resumes after the mark's recipient: either way with the same ids
    resumed = "event=fanout_resumed" in node.log_text()
    print(f"killed mid fan-out: {mid_fanout}, resumed from a mark: {resumed}")


async def test_sigkill_with_1000_parked_timers_loses_none_and_fires_none_twice(
    node: NotifyNode, receiver: Receiver
) -> None:
    await asyncio.to_thread(node.start)
    ack = await publish(node, topic="soon-1000")  # a 3 s delay for each of 1,000 users
    await asyncio.sleep(1.0)  # parked by now (well before they are due)
    await asyncio.to_thread(node.kill)
    assert receiver.hooks == []
    await asyncio.to_thread(node.start)
    await receiver.wait_for(lambda: len(receiver.hooks) >= 300, within=60, what="firing")
    await asyncio.to_thread(node.kill)  # while the timers fire
    await asyncio.to_thread(node.start)
    want = expected_ids(str(ack["event_id"]), 1000, step=1)  # [delay, webhook]: step 1
    await receiver.wait_for(lambda: set(receiver.ids()) >= want, within=60, what="1000 ids")
    await receiver.settle(1.0)
    assert set(receiver.ids()) == want  # none lost, none extra
    assert len({h.user for h in receiver.hooks}) == 1000
    dupes = sum(n - 1 for n in receiver.ids().values())
    print(f"\nduplicates before dedupe: {dupes}")
