"""Fixtures: a real node in this process whose SMS channel talks to a fake Twilio (two, for
failover) and whose push channel talks to a fake APNs (HTTP/2 over TLS) and a fake FCM with
its token endpoint, all on 127.0.0.1. Users, devices, subscriptions and mandatory topics go in
through the node's HTTP API, events through ``POST /events``, inbound texts through ``POST
/hooks/sms/inbound`` signed as Twilio signs them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.config import ChannelRetry, Config, NotifyConfig
from channels.config import (
    ApnsConfig,
    BreakerConfig,
    ChannelsConfig,
    FcmConfig,
    SmsConfig,
    TwilioProvider,
)
from channels.push import PushChannel
from channels.twilio import signature
from herald.node import Node
from notify.engine import Engine

from ..channels.fake_push import FakeApns, FakeGoogle
from ..channels.fake_twilio import FakeTwilio
from ..smtp_sink import TestCA, make_test_ca

PRIMARY = ("AC" + "1" * 32, "token-primary")
BACKUP = ("AC" + "2" * 32, "token-backup")
SENDER = "+14155550199"
KEY_ID, TEAM_ID, TOPIC = "ABC123DEFG", "DEF123GHIJ", "com.example.herald"
EMAIL = "herald@example-project.iam.gserviceaccount.com"


@dataclass
class Keys:
    apns_file: Path
    apns_public: bytes
    google_private: str
    google_public: bytes


@dataclass
class SmsPushNode:
    node: Node
    engine: Engine
    url: str
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else msgspec.json.encode(body)
        async with self.session.request(
            method, f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"}
        ) as resp:
            raw = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, msgspec.json.decode(raw)
            return resp.status, raw.decode()

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        code, answer = await self.call(method, path, body)
        assert code in (200, 201, 204), (method, path, code, answer)
        return answer

    async def user(
        self,
        user: str,
        *topics: str,
        channels: tuple[str, ...] = ("sms",),
        devices: dict[str, str] | None = None,
        **contact: Any,
    ) -> None:
        await self.ok("PUT", f"/users/{user}", contact)
        for token, platform in (devices or {}).items():
            await self.ok("PUT", f"/users/{user}/devices/{token}", {"platform": platform})
        for topic in topics:
            await self.ok(
                "PUT", f"/users/{user}/subscriptions/{topic}", {"channels": list(channels)}
            )

    async def publish(self, **event: Any) -> str:
        event.setdefault("payload", {})
        answer = await self.ok("POST", "/events", event)
        return str(answer["event_id"])

    async def inbound(
        self,
        body: str,
        *,
        sender: str,
        account: tuple[str, str] = PRIMARY,
        signed_with: str | None = None,
    ) -> tuple[int, str]:
        """POST a text from ``sender`` to the hook as Twilio would, signed with the account's
        auth token (or ``signed_with``)."""
        url = f"{self.url}/hooks/sms/inbound"
        form = {
            "ToCountry": "US",
            "SmsMessageSid": "SM" + "9" * 32,
            "NumMedia": "0",
            "SmsSid": "SM" + "9" * 32,
            "SmsStatus": "received",
            "Body": body,
            "To": SENDER,
            "NumSegments": "1",
            "MessageSid": "SM" + "9" * 32,
            "AccountSid": account[0],
            "From": sender,
            "ApiVersion": "2010-04-01",
        }
        async with self._twilio_post(url, url, form, signed_with or account[1]) as resp:
            return resp.status, await resp.text()

    def _twilio_post(self, target: str, signed_url: str, form: dict[str, str], token: str) -> Any:
        """POST ``form`` to ``target`` as Twilio does, signed over ``signed_url``."""
        return self.session.post(
            target,
            data=urllib.parse.urlencode(form),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": signature(token, signed_url, list(form.items())),
                "User-Agent": "TwilioProxy/1.1",
            },
        )

    async def receipt(
        self,
        callback: str,
        status: str,
        *,
        code: str = "",
        to: str = "+14155550100",
        account: tuple[str, str] = PRIMARY,
        signed_with: str | None = None,
    ) -> tuple[int, Any]:
        """POST a delivery receipt as Twilio posts it to a message's ``StatusCallback``
        (``callback``, the public URL the node gave Twilio): signed over that URL, sent to
        this node's loopback address with the same path and query (a proxy in between)."""
        parts = urllib.parse.urlsplit(callback)
        sid = "SM" + "7" * 32
        form = {
            "SmsSid": sid,
            "SmsStatus": status,
            "MessageStatus": status,
            "To": to,
            "MessageSid": sid,
            "AccountSid": account[0],
            "From": SENDER,
            "ApiVersion": "2010-04-01",
        }
        if code:
            form["ErrorCode"] = code
        target = f"{self.url}{parts.path}?{parts.query}"
        async with self._twilio_post(target, callback, form, signed_with or account[1]) as resp:
            raw = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, msgspec.json.decode(raw)
            return resp.status, raw.decode()

    def rows(self, event_id: str, channel: str) -> list[dict[str, Any]]:
        return [r for r in self.engine.event_status("default", event_id) if r["channel"] == channel]

    async def settled(
        self,
        event_id: str,
        channel: str,
        statuses: set[str],
        *,
        user: str | None = None,
        within: float = 15.0,
    ) -> dict[str, Any]:
        """The event's status on ``channel`` (of ``user``, else the first) once it is one
        of ``statuses``."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            rows = [r for r in self.rows(event_id, channel) if user in (None, r["user"])]
            if rows and rows[0]["status"] in statuses:
                return rows[0]
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"event {event_id} on {channel} is {rows}, not {statuses}")
            await asyncio.sleep(0.05)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    apns_file = tmp_path_factory.mktemp("apns") / f"AuthKey_{KEY_ID}.p8"
    apns_file.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def public(k: Any) -> bytes:
        return bytes(
            k.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    return Keys(
        apns_file,
        public(ec_key),
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        public(rsa_key),
    )


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    fake = FakeTwilio(accounts=dict([PRIMARY]))
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def backup_twilio() -> AsyncIterator[FakeTwilio]:
    fake = FakeTwilio(accounts=dict([BACKUP]))
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def provider(fake: FakeTwilio, name: str = "primary") -> TwilioProvider:
    sid, token = PRIMARY if name == "primary" else BACKUP
    return TwilioProvider(
        name=name,
        url=fake.url,
        account_sid=sid,
        auth_token=token,
        sender=SENDER,
        rate_per_s=500.0,
        burst=50,
    )


def node_config(
    tmp: Path,
    *,
    channels: list[str],
    sms: SmsConfig | None = None,
    apns: ApnsConfig | None = None,
    fcm: FcmConfig | None = None,
    **extra: Any,
) -> Config:
    cfg = Config()
    delays = extra.pop("delays_ms", [200, 400])
    retry = [ChannelRetry(channel=ch, delays_ms=delays, jitter=0.0) for ch in channels]
    return msgspec.structs.replace(
        cfg,
        listen=msgspec.structs.replace(cfg.listen, http_port=0, tcp_port=0, ws_port=0),
        storage=msgspec.structs.replace(cfg.storage, data_dir=str(tmp)),
        topics=msgspec.structs.replace(cfg.topics, events_partitions=2),
        notify=NotifyConfig(
            channels=[*channels, "console"],
            partitions=2,
            retry_partitions=1,
            retry_overrides=retry,
        ),
        channels=ChannelsConfig(
            sms=sms or SmsConfig(),
            apns=apns or ApnsConfig(),
            fcm=fcm or FcmConfig(),
            **extra,
        ),
    )


def push_configs(
    tmp: Path, keys: Keys, apns: FakeApns, google: FakeGoogle
) -> tuple[ApnsConfig, FcmConfig]:
    account = tmp / "service-account.json"
    account.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "herald-test",
                "private_key_id": "k1",
                "private_key": keys.google_private,
                "client_email": EMAIL,
                "token_uri": google.token_uri,
            }
        )
    )
    return (
        ApnsConfig(
            urls=[apns.url],
            key_id=KEY_ID,
            team_id=TEAM_ID,
            key_file=str(keys.apns_file),
            topic=TOPIC,
            breaker=BreakerConfig(open_ms=200, max_open_ms=400, failure_threshold=50),
        ),
        FcmConfig(urls=[google.url], service_account_file=str(account)),
    )


def push_channel(ca: TestCA, apns: ApnsConfig, fcm: FcmConfig) -> PushChannel:
    """The push channel trusting the test CA (the node's own would trust the system's)."""
    return PushChannel(apns, fcm, ssl_context=ssl.create_default_context(cafile=str(ca.ca_pem)))


StartNode = Callable[..., Awaitable[SmsPushNode]]


@pytest.fixture
async def start_node(tmp_path: Path) -> AsyncIterator[StartNode]:
    """``await start_node(config, channels={name: Channel})``: a node in this process; every
    one started is stopped at teardown."""
    running: list[tuple[Node, asyncio.Task[None]]] = []
    session = aiohttp.ClientSession()

    async def start(config: Config, channels: dict[str, Any] | None = None) -> SmsPushNode:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        node = Node(config, shutdown_timeout=1.0, channels=channels)
        task = asyncio.create_task(node.run(lambda n: ready.set_result(None)))
        running.append((node, task))
        done, _ = await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert node.engine is not None
        return SmsPushNode(node, node.engine, f"http://127.0.0.1:{node.ports['http']}", session)

    try:
        yield start
    finally:
        for node, task in reversed(running):
            node.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 20)
        await session.close()
