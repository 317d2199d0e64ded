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

Group lifecycle: a group exists while it has members or stored offsets. It leaves memory
when its last member goes; its offsets are deleted once the group has been empty for
``offsets_retention_ms`` (Kafka's ``offsets.retention.minutes``) counted from its last
commit or from when it became empty, whichever is later; then it is forgotten.

Cost on the loop, which every other client shares: a join or leave is one rebalance,
O((P + S) log M) for the group's P partitions, M members and S subscriptions, deferred to
the end of the loop turn so that joins arriving together (pipelined, or a fleet starting)
share one; a heartbeat
is O(what the member owns); session expiry looks only at members whose deadline passed
(deadlines are kept in 100 ms buckets), not at every member every tick. Each group holds at
most ``max_members`` members.

Topic names here are the tenant's own (``broker/topics.py`` maps them to stored topics):
a group qualified ``tenant/group`` resolves its topics through ``partitions_of(tenant,
topic)``, so it can never be assigned another tenant's partitions, whatever names they reuse.

Offsets are stored in the node's LMDB (``offsets`` table, keys ``tenant/group \\0 topic \\0
partition``) the moment they are committed; the front door
(``BrokerService.commit_offsets``) syncs the state store before it answers, so an
acknowledged commit survives a power cut (commits arriving together share one sync).
Their rows count toward the tenant's state-store quota.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from broker.assignors import TopicPartition, range_assign, sticky_assign
from broker.config import QuotasConfig
from broker.errors import GroupFull, InvalidSessionTimeout, NotAssigned, UnknownMember
from broker.quotas import Quotas
from storage.kv import KV, ROW_OVERHEAD

log = logging.getLogger("herald.groups")

_BUCKET_MS = 100  # session deadlines are filed by this granularity (the expiry tick)
# a stored offset row: key (group, topic, 10-digit partition, 2 NULs) and a msgpack value of
# offset, metadata and time (at most 27 bytes around the metadata)
_ROW_FIXED = 10 + 2 + 27 + ROW_OVERHEAD


class StoredOffset(msgspec.Struct, array_like=True):
    offset: int
    metadata: str
    committed_ms: int


@dataclass(eq=False)
class Member:
    member_id: str
    client_id: str
    topics: list[str]
    session_timeout_ms: int
    last_seen_ms: int
    granted: set[TopicPartition] = field(default_factory=set)
    reported: set[TopicPartition] = field(default_factory=set)
    bucket: int = -1  # the deadline bucket it is filed under


@dataclass(eq=False)
class Group:
    name: str
    tenant: str
    assignor: str
    generation: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    target: dict[str, list[TopicPartition]] = field(default_factory=dict)
    target_sets: dict[str, set[TopicPartition]] = field(default_factory=dict)
    # partition -> members that were granted it or still report it
    holders: dict[TopicPartition, set[str]] = field(default_factory=dict)
    # members whose granted or reported partitions differ from their target
    unsettled: set[str] = field(default_factory=set)
    topic_refs: dict[str, int] = field(default_factory=dict)  # topic -> members subscribed
    dirty: bool = False  # membership changed; the rebalance is due at the end of this turn

    @property
    def topics(self) -> list[str]:
        return sorted(self.topic_refs)

    @property
    def state(self) -> str:
        if not self.members:
            return "empty"
        return "reconciling" if self.rebalancing else "stable"

    @property
    def rebalancing(self) -> bool:
        return bool(self.unsettled)


@dataclass(eq=False)
class StoredGroup:
    """A group's rows in the offsets table."""

    rows: int = 0
    bytes: int = 0
    last_commit_ms: int = 0
    empty_since_ms: int = 0  # wall time it was last seen without members


def _offset_key(group: str, topic: str, partition: int) -> str:
    return f"{group}\x00{topic}\x00{partition:010d}"


def _split_key(key: bytes) -> tuple[str, str, int] | None:
    """(group, topic, partition) of an offsets key; None for a key this version cannot
    read (a group name with a NUL, stored before names were checked)."""
    parts = key.decode(errors="replace").rsplit("\x00", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def tenant_of(group: str) -> str:
    """The tenant of a qualified group name ``tenant/group``."""
    return group.partition("/")[0]


class GroupCoordinator:
    """All groups of this node. Every method is synchronous (no awaits inside), so group
    state never changes under a caller's feet."""

    def __init__(
        self,
        kv: KV,
        partitions_of: Callable[[str, str], int | None],
        *,
        clock_ms: Callable[[], int],
        wall_ms: Callable[[], int],
        quotas: Quotas | None = None,
        min_session_timeout_ms: int = 1000,
        max_session_timeout_ms: int = 300_000,
        default_session_timeout_ms: int = 10_000,
        default_assignor: str = "sticky",
        max_members: int = 1000,
        offsets_retention_ms: int = 7 * 24 * 3600 * 1000,
    ) -> None:
        self._offsets = kv.table("offsets", StoredOffset)
        self._partitions_of = partitions_of
        self._clock = clock_ms
        self._wall = wall_ms
        self.quotas = quotas or Quotas(QuotasConfig())
        self._min_st = min_session_timeout_ms
        self._max_st = max_session_timeout_ms
        self._default_st = default_session_timeout_ms
        self._default_assignor = default_assignor
        self.max_members = max_members
        self.offsets_retention_ms = offsets_retention_ms
        self.groups: dict[str, Group] = {}  # groups with members
        self.stored: dict[str, StoredGroup] = {}  # groups with offsets
        self._by_tenant: dict[str, set[str]] = {}  # tenant -> its groups with members
        self._deadlines: dict[int, set[tuple[str, str]]] = {}  # bucket -> (group, member)
        self._next_bucket = clock_ms() // _BUCKET_MS
        self._ids = itertools.count(1)
        self._dirty: set[str] = set()  # groups whose rebalance is deferred to the turn's end
        self._flush_scheduled = False
        self._waiters: dict[str, asyncio.Future[None]] = {}

    # ---------------------------------------------------------------------- start-up
    def load(self) -> int:
        """Account the stored offsets (rows, bytes, groups per tenant). Reads the whole
        table: call it once at start-up, in a worker thread. Returns the rows read."""
        now = self._wall()
        rows = 0
        # values are not decoded: when each group became empty is not stored, so its
        # retention counts from now (a restart never expires a group sooner than its
        # retention says), and that is later than any commit time a value could tell
        by_group: dict[bytes, list[int]] = {}  # group -> [rows, bytes]: decoded once each
        for key, size in self._offsets.sizes():
            parts = key.rsplit(b"\x00", 2)
            if len(parts) != 3 or not parts[2].isdigit():
                continue
            rows += 1
            counts = by_group.get(parts[0])
            if counts is None:
                by_group[parts[0]] = [1, size]
            else:
                counts[0] += 1
                counts[1] += size
        for raw, (count, size) in by_group.items():
            group = raw.decode(errors="replace")
            usage = self.quotas.of(tenant_of(group))
            self.stored[group] = StoredGroup(rows=count, bytes=size, empty_since_ms=now)
            usage.groups += 1
            usage.state_store_bytes += size
        return rows

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
        """Join (or rejoin) and rebalance now: the member, its group and what it may
        consume. The front door uses :meth:`join_nowait` and :meth:`settled` instead, so
        that joins arriving together share one rebalance."""
        member, g = self.join_nowait(
            group,
            topics,
            member_id=member_id,
            session_timeout_ms=session_timeout_ms,
            assignor=assignor,
            client_id=client_id,
        )
        return member, g, self.grant(g, member)

    async def settled(self, g: Group) -> None:
        """Wait for the group's deferred rebalance (at the end of this loop turn)."""
        if g.dirty:
            waiter = self._waiters.get(g.name)
            if waiter is None:
                waiter = self._waiters[g.name] = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)

    def grant(self, g: Group, member: Member) -> list[TopicPartition]:
        """What ``member`` may consume now (after the group's pending rebalance)."""
        if member.member_id not in g.members:
            raise UnknownMember(f"member {member.member_id!r} left group {g.name!r}; join again")
        return self._grant(g, member)

    def join_nowait(
        self,
        group: str,
        topics: list[str],
        *,
        member_id: str | None = None,
        session_timeout_ms: int | None = None,
        assignor: str | None = None,
        client_id: str = "",
    ) -> tuple[Member, Group]:
        """Add (or update) the member and schedule the group's rebalance for the end of
        this loop turn: a burst of joins (a client pipelining them, a fleet starting)
        costs one rebalance, not one per join."""
        st = self._default_st if session_timeout_ms is None else session_timeout_ms
        if not self._min_st <= st <= self._max_st:
            raise InvalidSessionTimeout(
                f"session_timeout_ms={st} outside [{self._min_st}, {self._max_st}]"
            )
        g = self.groups.get(group)
        member = g.members.get(member_id) if g is not None and member_id else None
        now = self._clock()
        wanted = sorted(set(topics))
        if member is not None:
            assert g is not None
            self._file(g.name, member, now)
            if wanted != member.topics or st != member.session_timeout_ms:
                self._subscribe(g, member, wanted)
                member.session_timeout_ms = st
                self._file(g.name, member, now)
                self._defer(g)
            return member, g
        if g is None:
            tenant = tenant_of(group)
            if group not in self.stored:
                usage = self.quotas.of(tenant)
                self.quotas.admit(usage, "groups", field="group")
                usage.groups += 1
            g = self.groups[group] = Group(group, tenant, assignor or self._default_assignor)
            self._by_tenant.setdefault(tenant, set()).add(group)
        elif len(g.members) >= self.max_members:
            raise GroupFull(
                f"group {group.partition('/')[2]!r} has {len(g.members)} members, the most "
                f"a group may have (groups.max-members)"
            )
        mid = f"{client_id or 'member'}-{next(self._ids)}-{secrets.token_hex(4)}"
        member = Member(mid, client_id, [], st, now)
        g.members[mid] = member
        self._subscribe(g, member, wanted)
        self._file(g.name, member, now)
        # per member at debug: a storm of joins would be a storm of lines (and of the loop's
        # time); the rebalance line (info) says how many members the group has
        log.debug("event=member_joined group=%s member=%s topics=%s", group, mid, wanted)
        self._defer(g)
        return member, g

    def heartbeat(
        self, group: str, member_id: str, owned: Iterable[TopicPartition]
    ) -> tuple[Group, list[TopicPartition]]:
        member = self._member(group, member_id)
        g = self.groups[group]
        self._file(group, member, self._clock())
        # only partitions of the group's topics matter to the hand-off; keeping any other a
        # client reports would let it grow the group's index without bound
        counts: dict[str, int] = {}
        reported = set()
        for t, p in owned:
            n = counts.get(t)
            if n is None:
                n = counts[t] = (self._partitions_of(g.tenant, t) or 0) if t in g.topic_refs else 0
            if 0 <= p < n:
                reported.add((t, p))
        self._claim(g, member, reported=reported)
        return g, self._grant(g, member)

    def leave(self, group: str, member_id: str) -> None:
        self._member(group, member_id)
        g = self.groups[group]
        self._remove(g, member_id)
        log.debug("event=member_left group=%s member=%s", group, member_id)
        self._after_removal(g)

    def expire(self) -> list[tuple[str, str]]:
        """Remove members whose session timed out. Returns (group, member) pairs removed.
        Looks only at the buckets whose time has come."""
        now = self._clock()
        gone: list[tuple[str, str]] = []
        touched: dict[str, Group] = {}
        last = now // _BUCKET_MS
        bucket = self._next_bucket
        while bucket <= last:
            due = self._deadlines.get(bucket)
            if due:
                for name, mid in list(due):
                    g = self.groups.get(name)
                    m = g.members.get(mid) if g is not None else None
                    if m is None or g is None:
                        due.discard((name, mid))
                        continue
                    if now - m.last_seen_ms > m.session_timeout_ms:
                        self._remove(g, mid)
                        gone.append((name, mid))
                        touched[name] = g
            if bucket < last:  # the current bucket may still hold members not yet due
                self._deadlines.pop(bucket, None)
            bucket += 1
        self._next_bucket = last
        if gone:
            # one line per group, not per member: a thousand members timing out together
            # must not cost a thousand lines
            by_group: dict[str, list[str]] = {}
            for name, mid in gone:
                by_group.setdefault(name, []).append(mid)
            for name, mids in by_group.items():
                log.warning(
                    "event=members_expired group=%s count=%d members=%s",
                    name,
                    len(mids),
                    ",".join(mids[:5]) + (",..." if len(mids) > 5 else ""),
                )
        for g in touched.values():
            self._after_removal(g)
        return gone

    def next_expiry_ms(self) -> int:
        """How long :meth:`expire` may wait before it runs again and still remove every
        member on time: until the end of the earliest bucket holding a deadline, and never
        longer than the shortest session a member may have (one that joins meanwhile is
        due no sooner than that). An idle node's expiry then runs about once a second, not
        at every 100 ms bucket."""
        now = self._clock()
        first = min((b for b, due in self._deadlines.items() if due), default=None)
        wait = self._min_st if first is None else (first + 1) * _BUCKET_MS - now
        return max(_BUCKET_MS, min(wait, self._min_st))

    def topics_changed(self, tenant: str, topic: str) -> None:
        """The tenant's ``topic`` was created, deleted or grew: recompute the targets of the
        tenant's groups that subscribe to it."""
        for name in list(self._by_tenant.get(tenant, ())):
            g = self.groups.get(name)
            if g is not None and topic in g.topic_refs:
                self._defer(g)

    def _member(self, group: str, member_id: str) -> Member:
        g = self.groups.get(group)
        member = g.members.get(member_id) if g else None
        if member is None:
            raise UnknownMember(f"member {member_id!r} is not in group {group!r}; join again")
        return member

    def _file(self, group: str, member: Member, now: int) -> None:
        """Note ``member`` was seen at ``now``: file it under its new deadline's bucket."""
        member.last_seen_ms = now
        bucket = (now + member.session_timeout_ms) // _BUCKET_MS
        if bucket != member.bucket:
            if member.bucket >= 0:
                old = self._deadlines.get(member.bucket)
                if old is not None:
                    old.discard((group, member.member_id))
            self._deadlines.setdefault(bucket, set()).add((group, member.member_id))
            member.bucket = bucket

    def _subscribe(self, g: Group, member: Member, topics: list[str]) -> None:
        refs = g.topic_refs
        for t in member.topics:
            refs[t] -= 1
            if not refs[t]:
                del refs[t]
        for t in topics:
            refs[t] = refs.get(t, 0) + 1
        member.topics = topics

    def _remove(self, g: Group, member_id: str) -> None:
        member = g.members.pop(member_id)
        self._subscribe(g, member, [])
        self._claim(g, member, granted=set(), reported=set())
        g.unsettled.discard(member_id)
        g.target.pop(member_id, None)
        g.target_sets.pop(member_id, None)
        old = self._deadlines.get(member.bucket)
        if old is not None:
            old.discard((g.name, member_id))

    def _after_removal(self, g: Group) -> None:
        if g.members:
            self._defer(g)
            return
        # empty: out of memory; kept only as its stored offsets, until their retention
        del self.groups[g.name]
        names = self._by_tenant.get(g.tenant)
        if names is not None:
            names.discard(g.name)
            if not names:
                del self._by_tenant[g.tenant]
        stored = self.stored.get(g.name)
        if stored is not None:
            stored.empty_since_ms = self._wall()
        else:
            self.quotas.of(g.tenant).groups -= 1

    def _claim(
        self,
        g: Group,
        member: Member,
        *,
        granted: set[TopicPartition] | None = None,
        reported: set[TopicPartition] | None = None,
    ) -> None:
        """Set what ``member`` was granted and reports, keeping the group's index of who
        holds what and who is not settled up to date (O(what the member holds))."""
        before = member.granted | member.reported
        if granted is not None:
            member.granted = granted
        if reported is not None:
            member.reported = reported
        after = member.granted | member.reported
        mid = member.member_id
        holders = g.holders
        for tp in before - after:
            who = holders.get(tp)
            if who is not None:
                who.discard(mid)
                if not who:
                    del holders[tp]
        for tp in after - before:
            holders.setdefault(tp, set()).add(mid)
        want = g.target_sets.get(mid, set())
        if member.granted == want and member.reported == want:
            g.unsettled.discard(mid)
        else:
            g.unsettled.add(mid)

    def _defer(self, g: Group) -> None:
        """Rebalance ``g`` at the end of this loop turn (now, without a running loop)."""
        g.dirty = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._rebalance(g)
            return
        self._dirty.add(g.name)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for name in dirty:
            g = self.groups.get(name)
            if g is not None and g.dirty:
                self._rebalance(g)
            waiter = self._waiters.pop(name, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _rebalance(self, g: Group) -> None:
        g.dirty = False
        g.generation += 1
        subs = {m.member_id: m.topics for m in g.members.values()}
        counts: dict[str, int] = {}
        for t in g.topic_refs:
            n = self._partitions_of(g.tenant, t)
            if n:
                counts[t] = n
        if g.assignor == "range":
            g.target = range_assign(subs, counts)
        else:
            current = {m.member_id: sorted(m.granted | m.reported) for m in g.members.values()}
            g.target = sticky_assign(subs, counts, current)
        g.target_sets = {mid: set(tps) for mid, tps in g.target.items()}
        g.unsettled = {
            mid
            for mid, m in g.members.items()
            if m.granted != g.target_sets[mid] or m.reported != g.target_sets[mid]
        }
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
        if g.dirty:  # a rebalance is pending: answer from its result, not the old one
            self._rebalance(g)
        mid = member.member_id
        holders = g.holders
        granted = []
        for tp in g.target.get(mid, ()):
            who = holders.get(tp)
            if who is None or (len(who) == 1 and mid in who):
                granted.append(tp)
        self._claim(g, member, granted=set(granted))
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
        """Store ``offsets``. Raises :class:`UnknownMember`, :class:`NotAssigned`, and
        :class:`~broker.errors.QuotaExceeded` when the group would be one too many for its
        tenant or the rows would take the tenant past its state-store bytes."""
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
        tenant = tenant_of(group)
        usage = self.quotas.of(tenant)
        stored = self.stored.get(group)
        new_group = stored is None and g is None
        if new_group:
            self.quotas.admit(usage, "groups", field="group")
        now = self._wall()
        rows: list[tuple[bytes | str, StoredOffset]] = [
            (_offset_key(group, t, p), StoredOffset(off, metadata, now)) for t, p, off in offsets
        ]
        if not usage.exempt:
            # at most this much more (every row new); near the quota, ask what exists
            need = sum(_ROW_FIXED + len(str(k)) + len(metadata.encode()) for k, _v in rows)
            if usage.state_store_bytes + need > usage.limits["state_store_bytes"]:
                need = self._growth(rows)
                self.quotas.admit(usage, "state_store_bytes", need)
        change = self._offsets.put_many(rows)
        if stored is None:
            stored = self.stored[group] = StoredGroup(empty_since_ms=now)
            if new_group:
                usage.groups += 1
        stored.rows += change.rows
        stored.bytes += change.bytes
        usage.state_store_bytes += change.bytes
        stored.last_commit_ms = now
        return len(offsets)

    def _growth(self, rows: list[tuple[bytes | str, StoredOffset]]) -> int:
        """The bytes ``rows`` would add, knowing which exist (one read per row)."""
        enc = msgspec.msgpack.Encoder()
        growth = 0
        for key, value in rows:
            k = key.encode() if isinstance(key, str) else key
            v = enc.encode(value)
            old = self._offsets.raw_size(k)
            growth += len(k) + len(v) + ROW_OVERHEAD if old is None else len(v) - old
        return growth

    def committed(self, group: str, topic: str, partition: int) -> StoredOffset | None:
        return self._offsets.get(_offset_key(group, topic, partition))

    def group_offsets(self, group: str) -> list[tuple[str, int, StoredOffset]]:
        out = []
        for key, value in self._offsets.scan(f"{group}\x00"):
            parts = _split_key(key)
            if parts is None or parts[0] != group:
                continue  # a longer legacy name that starts with this one and a NUL
            out.append((parts[1], parts[2], value))
        return out

    def delete_topic_offsets(self, tenant: str, topic: str) -> int:
        """Forget every offset the tenant's groups hold for ``topic`` (deleted). Reads the
        tenant's offsets only. Returns the rows deleted."""
        doomed: dict[str, list[bytes | str]] = {}
        for key, _size in self._offsets.sizes(f"{tenant}/"):
            parts = _split_key(key)
            if parts is not None and parts[1] == topic:
                doomed.setdefault(parts[0], []).append(key)
        deleted = 0
        for group, keys in doomed.items():
            deleted += self._delete_rows(group, keys)
        return deleted

    def _delete_rows(self, group: str, keys: list[bytes | str]) -> int:
        change = self._offsets.remove_many(keys)
        stored = self.stored.get(group)
        if stored is not None:
            stored.rows += change.rows
            stored.bytes += change.bytes
            usage = self.quotas.of(tenant_of(group))
            usage.state_store_bytes += change.bytes
            if stored.rows <= 0:
                del self.stored[group]
                if group not in self.groups:
                    usage.groups -= 1
        return -change.rows

    def expire_offsets(self, limit: int = 1000) -> list[str]:
        """Delete the offsets of groups empty for longer than the retention (from their
        last commit or from when they became empty, whichever is later), at most ``limit``
        groups per call. Returns the groups forgotten."""
        now = self._wall()
        due = [
            name
            for name, s in self.stored.items()
            if name not in self.groups
            and now - max(s.last_commit_ms, s.empty_since_ms) > self.offsets_retention_ms
        ][:limit]
        for name in due:
            keys: list[bytes | str] = [
                k
                for k, _s in self._offsets.sizes(f"{name}\x00")
                if (parts := _split_key(k)) is not None and parts[0] == name
            ]
            self._delete_rows(name, keys)
            leftover = self.stored.pop(name, None)
            if leftover is not None:  # rows counted but not found: forget them all the same
                usage = self.quotas.of(tenant_of(name))
                usage.groups -= 1
                usage.state_store_bytes -= leftover.bytes
            log.info("event=group_offsets_expired group=%s rows=%d", name, len(keys))
        return due

    def group_names(self, prefix: str = "") -> list[str]:
        names = {g for g in self.groups if g.startswith(prefix)}
        names.update(g for g in self.stored if g.startswith(prefix))
        return sorted(names)
