"""``gateway.workers = 3``: the node (in the test's process) starts three real worker
processes sharing ws-port with SO_REUSEPORT; real ``websockets`` clients land on whichever
the kernel picks. Which worker holds a device is read from the node's hub (the presence each
worker reports), never assumed.

What it proves: connections spread over the workers; 1:1 delivery; every device of a user
gets every message when they sit on different workers (and counts after a mark reach both);
a reconnect with a cursor that lands on another worker misses nothing and repeats nothing;
a broadcast (with the preference filter) and a retraction reach every worker; presence is
the sum over workers, so an offline user gets the push fallback and an online one does not;
a SIGKILLed worker is restarted by the node and its clients, reconnecting with their
cursors, miss nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import websockets

from broker.config import TlsConfig
from broker.tls import client_context
from gateway.hub import Hub
from gateway.workers import GatewayWorkers
from notify.model import Preferences, Rule
from tests.integration.notify.support import Receiver
from tests.integration.tls_certs import make_tls_files

from .conftest import TENANT, Device, Running
from .test_engagement import _webhook_user
from .test_limits import _feed_has

WORKERS = 3


def _hub(node: Running) -> Hub:
    assert node.node.gateway is not None and node.node.gateway.hub is not None
    return node.node.gateway.hub


def _workers(node: Running) -> GatewayWorkers:
    assert node.node.gateway_workers is not None
    return node.node.gateway_workers


def _where(node: Running, user: str) -> list[int]:
    return _hub(node).workers_of(TENANT, user)


async def _connect_on(
    node: Running, user: str, *, avoid: set[int], cursor: str | None = None
) -> tuple[Device, int]:
    """A device of ``user`` on a worker not in ``avoid`` (connections landing elsewhere are
    closed and tried again: the kernel picks the worker by a hash of the address pair)."""
    for _ in range(60):
        before = set(_where(node, user))
        device = await node.connect(user, cursor=cursor)
        now = set(_where(node, user))
        landed = (now - before) or now
        if len(landed) == 1 and not landed & avoid:
            return device, landed.pop()
        await device.close()
        node.devices.remove(device)
        await _settle(lambda before=before: set(_where(node, user)) == before)
    raise AssertionError(f"no connection of {user} landed outside workers {avoid}")


async def _reconnect(node: Running, user: str, cursor: str | None) -> Device:
    """Reconnect as a client does after its worker died: a connection made in the instant the
    worker's sockets are being closed may land on its listener and be reset (the kernel
    spreads connections over the listeners that exist at the SYN); try again shortly."""
    for attempt in range(20):
        try:
            return await node.connect(user, cursor=cursor)
        except (websockets.InvalidHandshake, OSError):
            if attempt == 19:
                raise
            await asyncio.sleep(0.05)
    raise AssertionError("unreachable")


async def _settle(check: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_connections_spread_over_the_worker_processes_and_one_to_one_delivery(
    start_node: Any,
) -> None:
    node: Running = await start_node(workers=WORKERS)
    pids = [w.pid for w in _workers(node).workers]
    assert len(set(pids)) == WORKERS and os.getpid() not in pids
    users = [f"u{i:03d}" for i in range(60)]
    devices = {u: await node.connect(u) for u in users}
    per_worker = _hub(node).per_worker()
    assert sorted(per_worker) == list(range(WORKERS))
    assert sum(per_worker.values()) == len(users)
    assert all(n > 0 for n in per_worker.values()), per_worker  # P(a worker gets none) ~ 1e-10
    async with node.session.get(f"{node.http_url}/metrics") as resp:
        text = await resp.text()
    assert f"herald_gateway_sessions {float(len(users))}" in text
    for index, n in per_worker.items():
        assert f'herald_gateway_worker_sessions{{worker="{index}"}} {float(n)}' in text
    assert node.node.gateway is not None
    assert node.node.gateway.present(TENANT, "u007") == 1
    event_id = await node.publish(topic="orders", users=["u007"], payload={"order": 7})
    await devices["u007"].wait_for(lambda d: len(d.notifications) == 1)
    await asyncio.sleep(0.3)
    (note,) = devices["u007"].notifications
    assert note["event_id"] == event_id and note["payload"] == {"order": 7}
    assert all(not d.notifications for u, d in devices.items() if u != "u007")


async def test_every_device_of_a_user_gets_everything_across_two_workers(start_node: Any) -> None:
    node: Running = await start_node(workers=WORKERS)
    phone, w1 = await _connect_on(node, "alice", avoid=set())
    laptop, w2 = await _connect_on(node, "alice", avoid={w1})
    assert w1 != w2 and _where(node, "alice") == sorted({w1, w2})
    assert node.node.gateway is not None and node.node.gateway.present(TENANT, "alice") == 2
    sent = [await node.publish(topic="t", users=["alice"], payload={"i": i}) for i in range(5)]
    for d in (phone, laptop):
        await d.wait_for(lambda d: len(d.notifications) == 5)
    assert [n["event_id"] for n in phone.notifications] == sent
    assert [n["id"] for n in laptop.notifications] == phone.ids
    # a mark from one device: fresh counts on both, on both workers (once the feed holds the
    # five: the counts come from it)
    await _feed_has(node, "alice", 5)
    counts_before = len(laptop.of("counts"))
    await phone.send(type="read", ids=phone.ids[:2])
    await laptop.wait_for(lambda d: len(d.of("counts")) > counts_before, what="counts")
    await _settle(lambda: laptop.of("counts")[-1]["unread"] == 3)


async def test_a_cursor_reconnect_to_another_worker_misses_nothing_and_repeats_nothing(
    start_node: Any,
) -> None:
    node: Running = await start_node(workers=WORKERS)
    first, w1 = await _connect_on(node, "alice", avoid=set())
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
    await asyncio.sleep(0.2)  # events arrive while nobody is connected
    second, w2 = await _connect_on(node, "alice", avoid={w1}, cursor=cursor)
    assert w2 != w1
    await second.wait_for(lambda d: len(d.notifications) >= 10)
    stop.set()
    await task
    await second.wait_for(lambda d: len(got) + len(d.notifications) >= len(published), 15)
    await asyncio.sleep(0.3)
    events = [n["event_id"] for n in got + second.notifications]
    assert events == published
    cursors = [int(n["cursor"]) for n in got + second.notifications]
    assert cursors == sorted(set(cursors))


async def test_a_broadcast_and_a_retraction_reach_every_worker(start_node: Any) -> None:
    node: Running = await start_node(workers=WORKERS)
    users = [f"u{i:03d}" for i in range(45)]
    muted = set(users[::5])
    assert node.node.gateway is not None
    now = node.node.gateway.clock()
    for u in muted:
        prefs = Preferences(rules=[Rule(topic="news", channel="inapp", allow=False)])
        await node.registry.put_preferences(TENANT, u, prefs, now_ms=now)
    devices = {u: await node.connect(u) for u in users}
    held = {w for u in users for w in _where(node, u)}
    assert held == set(range(WORKERS))
    event_id = await node.publish(topic="news", broadcast=True, payload={"headline": "hi"})
    allowed = [u for u in users if u not in muted]
    for u in allowed:
        await devices[u].wait_for(lambda d: len(d.notifications) == 1, what=f"{u}'s broadcast")
    assert {w for u in allowed for w in _where(node, u)} == set(range(WORKERS))
    for u in allowed:
        (note,) = devices[u].notifications
        assert note["id"] == f"b:{event_id}" and note["payload"] == {"headline": "hi"}
    await asyncio.sleep(0.3)
    assert not any(devices[u].notifications for u in muted)
    # retract: every device on every worker that may hold it is told
    async with node.session.delete(f"{node.http_url}/events/{event_id}/inapp") as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["retracted"] == 1
    for u in users:
        await devices[u].wait_for(
            lambda d: any(f["type"] == "retract" for f in d.frames), what=f"{u}'s retract"
        )
        assert [f["id"] for f in devices[u].of("retract")] == [f"b:{event_id}"]
    # and a device that connects later (on any worker) does not get it back
    again = await node.connect(users[1])
    assert again.notifications == []


async def test_presence_over_workers_decides_the_push_fallback(
    start_node: Any, receiver: Receiver
) -> None:
    node: Running = await start_node(workers=WORKERS)
    assert node.node.gateway is not None
    now = node.node.gateway.clock()
    for user in ("online", "offline"):
        await _webhook_user(node, user, receiver, now)
    await node.registry.put_workflow(
        TENANT,
        "chat",
        {
            "steps": [
                {"channel": "inapp"},
                {"channel": "webhook", "if": {"recipient.online": False}},
            ]
        },
        now_ms=now,
    )
    here = await node.connect("online")
    assert len(_where(node, "online")) == 1
    event_id = await node.publish(topic="chat", users=["online", "offline"], payload={"m": "hi"})
    await receiver.wait_for(lambda: len(receiver.hooks) == 1, what="the fallback")
    await here.wait_for(lambda d: len(d.notifications) == 1)
    await asyncio.sleep(0.5)
    (hook,) = receiver.hooks
    assert hook.user == "offline"
    assert node.node.engine is not None
    status = {(s["user"], s["channel"]): s for s in node.node.engine.event_status(TENANT, event_id)}
    assert status[("online", "webhook")]["reason"] == "condition"
    assert "shown on 1" in status[("online", "inapp")]["detail"]
    assert "offline" in status[("offline", "inapp")]["detail"]
    # the device leaves: not present any more on any worker
    await here.close()
    await _settle(
        lambda: node.node.gateway is not None and not node.node.gateway.present(TENANT, "online")
    )


async def test_a_sigkilled_worker_is_restarted_and_its_clients_miss_nothing(
    start_node: Any,
) -> None:
    node: Running = await start_node(workers=WORKERS)
    users = [f"u{i:02d}" for i in range(12)]
    devices = {u: await node.connect(u) for u in users}
    victim = max(range(WORKERS), key=lambda w: _hub(node).per_worker().get(w, 0))
    on_victim = [u for u in users if _where(node, u) == [victim]]
    assert on_victim
    published: dict[str, list[str]] = {u: [] for u in users}
    stop = asyncio.Event()

    async def publisher() -> None:
        i = 0
        while not stop.is_set():
            u = users[i % len(users)]
            published[u].append(await node.publish(topic="t", users=[u], payload={"i": i}))
            i += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(publisher())
    await asyncio.sleep(0.5)
    slot = _workers(node).workers[victim]
    old_pid = slot.pid
    os.kill(old_pid, signal.SIGKILL)
    # every client of the killed worker sees its connection end; it reconnects with its cursor
    got: dict[str, list[dict[str, Any]]] = {}
    for u in on_victim:
        d = devices[u]
        assert d.task is not None
        await asyncio.wait_for(d.task, 10)
        got[u] = list(d.notifications)
        node.devices.remove(d)
        devices[u] = await _reconnect(node, u, d.cursor)
    await _settle(lambda: slot.pid != old_pid and victim in _hub(node).per_worker(), 15)
    assert slot.restarts == 1
    await asyncio.sleep(0.5)
    stop.set()
    await task
    for u in users:
        before = got.get(u, [])
        await devices[u].wait_for(
            lambda d, u=u, before=before: len(before) + len(d.notifications) >= len(published[u]),
            15,
            what=f"{u}'s notifications",
        )
    await asyncio.sleep(0.3)
    for u in users:
        notes = got.get(u, []) + devices[u].notifications
        assert [n["event_id"] for n in notes] == published[u], u
        cursors = [int(n["cursor"]) for n in notes]
        assert cursors == sorted(set(cursors))
    # the restarted worker takes connections again
    fresh = [await node.connect(f"late{i}") for i in range(30)]
    assert all(fresh)
    await _settle(lambda: _hub(node).per_worker().get(victim, 0) > 0, 10)


@pytest.mark.parametrize("workers", [1])
async def test_a_clean_stop_closes_every_worker_connection_going_away(
    start_node: Any, workers: int
) -> None:
    node: Running = await start_node(workers=workers)
    device = await node.connect("alice")
    pid = _workers(node).workers[0].pid
    node.node.stop()
    await asyncio.wait_for(node.task, 20)
    assert device.task is not None
    await asyncio.wait_for(device.task, 5)
    assert device.conn.close_code == 1001
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_with_tls_each_worker_serves_wss(start_node: Any, tmp_path: Path) -> None:
    """The worker processes load the node's certificate: clients on every worker speak wss,
    get their notifications, and plain text on the port gets nowhere."""
    files = make_tls_files(tmp_path / "tls")
    node: Running = await start_node(
        workers=2, tls=TlsConfig(cert_file=str(files.cert_file), key_file=str(files.key_file))
    )
    port = node.node.ports["ws"]
    users = [f"s{i:02d}" for i in range(16)]
    conns = []
    try:
        for user in users:
            url = f"wss://127.0.0.1:{port}/?token={node.token(user)}"
            conn = await websockets.connect(url, ssl=client_context(str(files.ca_file)))
            conns.append(conn)
            while json.loads(await asyncio.wait_for(conn.recv(), 5))["type"] != "ready":
                pass
        await _settle(lambda: sum(_hub(node).per_worker().values()) == len(users))
        per_worker = _hub(node).per_worker()
        assert sorted(per_worker) == [0, 1] and all(n > 0 for n in per_worker.values()), (
            per_worker  # P(one worker gets all 16) ~ 3e-5
        )
        https = node.http_url.replace("http://", "https://")
        ctx = client_context(str(files.ca_file))
        for user, conn in zip(users, conns, strict=True):
            event = {"topic": "t", "users": [user], "payload": {"to": user}}
            async with node.session.post(f"{https}/events", json=event, ssl=ctx) as r:
                assert r.status in (200, 201, 202), await r.text()
                event_id = (await r.json())["event_id"]
            got = json.loads(await asyncio.wait_for(conn.recv(), 5))
            while got["type"] != "notification":
                got = json.loads(await asyncio.wait_for(conn.recv(), 5))
            assert got["event_id"] == event_id and got["payload"] == {"to": user}
    finally:
        for conn in conns:
            await conn.close()
    with pytest.raises((OSError, websockets.InvalidHandshake, websockets.InvalidMessage)):
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/?token={node.token('s00')}", open_timeout=3
        ):
            pass
