"""In-app delivery through a real node to real ``websockets`` clients: one user, several
devices, reconnecting with a cursor (also across a node restart), tokens, retraction."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import websockets

from gateway import auth

from .conftest import TENANT, Running


async def test_a_connected_user_gets_an_event_sent_to_them(start_node: Any) -> None:
    node: Running = await start_node()
    alice = await node.connect("alice")
    bob = await node.connect("bob")
    event_id = await node.publish(topic="orders", users=["alice"], payload={"order": 42})
    await alice.wait_for(lambda d: len(d.notifications) == 1)
    (note,) = alice.notifications
    assert note["event_id"] == event_id
    assert note["topic"] == "orders"
    assert note["payload"] == {"order": 42}
    assert note["cursor"] and note["id"]
    await asyncio.sleep(0.2)
    assert bob.notifications == []
    # the core saw the delivery as shown on a connected device
    assert node.node.engine is not None
    status = node.node.engine.event_status(TENANT, event_id)
    assert [(s["channel"], s["status"]) for s in status] == [("inapp", "delivered")]
    assert "1 connected device" in status[0]["detail"]


async def test_every_device_of_a_user_gets_every_notification(start_node: Any) -> None:
    node: Running = await start_node()
    phone = await node.connect("alice")
    laptop = await node.connect("alice")
    ids = [await node.publish(topic="t", users=["alice"], payload={"n": i}) for i in range(5)]
    for device in (phone, laptop):
        await device.wait_for(lambda d: len(d.notifications) == 5)
        assert [n["event_id"] for n in device.notifications] == ids
    assert phone.ids == laptop.ids


async def test_reconnecting_with_a_cursor_misses_nothing_and_repeats_nothing(
    start_node: Any,
) -> None:
    """Events keep coming while the client drops and reconnects with its last cursor: the
    ids it gets over both connections are every event, once each, in order."""
    node: Running = await start_node()
    first = await node.connect("alice")
    published: list[str] = []
    stop = asyncio.Event()

    async def publisher() -> None:
        i = 0
        while not stop.is_set():
            published.append(await node.publish(topic="t", users=["alice"], payload={"i": i}))
            i += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(publisher())
    await first.wait_for(lambda d: len(d.notifications) >= 10)
    await first.close()
    got = list(first.notifications)
    cursor = got[-1]["cursor"]
    await asyncio.sleep(0.3)  # events arrive while nobody is connected
    second = await node.connect("alice", cursor=cursor)
    await second.wait_for(lambda d: len(d.notifications) >= 10)
    stop.set()
    await task
    await second.wait_for(lambda d: len(got) + len(d.notifications) >= len(published), 15)
    await asyncio.sleep(0.3)
    events = [n["event_id"] for n in got + second.notifications]
    assert events == published
    cursors = [int(n["cursor"]) for n in got + second.notifications]
    assert cursors == sorted(set(cursors))


async def test_a_cursor_still_works_after_the_node_restarts(
    start_node: Any, tmp_path: Path
) -> None:
    data = tmp_path / "restart"
    node: Running = await start_node(data=data)
    alice = await node.connect("alice")
    before = [await node.publish(topic="t", users=["alice"], payload={"i": i}) for i in range(5)]
    await alice.wait_for(lambda d: len(d.notifications) == 5)
    cursor = alice.notifications[2]["cursor"]  # as if the client had seen only three
    seen = [n["event_id"] for n in alice.notifications[:3]]
    secret = node.node.gateway.secret if node.node.gateway else b""
    await node.stop()

    node = await start_node(data=data)
    assert node.node.gateway is not None and node.node.gateway.secret == secret
    after = [await node.publish(topic="t", users=["alice"], payload={"j": i}) for i in range(3)]
    back = await node.connect("alice", cursor=cursor)
    await back.wait_for(lambda d: len(d.notifications) == 5)
    await asyncio.sleep(0.3)
    assert seen + [n["event_id"] for n in back.notifications] == before + after
    # the two published before the restart come in the backfill; of the three after it,
    # those the reader indexed before the connect do too, the rest arrive live after ready
    kinds = [f["type"] for f in back.frames]
    backfilled = kinds[: kinds.index("ready")].count("notification")
    assert back.of("ready")[0]["backfilled"] == backfilled >= 2


async def test_without_a_cursor_a_device_gets_what_came_after_the_last_seen(
    start_node: Any,
) -> None:
    node: Running = await start_node()
    alice = await node.connect("alice")
    for i in range(4):
        await node.publish(topic="t", users=["alice"], payload={"i": i})
    await alice.wait_for(lambda d: len(d.notifications) == 4)
    await alice.send(type="seen", ids=[alice.notifications[1]["id"]])
    # the counts after the mark: one seen, none read (after a delivery they are equal)
    await alice.wait_for(lambda d: any(f["unseen"] < f["unread"] for f in d.of("counts")))
    await alice.close()
    again = await node.connect("alice")
    assert [n["id"] for n in again.notifications] == alice.ids[2:]


async def test_retract_takes_a_shown_message_back_from_every_device_and_from_backfill(
    start_node: Any,
) -> None:
    node: Running = await start_node()
    phone = await node.connect("alice")
    laptop = await node.connect("alice")
    keep = await node.publish(topic="t", users=["alice"], payload={"keep": True})
    gone = await node.publish(topic="t", users=["alice"], payload={"oops": True})
    for d in (phone, laptop):
        await d.wait_for(lambda d: len(d.notifications) == 2)
    wire_id = phone.notifications[1]["id"]
    async with node.session.delete(f"{node.http_url}/events/{gone}/inapp") as resp:
        assert resp.status == 200
        assert await resp.json() == {"event_id": gone, "retracted": 1}
    for d in (phone, laptop):
        await d.wait_for(lambda d: d.of("retract") == [{"type": "retract", "id": wire_id}])
    # a device that was away, reconnecting from the start, never sees it
    later = await node.connect("alice", cursor="0")
    assert [n["event_id"] for n in later.notifications] == [keep]
    # nor does a copy that arrives after the retraction (a redone delivery)
    assert node.node.gateway is not None and node.node.gateway.reader is not None
    from channels.inapp import InAppMessage

    assert node.node.gateway.inbox is not None
    again = node.node.gateway.inbox.add(
        [InAppMessage(id=wire_id, tenant=TENANT, user="alice", event_id=gone, topic="t", ts=1)]
    )
    assert again == []


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, 4001),
        ("not-a-token", 4002),
        ("forged", 4002),
        ("expired", 4003),
        ("other-tenant", 4004),
    ],
)
async def test_bad_tokens_are_refused_with_a_close_code(
    start_node: Any, token: str | None, code: int
) -> None:
    node: Running = await start_node(auth_timeout_ms=500)
    assert node.node.gateway is not None
    secret = node.node.gateway.secret
    now = node.node.gateway.clock() // 1000
    if token == "forged":
        token = auth.mint(b"x" * 64, "alice", tenant=TENANT, now_s=now, ttl_s=60)
    elif token == "expired":
        token = auth.mint(secret, "alice", tenant=TENANT, now_s=now - 120, ttl_s=60)
    elif token == "other-tenant":
        token = auth.mint(secret, "alice", tenant="acme", now_s=now, ttl_s=60)
    url = node.ws_url + (f"?token={token}" if token else "")
    async with websockets.connect(url) as conn:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(conn.recv(), 5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == code
    assert closed.value.rcvd.reason


async def test_a_token_may_come_in_the_first_message(start_node: Any) -> None:
    node: Running = await start_node()
    async with websockets.connect(node.ws_url) as conn:
        await conn.send(json.dumps({"type": "auth", "token": node.token("carol")}))
        ready = json.loads(await asyncio.wait_for(conn.recv(), 5))
        assert ready["type"] == "ready"
        await node.publish(topic="t", users=["carol"], payload={})
        frames = [json.loads(await asyncio.wait_for(conn.recv(), 5)) for _ in range(2)]
        assert [f["type"] for f in frames] == ["counts", "notification"]


async def test_a_bad_message_is_answered_and_the_connection_kept(start_node: Any) -> None:
    node: Running = await start_node()
    alice = await node.connect("alice")
    await alice.send(type="nonsense")
    await alice.wait_for(lambda d: bool(d.of("error")))
    await node.publish(topic="t", users=["alice"], payload={})
    await alice.wait_for(lambda d: len(d.notifications) == 1)


async def test_a_client_sending_too_fast_is_cut_off(start_node: Any) -> None:
    node: Running = await start_node(messages_per_second=5.0, message_burst=5)
    alice = await node.connect("alice")
    with contextlib.suppress(websockets.ConnectionClosed):
        for _ in range(20):
            await alice.send(type="seen", ids=["nothing"])
    await alice.wait_for(lambda d: d.conn.close_code is not None, what="close")
    assert alice.conn.close_code == 4009


async def test_a_connected_device_is_shown_a_message_before_its_feed_record_is_durable(
    start_node: Any,
) -> None:
    """The in-app worker hands each message to the gateway as it appends the ``__inapp``
    record, so a connected device gets it while that record's sync is still held; once the
    record is durable the reader finds the message in the inbox and drops it by id: the
    device gets it once, and so does a device that connects afterwards (backfill)."""
    node: Running = await start_node()
    alice = await node.connect("alice")
    assert node.node.service is not None
    log = node.node.service.log
    parts = [p for (topic, _i), p in log.partitions.items() if topic == "__inapp"]
    assert parts
    release = threading.Event()

    def held_fsync(fd: int) -> None:
        release.wait(10)
        os.fdatasync(fd)

    for part in parts:
        part._flusher.threads.inline_max_s = 0  # no sync on the loop: it would hold it
        part._flusher._fsync = held_fsync  # (threads only: the kernel's AIO is for the real one)
    before = {id(p): p.high_watermark for p in parts}
    try:
        event_id = await node.publish(topic="orders", users=["alice"], payload={"n": 1})
        await alice.wait_for(lambda d: len(d.notifications) == 1)
        assert alice.notifications[0]["event_id"] == event_id
        # shown, and no __inapp record durable yet
        assert all(p.high_watermark == before[id(p)] for p in parts)
        assert any(p.log_end_offset > before[id(p)] for p in parts)
    finally:
        release.set()
    gateway = node.node.gateway
    assert gateway is not None and gateway.reader is not None
    reader = gateway.reader
    async with asyncio.timeout(10):  # the reader read the durable record and dropped it
        while reader.duplicates < 1:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert [n["event_id"] for n in alice.notifications] == [event_id]
    later = await node.connect("alice")
    await later.wait_for(lambda d: len(d.notifications) == 1)
    await asyncio.sleep(0.2)
    assert [n["event_id"] for n in later.notifications] == [event_id]
    assert later.notifications[0]["id"] == alice.notifications[0]["id"]
