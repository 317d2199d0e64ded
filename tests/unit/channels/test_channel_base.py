"""The channel interface's types: outcomes built by their factories round-trip through
msgspec (the core stores them with each attempt), and a Delivery carries a webhook address."""

from __future__ import annotations

import msgspec
import pytest

from channels.base import (
    AnyOutcome,
    Channel,
    Delivered,
    Delivery,
    Outcome,
    Permanent,
    Retry,
    WebhookAddress,
)
from channels.console import ConsoleChannel
from channels.null import NullChannel
from channels.webhook import WebhookChannel


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome.delivered("prov-1", detail="HTTP 200"),
        Outcome.delivered(),
        Outcome.retry(2.5, "http_429", detail="HTTP 429"),
        Outcome.retry(None, "timeout"),
        Outcome.permanent("gone", "endpoint", detail="HTTP 410"),
        Outcome.permanent("http_404"),
    ],
)
def test_every_outcome_round_trips_with_its_tag(outcome: Outcome) -> None:
    for codec in (msgspec.json, msgspec.msgpack):
        back = codec.decode(codec.encode(outcome), type=AnyOutcome)
        assert back == outcome and type(back) is type(outcome)


def test_outcome_factories_build_the_three_kinds() -> None:
    assert isinstance(Outcome.delivered("x"), Delivered)
    r = Outcome.retry(1.0, "http_503")
    assert isinstance(r, Retry) and r.after_s == 1.0 and r.reason == "http_503"
    p = Outcome.permanent("gone", "endpoint")
    assert isinstance(p, Permanent) and p.invalidates == "endpoint"
    assert msgspec.json.decode(msgspec.json.encode(p))["outcome"] == "permanent"


def test_delivery_carries_the_address_and_the_raw_payload() -> None:
    d = Delivery(
        delivery_id="d1",
        tenant="t",
        user="u",
        topic="orders",
        event_id="e1",
        created_ms=1_700_000_000_000,
        payload=msgspec.Raw(b'{"n":1}'),
        activities=(msgspec.Raw(b"1"), msgspec.Raw(b'{"a":2}')),
        address=WebhookAddress(url="https://example.com/h", secrets=("whsec_x",)),
    )
    back = msgspec.json.decode(msgspec.json.encode(d), type=Delivery)
    assert back.address == d.address and bytes(back.payload) == b'{"n":1}'
    assert [bytes(a) for a in back.activities or ()] == [b"1", b'{"a":2}']
    assert back.attempt == 1


def test_every_channel_satisfies_the_protocol() -> None:
    for channel in (NullChannel(), ConsoleChannel(), WebhookChannel()):
        assert isinstance(channel, Channel)


def test_the_registry_makes_each_built_in_channel_by_name() -> None:
    from channels.config import ChannelsConfig, WebhookConfig
    from channels.registry import BUILT_IN, make_channel

    for name in BUILT_IN:
        channel = make_channel(name)
        assert channel.name == name and isinstance(channel, Channel)
    cfg = ChannelsConfig(webhook=WebhookConfig(timeout_ms=9000))
    webhook = make_channel("webhook", cfg)
    assert isinstance(webhook, WebhookChannel) and webhook.config.timeout_ms == 9000
    with pytest.raises(KeyError, match="inapp"):
        make_channel("inapp")
