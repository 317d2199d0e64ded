"""Durable produce and fsync rounds against a real node (issue 12 § 3): a lone acks=all
record is answered after one fdatasync round; requests that arrive together share one.
Rounds are counted by the node's own ``herald_partition_syncs_total``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker import protocol as p
from broker.client import Client
from storage import records

from .herald_process import HeraldProcess
from .raw_wire import RawConnection
from .tenants import metrics


def syncs(node: HeraldProcess, topic: str, kind: str = "") -> float:
    """The node's count of fdatasync rounds of ``topic``'s partition 0 (``kind`` "inline_"
    or "aio_": of those, the ones run on the loop or as kernel AIO)."""
    wanted = f"herald_partition_{kind}syncs_total"
    for (name, labels), value in metrics(node).items():
        if name != wanted:
            continue
        where = dict(labels)
        if where["topic"] == topic and where["partition"] == "0":
            return value
    raise AssertionError(f"no {wanted} for {topic}")


@pytest.fixture
async def client(shared_herald: HeraldProcess) -> AsyncIterator[Client]:
    async with await Client.connect(shared_herald.host, shared_herald.tcp_port) as c:
        yield c


async def test_a_lone_acks_all_record_is_answered_after_one_sync_round(
    client: Client, shared_herald: HeraldProcess
) -> None:
    await client.create_topic("rounds-lone", 1)
    producer = await client.producer(acks=-1, linger_ms=0)
    await producer.send("rounds-lone", b"first", partition=0)
    before = syncs(shared_herald, "rounds-lone")
    for i in range(5):
        meta = await producer.send("rounds-lone", b"v%d" % i, partition=0)
        assert meta.offset == i + 1
        # answered once synced: exactly one more round per record, none spare
        assert syncs(shared_herald, "rounds-lone") == before + i + 1
    await producer.close()


def test_requests_that_arrive_together_share_one_sync(shared_herald: HeraldProcess) -> None:
    n = 50
    with RawConnection(shared_herald.host, shared_herald.tcp_port) as conn:
        created = conn.request(p.CreateTopic(id=1, topic="rounds-shared", partitions=1))
        assert isinstance(created, p.TopicCreated), created
        first = records.encode_batch([(0, None, b"warm")], first_timestamp=1)
        warm = conn.request(p.Produce(id=2, topic="rounds-shared", partition=0, batches=[first]))
        assert isinstance(warm, p.Produced), warm
        before = syncs(shared_herald, "rounds-shared")
        before_loop = sum(syncs(shared_herald, "rounds-shared", k) for k in ("inline_", "aio_"))
        frames = b"".join(
            p.encode_message(
                p.Produce(
                    id=10 + i,
                    topic="rounds-shared",
                    partition=0,
                    batches=[records.encode_batch([(0, None, b"r%d" % i)], first_timestamp=1)],
                    acks=-1,
                )
            )
            for i in range(n)
        )
        conn.send_bytes(frames)  # fifty producers' requests, arriving together
        replies = [conn.recv() for _ in range(n)]
    assert all(isinstance(r, p.Produced) for r in replies), replies[:3]
    assert sorted(r.base_offset for r in replies if isinstance(r, p.Produced)) == list(
        range(1, n + 1)
    )
    # one round for the lot, or a few if the node read them in more than one piece; never
    # one per request
    rounds = syncs(shared_herald, "rounds-shared") - before
    assert 1 <= rounds <= 3
    # and none of them on an I/O thread: small rounds are written by the loop and synced
    # there (inline) or by the kernel (AIO, storage.sync-engine's default)
    on_loop = sum(syncs(shared_herald, "rounds-shared", k) for k in ("inline_", "aio_"))
    assert on_loop - before_loop == rounds
