"""The audit indexer gives way to deliveries, within its bound (``notify.audit``): while a
delivery worker has a batch in hand, ``GET /events/{id}`` may lag, by at most about
``audit-max-lag-ms``; ``herald_notify_audit_lag_seconds`` says how far behind it is, and
once nothing waits it is 0 and every status is there.

A real webhook receiver on 127.0.0.1 holds its first request, so the webhook worker keeps a
batch in hand as a worker does under load; another user's event goes through the console
channel meanwhile."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import msgspec
from aiohttp import web

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
    port = runner.addresses[0][1]
    try:
        cfg = node_config(tmp_path / "node", audit_max_lag_ms=MAX_LAG_MS)
        # the held request must outlast the test's wait, not time out into a retry
        slow = msgspec.structs.replace(cfg.channels.webhook, timeout_ms=30_000)
        cfg = msgspec.structs.replace(
            cfg, channels=msgspec.structs.replace(cfg.channels, webhook=slow)
        )
        node = await start_node(config=cfg)
        hook_url = f"http://127.0.0.1:{port}/hook/slow"
        await node.api.ok("PUT", "/users/slow", {"webhook": {"url": hook_url, "secret": SECRET}})
        await node.api.ok("PUT", "/users/slow/subscriptions/a", {"channels": ["webhook"]})
        await node.api.ok("PUT", "/users/quick/subscriptions/b", {"channels": ["console"]})
        audit = node.engine.audit
        assert audit is not None

        a = await node.publish(topic="a", payload={"n": 1})
        async with asyncio.timeout(10):
            await held.wait()
        # the webhook worker has a batch in hand: the queued transition of "a" waits (once
        # it is durable in __audit, what the indexer can see), and the metric says so
        async with asyncio.timeout(MAX_LAG_MS / 1000):
            while await audit_lag(node) == 0:
                await asyncio.sleep(0.01)
        b = await node.publish(topic="b", payload={"n": 2})
        console = node.engine.workers["console"]
        async with asyncio.timeout(10):
            while console.delivered < 1:
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
        assert await status(node, a["event_id"]) == "queued"

        release.set()
        await node.drained()
        assert await status(node, a["event_id"]) == "delivered"
        assert await audit_lag(node) == 0
    finally:
        release.set()
        await runner.cleanup()
