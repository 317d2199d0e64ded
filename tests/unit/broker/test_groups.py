"""The group coordinator with an injected clock: membership, cooperative hand-off, session
expiry and offset commits."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.assignors import TopicPartition
from broker.config import QuotasConfig
from broker.errors import GroupFull, QuotaExceeded
from broker.groups import (
    GroupCoordinator,
    InvalidSessionTimeout,
    NotAssigned,
    StoredOffset,
    UnknownMember,
)
from broker.quotas import Quotas
from storage.kv import KV

SESSION = 3000


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture(scope="module")
def kv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KV]:
    store = KV(Path(tmp_path_factory.mktemp("groups")) / "state", map_size=64 << 20)
    try:
        yield store
    finally:
        store.close()


_group_names = (f"tenant/g{i}" for i in itertools.count())


class Harness:
    def __init__(self, kv: KV, partitions: dict[str, int], assignor: str = "sticky") -> None:
        self.clock = Clock()
        self.partitions = partitions
        self.coord = GroupCoordinator(
            kv,
            lambda _tenant, topic: partitions.get(topic),
            clock_ms=self.clock,
            wall_ms=lambda: 1_700_000_000_000,
            min_session_timeout_ms=1000,
            max_session_timeout_ms=60_000,
            default_session_timeout_ms=SESSION,
            default_assignor=assignor,
        )
        self.group = next(_group_names)
        self.topics = sorted(partitions)

    def join(self, name: str = "") -> tuple[str, set[TopicPartition]]:
        member, _g, assignment = self.coord.join(self.group, self.topics, client_id=name)
        return member.member_id, set(assignment)

    def beat(self, member_id: str, owned: set[TopicPartition]) -> set[TopicPartition]:
        _g, assignment = self.coord.heartbeat(self.group, member_id, sorted(owned))
        return set(assignment)

    def settle(self, owned: dict[str, set[TopicPartition]], rounds: int = 6) -> None:
        """Every member heartbeats reporting what it was last given, a few rounds."""
        for _ in range(rounds):
            for mid in list(owned):
                owned[mid] = self.beat(mid, owned[mid])

    @property
    def all_partitions(self) -> set[TopicPartition]:
        return {(t, i) for t, n in self.partitions.items() for i in range(n)}


def test_first_member_gets_every_partition_and_the_group_is_stable(kv: KV) -> None:
    h = Harness(kv, {"t": 4})
    m1, got = h.join("a")
    assert got == h.all_partitions
    assert h.coord.groups[h.group].state == "reconciling"  # it has not reported yet
    assert h.beat(m1, got) == got
    assert h.coord.groups[h.group].state == "stable"


def test_a_partition_moves_only_after_its_owner_stops_reporting_it(kv: KV) -> None:
    h = Harness(kv, {"t": 4})
    m1, owned1 = h.join("a")
    owned1 = h.beat(m1, owned1)
    m2, owned2 = h.join("b")
    assert owned2 == set(), "m1 still consumes everything"
    assert h.coord.groups[h.group].rebalancing

    owned1 = h.beat(m1, owned1)  # m1 learns its smaller share; it still reported all
    assert len(owned1) == 2
    assert h.beat(m2, owned2) == set(), "m1 has not confirmed it let go yet"

    owned1 = h.beat(m1, owned1)  # now m1 reports only its share
    owned2 = h.beat(m2, owned2)
    assert owned2 == h.all_partitions - owned1
    h.beat(m2, owned2)
    assert h.coord.groups[h.group].state == "stable"


def test_session_expiry_frees_the_dead_members_partitions(kv: KV) -> None:
    h = Harness(kv, {"t": 6})
    owned: dict[str, set[TopicPartition]] = {}
    for name in "abc":
        mid, got = h.join(name)
        owned[mid] = got
    h.settle(owned)
    dead, *alive = list(owned)
    assert all(len(v) == 2 for v in owned.values())

    h.clock.now += SESSION  # exactly the timeout: not yet expired
    for mid in alive:
        owned[mid] = h.beat(mid, owned[mid])
    assert h.coord.expire() == []
    h.clock.now += 1
    assert h.coord.expire() == [(h.group, dead)]
    with pytest.raises(UnknownMember):
        h.beat(dead, owned.pop(dead))
    h.settle(owned, rounds=2)
    assert set().union(*owned.values()) == h.all_partitions
    assert sorted(len(v) for v in owned.values()) == [3, 3]


def test_leave_hands_partitions_to_the_others(kv: KV) -> None:
    h = Harness(kv, {"t": 4})
    owned: dict[str, set[TopicPartition]] = {}
    for name in "ab":
        mid, got = h.join(name)
        owned[mid] = got
    h.settle(owned)
    leaver = next(iter(owned))
    h.coord.leave(h.group, leaver)
    del owned[leaver]
    h.settle(owned, rounds=1)
    assert set().union(*owned.values()) == h.all_partitions
    with pytest.raises(UnknownMember):
        h.coord.leave(h.group, leaver)


def test_rejoin_with_member_id_keeps_the_assignment(kv: KV) -> None:
    h = Harness(kv, {"t": 4})
    owned: dict[str, set[TopicPartition]] = {}
    for name in "ab":
        mid, got = h.join(name)
        owned[mid] = got
    h.settle(owned)
    generation = h.coord.groups[h.group].generation
    m1 = next(iter(owned))
    member, group, assignment = h.coord.join(h.group, h.topics, member_id=m1)
    assert member.member_id == m1
    assert set(assignment) == owned[m1]
    assert group.generation == generation


def test_new_partitions_are_assigned_when_a_topic_grows(kv: KV) -> None:
    h = Harness(kv, {"t": 2})
    m1, owned = h.join("a")
    owned = h.beat(m1, owned)
    h.partitions["t"] = 5
    h.coord.topics_changed("tenant", "t")
    assert h.beat(m1, owned) == h.all_partitions


def test_session_timeout_outside_the_bounds_is_refused(kv: KV) -> None:
    h = Harness(kv, {"t": 1})
    for bad in (999, 60_001, -1):
        with pytest.raises(InvalidSessionTimeout):
            h.coord.join(h.group, h.topics, session_timeout_ms=bad)
    with pytest.raises(UnknownMember):
        h.beat("nobody", set())


def test_commit_only_by_the_member_holding_the_partition(kv: KV) -> None:
    h = Harness(kv, {"t": 4})
    m1, owned1 = h.join("a")
    owned1 = h.beat(m1, owned1)
    m2, owned2 = h.join("b")
    owned1 = h.beat(m1, owned1)  # m1 reported all, and is told to give two up
    moving = h.all_partitions - owned1
    tp = sorted(moving)[0]
    # m1 still reports the moving partition: its final commit on revocation is accepted
    assert h.coord.commit(h.group, [(*tp, 7)], member_id=m1) == 1
    # m2 does not hold it yet
    with pytest.raises(NotAssigned):
        h.coord.commit(h.group, [(*tp, 8)], member_id=m2)
    owned1 = h.beat(m1, owned1)
    owned2 = h.beat(m2, owned2)
    assert tp in owned2
    with pytest.raises(NotAssigned):
        h.coord.commit(h.group, [(*tp, 9)], member_id=m1)  # a zombie's late commit
    assert h.coord.commit(h.group, [(*tp, 10)], member_id=m2) == 1
    stored = h.coord.committed(h.group, *tp)
    assert stored is not None and stored.offset == 10

    with pytest.raises(UnknownMember):
        h.coord.commit(h.group, [(*tp, 11)], member_id="ghost")
    with pytest.raises(UnknownMember):
        h.coord.commit(h.group, [(*tp, 11)], member_id=None)  # live members: not standalone
    assert [(t, i, o.offset) for t, i, o in h.coord.group_offsets(h.group)] == [(*tp, 10)]


def test_a_group_without_members_accepts_standalone_commits(kv: KV) -> None:
    h = Harness(kv, {"t": 2})
    assert h.coord.commit(h.group, [("t", 0, 5), ("t", 1, 6)], member_id=None) == 2
    assert [(i, o.offset) for _t, i, o in h.coord.group_offsets(h.group)] == [(0, 5), (1, 6)]
    assert h.group in h.coord.group_names("tenant/")


# --------------------------------------------------------------------- the hand-off model
ops = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.integers(0, 0)),
        st.tuples(st.just("beat"), st.integers(0, 20)),
        st.tuples(st.just("leave"), st.integers(0, 20)),
        st.tuples(st.just("tick"), st.integers(0, 2 * SESSION)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    partitions=st.dictionaries(st.sampled_from(["t", "u"]), st.integers(1, 8), min_size=1),
    steps=ops,
    assignor=st.sampled_from(["sticky", "range"]),
)
def test_no_partition_is_ever_held_by_two_live_members(
    kv: KV, partitions: dict[str, int], steps: list[tuple[str, int]], assignor: str
) -> None:
    """Members that report what they were last given (well-behaved clients) never consume
    the same partition at once, whatever the order of joins, heartbeats, leaves and session
    expiries; once heartbeats settle, every partition is consumed.

    A member may still be finishing (and committing) a partition it last reported until its
    next heartbeat says it let go, so it holds its last answer and its last report."""
    h = Harness(kv, partitions, assignor)
    consuming: dict[str, set[TopicPartition]] = {}  # member -> its last answer
    reported: dict[str, set[TopicPartition]] = {}  # member -> what its last heartbeat said
    last_beat: dict[str, int] = {}

    def check() -> None:
        held = [tp for m, tps in consuming.items() for tp in tps | reported[m]]
        assert len(held) == len(set(held)), (consuming, reported)

    for op, arg in steps:
        if op == "join":
            mid, got = h.join()
            consuming[mid], reported[mid] = got, set()
            last_beat[mid] = h.clock.now
        elif op in ("beat", "leave") and consuming:
            mid = sorted(consuming)[arg % len(consuming)]
            if op == "beat":
                reported[mid] = consuming[mid]
                consuming[mid] = h.beat(mid, consuming[mid])
                last_beat[mid] = h.clock.now
            else:
                h.coord.leave(h.group, mid)
                del consuming[mid]
        elif op == "tick":
            h.clock.now += arg
            for _group, mid in h.coord.expire():
                # expired only if it really stayed silent past its session; then it is dead
                assert h.clock.now - last_beat[mid] > SESSION
                del consuming[mid]
            group = h.coord.groups.get(h.group)
            assert set(consuming) == set(group.members if group else ())
        check()

    for _ in range(4):  # every member heartbeats a few times, reporting its last answer
        for mid in sorted(consuming):
            reported[mid] = consuming[mid]
            consuming[mid] = h.beat(mid, consuming[mid])
            check()
    if consuming:
        assert set().union(*consuming.values()) == h.all_partitions
        assert h.coord.groups[h.group].state == "stable"


# ---------------------------------------------------------------- bounds and lifecycle
class Wall:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now


def coordinator(
    kv: KV, partitions: dict[str, int], **kw: object
) -> tuple[GroupCoordinator, Clock, Wall]:
    clock, wall = Clock(), Wall()
    coord = GroupCoordinator(
        kv,
        lambda _tenant, topic: partitions.get(topic),
        clock_ms=clock,
        wall_ms=wall,
        quotas=Quotas(QuotasConfig(groups=3)),
        default_session_timeout_ms=SESSION,
        **kw,  # type: ignore[arg-type]
    )
    return coord, clock, wall


def test_a_group_holds_at_most_max_members(kv: KV) -> None:
    coord, _clock, _wall = coordinator(kv, {"t": 2}, max_members=3)
    name = next(_group_names)
    for _ in range(3):
        coord.join(name, ["t"])
    with pytest.raises(GroupFull):
        coord.join(name, ["t"])
    assert len(coord.groups[name].members) == 3


def test_groups_count_toward_the_tenant_until_forgotten(kv: KV) -> None:
    coord, _clock, wall = coordinator(kv, {"t": 1}, offsets_retention_ms=1000)
    usage = coord.quotas.of("q1")
    member, _g, _a = coord.join("q1/live", ["t"])
    coord.commit("q1/standalone", [("t", 0, 5)], member_id=None)
    coord.commit("q1/other", [("t", 0, 5)], member_id=None)
    assert usage.groups == 3 and usage.state_store_bytes > 0
    with pytest.raises(QuotaExceeded):
        coord.join("q1/fourth", ["t"])
    with pytest.raises(QuotaExceeded):
        coord.commit("q1/fourth", [("t", 0, 1)], member_id=None)
    # the member leaves: a group without offsets is forgotten at once, out of memory too
    coord.leave("q1/live", member.member_id)
    assert "q1/live" not in coord.groups and usage.groups == 2
    # offsets of empty groups go after the retention, counted from the last commit
    wall.now += 999
    assert coord.expire_offsets() == []
    coord.commit("q1/other", [("t", 0, 6)], member_id=None)  # a later commit: kept longer
    wall.now += 2
    assert coord.expire_offsets() == ["q1/standalone"]
    assert coord.group_names("q1/") == ["q1/other"]
    assert usage.groups == 1
    wall.now += 1000
    assert coord.expire_offsets() == ["q1/other"]
    assert usage.groups == 0 and usage.state_store_bytes == 0


def test_a_group_with_members_keeps_its_offsets_and_retention_starts_when_it_empties(
    kv: KV,
) -> None:
    coord, _clock, wall = coordinator(kv, {"t": 1}, offsets_retention_ms=1000)
    member, _g, assignment = coord.join("q2/g", ["t"])
    coord.heartbeat("q2/g", member.member_id, assignment)
    coord.commit("q2/g", [("t", 0, 3)], member_id=member.member_id)
    wall.now += 5000
    assert coord.expire_offsets() == []  # live: never expired
    coord.leave("q2/g", member.member_id)
    wall.now += 999
    assert coord.expire_offsets() == []
    wall.now += 2
    assert coord.expire_offsets() == ["q2/g"]


def test_expiry_removes_exactly_the_members_whose_session_ran_out(kv: KV) -> None:
    coord, clock, _wall = coordinator(kv, {"t": 4}, min_session_timeout_ms=1000)
    name = next(_group_names)
    short, _g, _a = coord.join(name, ["t"], session_timeout_ms=1000)
    long_, _g, _a = coord.join(name, ["t"], session_timeout_ms=5000)
    clock.now += 1000
    assert coord.expire() == []
    clock.now += 1
    assert coord.expire() == [(name, short.member_id)]
    clock.now += 3000
    coord.heartbeat(name, long_.member_id, [])  # seen: its deadline moves on
    clock.now += 4000
    assert coord.expire() == []
    clock.now += 1001
    assert coord.expire() == [(name, long_.member_id)]
    assert name not in coord.groups


def test_expiry_waits_for_the_earliest_deadline_and_never_past_it(kv: KV) -> None:
    """The node's expiry loop sleeps ``next_expiry_ms``: never past the end of the
    earliest deadline's bucket (a member is removed as promptly as at every bucket), never
    longer than the shortest session (a member joining meanwhile), never below a bucket."""
    coord, clock, _wall = coordinator(kv, {"t": 4}, min_session_timeout_ms=1000)
    assert coord.next_expiry_ms() == 1000  # no members: the shortest session
    name = next(_group_names)
    long_, _g, _a = coord.join(name, ["t"], session_timeout_ms=30_000)
    assert coord.next_expiry_ms() == 1000
    clock.now += 29_450
    coord.expire()
    # its deadline is 550 ms away, in a bucket that ends 650 ms from now
    assert coord.next_expiry_ms() == 650
    clock.now += 650
    assert coord.expire() == [(name, long_.member_id)]
    short, _g, _a = coord.join(name, ["t"], session_timeout_ms=1000)
    clock.now += 1050  # its bucket ends 50 ms from now: at least a bucket's wait
    assert coord.next_expiry_ms() == 100
    clock.now += 100
    assert coord.expire() == [(name, short.member_id)]


def test_reported_partitions_outside_the_groups_topics_are_not_kept(kv: KV) -> None:
    coord, _clock, _wall = coordinator(kv, {"t": 2})
    name = next(_group_names)
    member, g, _a = coord.join(name, ["t"])
    junk = [("t", 0), ("t", 7), ("other", 0), *[(f"x{i}", i) for i in range(1000)]]
    coord.heartbeat(name, member.member_id, junk)
    assert member.reported == {("t", 0)}
    assert set(g.holders) <= {("t", 0), ("t", 1)}


def test_a_stored_key_with_a_nul_in_its_group_name_does_not_break_reading(kv: KV) -> None:
    coord, _clock, _wall = coordinator(kv, {"t": 1})
    coord.commit("q3/ok", [("t", 0, 1)], member_id=None)
    # written before group names were checked: "q3/ok\x00evil" is a group name with a NUL
    coord._offsets.put("q3/ok\x00evil\x00t\x000000000000", StoredOffset(9, "", 0))
    assert [(t, i, o.offset) for t, i, o in coord.group_offsets("q3/ok")] == [("t", 0, 1)]
    assert "q3/ok" in coord.group_names("q3/")


async def test_joins_in_one_loop_turn_share_one_rebalance(kv: KV) -> None:
    coord, _clock, _wall = coordinator(kv, {"t": 8})
    name = next(_group_names)
    joined = [coord.join_nowait(name, ["t"]) for _ in range(50)]
    g = joined[0][1]
    assert g.dirty and g.generation == 0
    await coord.settled(g)
    assert g.generation == 1 and not g.dirty
    given = [tp for m, _g in joined for tp in coord.grant(g, m)]
    assert sorted(given) == [("t", i) for i in range(8)]
