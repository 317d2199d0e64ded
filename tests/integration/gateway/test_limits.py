"""The gateway's session rules and limits on a real node with real ``websockets`` clients:
``counts`` after the backfill and after every mark, on every device of the user; keepalive
pings find a client that no longer answers; the idle timeout closes a silent one; the
connection cap, the frame size limit."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import websockets

from broker.config import TlsConfig
from broker.tls import client_context
from tests.integration.tls_certs import make_tls_files

from .conftest import TENANT, Device, Running


def _counts(device: Device) -> list[tuple[int, int]]:
    return [(f["unseen"], f["unread"]) for f in device.of("counts")]


def _counts_as_delivered(device: Device, published: int) -> list[tuple[int, int]]:
    """The counts frames that followed new notifications (nothing marked yet), each checked:
    every notification shown before it counts (unseen and unread), and at most the ones
    published (the feed may hold some before their in-app message is shown)."""
    shown = 0
    out = []
    for f in device.frames:
        if f["type"] == "notification":
            shown += 1
        elif f["type"] == "counts" and shown:
            assert f["unseen"] == f["unread"], device.frames
            assert shown <= f["unread"] <= published, device.frames
            out.append((f["unseen"], f["unread"]))
    return out


async def _feed_has(node: Running, user: str, n: int) -> None:
    """The audit indexer folds a notification into the feed a few ms after the fan-out."""
    assert node.node.engine is not None
    deadline = time.monotonic() + 10
    while node.node.engine.feed(TENANT, user, limit=10)["unread"] < n:
        assert time.monotonic() < deadline, "the feed did not catch up"
        await asyncio.sleep(0.05)


async def test_counts_follow_the_backfill_and_every_mark_on_every_device(
    start_node: Any,
) -> None:
    node: Running = await start_node()
    phone = await node.connect("alice")
    assert _counts(phone) == [(0, 0)]  # nothing yet: counts come right after ready
    bob = await node.connect("bob")
    for i in range(3):
        await node.publish(topic="t", users=["alice"], payload={"i": i})
    await phone.wait_for(lambda d: len(d.notifications) == 3)
    await phone.wait_for(lambda d: (3, 3) in _counts(d), what="counts after the deliveries")
    live = _counts_as_delivered(phone, 3)  # once per reader batch, up to (3, 3)
    assert live[-1] == (3, 3)
    await _feed_has(node, "alice", 3)

    laptop = await node.connect("alice")  # a second device: its backfill, then the counts
    kinds = [f["type"] for f in laptop.frames]
    assert kinds == ["notification"] * 3 + ["ready", "counts"]
    assert _counts(laptop) == [(3, 3)]

    first, second = phone.ids[0], phone.ids[1]
    await phone.send(type="seen", ids=[first])
    for d in (phone, laptop):
        await d.wait_for(lambda d: (2, 3) in _counts(d), what="counts after seen")
    await laptop.send(type="read", ids=[second])  # read implies seen
    for d in (phone, laptop):
        await d.wait_for(lambda d: (1, 2) in _counts(d), what="counts after read")
    await asyncio.sleep(0.2)
    assert _counts(phone) == [(0, 0), *live, (2, 3), (1, 2)]
    assert _counts(laptop) == [(3, 3), (2, 3), (1, 2)]
    assert _counts(bob) == [(0, 0)]  # another user's marks are not his business

    tablet = await node.connect("alice")  # without a cursor: after the last seen
    assert tablet.ids == phone.ids[2:]
    assert _counts(tablet) == [(1, 2)]


@pytest.mark.parametrize("workers", [0, 2])
async def test_every_new_notification_brings_fresh_counts_to_every_device(
    start_node: Any, workers: int
) -> None:
    """After each batch of in-app messages reaching a user, every device of the user gets
    the counts including them (even before the feed has folded them in); another user's
    devices get nothing. With worker processes too."""
    node: Running = await start_node(workers=workers)
    phone = await node.connect("alice")
    laptop = await node.connect("alice")
    bob = await node.connect("bob")
    for i in range(5):
        await node.publish(topic="t", users=["alice"], payload={"i": i})
    for d in (phone, laptop):
        await d.wait_for(lambda d: len(d.notifications) == 5)
        await d.wait_for(lambda d: (5, 5) in _counts(d), what="counts after the fifth")
        assert _counts_as_delivered(d, 5)[-1] == (5, 5)
    await asyncio.sleep(0.2)
    assert _counts(bob) == [(0, 0)]


async def test_keepalive_drops_a_client_that_stops_answering_pings(start_node: Any) -> None:
    node: Running = await start_node(
        ping_interval_ms=200, ping_timeout_ms=300, close_timeout_ms=500
    )
    assert node.node.gateway is not None
    sessions = node.node.gateway.sessions
    alive = await node.connect("alive")  # websockets answers pings while it reads
    gone = await node.connect("gone")
    assert sessions.count == 2
    gone.conn.transport.pause_reading()  # a peer that vanished: no pong ever comes
    deadline = time.monotonic() + 5
    while sessions.present(TENANT, "gone"):
        assert time.monotonic() < deadline, "the silent peer was never dropped"
        await asyncio.sleep(0.05)
    waited = 5 - (deadline - time.monotonic())
    # ping interval + ping timeout, then the close handshake's timeout: 1 s, and some slack
    assert waited < 2.0
    gone.conn.transport.abort()
    assert sessions.present(TENANT, "alive") == 1
    await node.publish(topic="t", users=["alive"], payload={})
    await alive.wait_for(lambda d: len(d.notifications) == 1)


async def test_the_idle_timeout_closes_a_client_that_sends_nothing(start_node: Any) -> None:
    node: Running = await start_node(idle_timeout_ms=500)
    quiet = await node.connect("quiet")
    chatty = await node.connect("chatty")
    t0 = time.monotonic()
    for _ in range(8):  # 1.2 s: well past the timeout
        await chatty.send(type="seen", ids=[])
        await asyncio.sleep(0.15)
    assert quiet.task is not None
    await asyncio.wait_for(quiet.task, 5)
    assert quiet.conn.close_code == 4011
    assert quiet.conn.close_reason == "idle timeout"
    assert time.monotonic() - t0 >= 0.5
    assert chatty.conn.close_code is None  # still open
    await node.publish(topic="t", users=["chatty"], payload={})
    await chatty.wait_for(lambda d: len(d.notifications) == 1)


async def test_past_the_connection_cap_a_handshake_is_answered_503(start_node: Any) -> None:
    node: Running = await start_node(max_connections=3)
    devices = [await node.connect(f"u{i}") for i in range(3)]
    with pytest.raises(websockets.InvalidStatus) as refused:
        await node.connect("u3")
    assert refused.value.response.status_code == 503
    assert node.node.gateway is not None
    assert node.node.gateway.admission.table.refused.get("listener_full") == 1
    await devices[0].close()
    await asyncio.sleep(0.1)
    fourth = await node.connect("u3")  # a freed slot is a slot again
    await node.publish(topic="t", users=["u3"], payload={})
    await fourth.wait_for(lambda d: len(d.notifications) == 1)


async def test_a_message_past_the_frame_limit_closes_1009(start_node: Any) -> None:
    node: Running = await start_node(max_frame_bytes=1024)
    big = await node.connect("big")
    small = await node.connect("small")
    await big.send(type="seen", ids=["x" * 100] * 12)  # ~1.3 KB
    assert big.task is not None
    await asyncio.wait_for(big.task, 5)
    assert big.conn.close_code == 1009
    await small.send(type="seen", ids=["x" * 100] * 8)  # ~0.9 KB: within the limit
    await small.wait_for(lambda d: bool(d.of("error")), what="an answer")
    assert small.of("error")[0]["code"] == "unknown_ids"
    assert small.conn.close_code is None


async def test_gateway_connections_come_out_of_the_node_admission_budget(start_node: Any) -> None:
    """The node's one admission policy counts the gateway's connections with the TCP and
    HTTP listeners' (one descriptor budget) and applies its per-address cap to them."""
    node: Running = await start_node(admission={"max_connections_per_address": 3})
    assert node.node.gateway is not None
    table = node.node.gateway.admission.table
    devices = [await node.connect(f"u{i}") for i in range(3)]
    assert table.open_by_listener()["ws"] == 3
    with pytest.raises(websockets.InvalidStatus) as refused:
        await node.connect("u3")  # a fourth from the same address
    assert refused.value.response.status_code == 503
    assert table.refused.get("per_address") == 1
    await devices[0].close()
    await asyncio.sleep(0.1)
    assert table.open_by_listener()["ws"] == 2  # released with its socket
    await node.connect("u3")


async def test_a_connection_that_never_shows_a_token_is_dropped_at_the_handshake_deadline(
    start_node: Any,
) -> None:
    """Pending until its token checks out: a socket that sends nothing (no upgrade, no
    token) is closed by the admission sweep past admission.handshake-timeout-ms, while a
    client that showed its token stays."""
    node: Running = await start_node(admission={"handshake_timeout_ms": 500})
    assert node.node.gateway is not None
    table = node.node.gateway.admission.table
    settled = await node.connect("settled")
    reader, writer = await asyncio.open_connection("127.0.0.1", node.node.ports["ws"])
    t0 = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the node
    assert 0.5 <= time.monotonic() - t0 < 3.0  # the deadline, then the next 1 s sweep
    writer.close()
    assert table.expired >= 1
    await node.publish(topic="t", users=["settled"], payload={})
    await settled.wait_for(lambda d: len(d.notifications) == 1)


async def test_before_its_token_a_client_may_send_only_small_messages(start_node: Any) -> None:
    node: Running = await start_node(
        max_frame_bytes=8192, admission={"max_unauthenticated_frame_bytes": 1024}
    )
    url = node.ws_url
    async with websockets.connect(url, compression=None) as conn:  # no token in the URL
        await conn.send('{"type":"auth","token":"' + "x" * 2000 + '"}')
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(conn.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    # once in, the gateway's own limit applies
    big = await node.connect("big")
    await big.send(type="seen", ids=["x" * 100] * 40)  # ~4 KB
    await big.wait_for(lambda d: bool(d.of("error")), what="an answer")
    assert big.conn.close_code is None


async def test_with_tls_configured_the_gateway_serves_wss(start_node: Any, tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "tls")
    node: Running = await start_node(
        tls=TlsConfig(cert_file=str(files.cert_file), key_file=str(files.key_file))
    )
    url = f"wss://127.0.0.1:{node.node.ports['ws']}/?token={node.token('alice')}"
    async with websockets.connect(url, ssl=client_context(str(files.ca_file))) as conn:
        ready = json.loads(await asyncio.wait_for(conn.recv(), 5))
        while ready["type"] != "ready":
            ready = json.loads(await asyncio.wait_for(conn.recv(), 5))
        ctx = client_context(str(files.ca_file))
        https = node.http_url.replace("http://", "https://")
        event = {"topic": "t", "users": ["alice"], "payload": {"secret": 1}}
        async with node.session.post(f"{https}/events", json=event, ssl=ctx) as r:
            assert r.status in (200, 201, 202), await r.text()
        while (got := json.loads(await asyncio.wait_for(conn.recv(), 5)))["type"] != "notification":
            pass
        assert got["payload"] == {"secret": 1}
    with pytest.raises((OSError, websockets.InvalidHandshake, websockets.InvalidMessage)):
        async with websockets.connect(url.replace("wss://", "ws://"), open_timeout=3):
            pass  # plain text on the TLS port gets nowhere
