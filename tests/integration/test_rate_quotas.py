"""Issue 13, item 10 (rates): a tenant over its produce or fetch rate is throttled, not
refused: answers are delayed by the throttle time and report it, so the tenant's bytes per
second stay near its quota, while another tenant without a rate quota is not slowed.
Usage and throttling show in /metrics."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker import protocol as p
from broker.client import Client
from storage import records

from .conftest import NodeFactory
from .tenants import ACME, BETA, Bystander, config, connect, http_json, metrics

# bounds on the node's CPU time or latency: run alone, after the parallel pass (make test)
pytestmark = pytest.mark.serial

RATE = 400_000  # bytes per second
CHUNK = 50_000


def batch(size: int = CHUNK) -> bytes:
    return records.encode_batch(
        [(0, None, b"x" * size)], first_timestamp=time.time_ns() // 1_000_000
    )


async def produce_for(client: Client, seconds: float) -> tuple[int, float, int]:
    """Produce CHUNK-sized batches one at a time (as a client that waits for its answers)
    for ``seconds``: (bytes sent, seconds taken, throttle ms reported)."""
    sent = throttle = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        resp = await client.request(
            p.Produce(id=0, topic="orders", partition=0, batches=[batch()]), retries=0
        )
        assert isinstance(resp, p.Produced), resp
        sent += CHUNK
        throttle += resp.throttle_ms
    return sent, time.perf_counter() - started, throttle


async def test_rates_throttle_and_do_not_fail(herald_factory: NodeFactory) -> None:
    node = herald_factory(
        config=config(
            "[quotas]\n"
            "[[quotas.tenants]]\n"
            f'tenant = "acme"\nproduce-bytes-per-second = {RATE}\n'
            f"fetch-bytes-per-second = {RATE}\n"
        )
    )
    async with await connect(node, ACME) as acme, Bystander(node) as beta:
        await acme.create_topic("orders", 1)
        # produce: 1 s of burst, then held to the rate
        sent, took, throttled = await produce_for(acme, 3.0)
        rate = sent / took
        print(f"\nacme produced {rate / 1000:.0f} kB/s against a quota of {RATE / 1000:.0f}")
        assert rate < RATE * 1.5 + RATE / took, rate  # the burst, spread over the window
        assert rate > RATE * 0.6, rate  # throttled, not stopped
        assert throttled > 0
        # fetch: the same, over what was produced
        got = fetch_throttle = 0
        offset = 0
        started = time.perf_counter()
        while time.perf_counter() - started < 3.0:
            resp = await acme.request(
                p.Fetch(
                    id=0,
                    partitions=[p.FetchPartition("orders", 0, offset, CHUNK + 200)],
                    max_bytes=CHUNK + 200,
                )
            )
            assert isinstance(resp, p.Fetched)
            (res,) = resp.partitions
            assert res.error is None and res.records
            got += len(res.records)
            for _pos, h in records.iter_batches(res.records):
                offset = h.next_offset
            fetch_throttle += resp.throttle_ms
            if offset >= res.high_watermark:
                offset = 0
        fetch_rate = got / (time.perf_counter() - started)
        print(f"acme fetched {fetch_rate / 1000:.0f} kB/s against a quota of {RATE / 1000:.0f}")
        assert fetch_rate < RATE * 1.5 + RATE / 3, fetch_rate
        assert fetch_throttle > 0
        # events count toward the produce rate and report the throttle in the answer
        status, body = await asyncio.to_thread(
            http_json,
            node,
            "POST",
            "/events/batch",
            {"events": [{"topic": "t", "payload": "y" * 10_000} for _ in range(60)]},
            key=ACME,
        )
        assert status == 200 and body["throttle_ms"] > 0, body
        # beta has no rate quota: never throttled, answered fast all along
        async with await connect(node, BETA) as b:
            resp = await b.request(
                p.Produce(id=0, topic="beta-orders", partition=0, batches=[batch(1_000_000)])
            )
            assert isinstance(resp, p.Produced) and resp.throttle_ms == 0
    beta.check(250)
    m = metrics(node)
    key = (
        "herald_quota_throttle_seconds_total",
        frozenset({("tenant", "acme"), ("direction", "produce")}),
    )
    assert m[key] > 0
    key = (
        "herald_quota_limit",
        frozenset({("tenant", "acme"), ("quota", "produce-bytes-per-second")}),
    )
    assert m[key] == RATE
    key = ("herald_tenant_bytes_total", frozenset({("tenant", "beta"), ("direction", "produce")}))
    assert m[key] > 1_000_000
