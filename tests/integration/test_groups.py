"""Consumer groups on a real node with members in their own processes: one is SIGKILLed while
records flow; its partitions move to the survivors within the session timeout, nothing is
lost, and the only records consumed twice are the dead member's uncommitted ones."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker import protocol as p
from broker.client import Client

from .herald_process import HeraldProcess, child_env

MEMBER = Path(__file__).resolve().with_name("group_member.py")
TOPIC = "orders"
GROUP = "G"
PARTITIONS = 6
SESSION_TIMEOUT_MS = 2000
SLACK_S = 3.0  # expiry check interval, heartbeat interval and a loaded CI machine


@dataclass
class Member:
    name: str
    proc: asyncio.subprocess.Process
    consumed: list[tuple[int, int]] = field(default_factory=list)
    assigned: list[tuple[int, int]] = field(default_factory=list)  # (partition, start)
    events: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            ev = json.loads(line)
            self.events.append(ev)
            if ev["event"] == "consumed":
                self.consumed += [(part, off) for part, off in ev["records"]]
            elif ev["event"] == "assigned":
                self.assigned += [(part, start) for part, start in ev["partitions"]]


@pytest.fixture
async def members(herald: HeraldProcess) -> AsyncIterator[list[Member]]:
    started: list[Member] = []
    try:
        yield started
    finally:
        for m in started:
            if m.proc.returncode is None:
                m.proc.kill()
            await m.proc.wait()
            if m.reader is not None:
                m.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await m.reader


async def start_member(node: HeraldProcess, name: str) -> Member:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(MEMBER),
        node.host,
        str(node.tcp_port),
        TOPIC,
        GROUP,
        str(SESSION_TIMEOUT_MS),
        name,
        stdout=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    member = Member(name, proc)
    member.reader = asyncio.ensure_future(member.read())
    return member


async def wait_for(cond: Any, within: float, what: str) -> float:
    """Poll the async predicate ``cond`` every 50 ms; returns when it first held."""
    deadline = time.monotonic() + within
    while True:
        if await cond():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


async def produce_until(client: Client, stop: asyncio.Event, per_batch: int = 30) -> int:
    """Keep records flowing to every partition until ``stop``; returns how many batches."""
    producer = await client.producer(linger_ms=1)
    b = 0
    while not stop.is_set():
        futures = [
            producer.send_nowait(TOPIC, b"order-%d-%d" % (b, i), key=b"customer-%d" % i)
            for i in range(per_batch)
        ]
        await producer.flush()
        for f in futures:
            f.result()
        b += 1
        await asyncio.sleep(0.03)
    return b


async def test_killed_member_partitions_move_to_survivors_without_loss(
    herald: HeraldProcess, members: list[Member]
) -> None:
    async with (
        await Client.connect(herald.host, herald.tcp_port) as admin,
        await Client.connect(herald.host, herald.tcp_port) as producer_client,
    ):
        await admin.create_topic(TOPIC, PARTITIONS)
        for name in ("alpha", "bravo", "charlie"):
            members.append(await start_member(herald, name))

        async def stable_with(n: int) -> bool:
            try:
                info = await admin.describe_group(GROUP)
            except Exception:
                return False
            granted = [tp for m in info.members for tp in m.assignment]
            return (
                len(info.members) == n
                and info.state == "stable"
                and sorted(tp[1] for tp in granted) == list(range(PARTITIONS))
            )

        # no record exists until the group settled: hand-offs at start-up move nothing
        await wait_for(lambda: stable_with(3), 30, "three members sharing every partition")
        info = await admin.describe_group(GROUP)
        owner = {
            tp[1]: m.client_id for m in info.members for tp in m.assignment
        }  # partition -> member name
        assert sorted(Counter(owner.values()).values()) == [2, 2, 2]

        stop_flow = asyncio.Event()
        flow = asyncio.ensure_future(produce_until(producer_client, stop_flow))
        victim = next(m for m in members if m.name == "bravo")
        victim_parts = sorted(part for part, name in owner.items() if name == victim.name)

        async def victim_consumed_some() -> bool:
            return len({part for part, _ in victim.consumed}) == len(victim_parts)

        await wait_for(victim_consumed_some, 30, "the victim consuming its partitions")
        await asyncio.sleep(0.5)

        # freeze the victim, let whatever it already sent reach the node, read what it had
        # committed, then kill it: the committed offsets cannot move any more
        victim.proc.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        assigned_before_kill = {m.name: len(m.assigned) for m in members}
        await asyncio.sleep(0.3)
        resp = await admin.request(
            p.FetchOffsets(id=0, group=GROUP, partitions=[(TOPIC, i) for i in victim_parts])
        )
        assert isinstance(resp, p.OffsetsFetched)
        committed_at_kill = {o.partition: max(o.offset, 0) for o in resp.offsets}
        victim.proc.kill()
        await victim.proc.wait()

        async def victim_partitions_moved() -> bool:
            info = await admin.describe_group(GROUP)
            names = {m.client_id for m in info.members}
            moved = {tp[1] for m in info.members for tp in m.assignment}
            return victim.name not in names and set(victim_parts) <= moved

        moved_at = await wait_for(
            victim_partitions_moved, SESSION_TIMEOUT_MS / 1000 + SLACK_S, "the hand-over"
        )
        assert moved_at - frozen_at <= SESSION_TIMEOUT_MS / 1000 + SLACK_S

        await asyncio.sleep(0.5)  # records keep flowing to the partitions that moved
        stop_flow.set()
        batches = await flow
        end = {i: await admin.list_offsets(TOPIC, i) for i in range(PARTITIONS)}
        produced = {(part, off) for part, hw in end.items() for off in range(hw)}
        assert len(produced) == batches * 30
        survivors = [m for m in members if m is not victim]

        async def all_consumed() -> bool:
            seen = {r for m in members for r in m.consumed}
            return seen >= produced

        await wait_for(all_consumed, 30, "the survivors to consume everything")
        # the survivors stop one after the other: the last ones may be handed the first
        # ones' partitions on the way out; only the hand-over of the kill is checked below
        assigned_before_stop = {m.name: len(m.assigned) for m in members}
        for m in survivors:
            m.proc.send_signal(signal.SIGTERM)
        for m in survivors:
            assert await asyncio.wait_for(m.proc.wait(), 15) == 0

    # nothing lost, nothing invented
    everything = Counter(r for m in members for r in m.consumed)
    assert set(everything) == produced
    # the survivors took over the victim's partitions exactly where it had committed
    takeovers = [
        (part, start)
        for m in survivors
        for part, start in m.assigned[assigned_before_kill[m.name] : assigned_before_stop[m.name]]
        if part in victim_parts
    ]
    assert sorted(takeovers) == sorted(committed_at_kill.items())
    # each member on its own consumed every record at most once
    for m in members:
        assert len(m.consumed) == len(set(m.consumed)), m.name
    # duplicates: only the victim's records past its last commit
    dups = sorted(r for r, n in everything.items() if n > 1)
    for part, off in dups:
        assert part in victim_parts, (part, off)
        assert off >= committed_at_kill[part], (part, off, committed_at_kill)
        assert (part, off) in set(victim.consumed)
    # and the survivors' partitions were never consumed by anyone else
    for m in survivors:
        mine = {part for part, name in owner.items() if name == m.name}
        others = {r for o in members if o is not m for r in o.consumed}
        assert not {r for r in others if r[0] in mine}, m.name
