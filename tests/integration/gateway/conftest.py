"""Fixtures: a real node in the test's process (``herald.node.Node`` on free loopback ports,
the gateway on its own), real ``websockets`` clients, the webhook receiver of the notify tests
(``tests/integration/notify/support.py``) standing in for a push provider.

``start_node(data=..., clock=...)`` may be called again with the same data directory after
``stop()`` to restart a node on its log and state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from broker.config import ChannelRetry, Config, GatewayConfig, NotifyConfig, TlsConfig
from channels.config import BreakerConfig, ChannelsConfig, WebhookConfig
from herald.node import Node
from notify.directory import RegistryDirectory
from notify.registry import Registry
from tests.integration.notify.support import FakeClock, Receiver

TENANT = "default"


def gateway_config(
    tmp: Path,
    admission: dict[str, Any] | None = None,
    tls: TlsConfig | None = None,
    **gateway: Any,
) -> Config:
    cfg = Config()
    if tls is not None:
        cfg = msgspec.structs.replace(cfg, tls=tls)
    # every client of these tests comes from 127.0.0.1: the per-address caps are the tests'
    # own business (test_limits.py), not every test's
    adm = {"max_connections_per_address": 20_000, "max_unauthenticated_per_address": 20_000}
    adm.update(admission or {})
    return msgspec.structs.replace(
        cfg,
        admission=msgspec.structs.replace(cfg.admission, **adm),
        listen=msgspec.structs.replace(cfg.listen, http_port=0, tcp_port=0, ws_port=0),
        storage=msgspec.structs.replace(cfg.storage, data_dir=str(tmp)),
        topics=msgspec.structs.replace(cfg.topics, events_partitions=2),
        notify=NotifyConfig(
            channels=["inapp", "webhook", "console"],
            default_channels=["inapp"],
            partitions=2,
            retry_partitions=1,
            retry_overrides=[ChannelRetry(channel="webhook", delays_ms=[300, 600], jitter=0.0)],
        ),
        channels=ChannelsConfig(
            webhook=WebhookConfig(
                allow_networks=["127.0.0.1/32"],
                timeout_ms=3000,
                connect_timeout_ms=1000,
                breaker=BreakerConfig(open_ms=100, max_open_ms=200, failure_threshold=50),
            )
        ),
        gateway=GatewayConfig(partitions=2, **gateway),
    )


@dataclass
class Device:
    """One client connection: every message it gets, kept in order."""

    conn: ClientConnection
    frames: list[dict[str, Any]] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> Device:
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.conn:
                self.frames.append(json.loads(raw))
                self.arrived.append(time.perf_counter())
                self.changed.set()
        self.changed.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == kind]

    @property
    def notifications(self) -> list[dict[str, Any]]:
        return self.of("notification")

    @property
    def ids(self) -> list[str]:
        return [f["id"] for f in self.notifications]

    @property
    def cursor(self) -> str | None:
        cursors = [f["cursor"] for f in self.frames if "cursor" in f]
        return cursors[-1] if cursors else None

    async def wait_for(
        self, check: Callable[[Device], bool], within: float = 10.0, what: str = "frames"
    ) -> None:
        deadline = time.monotonic() + within
        while not check(self):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}: got {self.frames[-5:]}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.2))

    async def ready(self) -> Device:
        await self.wait_for(lambda d: bool(d.of("ready")), what="ready")
        return self

    async def send(self, **msg: Any) -> None:
        await self.conn.send(json.dumps(msg))

    async def close(self) -> None:
        await self.conn.close()
        if self.task is not None:
            await self.task


@dataclass
class Running:
    node: Node
    task: asyncio.Task[None]
    session: aiohttp.ClientSession
    devices: list[Device] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.node.ports['ws']}/"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.node.ports['http']}"

    @property
    def registry(self) -> Registry:
        assert self.node.engine is not None
        directory = self.node.engine.directory
        assert isinstance(directory, RegistryDirectory)
        return directory.registry

    def token(self, user: str, *, tenant: str = TENANT, ttl_s: int = 3600) -> str:
        assert self.node.gateway is not None
        return self.node.gateway.mint(user, tenant=tenant, ttl_s=ttl_s)

    async def connect(
        self, user: str, *, cursor: str | None = None, ready: bool = True, **kw: Any
    ) -> Device:
        url = f"{self.ws_url}?token={self.token(user)}"
        if cursor is not None:
            url += f"&cursor={cursor}"
        conn = await websockets.connect(url, compression=None, **kw)
        device = Device(conn).start()
        self.devices.append(device)
        return await device.ready() if ready else device

    async def publish(self, **event: Any) -> str:
        event.setdefault("payload", {})
        async with self.session.post(f"{self.http_url}/events", json=event) as resp:
            body = await resp.json()
            assert resp.status in (200, 201, 202), body
            return str(body["event_id"])

    async def stop(self) -> None:
        for d in self.devices:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(d.close(), 2)
        self.devices.clear()
        self.node.stop()
        await asyncio.wait_for(self.task, 20)


@pytest.fixture
async def start_node(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    running: list[Running] = []
    session = aiohttp.ClientSession()

    async def start(
        *,
        data: Path | None = None,
        clock: FakeClock | None = None,
        admission: dict[str, Any] | None = None,
        tls: TlsConfig | None = None,
        **gateway: Any,
    ) -> Running:
        cfg = gateway_config(data or tmp_path / "node", admission, tls, **gateway)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        node = Node(cfg, shutdown_timeout=1.0, clock=clock)
        task = asyncio.create_task(node.run(lambda n: ready.set_result(None)))
        done, _ = await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        r = Running(node, task, session)
        running.append(r)
        return r

    try:
        yield start
    finally:
        for r in reversed(running):
            if not r.task.done():
                with contextlib.suppress(Exception):
                    await r.stop()
        await session.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()
