"""Issue 13, item 8 and the group parts of items 9 and "medium and low": a burst of joins
costs the loop little and groups are capped; names are bounded (a NUL no longer breaks
describe_group and /metrics; a name cannot forge a log line); empty groups are forgotten
after their offsets' retention; a group never gets another tenant's partitions when a
topic name is reused.

Real node, two tenants: acme abuses, beta (a :class:`Bystander`) must keep being served."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker import errors
from broker import protocol as p
from broker.client import BrokerError
from herald.logs import parse_pairs

from .conftest import NodeFactory
from .herald_process import HeraldProcess
from .raw_wire import RawConnection
from .tenants import ACME, BETA, Bystander, config, connect, metrics, quota_usage

# the floods stalled the loop for 2-17 s before their fixes; scheduling noise on a loaded
# 2-core VM reaches ~0.3 s
MAX_STALL_MS = 1000


def pipelined_joins(node: HeraldProcess, group: str, count: int) -> list[p.Response]:
    """``count`` joins to ``group`` written at once on one connection (one read for the
    node, as many frames as fit), and their answers."""
    with RawConnection(node.host, node.tcp_port, timeout=60) as conn:
        conn.request(p.Hello(id=0, api_key=ACME, client_id="storm"))
        conn.send(
            *[
                p.JoinGroup(
                    id=i + 1,
                    group=group,
                    topics=["orders"],
                    session_timeout_ms=1000,
                    client_id="storm",
                )
                for i in range(count)
            ]
        )
        return [conn.recv() for _ in range(count)]


async def test_a_join_storm_is_cheap_and_groups_are_capped(herald_factory: NodeFactory) -> None:
    node = herald_factory(
        config=config("[groups]\nmin-session-timeout-ms = 1000\nmax-members = 1000\n")
    )
    async with await connect(node, ACME) as acme, Bystander(node) as beta:
        await acme.create_topic("orders", 12)
        started = time.perf_counter()
        answers = await asyncio.to_thread(pipelined_joins, node, "big", 1200)
        took = time.perf_counter() - started
        joined = [a for a in answers if isinstance(a, p.Joined)]
        full = [a for a in answers if isinstance(a, p.Error)]
        assert len(joined) == 1000, {type(a).__name__ for a in answers}
        assert {a.code for a in full} == {errors.GroupFull.code} and len(full) == 200
        assert "groups.max-members" in full[0].message
        # every partition went to exactly one of the 1000 members
        given = [tp for a in joined for tp in a.assignment]
        assert len(given) == len(set(given)) <= 12
        info = await acme.describe_group("big")
        assert len(info.members) == 1000
        # nobody heartbeats: all expire after the session timeout, and the group (with no
        # offsets) is forgotten: out of memory and out of the tenant's count
        for _ in range(200):
            if "big" not in await acme.list_groups():
                break
            await asyncio.sleep(0.05)
        assert "big" not in await acme.list_groups()
        assert quota_usage(node, "acme", "groups") == 0
    print(f"\n1200 pipelined joins answered in {took:.2f} s")
    beta.check(MAX_STALL_MS)
    await beta.served_after()


async def test_names_are_bounded_and_cannot_break_or_forge_anything(
    herald_factory: NodeFactory,
) -> None:
    node = herald_factory(config=config())
    async with await connect(node, ACME) as acme, Bystander(node) as beta:
        await acme.create_topic("orders", 2)
        for group in ("a\x00b", "", "x" * 201, "g\nlevel=error", "two words", "x" * (1 << 20)):
            with pytest.raises(BrokerError) as info:
                await acme.request(p.JoinGroup(id=0, group=group, topics=["orders"]), retries=0)
            assert info.value.code == errors.InvalidGroup.code
            assert len(info.value.message) < 300  # a 1 MiB name is not echoed back
            with pytest.raises(BrokerError) as info:
                await acme.request(
                    p.CommitOffsets(id=0, group=group, offsets=[("orders", 0, 1)]), retries=0
                )
            assert info.value.code == errors.InvalidGroup.code
        for client_id in ("c\x00", "c\nevent=forged", "c" * 101):
            with pytest.raises(BrokerError) as info:
                await acme.request(
                    p.JoinGroup(id=0, group="g", topics=["orders"], client_id=client_id),
                    retries=0,
                )
            assert info.value.code == errors.InvalidRequest.code
            assert "client_id" in info.value.message
        for member_id in ("m" * 201, "m\x00"):
            with pytest.raises(BrokerError) as info:
                await acme.request(
                    p.Heartbeat(id=0, group="g", member_id=member_id, generation=0), retries=0
                )
            assert info.value.code == errors.InvalidRequest.code
        # a client id with spaces and '=' is a label, allowed, and logged as one value: the
        # member id made from it is in the line that says the member expired
        joined = await acme.request(
            p.JoinGroup(
                id=0,
                group="g",
                topics=["orders"],
                session_timeout_ms=1000,
                client_id="x event=forged tenant=*",
            )
        )
        assert isinstance(joined, p.Joined)
        for _ in range(100):
            if "event=members_expired" in node.log_text():
                break
            await asyncio.sleep(0.05)
        # everyone's describe_group and /metrics still work
        await acme.request(p.CommitOffsets(id=0, group="ok", offsets=[("orders", 0, 1)]))
        assert (await acme.describe_group("ok")).offsets[0].committed == 1
        assert metrics(node)
        async with await connect(node, BETA) as b:
            await b.request(p.ListGroups(id=0))
    beta.check(MAX_STALL_MS)
    await beta.served_after()
    expired = []
    for line in node.log_text().splitlines():
        if "logger=" in line:
            fields = parse_pairs(line.split(" ", 3)[3]) or {}
            assert fields.get("event") != "forged", line
            if fields.get("event") == "members_expired":
                expired.append(fields)
    assert expired and expired[0]["members"].startswith("x event=forged tenant=*-"), expired


async def test_empty_groups_are_forgotten_after_their_offsets_retention(
    herald_factory: NodeFactory,
) -> None:
    node = herald_factory(
        config=config(
            "[groups]\noffsets-retention-ms = 1500\noffsets-retention-check-interval-ms = 100\n"
        )
    )
    async with await connect(node, ACME) as acme, Bystander(node) as beta:
        await acme.create_topic("orders", 1)
        for i in range(200):
            await acme.request(p.CommitOffsets(id=0, group=f"idle{i}", offsets=[("orders", 0, i)]))
        # a group with a live member is kept, however old its commits
        consumer = await acme.consumer("orders", group="live", session_timeout_ms=3000)
        await consumer.commit({("orders", 0): 5})
        assert len(await acme.list_groups()) == 201
        assert quota_usage(node, "acme", "groups") == 201
        stored_bytes = quota_usage(node, "acme", "state-store-bytes")
        assert stored_bytes > 0
        await asyncio.sleep(2.5)
        await consumer.heartbeat()
        assert await acme.list_groups() == ["live"]
        assert quota_usage(node, "acme", "groups") == 1
        assert quota_usage(node, "acme", "state-store-bytes") < stored_bytes / 100
        fetched = await acme.request(p.FetchOffsets(id=0, group="idle7"))
        assert isinstance(fetched, p.OffsetsFetched) and fetched.offsets == []
        # once its member leaves, the live group's retention starts from then
        await consumer.close()
        assert await acme.list_groups() == ["live"]
        await asyncio.sleep(2.0)
        assert await acme.list_groups() == []
    beta.check(MAX_STALL_MS)
    await beta.served_after()


async def test_a_reused_topic_name_never_gives_a_group_another_tenants_partitions(
    herald_factory: NodeFactory,
) -> None:
    node = herald_factory(config=config())
    async with await connect(node, ACME) as acme, await connect(node, BETA) as beta:
        await acme.create_topic("orders", 2)
        joined = await acme.request(p.JoinGroup(id=0, group="G", topics=["orders"]))
        assert isinstance(joined, p.Joined) and len(joined.assignment) == 2
        await acme.delete_topic("orders")
        # beta's topic of the same name: never acme's, whatever acme's group subscribed to
        await beta.create_topic("orders", 6)
        producer = await beta.producer()
        for i in range(6):
            await producer.send("orders", b"beta's", partition=i)
        beat = await acme.request(
            p.Heartbeat(
                id=0,
                group="G",
                member_id=joined.member_id,
                generation=joined.generation,
                owned=joined.assignment,
            )
        )
        assert isinstance(beat, p.HeartbeatResult) and beat.assignment == []
        info = await acme.describe_group("G")
        assert info.offsets == []
        (res,) = await acme.fetch([("orders", 3, 0)])
        assert res.error == errors.UnknownTopic.code and res.records == b""
        # acme makes its own "orders" again: its group gets that one, 3 partitions
        await acme.create_topic("orders", 3)
        await asyncio.sleep(0.05)
        beat = await acme.request(
            p.Heartbeat(id=0, group="G", member_id=joined.member_id, generation=0, owned=[])
        )
        assert isinstance(beat, p.HeartbeatResult)
        assert sorted(beat.assignment) == [("orders", 0), ("orders", 1), ("orders", 2)]


@pytest.mark.slow
async def test_full_size_group_floods(herald_factory: NodeFactory) -> None:
    """The issue's floods at full size: 1,200 members joining one group (107 ms per join
    before), and 100k empty groups (57 MB, idle CPU 2% -> 33% before): now capped at 1,000
    members and 1,000 groups per tenant, beta served throughout."""
    node = herald_factory(config=config())
    async with await connect(node, ACME) as acme, Bystander(node) as beta:
        await acme.create_topic("orders", 12)
        answers = await asyncio.to_thread(pipelined_joins, node, "big", 1200)
        assert sum(isinstance(a, p.Joined) for a in answers) == 1000
        refused = 0
        for i in range(100_000):
            try:
                await acme.request(
                    p.CommitOffsets(id=0, group=f"empty{i}", offsets=[("orders", 0, 1)]),
                    retries=0,
                )
            except BrokerError as exc:
                assert exc.code == errors.QuotaExceeded.code
                refused += 1
                if refused > 1000:
                    break
        assert quota_usage(node, "acme", "groups") <= 1000
    beta.check(MAX_STALL_MS)
    await beta.served_after()
