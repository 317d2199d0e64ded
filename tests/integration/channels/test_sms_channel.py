"""The SMS channel against a fake Twilio on 127.0.0.1 speaking Twilio's wire format: the
form fields and basic auth it receives, each answer class's outcome, the per-sender token
bucket, and failover between two providers with their breakers opening, probing and
closing."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from channels.base import Delivered, Delivery, Permanent, Retry, SmsAddress
from channels.config import BreakerConfig, SmsConfig, TwilioProvider
from channels.sms import SmsChannel

from .fake_twilio import FakeTwilio

PRIMARY = ("AC" + "1" * 32, "token-primary")
BACKUP = ("AC" + "2" * 32, "token-backup")


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    fake = FakeTwilio(accounts=dict([PRIMARY, BACKUP]))
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


def provider(fake: FakeTwilio, name: str = "primary", **kw: Any) -> TwilioProvider:
    sid, token = PRIMARY if name == "primary" else BACKUP
    fields: dict[str, Any] = {
        "name": name,
        "url": fake.url,
        "account_sid": sid,
        "auth_token": token,
        "sender": "+14155550199",
        "rate_per_s": 1000.0,
        "burst": 100,
    }
    fields.update(kw)
    return TwilioProvider(**fields)


_channels: list[SmsChannel] = []


@pytest.fixture(autouse=True)
async def _close_channels() -> AsyncIterator[None]:
    yield
    while _channels:
        await _channels.pop().close()


def channel(*providers: TwilioProvider, **kw: Any) -> SmsChannel:
    extra = {k: kw.pop(k) for k in ("monotonic",) if k in kw}
    if isinstance(kw.get("breaker"), dict):
        kw["breaker"] = BreakerConfig(**kw["breaker"])
    ch = SmsChannel(SmsConfig(providers=list(providers), **kw), **extra)
    _channels.append(ch)
    return ch


def sms(to: str = "+14155550100", text: str = "Your code is 123456", **kw: Any) -> Delivery:
    fields: dict[str, Any] = {
        "delivery_id": "dlv-1",
        "tenant": "acme",
        "user": "u-1",
        "topic": "auth.code",
        "event_id": "evt-1",
        "created_ms": 1_764_000_000_123,
        "payload": msgspec.Raw(msgspec.json.encode({"text": text})),
        "address": SmsAddress(to=to),
    }
    fields.update(kw)
    return Delivery(**fields)


# --------------------------------------------------------------------------- the wire
async def test_a_send_is_twilios_form_post_with_basic_auth_and_the_sid_comes_back(
    twilio: FakeTwilio,
) -> None:
    outcome = await channel(provider(twilio)).send(sms())
    assert isinstance(outcome, Delivered)
    (msg,) = twilio.messages
    assert outcome.provider_message_id == msg.sid and msg.sid.startswith("SM")
    assert msg.account == PRIMARY[0]
    assert msg.form == {"To": "+14155550100", "From": "+14155550199", "Body": "Your code is 123456"}
    (_sid, _form, auth) = twilio.requests[0]
    assert auth == "Basic " + base64.b64encode(f"{PRIMARY[0]}:{PRIMARY[1]}".encode()).decode()


async def test_a_messaging_service_replaces_from_and_a_status_callback_is_passed(
    twilio: FakeTwilio,
) -> None:
    ch = channel(
        provider(twilio, sender="", messaging_service_sid="MG" + "3" * 32),
        status_callback="https://herald.example/hooks/sms/status",
    )
    assert isinstance(await ch.send(sms()), Delivered)
    (msg,) = twilio.messages
    assert "From" not in msg.form
    assert msg.form["MessagingServiceSid"] == "MG" + "3" * 32
    assert msg.form["StatusCallback"] == "https://herald.example/hooks/sms/status"


# ---------------------------------------------------------------------- answer classes
async def test_an_invalid_number_is_permanent_and_invalidates_the_phone(
    twilio: FakeTwilio,
) -> None:
    twilio.invalid.add("+15005550001")
    outcome = await channel(provider(twilio)).send(sms("+15005550001"))
    assert isinstance(outcome, Permanent)
    assert (outcome.reason, outcome.invalidates) == ("invalid_number", "address")
    assert "21211" in outcome.detail


async def test_an_unsubscribed_recipient_is_permanent_and_revokes_consent(
    twilio: FakeTwilio,
) -> None:
    twilio.unsubscribed.add("+14155550100")
    outcome = await channel(provider(twilio)).send(sms())
    assert isinstance(outcome, Permanent)
    assert (outcome.reason, outcome.invalidates) == ("recipient_unsubscribed", "consent")


async def test_503_and_429_retry_after_the_providers_retry_after(twilio: FakeTwilio) -> None:
    twilio.down, twilio.retry_after = True, "7"
    outcome = await channel(provider(twilio)).send(sms())
    assert isinstance(outcome, Retry)
    assert (outcome.reason, outcome.after_s) == ("http_503", 7.0)


async def test_wrong_credentials_are_a_retry_not_a_permanent_failure(twilio: FakeTwilio) -> None:
    outcome = await channel(provider(twilio, auth_token="wrong")).send(sms())
    assert isinstance(outcome, Retry) and outcome.reason == "auth_failed"
    assert twilio.auth_failures == 1 and not twilio.messages


async def test_a_hanging_provider_times_out_as_a_retry_without_failing_over(
    twilio: FakeTwilio, backup_twilio: FakeTwilio
) -> None:
    twilio.hang = True
    ch = channel(
        provider(twilio), provider(backup_twilio, "backup"), timeout_ms=300, connect_timeout_ms=300
    )
    started = time.monotonic()
    outcome = await ch.send(sms())
    assert time.monotonic() - started < 2
    assert isinstance(outcome, Retry) and outcome.reason == "timeout"
    # the primary may have taken the message: a second provider would send it twice
    assert not backup_twilio.requests


async def test_no_phone_number_is_permanent_without_a_request(twilio: FakeTwilio) -> None:
    outcome = await channel(provider(twilio)).send(sms(address=None))
    assert isinstance(outcome, Permanent) and outcome.reason == "no_phone"
    assert not twilio.requests


# ------------------------------------------------------------------------- rate limit
@pytest.mark.serial  # bounds elapsed time: run alone (make test)
async def test_each_sender_is_held_to_its_rate(twilio: FakeTwilio) -> None:
    ch = channel(provider(twilio, rate_per_s=10.0, burst=1))
    started = time.monotonic()
    outcomes = await asyncio.gather(*(ch.send(sms(delivery_id=f"d{i}")) for i in range(6)))
    elapsed = time.monotonic() - started
    assert all(isinstance(o, Delivered) for o in outcomes)
    assert elapsed >= 0.45, elapsed  # 1 at once, then 5 more at 10/s
    # The bucket (burst 1, 10/s) lets at most 1 + 10 * t sends through in the first t seconds,
    # so the i-th arrival (from 0) comes no sooner than i / 10 s after the start. A late
    # scheduler only delays arrivals, so this holds on a loaded machine too (gaps between two
    # arrivals need not: one held up and the next on time arrive close together).
    arrivals = sorted(m.at - started for m in twilio.messages)
    assert len(arrivals) == 6
    early = [(i, round(at, 4)) for i, at in enumerate(arrivals) if at < i / 10 - 0.001]
    assert not early, (early, arrivals)


@pytest.mark.serial  # bounds elapsed time: run alone (make test)
async def test_a_send_that_would_wait_too_long_for_its_sender_is_a_retry(
    twilio: FakeTwilio,
) -> None:
    ch = channel(provider(twilio, rate_per_s=1.0, burst=1), rate_wait_ms=200)
    first, second = await asyncio.gather(ch.send(sms()), ch.send(sms(delivery_id="d2")))
    assert isinstance(first, Delivered)
    assert isinstance(second, Retry) and second.reason == "rate_limited"
    assert second.after_s is not None and 0.5 < second.after_s <= 1.0
    assert len(twilio.messages) == 1


# --------------------------------------------------------------------------- failover
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_failover_to_the_backup_while_the_primary_is_down_and_back_after_a_probe(
    twilio: FakeTwilio, backup_twilio: FakeTwilio, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="herald.channels.failover")
    clock = Clock()
    ch = channel(
        provider(twilio),
        provider(backup_twilio, "backup"),
        breaker={"failure_threshold": 3, "open_ms": 30_000},
        monotonic=clock,
    )
    twilio.down = True
    # while the primary answers 503, each send fails over to the backup at once
    for i in range(3):
        outcome = await ch.send(sms(delivery_id=f"a{i}"))
        assert isinstance(outcome, Delivered), outcome
    assert len(twilio.requests) == 3 and len(backup_twilio.messages) == 3
    assert ch.chain.states() == {"primary": "open", "backup": "closed"}
    # the primary's breaker is open: no more requests to it, the backup takes the traffic
    for i in range(5):
        assert isinstance(await ch.send(sms(delivery_id=f"b{i}")), Delivered)
    assert len(twilio.requests) == 3 and len(backup_twilio.messages) == 8
    # cool-down over, the primary still down: the probe fails, the send still gets through
    clock.now += 30
    assert isinstance(await ch.send(sms(delivery_id="c0")), Delivered)
    assert len(twilio.requests) == 4 and len(backup_twilio.messages) == 9
    assert ch.chain.states()["primary"] == "open"
    # the primary recovers; after the (doubled) cool-down one probe succeeds, traffic is back
    twilio.down = False
    clock.now += 60
    for i in range(4):
        assert isinstance(await ch.send(sms(delivery_id=f"d{i}")), Delivered)
    assert len(twilio.messages) == 4 and len(backup_twilio.messages) == 9
    assert ch.chain.states() == {"primary": "closed", "backup": "closed"}
    moves = [r.getMessage() for r in caplog.records if "event=breaker_" in r.getMessage()]
    print("\n".join(moves))
    assert [m.split()[0] for m in moves] == [
        "event=breaker_open",
        "event=breaker_half_open",
        "event=breaker_open",
        "event=breaker_half_open",
        "event=breaker_closed",
    ]
    assert all("provider=primary" in m for m in moves)


async def test_every_breaker_open_is_a_retry_after_the_shortest_cool_down(
    twilio: FakeTwilio, backup_twilio: FakeTwilio
) -> None:
    clock = Clock()
    ch = channel(
        provider(twilio),
        provider(backup_twilio, "backup"),
        breaker={"failure_threshold": 1, "open_ms": 10_000},
        monotonic=clock,
    )
    twilio.down = backup_twilio.down = True
    first = await ch.send(sms())
    assert isinstance(first, Retry) and first.reason == "http_503"
    clock.now += 4
    second = await ch.send(sms(delivery_id="d2"))
    assert isinstance(second, Retry) and second.reason == "circuit_open"
    assert second.after_s == pytest.approx(6.0)
    assert len(twilio.requests) == len(backup_twilio.requests) == 1
