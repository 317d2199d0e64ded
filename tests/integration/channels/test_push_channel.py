"""The push channel against a fake APNs (HTTP/2 over TLS on 127.0.0.1, verifying the ES256
provider token with the team's public key) and a fake FCM with its OAuth2 token endpoint
(verifying the RS256 service-account assertion): the wire, each answer class, token caching
and refresh, several devices, and failover between APNs hosts."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from channels.base import Delivered, Delivery, Permanent, PushAddress, PushDevice, Retry
from channels.config import ApnsConfig, BreakerConfig, FcmConfig
from channels.push import PushChannel
from tests.integration.smtp_sink import TestCA, make_test_ca

from .fake_push import FakeApns, FakeGoogle

KEY_ID, TEAM_ID, TOPIC = "ABC123DEFG", "DEF123GHIJ", "com.example.herald"
GOOD = "a" * 64
EMAIL = "herald@example-project.iam.gserviceaccount.com"


class Clock:
    """Wall-clock seconds that a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def apns_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path_factory.mktemp("apns") / f"AuthKey_{KEY_ID}.p8"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, public


@pytest.fixture(scope="module")
def google_key() -> tuple[str, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.fixture
async def apns(ca: TestCA, apns_key: tuple[Path, bytes]) -> AsyncIterator[FakeApns]:
    fake = FakeApns(apns_key[1], KEY_ID, TEAM_ID, TOPIC, ca)
    await fake.start()
    try:
        yield fake
    finally:
        await close_channels()
        await fake.stop()


@pytest.fixture
async def apns_backup(ca: TestCA, apns_key: tuple[Path, bytes]) -> AsyncIterator[FakeApns]:
    fake = FakeApns(apns_key[1], KEY_ID, TEAM_ID, TOPIC, ca)
    await fake.start()
    try:
        yield fake
    finally:
        await close_channels()
        await fake.stop()


@pytest.fixture
async def google(google_key: tuple[str, bytes]) -> AsyncIterator[FakeGoogle]:
    fake = FakeGoogle(google_key[1], EMAIL)
    await fake.start()
    try:
        yield fake
    finally:
        await close_channels()
        await fake.stop()


_made: list[PushChannel] = []


async def close_channels() -> None:
    """Close the test's channels before a fake stops (an open HTTP/2 connection would hold
    the server's shutdown)."""
    while _made:
        await _made.pop().close()


@pytest.fixture(autouse=True)
async def _close() -> AsyncIterator[None]:
    yield
    await close_channels()


def push_channel(
    ca: TestCA,
    apns_key: tuple[Path, bytes],
    *apns_fakes: FakeApns,
    google: FakeGoogle | None = None,
    google_key: tuple[str, bytes] | None = None,
    tmp: Path | None = None,
    clock: Clock | None = None,
    breaker: dict[str, Any] | None = None,
    **apns_kw: Any,
) -> PushChannel:
    acfg = ApnsConfig(
        urls=[f.url for f in apns_fakes] or ["https://localhost:1"],
        key_id=KEY_ID,
        team_id=TEAM_ID,
        key_file=str(apns_key[0]),
        topic=TOPIC,
        breaker=BreakerConfig(**(breaker or {})),
        **apns_kw,
    )
    fcfg = FcmConfig()
    if google is not None:
        assert google_key is not None and tmp is not None
        account = tmp / "service-account.json"
        account.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "herald-test",
                    "private_key_id": "k1",
                    "private_key": google_key[0],
                    "client_email": EMAIL,
                    "token_uri": google.token_uri,
                }
            )
        )
        fcfg = FcmConfig(urls=[google.url], service_account_file=str(account))
    channel = PushChannel(
        acfg,
        fcfg,
        clock=clock or Clock(),
        ssl_context=ssl.create_default_context(cafile=str(ca.ca_pem)),
    )
    _made.append(channel)
    return channel


def push(*devices: tuple[str, str], **kw: Any) -> Delivery:
    fields: dict[str, Any] = {
        "delivery_id": "dlv-1",
        "tenant": "acme",
        "user": "u-1",
        "topic": "orders.shipped",
        "event_id": "evt-1",
        "created_ms": 1_764_000_000_123,
        "priority": "high",
        "payload": msgspec.Raw(b'{"body":"Your order is on its way","order":42}'),
        "address": PushAddress(
            devices=tuple(PushDevice(token=t, platform=p) for t, p in devices)  # type: ignore[arg-type]
        ),
    }
    fields.update(kw)
    return Delivery(**fields)


# ------------------------------------------------------------------------------ APNs
async def test_apns_gets_an_http2_request_with_its_headers_and_a_verified_es256_token(
    ca: TestCA, apns_key: tuple[Path, bytes], apns: FakeApns
) -> None:
    channel = push_channel(ca, apns_key, apns)
    before = int(time.time())
    outcome = await channel.send(push((GOOD, "apns")))
    assert isinstance(outcome, Delivered), outcome
    (req,) = apns.accepted  # accepted: the fake verified the JWT's signature with the key
    assert req.http_version == "2"
    assert req.path == f"/3/device/{GOOD}"
    assert req.jwt_header == {"alg": "ES256", "kid": KEY_ID, "typ": "JWT"}
    assert req.claims["iss"] == TEAM_ID and abs(req.claims["iat"] - before) <= 2
    h = req.headers
    assert h["apns-topic"] == TOPIC
    assert h["apns-push-type"] == "alert"
    assert h["apns-priority"] == "10"  # a high-priority event
    assert 0 <= int(h["apns-expiration"]) - (before + 86_400) <= 2
    assert h["apns-collapse-id"] == "dlv-1"
    assert h["apns-id"] == str(uuid.UUID(h["apns-id"]))
    assert outcome.provider_message_id == h["apns-id"]
    assert req.body["aps"] == {
        "alert": {"title": "orders.shipped", "body": "Your order is on its way"}
    }
    assert req.body["herald"]["data"] == {"body": "Your order is on its way", "order": 42}
    # a retry of the same delivery carries the same apns-id
    await channel.send(push((GOOD, "apns"), attempt=2))
    assert apns.accepted[1].headers["apns-id"] == h["apns-id"]


async def test_the_fake_apns_refuses_http1(ca: TestCA, apns: FakeApns) -> None:
    ctx = ssl.create_default_context(cafile=str(ca.ca_pem))
    async with httpx.AsyncClient(verify=ctx) as client:
        resp = await client.post(f"{apns.url}/3/device/{GOOD}", content=b"{}")
    assert resp.http_version == "HTTP/1.1"
    assert resp.status_code == 400 and resp.json() == {"reason": "HTTP2Required"}


async def test_the_provider_token_is_reused_then_signed_again_within_the_hour(
    ca: TestCA, apns_key: tuple[Path, bytes], apns: FakeApns
) -> None:
    clock = Clock()
    channel = push_channel(ca, apns_key, apns, clock=clock)
    for i in range(3):
        assert isinstance(await channel.send(push((GOOD, "apns"), delivery_id=f"d{i}")), Delivered)
    bearers = {r.headers["authorization"] for r in apns.accepted}
    assert len(bearers) == 1
    clock.offset += 39 * 60
    await channel.send(push((GOOD, "apns"), delivery_id="d3"))
    assert apns.accepted[-1].headers["authorization"] in bearers  # 39 min: still the same
    clock.offset += 2 * 60
    await channel.send(push((GOOD, "apns"), delivery_id="d4"))
    assert apns.accepted[-1].headers["authorization"] not in bearers  # 41 min: signed again
    assert channel.apns is not None and channel.apns.tokens.signed == 2


@pytest.mark.parametrize(
    ("token", "setup", "kind", "reason", "invalidates"),
    [
        ("b" * 64, "unregistered", Permanent, "unregistered", "token"),
        ("c" * 64, "bad", Permanent, "bad_device_token", "token"),
        ("not-a-token", None, Permanent, "bad_device_token", "token"),
        ("d" * 64, "throttled", Retry, "apns_TooManyRequests", None),
        ("e" * 64, "down", Retry, "http_503", None),
    ],
)
async def test_each_apns_answer_class_gives_its_outcome(
    ca: TestCA,
    apns_key: tuple[Path, bytes],
    apns: FakeApns,
    token: str,
    setup: str | None,
    kind: type,
    reason: str,
    invalidates: str | None,
) -> None:
    if setup == "down":
        apns.down = True
    elif setup is not None:
        getattr(apns, setup).add(token)
    outcome = await push_channel(ca, apns_key, apns).send(push((token, "apns")))
    assert type(outcome) is kind, outcome
    assert getattr(outcome, "reason", None) == reason
    if isinstance(outcome, Permanent):
        assert outcome.invalidates == invalidates
        assert outcome.dead_tokens == (token,)
    if setup == "down":
        assert isinstance(outcome, Retry) and outcome.after_s == 3.0


async def test_apns_fails_over_to_the_next_host_and_comes_back_after_a_probe(
    ca: TestCA, apns_key: tuple[Path, bytes], apns: FakeApns, apns_backup: FakeApns
) -> None:
    channel = push_channel(
        ca, apns_key, apns, apns_backup, breaker={"failure_threshold": 2, "open_ms": 300}
    )
    apns.down = True
    for i in range(4):
        assert isinstance(await channel.send(push((GOOD, "apns"), delivery_id=f"a{i}")), Delivered)
    assert len(apns.refused) == 2 and len(apns_backup.accepted) == 4
    assert channel.apns_chain.states()[apns.url] == "open"
    apns.down = False
    await asyncio.sleep(0.35)  # the breaker runs on the real monotonic clock here
    for i in range(3):
        assert isinstance(await channel.send(push((GOOD, "apns"), delivery_id=f"b{i}")), Delivered)
    assert len(apns.accepted) == 3 and len(apns_backup.accepted) == 4
    assert channel.apns_chain.states()[apns.url] == "closed"


# ------------------------------------------------------------------------------- FCM
async def test_fcm_gets_a_v1_message_with_a_bearer_from_a_verified_service_account_grant(
    ca: TestCA,
    apns_key: tuple[Path, bytes],
    google: FakeGoogle,
    google_key: tuple[str, bytes],
    tmp_path: Path,
) -> None:
    clock = Clock()
    channel = push_channel(
        ca, apns_key, google=google, google_key=google_key, tmp=tmp_path, clock=clock
    )
    for i in range(3):
        outcome = await channel.send(push(("fcm-token-1", "fcm"), delivery_id=f"d{i}"))
        assert isinstance(outcome, Delivered), outcome
        assert (outcome.provider_message_id or "").startswith("projects/herald-test/messages/")
    # one grant for the three sends: the assertion was verified with the account's public key
    (claims,) = google.assertions
    assert claims["iss"] == EMAIL and claims["aud"] == google.token_uri
    assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
    assert claims["exp"] - claims["iat"] == 3600
    first = google.sent[0]
    assert first.project == "herald-test" and first.bearer in google.granted
    assert first.message == {
        "token": "fcm-token-1",
        "notification": {"title": "orders.shipped", "body": "Your order is on its way"},
        "data": {
            "event_id": "evt-1",
            "topic": "orders.shipped",
            "payload": '{"body":"Your order is on its way","order":42}',
        },
        "android": {"priority": "high", "collapse_key": "d0"},
    }
    # past expiry minus the margin, a new access token is fetched
    clock.offset += 3600 - 299
    google.leeway_s = 3600  # the fake's clock has not moved with the channel's
    refreshed = await channel.send(push(("fcm-token-1", "fcm"), delivery_id="d9"))
    assert isinstance(refreshed, Delivered), refreshed
    assert len(google.assertions) == 2
    assert google.sent[-1].bearer != first.bearer


@pytest.mark.parametrize(
    ("setup", "kind", "reason", "invalidates"),
    [
        ("unregistered", Permanent, "unregistered", "token"),
        ("invalid", Permanent, "invalid_token", "token"),
        ("down", Retry, "http_503", None),
        ("quota", Retry, "quota_exceeded", None),
    ],
)
async def test_each_fcm_answer_class_gives_its_outcome(
    ca: TestCA,
    apns_key: tuple[Path, bytes],
    google: FakeGoogle,
    google_key: tuple[str, bytes],
    tmp_path: Path,
    setup: str,
    kind: type,
    reason: str,
    invalidates: str | None,
) -> None:
    token = "fcm-token-x"
    if setup in ("down", "quota"):
        setattr(google, setup, True)
    else:
        getattr(google, setup).add(token)
    channel = push_channel(ca, apns_key, google=google, google_key=google_key, tmp=tmp_path)
    outcome = await channel.send(push((token, "fcm")))
    assert type(outcome) is kind, outcome
    assert getattr(outcome, "reason", None) == reason
    if isinstance(outcome, Permanent):
        assert (outcome.invalidates, outcome.dead_tokens) == (invalidates, (token,))
    if setup == "quota":
        assert isinstance(outcome, Retry) and outcome.after_s == 60.0  # at least a minute


async def test_a_revoked_access_token_is_replaced(
    ca: TestCA,
    apns_key: tuple[Path, bytes],
    google: FakeGoogle,
    google_key: tuple[str, bytes],
    tmp_path: Path,
) -> None:
    channel = push_channel(ca, apns_key, google=google, google_key=google_key, tmp=tmp_path)
    assert isinstance(await channel.send(push(("t1", "fcm"))), Delivered)
    google.granted.clear()  # every access token revoked
    second = await channel.send(push(("t1", "fcm"), delivery_id="d2"))
    assert isinstance(second, Retry) and second.reason == "fcm_unauthenticated"
    assert isinstance(await channel.send(push(("t1", "fcm"), delivery_id="d3")), Delivered)
    assert google.rejected_bearers == 1 and len(google.assertions) == 2


# ------------------------------------------------------------------------ many devices
async def test_one_delivery_reaches_every_device_and_names_the_dead_tokens(
    ca: TestCA,
    apns_key: tuple[Path, bytes],
    apns: FakeApns,
    google: FakeGoogle,
    google_key: tuple[str, bytes],
    tmp_path: Path,
) -> None:
    apns.unregistered.add("f" * 64)
    google.unregistered.add("fcm-dead")
    channel = push_channel(ca, apns_key, apns, google=google, google_key=google_key, tmp=tmp_path)
    outcome = await channel.send(
        push((GOOD, "apns"), ("f" * 64, "apns"), ("fcm-live", "fcm"), ("fcm-dead", "fcm"))
    )
    assert isinstance(outcome, Delivered), outcome
    assert set(outcome.dead_tokens) == {"f" * 64, "fcm-dead"}
    assert len(apns.accepted) == 1 and len(google.sent) == 1
    assert (outcome.provider_message_id or "").count(",") == 1

    everyone_dead = await channel.send(push(("f" * 64, "apns"), ("fcm-dead", "fcm")))
    assert isinstance(everyone_dead, Permanent) and everyone_dead.invalidates == "token"
