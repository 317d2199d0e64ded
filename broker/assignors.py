"""Partition assignment strategies: pure functions, no I/O, no clock.

Both take the members (each with the topics it subscribes to), the partitions of every topic,
and, for ``sticky``, the current assignment; both return ``member -> sorted partitions``.
Every partition of a subscribed topic goes to exactly one member that subscribes to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

TopicPartition = tuple[str, int]
Assignment = dict[str, list[TopicPartition]]


def range_assign(
    subscriptions: Mapping[str, Sequence[str]], partitions: Mapping[str, int]
) -> Assignment:
    """Kafka's range assignor: per topic, the sorted subscribers get contiguous ranges of
    partitions, the first ``n % m`` members one extra. Deterministic; moves many
    partitions on a membership change."""
    result: Assignment = {m: [] for m in subscriptions}
    for topic in sorted(partitions):
        members = sorted(m for m, topics in subscriptions.items() if topic in topics)
        if not members:
            continue
        count = partitions[topic]
        per, extra = divmod(count, len(members))
        start = 0
        for i, member in enumerate(members):
            n = per + (1 if i < extra else 0)
            result[member].extend((topic, p) for p in range(start, start + n))
            start += n
    return {m: sorted(tps) for m, tps in result.items()}


def sticky_assign(
    subscriptions: Mapping[str, Sequence[str]],
    partitions: Mapping[str, int],
    current: Mapping[str, Sequence[TopicPartition]],
) -> Assignment:
    """Balanced and sticky: keep every current owner that is still a subscriber, up to its
    fair share; hand the rest (orphans and surplus) to the least-loaded eligible members.

    The result is balanced to within one partition per member among members with the same
    subscriptions, and a membership change moves about the minimum it must: a member that
    leaves gives up only its own partitions; a member that joins takes only its share.
    """
    members = sorted(subscriptions)
    result: Assignment = {m: [] for m in members}
    if not members:
        return result
    all_tps = [(t, p) for t in sorted(partitions) for p in range(partitions[t])]
    eligible = {tp: [m for m in members if tp[0] in subscriptions[m]] for tp in all_tps}
    wanted = [tp for tp in all_tps if eligible[tp]]
    owner: dict[TopicPartition, str] = {}
    for member, tps in current.items():
        if member not in result:
            continue
        for tp in tps:
            if tp in eligible and member in eligible[tp] and tp not in owner:
                owner[tp] = member
    held = {m: 0 for m in members}
    for m in owner.values():
        held[m] += 1
    # the members that get one more than the floor are those holding the most already,
    # so that fewer partitions move
    cap_low, extra = divmod(len(wanted), len(members))
    by_held = sorted(members, key=lambda m: (-held[m], m))
    caps = {m: cap_low + (1 if i < extra else 0) for i, m in enumerate(by_held)}
    # keep current ownership up to each member's cap (highest cap first among equals)
    kept: dict[str, list[TopicPartition]] = {m: [] for m in members}
    for tp in wanted:
        holder = owner.get(tp)
        if holder is not None and len(kept[holder]) < caps[holder]:
            kept[holder].append(tp)
    taken = {tp for tps in kept.values() for tp in tps}
    for m in members:
        result[m] = list(kept[m])
    # give the rest to the least-loaded eligible member
    for tp in wanted:
        if tp in taken:
            continue
        m = min(eligible[tp], key=lambda x: (len(result[x]), x))
        result[m].append(tp)
    _even_out(members, result, eligible)
    return {m: sorted(tps) for m, tps in result.items()}


def _even_out(
    members: list[str], result: Assignment, eligible: Mapping[TopicPartition, list[str]]
) -> None:
    """With mixed subscriptions the caps above ignore who may take what, so a member can be
    left with nothing while a peer with the same subscriptions holds everything. Move one
    partition at a time from a member to an eligible one holding at least two fewer, newest
    first, until no such move exists. Each move lowers the sum of squared loads, so this
    ends; with identical subscriptions the result is already even and nothing moves."""
    while True:
        by_load = sorted(members, key=lambda m: (len(result[m]), m))
        move = next(
            (
                (heavy, light, tp)
                for heavy in reversed(by_load)
                for light in by_load
                if len(result[heavy]) - len(result[light]) >= 2
                for tp in reversed(result[heavy])
                if light in eligible[tp]
            ),
            None,
        )
        if move is None:
            return
        heavy, light, tp = move
        result[heavy].remove(tp)
        result[light].append(tp)
