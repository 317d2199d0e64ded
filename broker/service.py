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
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from broker import protocol as p
from broker.auth import OPERATOR_TENANT, Principal
from broker.config import Config
from broker.errors import (
    BatchTooLarge,
    InvalidRequest,
    InvalidTimestamp,
    OffsetMetadataTooLarge,
    ShuttingDown,
    TooManyBatches,
    UnknownGroup,
    UnknownPartition,
    UnknownTopic,
)
from broker.groups import GroupCoordinator, StoredOffset
from broker.names import shown, validate_client_id, validate_group, validate_member_id
from broker.producer_ids import ProducerIds
from broker.quotas import Quotas, delayed
from broker.replication import Acks, LocalReplication, Replication
from broker.topics import Topics, partition_for_key
from storage.errors import CorruptData, StorageError
from storage.kv import KV
from storage.log import Log
from storage.partition import Partition

log = logging.getLogger("herald.broker")

# a batch header's record count (u32 LE at byte 20, docs/STORAGE.md): read without parsing
_RECORD_COUNT = struct.Struct("<I")
_RECORD_COUNT_AT = 20


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


# first_timestamp, max_timestamp and producer_id of a batch header (docs/STORAGE.md), read
# at the front door without decoding the rest
_HEAD = struct.Struct("<qqq")
_HEAD_AT = 24
_NO_BOUND = 1 << 63


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
    throttle_ms: int = 0


class BrokerService:
    def __init__(
        self, config: Config, log_: Log, kv: KV, replication: Replication | None = None
    ) -> None:
        self.config = config
        self.log = log_
        self.kv = kv
        self.replication: Replication = replication or LocalReplication()
        self.quotas = Quotas(config.quotas)
        self.topics = Topics(config, log_, kv, self.quotas)
        self.producer_ids = ProducerIds(
            kv, self.quotas, expiration_ms=config.quotas.producer_id_expiration_ms
        )
        self._round_robin: dict[str, itertools.count[int]] = {}
        g = config.groups
        self.groups = GroupCoordinator(
            kv,
            self.topics.partition_count_in,
            clock_ms=monotonic_ms,
            wall_ms=now_ms,
            quotas=self.quotas,
            min_session_timeout_ms=g.min_session_timeout_ms,
            max_session_timeout_ms=g.max_session_timeout_ms,
            default_session_timeout_ms=g.default_session_timeout_ms,
            default_assignor=g.default_assignor,
            max_members=g.max_members,
            offsets_retention_ms=g.offsets_retention_ms,
        )
        self.topics.on_change = self.groups.topics_changed
        t = config.topics
        self._ts_after = t.timestamp_after_max_ms
        self._ts_before = (
            _NO_BOUND if t.timestamp_before_max_ms is None else t.timestamp_before_max_ms
        )
        # a list in a request naming partitions never needs more entries than the node has
        self._max_listed = config.quotas.node_partitions or _NO_BOUND
        self.stopping = False
        self._stop_waiters: set[asyncio.Future[None]] = set()

    def load_state(self) -> None:
        """Account what the state store holds (offsets, producer ids) to the tenants'
        quotas. Blocking, reads whole tables: at start-up, in a worker thread."""
        self.groups.load()
        self.producer_ids.load()

    def expire_producers(self, now: int | None = None) -> tuple[int, int]:
        """Forget producer ids and partitions' producer state idle past the expiration.
        Returns (ids forgotten, partition entries forgotten)."""
        now = now_ms() if now is None else now
        ids = self.producer_ids.expire(now)
        cutoff = now - self.producer_ids.expiration_ms
        entries = sum(part.expire_producers(cutoff) for part in self.log.partitions.values())
        return len(ids), entries

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
    async def create_topic(
        self, principal: Principal, req: p.CreateTopic
    ) -> tuple[p.TopicInfo, bool]:
        principal.require("admin")
        return await self.topics.create(
            principal,
            req.topic,
            partitions=req.partitions,
            retention_ms=req.retention_ms,
            retention_bytes=req.retention_bytes,
            exist_ok=req.exist_ok,
        )

    async def delete_topic(self, principal: Principal, name: str) -> None:
        principal.require("admin")
        owner, local, stored = await self.topics.delete(principal, name)
        self.groups.delete_topic_offsets(owner, local)
        if owner != OPERATOR_TENANT:  # the operator's groups name it by its stored name
            self.groups.delete_topic_offsets(OPERATOR_TENANT, stored)

    def metadata(
        self, principal: Principal, topics: Sequence[str] | None, *, auto_create: bool = False
    ) -> list[p.TopicInfo]:
        """The principal's topics (all, or ``topics``), by its names. With ``auto_create``
        a missing one is created as a produce would: raises
        :class:`~broker.topics.TopicPending` until it is."""
        names = self.topics.names(principal) if topics is None else list(topics)
        out = []
        for name in names:
            stored = self.topics.resolve(principal, name)
            if stored is None and auto_create and "produce" in principal.scopes:
                stored, _n = self.topics.usable(principal, name, produce=True)
            if stored is not None:
                out.append(self.topics.info(stored, name))
            elif topics is not None:
                raise UnknownTopic(f"unknown topic {shown(name)}")
        return out

    def partition(self, principal: Principal, topic: str, index: int) -> Partition:
        stored, n = self.topics.usable(principal, topic, produce=False)
        if not 0 <= index < n:
            raise UnknownPartition(f"topic {shown(topic)} has partitions 0..{n - 1}, not {index}")
        return self.log.partition(stored, index)

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
        is not acceptable (scope, limits, timestamps, producer ids, unknown partition,
        stopping); raises :class:`~broker.topics.TopicPending` while the topic is being
        auto-created. Over the tenant's produce rate, the ``ack`` is delayed by the
        throttle time (``throttle_ms``)."""
        principal.require("produce")
        if self.stopping:
            raise ShuttingDown("the node is shutting down")
        size = self.check_batches(batches)
        self.check_headers(principal, batches)
        stored, n = self.topics.usable(principal, topic, produce=True)
        if partition is None:
            if key is not None:
                partition = partition_for_key(key, n)
            else:
                rr = self._round_robin.get(stored)
                if rr is None:
                    rr = self._round_robin[stored] = itertools.count()
                partition = next(rr) % n
        elif not 0 <= partition < n:
            raise UnknownPartition(
                f"topic {shown(topic)} has partitions 0..{n - 1}, not {partition}"
            )
        appended = self.append(stored, partition, batches, acks)
        usage = self.quotas.tenants.get(principal.tenant) or self.quotas.of(principal.tenant)
        usage.produced_bytes += size
        if usage.produce is not None:
            delay = self.quotas.throttle(usage, usage.produce, size, "produce")
            if delay:
                appended.ack = delayed(appended.ack, delay)
                appended.throttle_ms = int(delay * 1000)
        return appended

    def check_headers(self, principal: Principal, batches: Sequence[bytes]) -> None:
        """Timestamps within the bounds around the node's clock, producer ids issued to
        this tenant. One header read per batch; nothing decoded."""
        now = time.time_ns() // 1_000_000
        lo = now - self._ts_before
        hi = now + self._ts_after
        unpack = _HEAD.unpack_from
        for b in batches:
            try:
                first, last, pid = unpack(b, _HEAD_AT)
            except struct.error:
                continue  # too short for a header: the partition refuses it as corrupt
            if not lo <= first <= last <= hi:
                raise InvalidTimestamp(
                    f"batch timestamps [{first}, {last}] are outside [{lo}, {hi}]: more than "
                    f"topics.timestamp-after-max-ms={self._ts_after} ahead of the node's "
                    f"clock, or more than topics.timestamp-before-max-ms behind it",
                    field=f"batches[{list(batches).index(b)}]",
                )
            if pid >= 0:
                self.producer_ids.check(principal.tenant, pid, now)

    def check_batches(self, batches: Sequence[bytes]) -> int:
        """The request limits every append obeys, whoever built the batches. Returns the
        batches' total size."""
        limits = self.config.limits
        if len(batches) > limits.max_batches_per_request:
            raise TooManyBatches(
                f"{len(batches)} batches exceed max_batches_per_request="
                f"{limits.max_batches_per_request}",
                field="batches",
            )
        size = 0
        cap = limits.max_batch_bytes
        max_records = limits.max_records_per_batch
        for b in batches:
            n = len(b)
            if n > cap:
                raise BatchTooLarge(
                    f"batch of {n} bytes exceeds max_batch_bytes={cap}", field="batches"
                )
            # every reader decodes a batch whole (an HTTP fetch, the SDK), so the records in
            # one bound the work one batch costs them; O(1): the header says how many
            if n >= 24 and _RECORD_COUNT.unpack_from(b, _RECORD_COUNT_AT)[0] > max_records:
                raise BatchTooLarge(
                    f"batch of {_RECORD_COUNT.unpack_from(b, _RECORD_COUNT_AT)[0]} records "
                    f"exceeds max_records_per_batch={max_records}",
                    field="batches",
                )
            size += n
        return size

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
        must not hand it out again: the log may already hold its records), issued to the
        principal's tenant within its ``producer-ids`` quota."""
        principal.require("produce")
        return await self.producer_ids.issue(principal.tenant)

    # ------------------------------------------------------------------------- fetch
    async def fetch_pass(
        self,
        principal: Principal,
        req: p.Fetch,
        found: dict[tuple[str, int], Partition] | None = None,
        *,
        only_data: bool = False,
    ) -> tuple[list[p.FetchedPartition], int, list[Partition]]:
        """One pass over the requested partitions. Returns the results, the bytes found and
        the partitions that had nothing (for a long poll to wait on). Reads within the
        page-cache window are served at once; a read further back (a consumer catching up)
        runs in a worker thread, so the loop never waits on the disk. ``found``: the
        partitions an earlier pass resolved (and authorized), kept there for the next pass
        of a long poll (a closed one is looked up again). ``only_data``: no result for a
        partition with nothing to read and no error (an in-process consumer, which skips
        those anyway: a stage waits on 8-17 partitions and gets one or two)."""
        principal.require("consume")
        budget = min(req.max_bytes, self.config.limits.max_fetch_bytes)
        results: list[p.FetchedPartition] = []
        total = 0
        empty: list[Partition] = []
        for fp in req.partitions:
            part = found.get((fp.topic, fp.partition)) if found is not None else None
            if part is None or part.closed:
                try:
                    part = self.partition(principal, fp.topic, fp.partition)
                except (UnknownTopic, UnknownPartition) as exc:
                    if found is not None:  # a deleted topic's partition is not kept
                        found.pop((fp.topic, fp.partition), None)
                    results.append(
                        p.FetchedPartition(fp.topic, fp.partition, -1, -1, b"", exc.code)
                    )
                    continue
                if found is not None:
                    found[(fp.topic, fp.partition)] = part
            data: bytes | bytearray = b""
            error = None
            resume = -1
            try:
                # a consumer that is caught up asks for the high watermark: nothing to read
                # (a long poll's every pass asks so of each partition it waits on)
                if budget > 0 and fp.offset != part.high_watermark:
                    data = await part.read_async(fp.offset, min(fp.max_bytes, budget))
            except CorruptData as exc:
                error, resume = exc.code, exc.end_offset
            except StorageError as exc:
                error = exc.code
            budget -= len(data)
            total += len(data)
            if not data and error is None:
                empty.append(part)
                if only_data:
                    continue
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

    async def fetch(
        self,
        principal: Principal,
        req: p.Fetch,
        *,
        yield_at_once: bool = False,
        only_data: bool = False,
        resolved: dict[tuple[str, int], Partition] | None = None,
    ) -> tuple[list[p.FetchedPartition], int]:
        """Fetch with long poll: if fewer than ``min_bytes`` are available, wait until a
        partition's high watermark moves or ``max_wait_ms`` passes. Returns the results and
        the throttle time (ms): over its fetch rate, a tenant's fetch first waits out the
        debt of its earlier fetches, before it reads anything. ``yield_at_once``: give the
        loop a turn before answering a fetch that did not wait (an in-process consumer
        that always finds data, catching up, would otherwise never let anything else run;
        one that waited was woken by the loop already). ``only_data``: as for
        :meth:`fetch_pass`. ``resolved``: the caller's own map of the partitions it
        fetched before (one principal's, kept across its fetches: an in-process client),
        filled and used instead of a fresh one per request; for a transport, whose
        principal may lose its rights between requests, None."""
        principal.require("consume")
        usage = self.quotas.of(principal.tenant)
        delay = self.quotas.throttle_fetch(usage)
        if delay:
            await self._sleep(delay)
        max_wait = min(req.max_wait_ms, self.config.limits.max_wait_ms) / 1000
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        found: dict[tuple[str, int], Partition] = {} if resolved is None else resolved
        waited = False
        while True:
            results, total, empty = await self.fetch_pass(
                principal, req, found, only_data=only_data
            )
            remaining = deadline - loop.time()
            if total >= req.min_bytes or remaining <= 0 or not empty or self.stopping:
                self.quotas.fetched(usage, total)
                if yield_at_once and not waited and not delay:
                    await asyncio.sleep(0)
                return results, int(delay * 1000)
            # one future for the whole wait, resolved by the first of: an empty partition's
            # high watermark moving, the node stopping, the deadline (a long poll of a stage
            # waits on every partition it owns: a future and a callback each, and
            # asyncio.wait's bookkeeping, were a good part of a pass's cost)
            woken: asyncio.Future[None] = loop.create_future()
            self._stop_waiters.add(woken)
            for part in empty:
                part.high_watermark_changed(woken)
            timer = loop.call_later(remaining, _wake, woken)
            waited = True
            try:
                await woken
            except Exception:  # a partition closing fails its waiters: the next pass looks
                found.clear()  # every partition up again and says why
            finally:
                timer.cancel()
                self._stop_waiters.discard(woken)
                if not woken.done():
                    woken.cancel()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but not past the node's shutdown."""
        if self.stopping:
            return
        stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stop_waiters.add(stop)
        try:
            await asyncio.wait([stop], timeout=seconds)
        finally:
            self._stop_waiters.discard(stop)
            stop.cancel()

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
                raise UnknownTopic(f"unknown topic {shown(t)}")

    def _check_listed(self, count: int, field: str) -> None:
        if count > self._max_listed:
            raise InvalidRequest(
                f"{count} partitions listed; at most {self._max_listed} (quotas.node-partitions)",
                field=field,
            )

    async def join_group(self, principal: Principal, req: p.JoinGroup) -> p.Joined:
        """Join; answered after the group's rebalance, which joins arriving in the same
        loop turn share."""
        principal.require("consume")
        validate_group(req.group)
        validate_client_id(req.client_id)
        if req.member_id is not None:
            validate_member_id(req.member_id)
        self._check_topics(principal, set(req.topics))
        member, group = self.groups.join_nowait(
            principal.qualify_group(req.group),
            req.topics,
            member_id=req.member_id,
            session_timeout_ms=req.session_timeout_ms,
            assignor=req.assignor,
            client_id=req.client_id,
        )
        await self.groups.settled(group)
        assignment = self.groups.grant(group, member)
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
        validate_group(req.group)
        validate_member_id(req.member_id)
        self._check_listed(len(req.owned), "owned")
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
        validate_group(req.group)
        validate_member_id(req.member_id)
        self.groups.leave(principal.qualify_group(req.group), req.member_id)
        return p.Left(id=req.id)

    async def commit_offsets(self, principal: Principal, req: p.CommitOffsets) -> p.Committed:
        """Store the offsets, then sync the state store before answering: an acknowledged
        commit survives a power cut. Concurrent commits share one sync (group commit).
        Every partition must exist (once per commit), the metadata is bounded, and the
        rows count toward the tenant's groups and state-store quotas."""
        n = self.store_offsets(principal, req)
        await self.kv.sync()
        return p.Committed(id=req.id, count=n)

    def store_offsets(self, principal: Principal, req: p.CommitOffsets) -> int:
        """:meth:`commit_offsets` without the sync: the offsets are in the state store (a
        killed process keeps them), durable at its next sync (the node's periodic one at
        the latest, ``storage.offsets-sync-interval-ms``). For the node's own stages, whose
        outputs are durable before they commit: a power cut can only take back their last
        commits, and what is redone carries the same ids. Returns the offsets stored."""
        principal.require("consume")
        validate_group(req.group)
        if req.member_id is not None:
            validate_member_id(req.member_id)
        limit = self.config.groups.max_commit_metadata_bytes
        if len(req.metadata) > limit or len(req.metadata.encode()) > limit:
            raise OffsetMetadataTooLarge(
                f"commit metadata of {len(req.metadata.encode())} bytes exceeds "
                f"groups.max-commit-metadata-bytes={limit}",
                field="metadata",
            )
        self._check_listed(len(req.offsets), "offsets")
        seen: set[tuple[str, int]] = set()
        tenant = principal.tenant
        for i, (topic, partition, offset) in enumerate(req.offsets):
            n = self.topics.partition_count_in(tenant, topic)
            if n is None:
                raise UnknownTopic(f"unknown topic {shown(topic)} (offsets[{i}])")
            if not 0 <= partition < n:
                raise UnknownPartition(
                    f"topic {shown(topic)} has partitions 0..{n - 1}, not {partition}",
                    field=f"offsets[{i}]",
                )
            if offset < 0:
                raise InvalidRequest("offsets must not be negative", field=f"offsets[{i}]")
            if (topic, partition) in seen:
                raise InvalidRequest(
                    f"{shown(topic)}/{partition} appears twice", field=f"offsets[{i}]"
                )
            seen.add((topic, partition))
        return self.groups.commit(
            principal.qualify_group(req.group),
            req.offsets,
            member_id=req.member_id,
            metadata=req.metadata,
        )

    def fetch_offsets(self, principal: Principal, req: p.FetchOffsets) -> p.OffsetsFetched:
        principal.require("consume")
        validate_group(req.group)
        coord = self.groups
        qname = principal.qualify_group(req.group)
        if req.partitions is None:
            found = [
                p.CommittedOffset(t, i, o.offset, o.metadata)
                for t, i, o in coord.group_offsets(qname)
            ]
        else:
            self._check_listed(len(req.partitions), "partitions")
            found = []
            for t, i in req.partitions:
                o = coord.committed(qname, t, i)
                found.append(
                    p.CommittedOffset(t, i, o.offset if o else -1, o.metadata if o else "")
                )
        return p.OffsetsFetched(id=req.id, offsets=found)

    def describe_group(self, principal: Principal, group: str) -> p.GroupInfo:
        principal.require("consume")
        validate_group(group)
        qname = principal.qualify_group(group)
        g = self.groups.groups.get(qname)
        stored = self.groups.group_offsets(qname)
        if (g is None or not g.members) and not stored:
            raise UnknownGroup(f"unknown group {shown(group)}")
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
            where = self.topics.resolve(principal, t)
            if where is None:
                continue
            for i in range(self.log.topics[where].partitions):
                hw = self.log.partition(where, i).high_watermark
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


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
