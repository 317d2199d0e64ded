"""Issue 12 items 7 and 8 on a real node: a full disk and failing syncs answered with clear
errors, never a traceback or a wrong promise.

- Item 7: on a full disk produce, events, new producers and topic creation answer the
  retriable ``storage_full`` (507 over HTTP), never ``internal_error``; ``/healthz`` says
  degraded; deleting a topic frees space; writes resume once space returns, with the same
  idempotent producer (not stuck on ``out_of_order_sequence``); a node stopped on a full disk
  starts again.
- Item 8: ``log_offline`` is not retried by the client (it lasts until a restart); a state
  store that cannot sync ends the node with one clear fatal line, exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.client import BrokerError

from .control import PowerLossFS
from .herald_power import PowerNode

SMALL_FREE = 1 << 20  # min-free-bytes for these nodes: /healthz stays ok until the disk is full


def post(node: PowerNode, path: str, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(
        node.http_url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def health_or_none(node: PowerNode) -> dict[str, Any] | None:
    try:
        return health(node)
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


def health(node: PowerNode) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(node.http_url + "/healthz", timeout=5) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


@pytest.fixture
def node(powerfs: PowerLossFS, tmp_path: Path) -> Iterator[PowerNode]:
    """A node whose /healthz stays ok until its disk is nearly full, with small segments."""
    config = f"[storage]\nmin-free-bytes = {SMALL_FREE}\nsegment-bytes = 1048576\n"
    n = PowerNode(powerfs, tmp_path / "node", config=config)
    try:
        n.start()
        yield n
    finally:
        n.close()


async def test_a_full_disk_is_a_clear_retriable_error_and_writes_resume(
    node: PowerNode,
) -> None:
    async with await node.connect() as client:
        await client.create_topic("fill", 1)
        await client.create_topic("ballast", 1)
        producer = await client.producer(acks=-1, linger_ms=0, retries=0)
        for _ in range(100):  # ~200 kB that deleting the topic will give back
            await producer.send("ballast", b"b" * 2000, partition=0)
        node.fs.set_free_bytes(64 * 1024)
        # fill the disk: the append that does not fit is refused, whole, and retriable
        stored = 0
        with pytest.raises(BrokerError) as full:
            for i in range(10_000):
                await producer.send("fill", b"x" * 2000 + b"%d" % i, partition=0)
                stored += 1
        assert full.value.code == "storage_full" and full.value.retriable
        node.fs.set_free_bytes(0)  # not even a small event fits now

        status, body = await asyncio.to_thread(
            post, node, "/events", {"topic": "t", "payload": 1, "event_id": "0" * 32}
        )
        assert (status, body["error"]["code"]) == (507, "storage_full"), body
        with pytest.raises(BrokerError) as created:
            await client.create_topic("new-on-full-disk", 1)
        assert created.value.code == "storage_full", created.value
        try:  # ids come from a block reserved before the disk filled: this may well work
            await client.producer()
        except BrokerError as exc:
            assert exc.code == "storage_full", exc
        h = await asyncio.to_thread(health, node)
        assert h["status"] == "degraded" and "disk_nearly_full" in h["reasons"], h

        # deleting a topic frees its space; the same producer goes on where it failed, with
        # the same partition (its sequence was not left ahead of what was stored)
        await client.delete_topic("ballast")
        md = await producer.send("fill", b"after the disk was full", partition=0)
        assert md.offset == stored
        status, body = await asyncio.to_thread(
            post, node, "/events", {"topic": "t", "payload": 1, "event_id": "0" * 32}
        )
        assert status == 200 and not body.get("duplicate"), body
        consumer = await client.consumer("fill", group="check", auto_commit=False)
        values: list[bytes] = []
        while len(values) < stored + 1:
            values += [r.value for r in await consumer.getmany(timeout_ms=1000)]
        assert values[-1] == b"after the disk was full" and len(values) == stored + 1
        await consumer.close()
    assert "Traceback" not in node.process.log_text()


async def test_a_node_stopped_on_a_full_disk_starts_again(node: PowerNode) -> None:
    async with await node.connect() as client:
        await client.create_topic("t", 2)
        producer = await client.producer(acks=-1, linger_ms=0)
        for i in range(20):
            await producer.send("t", b"%d" % i, partition=i % 2)
    node.fs.set_free_bytes(0)
    assert node.process.stop() == 0, node.process.log_tail()
    # stopping cut the active segments' preallocated fill: those bytes are free again;
    # another writer takes all but a few KiB of them (what the stop itself left before
    # there was a fill), so the node starts on a full disk
    node.fs.set_free_bytes(4096)
    # checkpoints cannot be written at start: logged, not fatal; the node serves, degraded
    node.process.proc = node.process.spawn()
    deadline = time.monotonic() + 30
    while (h := await asyncio.to_thread(health_or_none, node)) is None:
        assert node.process.running, node.process.log_tail()
        assert time.monotonic() < deadline, node.process.log_tail()
        await asyncio.sleep(0.1)
    assert h["status"] == "degraded" and "disk_nearly_full" in h["reasons"], h
    async with await node.connect() as client:
        assert await client.partition_count("t") == 2
        consumer = await client.consumer("t", group="g", auto_commit=False)
        got = 0
        while got < 20:
            got += len(await consumer.getmany(timeout_ms=1000))
        await consumer.close()
    node.fs.unlimited()


async def test_log_offline_is_answered_at_once_and_not_retried(node: PowerNode) -> None:
    async with await node.connect() as client:
        await client.create_topic("fenced", 1)
        # topic names are per tenant: the open node's "fenced" is stored as "default~fenced"
        node.fs.fail_next_fsync("log/default~fenced/*/*.log")
        producer = await client.producer(acks=-1, linger_ms=0, retry_backoff_ms=500)
        started = time.monotonic()
        with pytest.raises(BrokerError) as offline:
            await producer.send("fenced", b"x", partition=0)
        assert offline.value.code == "log_offline" and not offline.value.retriable
        # five retries with backoff would take seconds; a non-retriable error returns at once
        assert time.monotonic() - started < 2.0
        with pytest.raises(BrokerError) as again:
            await producer.send("fenced", b"y", partition=0)
        assert again.value.code == "log_offline"
    h = await asyncio.to_thread(health, node)
    assert h["offline_partitions"] == ["default~fenced-0"], h


async def test_a_state_store_that_cannot_sync_stops_the_node_with_a_clear_error(
    node: PowerNode,
) -> None:
    node.fs.fail_next_fsync("state/data.mdb", count=100)
    async with await node.connect() as client:
        await client.create_topic("t", 1)
        consumer = await client.consumer("t", group="g", auto_commit=False)
        with pytest.raises(BrokerError) as failed:
            await consumer.commit({("t", 0): 0})
        assert failed.value.code != "internal_error"
    proc = node.process.proc
    assert proc is not None
    code = await asyncio.to_thread(proc.wait, 15)
    assert code == 1
    log = node.process.log_text()
    assert "herald: fatal: state store sync failed" in log, node.process.log_tail()
    assert "Traceback" not in log
