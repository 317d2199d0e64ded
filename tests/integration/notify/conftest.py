"""Fixtures: a real node run in the test's own process (``herald.node.Node`` on free loopback
ports, its HTTP API on 127.0.0.1) with an injectable clock, and a webhook receiver on
127.0.0.1 that verifies every signature with ``standardwebhooks``.

Everything goes through the node's HTTP API, as a user's code would: events in through
``POST /events``; users, subscriptions, preferences and workflows into the registry through
the notification API; status, dead letters, cancellation and marks out of it
(``RunningNode.api``). Two things stay in-process, because only the test's own process can do
them: moving the engine's injected clock (``tick``: a 1 h delay is tested without waiting an
hour) and knowing when every stage has consumed what was appended (``drained``: the engine's
consumer positions, so a test asserts "nothing was sent" without sleeping and hoping)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from broker.config import ChannelRetry, Config, NotifyConfig
from channels.config import BreakerConfig, ChannelsConfig, WebhookConfig
from herald.node import Node
from notify.engine import Engine
from notify.ports import Directory

from .api_client import ApiClient
from .support import SECRET, FakeClock, Receiver


@dataclass
class RunningNode:
    node: Node
    engine: Engine
    http_url: str
    session: aiohttp.ClientSession
    clock: FakeClock | None
    task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        """Stop the node cleanly (its data directory can then be started again)."""
        self.node.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 20)

    @property
    def api(self) -> ApiClient:
        """The node's HTTP API (open: tenant ``default``, every scope)."""
        return ApiClient(self.session, self.http_url)

    def api_as(self, key: str) -> ApiClient:
        return ApiClient(self.session, self.http_url, key)

    async def user(
        self,
        name: str,
        receiver: Receiver | None = None,
        *topics: str,
        channels: tuple[str, ...] = ("webhook",),
        filter: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> None:
        """``PUT /users/{name}`` (with a webhook at ``receiver``, if given) and a
        subscription to each of ``topics``."""
        api = self.api_as(key) if key else self.api
        body = {"webhook": {"url": receiver.url(name), "secret": SECRET}} if receiver else {}
        await api.ok("PUT", f"/users/{name}", body)
        for topic in topics:
            sub: dict[str, Any] = {"channels": list(channels)}
            if filter is not None:
                sub["filter"] = filter
            await api.ok("PUT", f"/users/{name}/subscriptions/{topic}", sub)

    async def statuses(self, event_id: str, key: str | None = None) -> list[dict[str, Any]]:
        """``GET /events/{id}``'s recipients ([] for an event with none recorded)."""
        api = self.api_as(key) if key else self.api
        code, body = await api.call("GET", f"/events/{event_id}")
        if code == 404:
            return []
        assert code == 200, body
        return list(body["recipients"])

    async def publish(self, api_key: str | None = None, **event: Any) -> dict[str, Any]:
        event.setdefault("payload", {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        headers["Content-Type"] = "application/json"
        async with self.session.post(
            f"{self.http_url}/events", data=msgspec.json.encode(event), headers=headers
        ) as resp:
            body = await resp.json()
            assert resp.status in (200, 201, 202), body
            return dict(body)

    def tick(self, ms: int) -> None:
        """Move the engine's clock and let its timers and retry tiers look again."""
        assert self.clock is not None
        self.clock.advance(ms)
        self.engine.poke()

    async def drained(self, within: float = 10.0) -> None:
        """Wait until every stage has consumed everything appended so far."""
        service = self.engine.service
        deadline = asyncio.get_running_loop().time() + within
        while True:
            behind = 0
            for stage in self.engine.stages:
                consumer = stage.consumer
                if consumer is None:
                    continue
                for t, p in consumer.assignment:
                    hw = service.log.partition(t, p).high_watermark
                    behind += max(0, hw - consumer.positions.get((t, p), hw))
            if behind == 0 and all(s.settled for s in self.engine.stages):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"stages still {behind} records behind")
            await asyncio.sleep(0.05)


def node_config(tmp: Path, **notify: Any) -> Config:
    retry = notify.pop("retry_delays_ms", [300, 600, 1200])
    ncfg = NotifyConfig(
        channels=notify.pop("channels", ["webhook", "console"]),
        partitions=notify.pop("partitions", 2),
        retry_partitions=1,
        retry_overrides=[ChannelRetry(channel="webhook", delays_ms=retry, jitter=0.0)],
        **notify,
    )
    cfg = Config()
    return msgspec.structs.replace(
        cfg,
        listen=msgspec.structs.replace(cfg.listen, http_port=0, tcp_port=0, ws_port=0),
        storage=msgspec.structs.replace(cfg.storage, data_dir=str(tmp)),
        topics=msgspec.structs.replace(cfg.topics, events_partitions=2),
        notify=ncfg,
        channels=ChannelsConfig(
            webhook=WebhookConfig(
                allow_networks=["127.0.0.1/32"],
                timeout_ms=3000,
                connect_timeout_ms=1000,
                breaker=BreakerConfig(open_ms=100, max_open_ms=200, failure_threshold=50),
            )
        ),
    )


NodeFactory = Callable[..., Any]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def start_node(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """``await start_node(clock=FakeClock()|None, data=..., config=..., **notify_config)``:
    a node in this process; every one started is stopped at teardown. ``directory``
    replaces the registry-backed directory (none of these tests needs to)."""
    running: list[tuple[Node, asyncio.Task[None]]] = []
    session = aiohttp.ClientSession()

    async def start(
        directory: Directory | None = None,
        *,
        clock: FakeClock | None = None,
        data: Path | None = None,
        config: Config | None = None,
        **notify: Any,
    ) -> RunningNode:
        cfg = config or node_config(data or tmp_path / f"node{len(running)}", **notify)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        node = Node(
            cfg,
            shutdown_timeout=1.0,
            directory=(lambda kv: directory) if directory is not None else None,
            clock=clock,
        )
        task = asyncio.create_task(node.run(lambda n: ready.set_result(None)))
        running.append((node, task))
        done, _ = await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert node.engine is not None
        return RunningNode(
            node, node.engine, f"http://127.0.0.1:{node.ports['http']}", session, clock, task
        )

    try:
        yield start
    finally:
        for node, task in reversed(running):
            node.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 20)
        await session.close()
