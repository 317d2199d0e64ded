"""Consumer groups: membership, cooperative partition hand-off, offsets.

The coordinator assigns partitions on the server (as Kafka's KIP-848 protocol does), so
clients stay simple: a member joins, then heartbeats, reporting what it consumes; each answer
says what it may consume now.

Hand-off is cooperative: when membership changes, a new *target* assignment is computed
(range or sticky), but a partition is granted to its new owner only once the previous owner
has stopped reporting it. A member that dies stops heartbeating; after its session timeout
it is removed and its partitions are free at once. So two live members never hold the same
partition, and a rebalance pauses only the partitions that move.

Member lifecycle (a state machine with named states)::

    joining --join--> stable <--heartbeat-- ; stable --membership change--> reconciling
    reconciling --heartbeat with owned == granted == target--> stable
    any --leave | session timeout--> gone

Offsets are stored in the node's LMDB (``offsets`` table) the moment they are committed; the
front door (``BrokerService.commit_offsets``) syncs the state store before it answers, so an
acknowledged commit survives a power cut (commits arriving together share one sync).
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from broker.assignors import TopicPartition, range_assign, sticky_assign
from broker.errors import InvalidSessionTimeout, NotAssigned, UnknownMember
from storage.kv import KV

log = logging.getLogger("herald.groups")


class StoredOffset(msgspec.Struct, array_like=True):
    offset: int
    metadata: str
    committed_ms: int


@dataclass
class Member:
    member_id: str
    client_id: str
    topics: list[str]
    session_timeout_ms: int
    last_seen_ms: int
    granted: set[TopicPartition] = field(default_factory=set)
    reported: set[TopicPartition] = field(default_factory=set)


@dataclass
class Group:
    name: str
    assignor: str
    generation: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    target: dict[str, list[TopicPartition]] = field(default_factory=dict)

    @property
    def topics(self) -> list[str]:
        return sorted({t for m in self.members.values() for t in m.topics})

    @property
    def state(self) -> str:
        if not self.members:
            return "empty"
        return "reconciling" if self.rebalancing else "stable"

    @property
    def rebalancing(self) -> bool:
        for m in self.members.values():
            want = set(self.target.get(m.member_id, ()))
            if m.granted != want or m.reported != want:
                return True
        return False


def _offset_key(group: str, topic: str, partition: int) -> str:
    return f"{group}\x00{topic}\x00{partition:010d}"


class GroupCoordinator:
    """All groups of this node. Every method is synchronous and cheap (no awaits inside),
    so group state never changes under a caller's feet."""

    def __init__(
        self,
        kv: KV,
        partitions_of: Callable[[str], int | None],
        *,
        clock_ms: Callable[[], int],
        wall_ms: Callable[[], int],
        min_session_timeout_ms: int = 1000,
        max_session_timeout_ms: int = 300_000,
        default_session_timeout_ms: int = 10_000,
        default_assignor: str = "sticky",
    ) -> None:
        self._offsets = kv.table("offsets", StoredOffset)
        self._partitions_of = partitions_of
        self._clock = clock_ms
        self._wall = wall_ms
        self._min_st = min_session_timeout_ms
        self._max_st = max_session_timeout_ms
        self._default_st = default_session_timeout_ms
        self._default_assignor = default_assignor
        self.groups: dict[str, Group] = {}
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------- membership
    def join(
        self,
        group: str,
        topics: list[str],
        *,
        member_id: str | None = None,
        session_timeout_ms: int | None = None,
        assignor: str | None = None,
        client_id: str = "",
    ) -> tuple[Member, Group, list[TopicPartition]]:
        st = self._default_st if session_timeout_ms is None else session_timeout_ms
        if not self._min_st <= st <= self._max_st:
            raise InvalidSessionTimeout(
                f"session_timeout_ms={st} outside [{self._min_st}, {self._max_st}]"
            )
        g = self.groups.get(group)
        if g is None:
            g = self.groups[group] = Group(group, assignor or self._default_assignor)
        elif not g.members and assignor:
            g.assignor = assignor
        now = self._clock()
        member = g.members.get(member_id) if member_id else None
        if member is None:
            mid = f"{client_id or 'member'}-{next(self._ids)}-{secrets.token_hex(4)}"
            member = Member(mid, client_id, sorted(set(topics)), st, now)
            g.members[mid] = member
            log.info("event=member_joined group=%s member=%s topics=%s", group, mid, topics)
            self._rebalance(g)
        else:
            member.last_seen_ms = now
            if sorted(set(topics)) != member.topics or st != member.session_timeout_ms:
                member.topics, member.session_timeout_ms = sorted(set(topics)), st
                self._rebalance(g)
        return member, g, self._grant(g, member)

    def heartbeat(
        self, group: str, member_id: str, owned: Iterable[TopicPartition]
    ) -> tuple[Group, list[TopicPartition]]:
        member = self._member(group, member_id)
        g = self.groups[group]
        member.last_seen_ms = self._clock()
        member.reported = {tuple(tp) for tp in owned}  # type: ignore[misc]
        return g, self._grant(g, member)

    def leave(self, group: str, member_id: str) -> None:
        self._member(group, member_id)
        g = self.groups[group]
        del g.members[member_id]
        log.info("event=member_left group=%s member=%s", group, member_id)
        self._rebalance(g)

    def expire(self) -> list[tuple[str, str]]:
        """Remove members whose session timed out. Returns (group, member) pairs removed."""
        now = self._clock()
        gone = []
        for g in self.groups.values():
            dead = [
                m.member_id
                for m in g.members.values()
                if now - m.last_seen_ms > m.session_timeout_ms
            ]
            for mid in dead:
                del g.members[mid]
                gone.append((g.name, mid))
                log.warning("event=member_expired group=%s member=%s", g.name, mid)
            if dead:
                self._rebalance(g)
        return gone

    def topics_changed(self) -> None:
        """A topic was created, deleted or grew: recompute targets of the groups using it."""
        for g in self.groups.values():
            if g.members:
                self._rebalance(g)

    def _member(self, group: str, member_id: str) -> Member:
        g = self.groups.get(group)
        member = g.members.get(member_id) if g else None
        if member is None:
            raise UnknownMember(f"member {member_id!r} is not in group {group!r}; join again")
        return member

    def _rebalance(self, g: Group) -> None:
        g.generation += 1
        subs = {m.member_id: m.topics for m in g.members.values()}
        counts: dict[str, int] = {}
        for t in {t for ts in subs.values() for t in ts}:
            n = self._partitions_of(t)
            if n:
                counts[t] = n
        if g.assignor == "range":
            g.target = range_assign(subs, counts)
        else:
            current = {m.member_id: sorted(m.granted | m.reported) for m in g.members.values()}
            g.target = sticky_assign(subs, counts, current)
        log.info(
            "event=group_rebalance group=%s generation=%d members=%d assignor=%s",
            g.name,
            g.generation,
            len(g.members),
            g.assignor,
        )

    def _grant(self, g: Group, member: Member) -> list[TopicPartition]:
        """What ``member`` may consume now: its target, minus partitions another member was
        granted or still reports."""
        held_by_others: set[TopicPartition] = set()
        for other in g.members.values():
            if other is not member:
                held_by_others |= other.granted
                held_by_others |= other.reported
        target = g.target.get(member.member_id, [])
        granted = [tp for tp in target if tp not in held_by_others]
        member.granted = set(granted)
        return granted

    # ----------------------------------------------------------------------- offsets
    def commit(
        self,
        group: str,
        offsets: list[tuple[str, int, int]],
        *,
        member_id: str | None,
        metadata: str = "",
    ) -> int:
        g = self.groups.get(group)
        if member_id is None:
            if g is not None and g.members:
                raise UnknownMember(
                    f"group {group!r} has live members: commit as a member (member_id)"
                )
        else:
            member = self._member(group, member_id)
            allowed = member.granted | member.reported
            for topic, partition, _off in offsets:
                if (topic, partition) not in allowed:
                    raise NotAssigned(
                        f"{topic}/{partition} is not assigned to member {member_id!r}"
                    )
        now = self._wall()
        self._offsets.put_many(
            [(_offset_key(group, t, p), StoredOffset(off, metadata, now)) for t, p, off in offsets]
        )
        return len(offsets)

    def committed(self, group: str, topic: str, partition: int) -> StoredOffset | None:
        return self._offsets.get(_offset_key(group, topic, partition))

    def group_offsets(self, group: str) -> list[tuple[str, int, StoredOffset]]:
        out = []
        for key, value in self._offsets.scan(f"{group}\x00"):
            _g, topic, part = key.decode().split("\x00")
            out.append((topic, int(part), value))
        return out

    def delete_topic_offsets(self, topic: str) -> None:
        doomed = [k for k, _v in self._offsets.scan(b"") if k.decode().split("\x00")[1] == topic]
        for k in doomed:
            self._offsets.delete(k)

    def group_names(self, prefix: str = "") -> list[str]:
        names = {g for g, grp in self.groups.items() if grp.members and g.startswith(prefix)}
        for key, _v in self._offsets.scan(prefix):
            names.add(key.decode().split("\x00")[0])
        return sorted(names)
