"""SIGKILL a real ``herald serve`` while clients hold WebSockets to its gateway, restart it on
the same data directory, and reconnect with the cursor the client last kept: what the client
gets is exactly what came after that cursor, before and after the crash, in order, with no
duplicate and nothing missing; a message retracted before the crash stays retracted.

A killed process keeps the page cache, so this proves the gateway's redo logic (the reader
re-reading its uncommitted tail, the inbox recognising each message by its id, the sequence
never reusing a number), not fsync discipline.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import websockets

from gateway.auth import mint
from tests.integration.herald_process import HeraldProcess

SECRET = "a-gateway-secret-of-at-least-32-chars"
CONFIG = f"""
[notify]
channels = ["inapp"]
default-channels = ["inapp"]
partitions = 2

[gateway]
token-secret = "{SECRET}"
partitions = 2
"""


def _token(user: str) -> str:
    return mint(SECRET.encode(), user, tenant="default", now_s=int(time.time()), ttl_s=3600)


async def _publish(session: aiohttp.ClientSession, node: HeraldProcess, **event: Any) -> str:
    async with session.post(f"{node.http_url}/events", json=event) as r:
        body = await r.json()
        assert r.status in (200, 201, 202), body
        return str(body["event_id"])


async def _read_until(conn: Any, check: Any, within: float = 15.0) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        while not check(frames):
            frames.append(json.loads(await conn.recv()))
    return frames


def _notifications(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == "notification"]


async def test_a_cursor_survives_a_sigkill_without_gap_or_duplicate(tmp_path: Path) -> None:
    await _cursor_survives_a_sigkill(tmp_path, workers=0)


async def test_with_worker_processes_a_sigkilled_node_takes_its_workers_along(
    tmp_path: Path,
) -> None:
    """``gateway.workers = 2``: the node's SIGKILL ends its workers too (their link ends),
    nothing is left holding ws-port, and the restarted node's workers serve the cursor with
    no gap and no duplicate."""
    await _cursor_survives_a_sigkill(tmp_path, workers=2)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _cursor_survives_a_sigkill(tmp_path: Path, *, workers: int) -> None:
    config = CONFIG + f"workers = {workers}\n"
    node = HeraldProcess(tmp_path / "data", tmp_path / "work", config=config)
    node.start()
    assert node.proc is not None
    workers_before = _children(node.proc.pid)
    assert len(workers_before) == workers
    ws = f"ws://127.0.0.1:{node.ws_port}/"
    try:
        # a new connection per request: the pooled ones die with the killed node
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            async with websockets.connect(f"{ws}?token={_token('alice')}") as alice:
                await _read_until(alice, lambda fs: any(f["type"] == "ready" for f in fs))
                before = [
                    await _publish(http, node, topic="t", users=["alice"], payload={"i": i})
                    for i in range(6)
                ]
                got = _notifications(
                    await _read_until(alice, lambda fs: len(_notifications(fs)) == 6)
                )
            assert [n["event_id"] for n in got] == before
            cursor = got[2]["cursor"]  # the client kept only the first three
            gone = before[4]
            async with http.delete(f"{node.http_url}/events/{gone}/inapp") as r:
                assert r.status == 200, await r.text()
            # more come in, then the node is killed before the reader's commit is certain
            during = [
                await _publish(http, node, topic="t", users=["alice"], payload={"j": i})
                for i in range(4)
            ]
            node.kill()
            deadline = time.monotonic() + 10
            while any(_alive(p) for p in workers_before):
                assert time.monotonic() < deadline, "a worker outlived its node"
                await asyncio.sleep(0.05)
            node.start()
            after = [
                await _publish(http, node, topic="t", users=["alice"], payload={"k": i})
                for i in range(3)
            ]
            want = [e for e in before[3:] + during + after if e != gone]
            async with websockets.connect(f"{ws}?token={_token('alice')}&cursor={cursor}") as back:
                frames = await _read_until(back, lambda fs: len(_notifications(fs)) >= len(want))
                await asyncio.sleep(0.5)  # anything extra (a duplicate) would come now
                with_extra = frames + [json.loads(m) for m in await _drain(back)]
            notes = _notifications(with_extra)
            assert [n["event_id"] for n in notes] == want
            cursors = [int(n["cursor"]) for n in notes]
            assert cursors == sorted(set(cursors)) and cursors[0] > int(cursor)
    finally:
        node.close()


async def _drain(conn: Any) -> list[str]:
    out: list[str] = []
    while True:
        try:
            out.append(await asyncio.wait_for(conn.recv(), 0.2))
        except TimeoutError:
            return out
