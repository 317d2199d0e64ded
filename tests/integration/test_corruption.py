"""Damage in a real node's log, end to end: a flipped byte or a zeroed block in acknowledged,
fsynced data is never served, never makes the node spin, is reported (the fetcher's error with
the damaged offsets, /healthz, metrics) and deletes nothing else; the consumer stops at it and
goes on only when the application seeks past it."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from broker.client import Client, CorruptData

from .herald_process import HeraldProcess

TOPIC = "ledger"
# topic names are per tenant: on an open node (tenant "default") it is stored as this
STORED = f"default~{TOPIC}"


async def fill(node: HeraldProcess, batches: int = 40, per_batch: int = 50) -> list[bytes]:
    values = [b"record-%05d-" % i + b"x" * 150 for i in range(batches * per_batch)]
    async with Client(node.host, node.tcp_port) as client:
        await client.create_topic(TOPIC, 1)
        producer = await client.producer()
        for b in range(batches):
            await producer.send_batch(
                TOPIC, values[b * per_batch : (b + 1) * per_batch], partition=0
            )
        await producer.close()
    return values


def segment_file(node: HeraldProcess) -> Path:
    (log,) = sorted((node.data_dir / "log" / STORED / "0").glob("*.log"))
    return log


def health(node: HeraldProcess) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"{node.http_url}/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metrics(node: HeraldProcess) -> str:
    with urllib.request.urlopen(f"{node.http_url}/metrics", timeout=5) as resp:
        return resp.read().decode()


async def consume_all(client: Client, group: str) -> tuple[list[bytes], CorruptData | None]:
    consumer = await client.consumer(TOPIC, group=group, auto_commit=False)
    got: list[bytes] = []
    try:
        for _ in range(200):
            batch = await consumer.getmany(timeout_ms=200)
            if not batch and got:
                break
            got += [r.value for r in batch]
    except CorruptData as exc:
        await consumer.close()
        return got, exc
    await consumer.close()
    return got, None


@pytest.mark.parametrize("damage", ["flip", "zero_block"])
async def test_damage_is_never_served_and_the_consumer_stops_at_it(
    herald: HeraldProcess, damage: str
) -> None:
    values = await fill(herald)
    assert herald.stop() == 0  # a clean close: everything is below the checkpoint
    log = segment_file(herald)
    data = bytearray(log.read_bytes())
    middle = len(data) // 2
    if damage == "flip":
        data[middle] ^= 0x40
    else:
        block = middle - middle % 4096
        data[block : block + 4096] = bytes(4096)
    log.write_bytes(bytes(data))
    herald.start()

    async with Client(herald.host, herald.tcp_port) as client:
        got, stop = await consume_all(client, "g1")
        assert stop is not None, "the damaged range was served or skipped silently"
        assert got == values[: stop.offset], "records before the damage were not all served"
        assert stop.end_offset > stop.offset
        # nothing was deleted: the records after the damaged range are all there
        consumer = await client.consumer(TOPIC, group="g2", auto_commit=False)
        consumer.seek(TOPIC, 0, stop.end_offset)
        rest: list[bytes] = []
        while len(rest) < len(values) - stop.end_offset:
            batch = await consumer.getmany(timeout_ms=1000)
            assert batch, "records after the damage are missing"
            rest += [r.value for r in batch]
        assert rest == values[stop.end_offset :]
        await consumer.close()

    status, body = health(herald)
    assert status == 503 and body["status"] == "degraded", body
    assert "corrupt_data" in body["reasons"] and body["corrupt_partitions"] == [f"{STORED}-0"]
    text = metrics(herald)
    assert (
        f'herald_partition_quarantined_ranges{{partition="0",tenant="default",topic="{TOPIC}"}} 1.0'
        in text
    )
    assert "level=error" in herald.log_text() and "corrupt" in herald.log_text()
