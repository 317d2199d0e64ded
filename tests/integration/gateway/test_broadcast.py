"""Broadcasts through a real node to many real ``websockets`` clients: every connected user
the preferences allow gets it (muted ones nothing), from one frame encoded once; users who
were offline find it on their next connect; a client that stops reading is cut off without
delaying anyone else."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from typing import Any

import pytest
import websockets

from notify.model import Preferences, Rule

from .conftest import TENANT, Running


async def _crowd(node: Running, users: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Connect one light client per user (a reader task each); returns what each gets."""
    got: dict[str, list[dict[str, Any]]] = {u: [] for u in users}

    async def one(user: str) -> None:
        url = f"{node.ws_url}?token={node.token(user)}"
        async with websockets.connect(url, compression=None, ping_interval=None) as conn:
            async for raw in conn:
                got[user].append(json.loads(raw))

    tasks = []
    for i in range(0, len(users), 200):  # connect in waves: the accept queue is finite
        tasks += [asyncio.create_task(one(u)) for u in users[i : i + 200]]
        deadline = time.monotonic() + 30
        while sum(1 for u in users[: i + 200] if got.get(u)) < min(i + 200, len(users)):
            assert time.monotonic() < deadline, "clients did not all get ready"
            await asyncio.sleep(0.05)
    node.devices_tasks = tasks  # type: ignore[attr-defined]
    return got


async def _broadcast_reaches_only_the_users_who_allow_it(start_node: Any, n: int) -> None:
    node: Running = await start_node()
    users = [f"u{i:05d}" for i in range(n)]
    muted = set(users[::10])  # every tenth user muted the topic in-app
    by_category = set(users[5::20])  # and some muted the category
    assert node.node.gateway is not None
    now = node.node.gateway.clock()
    for u in muted:
        prefs = Preferences(rules=[Rule(topic="news", channel="inapp", allow=False)])
        await node.registry.put_preferences(TENANT, u, prefs, now_ms=now)
    for u in by_category:
        prefs = Preferences(rules=[Rule(category="promo", channel="*", allow=False)])
        await node.registry.put_preferences(TENANT, u, prefs, now_ms=now)
    got = await _crowd(node, users)
    assert node.node.gateway.sessions.count == n
    sent = time.perf_counter()
    event_id = await node.publish(
        topic="news", broadcast=True, category="promo", payload={"headline": "hello"}
    )
    allowed = [u for u in users if u not in muted and u not in by_category]

    def arrived(u: str) -> bool:
        return any(f["type"] == "notification" for f in got[u])

    deadline = time.monotonic() + 30
    while not all(arrived(u) for u in allowed):
        assert time.monotonic() < deadline, "the broadcast did not reach everyone"
        await asyncio.sleep(0.01)
    took = time.perf_counter() - sent
    await asyncio.sleep(0.5)
    for u in allowed:
        (note,) = [f for f in got[u] if f["type"] == "notification"]
        assert note["event_id"] == event_id and note["id"] == f"b:{event_id}"
        assert note["payload"] == {"headline": "hello"}
    assert not any(arrived(u) for u in muted | by_category)
    print(f"broadcast to {len(allowed)} of {n} clients: all received in {took * 1000:.0f} ms")
    for t in node.devices_tasks:  # type: ignore[attr-defined]
        t.cancel()
    await asyncio.gather(*node.devices_tasks, return_exceptions=True)  # type: ignore[attr-defined]


async def test_a_broadcast_reaches_500_clients_except_the_muted(start_node: Any) -> None:
    await _broadcast_reaches_only_the_users_who_allow_it(start_node, 500)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_broadcast_reaches_5000_clients_except_the_muted(start_node: Any) -> None:
    await _broadcast_reaches_only_the_users_who_allow_it(start_node, 5000)


async def test_an_offline_user_gets_a_broadcast_on_next_connect_unless_muted(
    start_node: Any,
) -> None:
    node: Running = await start_node()
    assert node.node.gateway is not None
    await node.registry.put_preferences(
        TENANT,
        "muted",
        Preferences(rules=[Rule(topic="*", channel="inapp", allow=False)]),
        now_ms=node.node.gateway.clock(),
    )
    watcher = await node.connect("watcher")
    event_id = await node.publish(topic="news", broadcast=True, payload={"n": 1})
    await watcher.wait_for(lambda d: len(d.notifications) == 1)
    late = await node.connect("late")
    assert [n["event_id"] for n in late.notifications] == [event_id]
    assert late.notifications[0]["cursor"] == watcher.notifications[0]["cursor"]
    muted = await node.connect("muted")
    assert muted.notifications == []


async def test_a_client_that_stops_reading_is_cut_off_without_delaying_the_others(
    start_node: Any,
) -> None:
    """One client stops reading (a small receive buffer, nothing read); broadcasts of 32 KiB
    keep coming. Its session is cut off (4008) once its send buffer is full, and the others'
    receipt latency stays that of a node without it."""
    node: Running = await start_node(send_buffer_bytes=128 * 1024, close_timeout_ms=10_000)
    readers = [await node.connect(f"r{i}") for i in range(20)]
    sock = socket.create_connection(("127.0.0.1", node.node.ports["ws"]))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    stuck = await websockets.connect(
        f"{node.ws_url}?token={node.token('stuck')}", sock=sock, max_queue=1, ping_interval=None
    )
    body = {"blob": "x" * 32 * 1024}

    async def wave(count: int) -> list[float]:
        lat: list[float] = []
        for _ in range(count):
            before = [len(r.notifications) for r in readers]
            t0 = time.perf_counter()
            await node.publish(topic="news", broadcast=True, payload=body)
            for r, b in zip(readers, before, strict=True):
                await r.wait_for(lambda d, b=b: len(d.notifications) > b)
            lat.append(time.perf_counter() - t0)
        return lat

    with_stuck = await wave(60)
    assert node.node.gateway is not None
    assert node.node.gateway.sessions.cut_offs.get("slow_consumer") == 1
    assert node.node.gateway.sessions.present(TENANT, "stuck") in (0, 1)
    # the stuck client reads at last: what it was sent, then the reason it was cut off
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(stuck.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008
    alone = await wave(20)
    p50_stuck, p50_alone = statistics.median(with_stuck), statistics.median(alone)
    print(
        f"others' receipt p50 {p50_stuck * 1000:.1f} ms with a stuck client, "
        f"{p50_alone * 1000:.1f} ms without; max {max(with_stuck) * 1000:.1f} ms"
    )
    assert max(with_stuck) < 1.0
    assert p50_stuck < max(3 * p50_alone, 0.05)
