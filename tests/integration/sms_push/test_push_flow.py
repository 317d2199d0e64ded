"""Push end to end on a real node: one event to a user's APNs and FCM devices (the fake APNs
speaks HTTP/2 over TLS and verifies the ES256 provider token; the fake FCM verifies the
bearer its token endpoint granted for a verified RS256 assertion), and dead tokens marked
invalid so later events skip them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ..channels.fake_push import FakeApns, FakeGoogle
from ..smtp_sink import TestCA
from .conftest import (
    EMAIL,
    KEY_ID,
    TEAM_ID,
    TOPIC,
    Keys,
    StartNode,
    node_config,
    push_channel,
    push_configs,
)

LIVE_APNS, DEAD_APNS = "a" * 64, "b" * 64


@pytest.fixture
async def apns(ca: TestCA, keys: Keys) -> AsyncIterator[FakeApns]:
    fake = FakeApns(keys.apns_public, KEY_ID, TEAM_ID, TOPIC, ca)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def google(keys: Keys) -> AsyncIterator[FakeGoogle]:
    fake = FakeGoogle(keys.google_public, EMAIL)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def test_an_event_reaches_every_device_and_dead_tokens_are_marked_and_skipped(
    tmp_path: Path,
    ca: TestCA,
    keys: Keys,
    apns: FakeApns,
    google: FakeGoogle,
    start_node: StartNode,  # after the fakes: the node stops first, closing its connections
) -> None:
    acfg, fcfg = push_configs(tmp_path, keys, apns, google)
    node = await start_node(
        node_config(tmp_path / "data", channels=["push"], apns=acfg, fcm=fcfg),
        channels={"push": push_channel(ca, acfg, fcfg)},
    )
    apns.unregistered.add(DEAD_APNS)
    google.unregistered.add("fcm-dead")
    devices = {LIVE_APNS: "apns", DEAD_APNS: "apns", "fcm-live": "fcm", "fcm-dead": "fcm"}
    await node.user("ann", "orders.shipped", channels=("push",), devices=devices)

    first = await node.publish(
        topic="orders.shipped", priority="high", payload={"order": 42, "body": "On its way"}
    )
    row = await node.settled(first, "push", {"delivered"})
    (to_apple,) = apns.accepted
    assert to_apple.http_version == "2" and to_apple.path == f"/3/device/{LIVE_APNS}"
    assert to_apple.headers["apns-topic"] == TOPIC and to_apple.headers["apns-priority"] == "10"
    assert to_apple.claims["iss"] == TEAM_ID  # the fake verified the ES256 signature
    assert "alert" in to_apple.body["aps"]
    (to_google,) = google.sent
    assert to_google.message["token"] == "fcm-live" and to_google.bearer in google.granted
    assert to_google.message["data"]["payload"] == '{"order":42,"body":"On its way"}'
    assert to_apple.headers["apns-id"] in row["detail"]

    user = await node.ok("GET", "/users/ann")
    dead = {d["token"] for d in user["devices"] if d["invalid_since_ms"] is not None}
    assert dead == {DEAD_APNS, "fcm-dead"}

    second = await node.publish(topic="orders.shipped", payload={})
    await node.settled(second, "push", {"delivered"})
    assert len(apns.accepted) == 2 and len(google.sent) == 2
    assert len(apns.refused) == 1  # the dead token was not tried again

    # the live ones die too: the next event has no device left and is suppressed
    apns.unregistered.add(LIVE_APNS)
    google.unregistered.add("fcm-live")
    third = await node.publish(topic="orders.shipped", payload={})
    assert (await node.settled(third, "push", {"dead_lettered"}))["reason"] == "unregistered"
    fourth = await node.publish(topic="orders.shipped", payload={})
    row = await node.settled(fourth, "push", {"suppressed"})
    assert row["reason"] == "no_channel_data" and "4 invalidated" in row["detail"]
