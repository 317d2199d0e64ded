"""Partition assignors: every partition goes to exactly one subscriber; range is
deterministic; sticky stays balanced and moves only what a membership change forces."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from hypothesis import given
from hypothesis import strategies as st

from broker.assignors import Assignment, TopicPartition, range_assign, sticky_assign

TOPICS = ["alpha", "beta", "gamma"]
member_names = st.lists(st.text("abcdefghij", min_size=1, max_size=3), unique=True, max_size=9)
partition_counts = st.dictionaries(st.sampled_from(TOPICS), st.integers(0, 16), min_size=1)


def all_partitions(partitions: Mapping[str, int], topics: set[str]) -> list[TopicPartition]:
    return [(t, i) for t in sorted(partitions) if t in topics for i in range(partitions[t])]


def assert_exactly_once(
    result: Assignment, subs: Mapping[str, Sequence[str]], partitions: Mapping[str, int]
) -> None:
    assert set(result) == set(subs)
    given_out = Counter(tp for tps in result.values() for tp in tps)
    subscribed = {t for ts in subs.values() for t in ts}
    assert sorted(given_out) == all_partitions(partitions, subscribed)
    assert all(n == 1 for n in given_out.values()), "a partition went to two members"
    for member, tps in result.items():
        assert tps == sorted(tps)
        for topic, _i in tps:
            assert topic in subs[member], f"{member} got {topic} it does not subscribe to"


def assert_balanced(result: Assignment) -> None:
    sizes = [len(tps) for tps in result.values()]
    if sizes:
        assert max(sizes) - min(sizes) <= 1, sizes


@st.composite
def subscriptions(draw: st.DrawFn) -> tuple[dict[str, list[str]], dict[str, int]]:
    partitions = draw(partition_counts)
    names = draw(member_names)
    topics = sorted(partitions)
    subs = {
        m: draw(st.lists(st.sampled_from(topics), min_size=1, max_size=3, unique=True))
        for m in names
    }
    return subs, partitions


@given(subscriptions())
def test_range_assigns_every_subscribed_partition_exactly_once(
    case: tuple[dict[str, list[str]], dict[str, int]],
) -> None:
    subs, partitions = case
    assert_exactly_once(range_assign(subs, partitions), subs, partitions)


@given(subscriptions())
def test_sticky_assigns_every_subscribed_partition_exactly_once(
    case: tuple[dict[str, list[str]], dict[str, int]],
) -> None:
    subs, partitions = case
    assert_exactly_once(sticky_assign(subs, partitions, {}), subs, partitions)


@given(subscriptions(), st.randoms(use_true_random=False))
def test_sticky_ignores_stale_or_foreign_current_ownership(
    case: tuple[dict[str, list[str]], dict[str, int]], rnd: object
) -> None:
    # ``current`` may name members that left, topics they dropped, partitions that no
    # longer exist and partitions claimed twice: the result must still be exact
    subs, partitions = case
    junk = [(t, i) for t in [*TOPICS, "gone"] for i in range(-1, 18)]
    current = {m: junk[k % 7 :: 3] for k, m in enumerate([*subs, "ghost"])}
    assert_exactly_once(sticky_assign(subs, partitions, current), subs, partitions)


def test_range_gives_contiguous_ranges_first_members_one_extra() -> None:
    subs = {"c": ["t"], "a": ["t"], "b": ["t"]}
    assert range_assign(subs, {"t": 7}) == {
        "a": [("t", 0), ("t", 1), ("t", 2)],
        "b": [("t", 3), ("t", 4)],
        "c": [("t", 5), ("t", 6)],
    }


@given(member_names, partition_counts)
def test_range_is_balanced_per_topic_and_deterministic(
    names: list[str], partitions: dict[str, int]
) -> None:
    subs = {m: sorted(partitions) for m in names}
    result = range_assign(subs, partitions)
    assert result == range_assign(dict(reversed(list(subs.items()))), partitions)
    for topic in partitions:
        per_topic = {m: [tp for tp in tps if tp[0] == topic] for m, tps in result.items()}
        assert_balanced(per_topic)


def test_no_members_no_assignment() -> None:
    assert range_assign({}, {"t": 3}) == {}
    assert sticky_assign({}, {"t": 3}, {}) == {}


# ---------------------------------------------------------------------------- sticky
@st.composite
def membership_changes(draw: st.DrawFn) -> tuple[dict[str, int], list[str], list[tuple[str, str]]]:
    """Homogeneous subscriptions: partitions, initial members, then joins and leaves."""
    partitions = draw(partition_counts)
    members = draw(st.lists(st.text("abcdef", min_size=1, max_size=2), unique=True, min_size=1))
    ops: list[tuple[str, str]] = []
    live = list(members)
    for step in range(draw(st.integers(1, 8))):
        if live and draw(st.booleans()):
            ops.append(("leave", live.pop(draw(st.integers(0, len(live) - 1)))))
        else:
            name = f"new{step}"
            live.append(name)
            ops.append(("join", name))
    return partitions, members, ops


@given(membership_changes())
def test_sticky_moves_only_what_a_join_or_leave_forces(
    case: tuple[dict[str, int], list[str], list[tuple[str, str]]],
) -> None:
    partitions, members, ops = case
    topics = sorted(partitions)
    live = list(members)
    current = sticky_assign({m: topics for m in live}, partitions, {})
    assert_balanced(current)
    for op, who in ops:
        if op == "leave":
            live.remove(who)
        else:
            live.append(who)
        subs = {m: topics for m in live}
        nxt = sticky_assign(subs, partitions, current)
        assert_exactly_once(nxt, subs, partitions)
        assert_balanced(nxt)
        if op == "leave":
            # the survivors keep everything they had; only the leaver's partitions move
            for m in live:
                assert set(current[m]) <= set(nxt[m]), (m, current[m], nxt[m])
        else:
            # the others only give partitions up, and only to the newcomer
            for m in live:
                if m != who:
                    assert set(nxt[m]) <= set(current[m]), (m, current[m], nxt[m])
            given_up = {tp for m in live if m != who for tp in set(current[m]) - set(nxt[m])}
            unowned = set(all_partitions(partitions, set(topics))) - {
                tp for m in live if m != who for tp in current[m]
            }
            assert set(nxt[who]) == given_up | unowned
        # nothing changed: nothing moves
        assert sticky_assign(subs, partitions, nxt) == nxt
        current = nxt


@given(subscriptions(), st.data())
def test_sticky_balances_members_with_the_same_subscriptions(
    case: tuple[dict[str, list[str]], dict[str, int]], data: st.DataObject
) -> None:
    subs, partitions = case
    # any previous owner of any partition, as a rebalance after some history would see it
    every = all_partitions(partitions, set(partitions))
    owners = list(subs) or ["nobody"]
    current: dict[str, list[TopicPartition]] = {}
    for tp in every:
        current.setdefault(data.draw(st.sampled_from(owners)), []).append(tp)
    result = sticky_assign(subs, partitions, current)
    assert_exactly_once(result, subs, partitions)
    by_subscription: dict[tuple[str, ...], list[int]] = {}
    for m, topics in subs.items():
        by_subscription.setdefault(tuple(sorted(topics)), []).append(len(result[m]))
    for sizes in by_subscription.values():
        assert max(sizes) - min(sizes) <= 1, (subs, result)


def test_sticky_gives_a_joining_member_its_share_when_others_subscribe_elsewhere() -> None:
    subs = {"m1": ["t"], "m2": ["t"], "m3": ["u"]}
    current = {"m1": [("t", i) for i in range(4)], "m3": [("u", i) for i in range(8)]}
    result = sticky_assign(subs, {"t": 4, "u": 8}, current)
    assert len(result["m1"]) == len(result["m2"]) == 2
    assert set(result["m1"]) <= set(current["m1"])  # m1 only gave up what m2 needed
    assert result["m3"] == current["m3"]
