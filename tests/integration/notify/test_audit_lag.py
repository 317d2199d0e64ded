"""The audit indexer gives way to deliveries with a fan-out's worth of transitions to fold,
within its bound (``notify.audit``): while a delivery worker has a batch in hand,
``GET /events/{id}`` of a fan-out may lag, by at most about ``audit-max-lag-ms``;
``herald_notify_audit_lag_seconds`` says how far behind it is, and once nothing waits it is 0
and every status is there. A few transitions (single events) are folded at once, busy
worker or not: deferring them under a steady load only gathered them into one long catch-up.

A real webhook receiver on 127.0.0.1 holds its first request, so the webhook worker keeps a
batch in hand as a worker does under load; other events go through the console channel
meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from broker.config import Config

from .conftest import NodeFactory, RunningNode, node_config
from .support import SECRET

MAX_LAG_MS = 1000


async def audit_lag(node: RunningNode) -> float:
    async with node.session.get(f"{node.http_url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    found = re.search(r"^herald_notify_audit_lag_seconds (\S+)$", text, re.M)
    assert found, "no herald_notify_audit_lag_seconds in /metrics"
    return float(found.group(1))


async def status(node: RunningNode, event_id: str) -> str | None:
    rows = await node.statuses(event_id)
    return rows[0]["status"] if rows else None


async def test_the_index_gives_way_to_a_busy_worker_for_at_most_its_bound(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    async with held_webhook() as (port, held, release):
        cfg = node_config(tmp_path / "node", audit_max_lag_ms=MAX_LAG_MS)
        node = await start_node(config=slow_webhooks(cfg))
        crowd = [f"c{i:03d}" for i in range(CROWD)]
        for u in crowd:
            await node.api.ok("PUT", f"/users/{u}/subscriptions/crowd", {"channels": ["console"]})
        await hold_a_worker(node, port, held)
        audit = node.engine.audit
        assert audit is not None

        # a fan-out to more users than a trickle: its queued and delivered pages wait
        b = await node.publish(topic="crowd", payload={"n": 2})
        console = node.engine.workers["console"]
        async with asyncio.timeout(10):
            while console.delivered < CROWD:
                await asyncio.sleep(0.01)
        started = time.monotonic()
        async with asyncio.timeout(10):
            while await status(node, b["event_id"]) != "delivered":
                await asyncio.sleep(0.02)
        # visible while the webhook worker still holds its batch: the bound, not the busy
        # worker, ended the wait (within the bound and a fold, with room for a slow machine)
        assert not release.is_set()
        assert time.monotonic() - started < 2 * MAX_LAG_MS / 1000 + 2
        assert audit.deferred_s > 0.5 * MAX_LAG_MS / 1000  # it did give way first

        release.set()
        await node.drained()
        assert await audit_lag(node) == 0
        rows = await node.statuses(b["event_id"])
        assert len(rows) == CROWD and {r["status"] for r in rows} == {"delivered"}


async def test_a_few_transitions_are_folded_at_once_while_a_worker_is_busy(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    async with held_webhook() as (port, held, release):
        # a bound far past the wait below: only folding at once can show the status in time
        cfg = node_config(tmp_path / "node", audit_max_lag_ms=30_000)
        node = await start_node(config=slow_webhooks(cfg))
        await node.api.ok("PUT", "/users/quick/subscriptions/b", {"channels": ["console"]})
        a = await hold_a_worker(node, port, held)
        audit = node.engine.audit
        assert audit is not None
        for n in range(3):
            b = await node.publish(topic="b", payload={"n": n})
            async with asyncio.timeout(5):
                while await status(node, b["event_id"]) != "delivered":
                    await asyncio.sleep(0.02)
        assert not release.is_set()  # the webhook worker held its batch all along
        assert audit.deferred_s == 0
        assert await status(node, a["event_id"]) == "queued"
        release.set()
        await node.drained()
        assert await status(node, a["event_id"]) == "delivered"
        assert await audit_lag(node) == 0


CROWD = 600  # more transitions than AuditIndexer.TRICKLE


@contextlib.asynccontextmanager
async def held_webhook() -> AsyncIterator[tuple[int, asyncio.Event, asyncio.Event]]:
    """A receiver on 127.0.0.1 that holds every request until ``release`` is set: its
    port, ``held`` (a request came) and ``release``."""
    held = asyncio.Event()  # the receiver has the request
    release = asyncio.Event()  # ... and may answer it

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        held.set()
        await release.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook/{user}", hook)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], held, release
    finally:
        release.set()
        await runner.cleanup()


def slow_webhooks(cfg: Config) -> Config:
    """The held request must outlast the test's wait, not time out into a retry."""
    slow = msgspec.structs.replace(cfg.channels.webhook, timeout_ms=30_000)
    return msgspec.structs.replace(
        cfg, channels=msgspec.structs.replace(cfg.channels, webhook=slow)
    )


async def hold_a_worker(node: RunningNode, port: int, held: asyncio.Event) -> dict[str, Any]:
    """Publish an event for the webhook user and wait until its worker holds the batch:
    the event's queued transition is there (the index is current but for it)."""
    hook_url = f"http://127.0.0.1:{port}/hook/slow"
    await node.api.ok("PUT", "/users/slow", {"webhook": {"url": hook_url, "secret": SECRET}})
    await node.api.ok("PUT", "/users/slow/subscriptions/a", {"channels": ["webhook"]})
    a = await node.publish(topic="a", payload={"n": 1})
    async with asyncio.timeout(10):
        await held.wait()
    return a
