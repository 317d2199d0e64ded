"""The broker's front door: the one way into the log.

The TCP server, the HTTP API, the event intake (``broker/events.py``) and the node's own
engines (``broker/local.py``) all call :class:`BrokerService` with an authenticated
:class:`Principal`; none of them touches a partition. Each operation checks scopes and
tenancy, validates limits and answers in the protocol's own types (``broker/protocol.py``),
so a transport only parses, authenticates, calls and encodes.

Acknowledgements: :meth:`BrokerService.produce` appends (validate, stamp, queue for the
worker threads) and returns an :class:`Appended` whose ``ack`` is the future to wait for
before answering, chosen in one place by ``acks`` through :mod:`broker.replication` (where
the cluster's replication plugs in). A state change that an answer depends on (an issued
producer id, a committed offset) is durable before the answer, or can be rebuilt from the
log.

Everything here runs on the event loop; operations that must wait (fetch long polls, topic
deletion, syncs of the state store) are coroutines, the rest are plain calls, so the TCP
server can answer most requests inside ``data_received``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from broker import protocol as p
from broker.auth import Principal
from broker.config import Config
from broker.errors import (
    BatchTooLarge,
    InvalidRequest,
    ShuttingDown,
    TooManyBatches,
    UnknownGroup,
    UnknownPartition,
    UnknownTopic,
)
from broker.groups import GroupCoordinator, StoredOffset
from broker.producer_ids import ProducerIds
from broker.replication import Acks, LocalReplication, Replication
from broker.topics import Topics, partition_for_key
from storage.errors import CorruptData, StorageError
from storage.kv import KV
from storage.log import Log
from storage.partition import Partition

log = logging.getLogger("herald.broker")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(slots=True)
class Appended:
    """An append accepted by the front door. Answer the producer once ``ack`` resolves (at
    once if it is None); ``ack`` fails with the storage error if the append does. A
    ``duplicate`` (an idempotent producer's retry) carries the original offsets, and its
    ``ack`` still waits for the original to be as durable as ``acks`` asks."""

    topic: str
    partition: int
    base_offset: int
    last_offset: int
    duplicate: bool
    ack: asyncio.Future[None] | None


class BrokerService:
    def __init__(
        self, config: Config, log_: Log, kv: KV, replication: Replication | None = None
    ) -> None:
        self.config = config
        self.log = log_
        self.kv = kv
        self.replication: Replication = replication or LocalReplication()
        self.topics = Topics(config, log_, kv)
        self.producer_ids = ProducerIds(kv)
        self._round_robin: dict[str, itertools.count[int]] = {}
        g = config.groups
        self.groups = GroupCoordinator(
            kv,
            self.topics.partition_count,
            clock_ms=monotonic_ms,
            wall_ms=now_ms,
            min_session_timeout_ms=g.min_session_timeout_ms,
            max_session_timeout_ms=g.max_session_timeout_ms,
            default_session_timeout_ms=g.default_session_timeout_ms,
            default_assignor=g.default_assignor,
        )
        self.topics.on_change = self.groups.topics_changed
        self.stopping = False
        self._stop_waiters: set[asyncio.Future[None]] = set()

    def stop(self) -> None:
        """Refuse new work and answer every parked long poll now: shutdown must not wait
        out their ``max_wait_ms``."""
        self.stopping = True
        for fut in self._stop_waiters:
            if not fut.done():
                fut.set_result(None)

    def health(self) -> dict[str, object]:
        """What ``/healthz`` reports: ``ok``, ``degraded`` (some partitions cannot take
        writes, or the disk is nearly full) or ``shutting_down``, with the reasons."""
        parts = self.log.partitions.values()
        offline = [part.name for part in parts if part.offline]
        damaged = [part.name for part in parts if part.quarantined]
        reasons = []
        if offline:
            reasons.append("offline_partitions")
        if damaged:
            reasons.append("corrupt_data")
        free = self.disk_free_bytes()
        if free < self.config.storage.min_free_bytes:
            reasons.append("disk_nearly_full")
        status = "shutting_down" if self.stopping else ("degraded" if reasons else "ok")
        return {
            "status": status,
            "reasons": reasons,
            "node_id": self.config.node_id,
            "topics": len(self.log.topics),
            "partitions": len(self.log.partitions),
            "offline_partitions": offline,
            "corrupt_partitions": damaged,
            "disk_free_bytes": free,
        }

    def disk_free_bytes(self) -> int:
        """Free bytes on the log's filesystem for unprivileged writers (one statvfs call)."""
        st = os.statvfs(self.log.root)
        return st.f_bavail * st.f_frsize

    # ------------------------------------------------------------------------ topics
    def create_topic(self, principal: Principal, req: p.CreateTopic) -> tuple[p.TopicInfo, bool]:
        principal.require("admin")
        return self.topics.create(
            principal,
            req.topic,
            partitions=req.partitions,
            retention_ms=req.retention_ms,
            retention_bytes=req.retention_bytes,
            exist_ok=req.exist_ok,
        )

    async def delete_topic(self, principal: Principal, name: str) -> None:
        principal.require("admin")
        await self.topics.delete(principal, name)
        self.groups.delete_topic_offsets(name)

    def metadata(
        self, principal: Principal, topics: Sequence[str] | None, *, auto_create: bool = False
    ) -> list[p.TopicInfo]:
        names = sorted(self.log.topics) if topics is None else list(topics)
        out = []
        for name in names:
            if auto_create and "produce" in principal.scopes:
                self.topics.usable(principal, name, produce=True)
            if self.topics.visible(principal, name):
                out.append(self.topics.info(name))
            elif topics is not None:
                raise UnknownTopic(f"unknown topic {name!r}")
        return out

    def partition(self, principal: Principal, topic: str, index: int) -> Partition:
        n = self.topics.usable(principal, topic, produce=False)
        if not 0 <= index < n:
            raise UnknownPartition(f"topic {topic!r} has partitions 0..{n - 1}, not {index}")
        return self.log.partition(topic, index)

    # ----------------------------------------------------------------------- produce
    def produce(
        self,
        principal: Principal,
        topic: str,
        batches: Sequence[bytes],
        *,
        partition: int | None = None,
        key: bytes | None = None,
        acks: Acks = -1,
    ) -> Appended:
        """Append record batches to one partition: ``partition`` if given, else the one of
        ``key``'s hash, else round robin. Raises before anything is appended if the request
        is not acceptable (scope, limits, unknown partition, stopping)."""
        principal.require("produce")
        if self.stopping:
            raise ShuttingDown("the node is shutting down")
        self.check_batches(batches)
        n = self.topics.usable(principal, topic, produce=True)
        if partition is None:
            if key is not None:
                partition = partition_for_key(key, n)
            else:
                rr = self._round_robin.get(topic)
                if rr is None:
                    rr = self._round_robin[topic] = itertools.count()
                partition = next(rr) % n
        elif not 0 <= partition < n:
            raise UnknownPartition(f"topic {topic!r} has partitions 0..{n - 1}, not {partition}")
        return self.append(topic, partition, batches, acks)

    def check_batches(self, batches: Sequence[bytes]) -> None:
        """The request limits every append obeys, whoever built the batches."""
        limits = self.config.limits
        if len(batches) > limits.max_batches_per_request:
            raise TooManyBatches(
                f"{len(batches)} batches exceed max_batches_per_request="
                f"{limits.max_batches_per_request}",
                field="batches",
            )
        for b in batches:
            if len(b) > limits.max_batch_bytes:
                raise BatchTooLarge(
                    f"batch of {len(b)} bytes exceeds max_batch_bytes={limits.max_batch_bytes}",
                    field="batches",
                )

    def append(self, topic: str, partition: int, batches: Sequence[bytes], acks: Acks) -> Appended:
        """Append to a partition the caller already chose and may use (the event intake
        places events itself). Limits are checked by the caller (:meth:`check_batches`)."""
        if self.stopping:
            raise ShuttingDown("the node is shutting down")
        part = self.log.partition(topic, partition)
        result = part.append_nowait(batches)
        ack = self.replication.ack_future(part, result.last_offset + 1, acks)
        return Appended(
            topic, partition, result.base_offset, result.last_offset, result.duplicate, ack
        )

    async def init_producer(self, principal: Principal) -> int:
        """A producer id never issued before, durable before it is returned (a power cut
        must not hand it out again: the log may already hold its records)."""
        principal.require("produce")
        return await self.producer_ids.issue()

    # ------------------------------------------------------------------------- fetch
    async def fetch_pass(
        self, principal: Principal, req: p.Fetch
    ) -> tuple[list[p.FetchedPartition], int, list[Partition]]:
        """One pass over the requested partitions. Returns the results, the bytes found and
        the partitions that had nothing (for a long poll to wait on). Reads within the
        page-cache window are served at once; a read further back (a consumer catching up)
        runs in a worker thread, so the loop never waits on the disk."""
        principal.require("consume")
        budget = min(req.max_bytes, self.config.limits.max_fetch_bytes)
        results: list[p.FetchedPartition] = []
        total = 0
        empty: list[Partition] = []
        for fp in req.partitions:
            try:
                part = self.partition(principal, fp.topic, fp.partition)
            except (UnknownTopic, UnknownPartition) as exc:
                results.append(p.FetchedPartition(fp.topic, fp.partition, -1, -1, b"", exc.code))
                continue
            data: bytes | bytearray = b""
            error = None
            resume = -1
            try:
                if budget > 0:
                    data = await part.read_async(fp.offset, min(fp.max_bytes, budget))
            except CorruptData as exc:
                error, resume = exc.code, exc.end_offset
            except StorageError as exc:
                error = exc.code
            budget -= len(data)
            total += len(data)
            if not data and error is None:
                empty.append(part)
            # msgspec encodes any bytes-like object as bin: pass the read buffer as it is
            results.append(
                p.FetchedPartition(
                    fp.topic,
                    fp.partition,
                    part.high_watermark,
                    part.log_start_offset,
                    cast(bytes, data),
                    error,
                    resume,
                )
            )
        return results, total, empty

    async def fetch(self, principal: Principal, req: p.Fetch) -> list[p.FetchedPartition]:
        """Fetch with long poll: if fewer than ``min_bytes`` are available, wait until a
        partition's high watermark moves or ``max_wait_ms`` passes."""
        max_wait = min(req.max_wait_ms, self.config.limits.max_wait_ms) / 1000
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        while True:
            results, total, empty = await self.fetch_pass(principal, req)
            remaining = deadline - loop.time()
            if total >= req.min_bytes or remaining <= 0 or not empty or self.stopping:
                return results
            stop: asyncio.Future[None] = loop.create_future()
            self._stop_waiters.add(stop)
            waits = [part.high_watermark_changed() for part in empty]
            try:
                await asyncio.wait(
                    [*waits, stop], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                self._stop_waiters.discard(stop)
                stop.cancel()
                for w in waits:
                    w.cancel()

    def list_offsets(
        self,
        principal: Principal,
        topic: str,
        index: int,
        spec: Literal["earliest", "latest"] | int,
    ) -> int:
        principal.require("consume")
        part = self.partition(principal, topic, index)
        if spec == "earliest":
            return part.log_start_offset
        if spec == "latest":
            return part.high_watermark
        return part.offset_for_timestamp(spec)

    # ------------------------------------------------------------------------ groups
    def _check_topics(self, principal: Principal, topics: Iterable[str]) -> None:
        for t in topics:
            if not self.topics.visible(principal, t):
                raise UnknownTopic(f"unknown topic {t!r}")

    def join_group(self, principal: Principal, req: p.JoinGroup) -> p.Joined:
        principal.require("consume")
        self._check_topics(principal, req.topics)
        member, group, assignment = self.groups.join(
            principal.qualify_group(req.group),
            req.topics,
            member_id=req.member_id,
            session_timeout_ms=req.session_timeout_ms,
            assignor=req.assignor,
            client_id=req.client_id,
        )
        return p.Joined(
            id=req.id,
            group=req.group,
            member_id=member.member_id,
            generation=group.generation,
            session_timeout_ms=member.session_timeout_ms,
            heartbeat_interval_ms=max(100, member.session_timeout_ms // 3),
            assignment=assignment,
        )

    def heartbeat(self, principal: Principal, req: p.Heartbeat) -> p.HeartbeatResult:
        principal.require("consume")
        group, assignment = self.groups.heartbeat(
            principal.qualify_group(req.group), req.member_id, req.owned
        )
        return p.HeartbeatResult(
            id=req.id,
            generation=group.generation,
            assignment=assignment,
            rebalancing=group.rebalancing,
        )

    def leave_group(self, principal: Principal, req: p.LeaveGroup) -> p.Left:
        principal.require("consume")
        self.groups.leave(principal.qualify_group(req.group), req.member_id)
        return p.Left(id=req.id)

    async def commit_offsets(self, principal: Principal, req: p.CommitOffsets) -> p.Committed:
        """Store the offsets, then sync the state store before answering: an acknowledged
        commit survives a power cut. Concurrent commits share one sync (group commit)."""
        principal.require("consume")
        self._check_topics(principal, {t for t, _p, _o in req.offsets})
        for i, (topic, partition, offset) in enumerate(req.offsets):
            n = self.topics.partition_count(topic) or 0
            if not 0 <= partition < n:
                raise UnknownPartition(
                    f"topic {topic!r} has partitions 0..{n - 1}, not {partition}",
                    field=f"offsets[{i}]",
                )
            if offset < 0:
                raise InvalidRequest("offsets must not be negative", field=f"offsets[{i}]")
        n = self.groups.commit(
            principal.qualify_group(req.group),
            req.offsets,
            member_id=req.member_id,
            metadata=req.metadata,
        )
        await self.kv.sync()
        return p.Committed(id=req.id, count=n)

    def fetch_offsets(self, principal: Principal, req: p.FetchOffsets) -> p.OffsetsFetched:
        principal.require("consume")
        coord = self.groups
        qname = principal.qualify_group(req.group)
        if req.partitions is None:
            found = [
                p.CommittedOffset(t, i, o.offset, o.metadata)
                for t, i, o in coord.group_offsets(qname)
            ]
        else:
            found = []
            for t, i in req.partitions:
                o = coord.committed(qname, t, i)
                found.append(
                    p.CommittedOffset(t, i, o.offset if o else -1, o.metadata if o else "")
                )
        return p.OffsetsFetched(id=req.id, offsets=found)

    def describe_group(self, principal: Principal, group: str) -> p.GroupInfo:
        principal.require("consume")
        qname = principal.qualify_group(group)
        g = self.groups.groups.get(qname)
        stored = self.groups.group_offsets(qname)
        if (g is None or not g.members) and not stored:
            raise UnknownGroup(f"unknown group {group!r}")
        now = monotonic_ms()
        members = []
        if g is not None:
            for m in g.members.values():
                members.append(
                    p.MemberInfo(
                        member_id=m.member_id,
                        client_id=m.client_id,
                        assignment=sorted(m.granted),
                        last_heartbeat_ms_ago=now - m.last_seen_ms,
                    )
                )
        committed: dict[tuple[str, int], StoredOffset] = {(t, i): o for t, i, o in stored}
        topics = set(g.topics if g else []) | {t for t, _i in committed}
        lags = []
        for t in sorted(topics):
            meta = self.log.topics.get(t)
            if meta is None:
                continue
            for i in range(meta.partitions):
                hw = self.log.partition(t, i).high_watermark
                c = committed.get((t, i))
                off = c.offset if c else -1
                lags.append(p.PartitionLag(t, i, off, hw, hw - off if off >= 0 else hw))
        return p.GroupInfo(
            group=group,
            state=g.state if g else "empty",
            generation=g.generation if g else 0,
            assignor=g.assignor if g else self.config.groups.default_assignor,
            topics=sorted(topics),
            members=members,
            offsets=lags,
        )

    def list_groups(self, principal: Principal) -> list[str]:
        principal.require("consume")
        prefix = "" if principal.operator else f"{principal.tenant}/"
        names = self.groups.group_names(prefix)
        if principal.operator:
            return names
        return [n[len(prefix) :] for n in names]
