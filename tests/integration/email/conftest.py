"""Fixtures: an SMTP server (aiosmtpd) on 127.0.0.1 and a real node in this process whose
email channel sends to it; users go into the node's registry, events in through its HTTP
``POST /events``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from broker.config import ChannelRetry, Config, NotifyConfig
from channels.config import BreakerConfig, ChannelsConfig, EmailConfig
from herald.node import Node
from notify.directory import RegistryDirectory
from notify.engine import Engine
from notify.model import Subscription, User
from notify.registry import Registry

from ..smtp_sink import SmtpSink

PUBLIC_URL = "https://herald.example.com"
BOUNCE_SECRET = "bounce-s3cret-for-tests"


@dataclass
class EmailNode:
    node: Node
    engine: Engine
    url: str
    session: aiohttp.ClientSession

    @property
    def registry(self) -> Registry:
        directory = self.engine.directory
        assert isinstance(directory, RegistryDirectory)
        return directory.registry

    async def user(self, user: str, email: str, *topics: str, locale: str = "en") -> None:
        await self.registry.put_user(
            "default", user, User(email=email, locale=locale), now_ms=self.engine.clock()
        )
        for topic in topics:
            await self.registry.subscribe(
                "default", user, topic, Subscription(channels=["email"]), now_ms=0
            )

    async def publish(self, **event: Any) -> str:
        event.setdefault("payload", {})
        async with self.session.post(
            f"{self.url}/events",
            data=msgspec.json.encode(event),
            headers={"Content-Type": "application/json"},
        ) as resp:
            body = await resp.json()
            assert resp.status in (200, 201, 202), body
            return str(body["event_id"])

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        data = kw.pop("data", None)
        if body is not None:  # a JSON body says so (the node answers 415 otherwise)
            data = msgspec.json.encode(body)
            kw["headers"] = {"Content-Type": "application/json", **kw.get("headers", {})}
        async with self.session.request(
            method, f"{self.url}{path}", data=data, allow_redirects=False, **kw
        ) as resp:
            raw = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, msgspec.json.decode(raw)
            return resp.status, raw.decode()

    def status(self, event_id: str) -> list[dict[str, Any]]:
        return self.engine.event_status("default", event_id)

    async def settled(
        self, event_id: str, statuses: set[str], within: float = 15.0, user: str | None = None
    ) -> dict[str, Any]:
        """The event's email status (of ``user``, else the first) once it is one of
        ``statuses``."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            rows = [
                r
                for r in self.status(event_id)
                if r["channel"] == "email" and user in (None, r["user"])
            ]
            if rows and rows[0]["status"] in statuses:
                return rows[0]
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"event {event_id} is {rows}, not one of {statuses}")
            await asyncio.sleep(0.05)


def email_node_config(tmp: Path, smtp_port: int, **email: Any) -> Config:
    cfg = Config()
    email.setdefault("breaker", BreakerConfig(open_ms=100, max_open_ms=200, failure_threshold=50))
    return msgspec.structs.replace(
        cfg,
        listen=msgspec.structs.replace(cfg.listen, http_port=0, tcp_port=0, ws_port=0),
        storage=msgspec.structs.replace(cfg.storage, data_dir=str(tmp)),
        topics=msgspec.structs.replace(cfg.topics, events_partitions=2),
        notify=NotifyConfig(
            channels=["email", "console"],
            partitions=2,
            retry_partitions=1,
            public_url=PUBLIC_URL,
            retry_overrides=[ChannelRetry(channel="email", delays_ms=[200, 400], jitter=0.0)],
        ),
        channels=ChannelsConfig(
            email=EmailConfig(
                host="127.0.0.1",
                port=smtp_port,
                tls="none",
                from_address="Acme <news@acme.test>",
                command_timeout_ms=2000,
                connect_timeout_ms=2000,
                bounce_secret=BOUNCE_SECRET,
                **email,
            )
        ),
    )


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    s = SmtpSink()
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


StartNode = Callable[..., Awaitable[EmailNode]]


@pytest.fixture
async def email_node(tmp_path: Path, sink: SmtpSink) -> AsyncIterator[StartNode]:
    """``await email_node(**EmailConfig fields)``: a node sending email to ``sink``."""
    running: list[tuple[Node, asyncio.Task[None]]] = []
    session = aiohttp.ClientSession()

    async def start(config: Config | None = None, **email: Any) -> EmailNode:
        cfg = config or email_node_config(tmp_path / f"node{len(running)}", sink.port, **email)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        node = Node(cfg, shutdown_timeout=1.0)
        task = asyncio.create_task(node.run(lambda n: ready.set_result(None)))
        running.append((node, task))
        done, _ = await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert node.engine is not None
        return EmailNode(node, node.engine, f"http://127.0.0.1:{node.ports['http']}", session)

    try:
        yield start
    finally:
        for node, task in reversed(running):
            node.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 20)
        await session.close()
