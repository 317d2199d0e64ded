"""Partition assignment strategies: pure functions, no I/O, no clock.

Both take the members (each with the topics it subscribes to), the partitions of every topic,
and, for ``sticky``, the current assignment; both return ``member -> sorted partitions``.
Every partition of a subscribed topic goes to exactly one member that subscribes to it.
"""

from __future__ import annotations

import heapq
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

    Cost: O((P + S) log M) for P partitions, M members and S subscriptions (member, topic),
    plus O(M log M) per evening-out pass (none with identical subscriptions): a group join
    must not cost O(M^2) on the event loop, where every other client waits.
    """
    members = sorted(subscriptions)
    result: Assignment = {m: [] for m in members}
    if not members:
        return result
    subscribers: dict[str, list[str]] = {}  # topic -> its subscribers, in member order
    for m in members:
        for t in set(subscriptions[m]):
            if partitions.get(t, 0) > 0:
                subscribers.setdefault(t, []).append(m)
    for subs in subscribers.values():
        subs.sort()
    wanted = [(t, p) for t in sorted(subscribers) for p in range(partitions[t])]
    owner: dict[TopicPartition, str] = {}
    for member, tps in current.items():
        if member not in result:
            continue
        mine = set(subscriptions[member])
        for tp in tps:
            t, p = tp
            if t in mine and t in subscribers and 0 <= p < partitions[t] and tp not in owner:
                owner[(t, p)] = member
    held = {m: 0 for m in members}
    for m in owner.values():
        held[m] += 1
    # the members that get one more than the floor are those holding the most already,
    # so that fewer partitions move
    cap_low, extra = divmod(len(wanted), len(members))
    by_held = sorted(members, key=lambda m: (-held[m], m))
    caps = {m: cap_low + (1 if i < extra else 0) for i, m in enumerate(by_held)}
    # keep current ownership up to each member's cap (highest cap first among equals)
    taken: set[TopicPartition] = set()
    for tp in wanted:
        holder = owner.get(tp)
        if holder is not None and len(result[holder]) < caps[holder]:
            result[holder].append(tp)
            taken.add(tp)
    loads = _Loads(result, subscriptions, subscribers)
    # give the rest to the least-loaded eligible member
    for tp in wanted:
        if tp not in taken:
            loads.give(loads.least(tp[0]), tp)
    loads.even_out()
    return {m: sorted(tps) for m, tps in result.items()}


class _Loads:
    """Members' loads with, per topic, a heap of ``(load, member)`` over its subscribers:
    the least-loaded eligible member in O(log M). A load change pushes a fresh entry into
    the heaps of the member's topics; entries whose load is no longer the member's are
    dropped when they reach the top."""

    def __init__(
        self,
        result: Assignment,
        subscriptions: Mapping[str, Sequence[str]],
        subscribers: Mapping[str, list[str]],
    ) -> None:
        self.result = result
        self.load = {m: len(tps) for m, tps in result.items()}
        self.topics = {
            m: [t for t in set(ts) if t in subscribers] for m, ts in subscriptions.items()
        }
        self.heaps = {t: [(self.load[m], m) for m in subs] for t, subs in subscribers.items()}
        for h in self.heaps.values():
            heapq.heapify(h)

    def least(self, topic: str) -> str:
        """The least-loaded subscriber of ``topic`` (ties: the smallest name)."""
        heap = self.heaps[topic]
        while True:
            load, m = heap[0]
            if load == self.load[m]:
                return m
            heapq.heappop(heap)

    def _changed(self, m: str) -> None:
        entry = (self.load[m], m)
        for t in self.topics[m]:
            heapq.heappush(self.heaps[t], entry)

    def give(self, m: str, tp: TopicPartition) -> None:
        self.result[m].append(tp)
        self.load[m] += 1
        self._changed(m)

    def _move(self, heavy: str, light: str, tp: TopicPartition) -> None:
        self.result[heavy].remove(tp)
        self.load[heavy] -= 1
        self._changed(heavy)
        self.give(light, tp)

    def even_out(self) -> None:
        """With mixed subscriptions the caps above ignore who may take what, so a member can
        be left with nothing while a peer with the same subscriptions holds everything. Move
        one partition at a time from a member to an eligible one holding at least two fewer,
        newest first, until no such move exists. Each move lowers the sum of squared loads,
        so this ends; with identical subscriptions the result is already even and a pass
        (O(M log M)) moves nothing."""
        while True:
            moved = False
            floor = min(self.load.values())
            for heavy in sorted(self.load, key=lambda m: (-self.load[m], m)):
                if self.load[heavy] - floor < 2:
                    break  # nobody lighter by two: no move from here on down
                while (move := self._move_from(heavy)) is not None:
                    self._move(heavy, *move)
                    moved = True
            if not moved:
                return

    def _move_from(self, heavy: str) -> tuple[str, TopicPartition] | None:
        least: dict[str, str] = {}
        for tp in reversed(self.result[heavy]):
            light = least.get(tp[0])
            if light is None:
                light = least[tp[0]] = self.least(tp[0])
            if self.load[heavy] - self.load[light] >= 2:
                return light, tp
        return None
