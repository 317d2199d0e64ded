"""The broker's operations, independent of the wire: the TCP server and the HTTP API both
call these with an authenticated :class:`Principal`.

Everything here runs on the event loop. The produce path is synchronous up to the page
cache (validate, stamp, write); waiting for durability is the caller's choice, so the TCP
layer can answer pipelined requests from callbacks without a task per request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Literal, cast

import msgspec

from broker import protocol as p
from broker.auth import Forbidden, Principal
from broker.config import Config
from broker.groups import GroupCoordinator, StoredOffset, UnknownGroup
from broker.topics import (
    EVENTS_TOPIC,
    InvalidTopic,
    TopicOwner,
    is_internal,
    partition_for_key,
    validate_topic_name,
)
from storage.errors import OffsetOutOfRange, StorageError
from storage.kv import KV
from storage.log import Log, TopicExists, UnknownTopic
from storage.partition import AppendResult, Partition

log = logging.getLogger("herald.broker")


class UnknownPartition(Exception):
    code = "unknown_partition"


class BadRequest(Exception):
    """A request that is well-formed on the wire but not acceptable (limits, values)."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class Counter(msgspec.Struct, array_like=True):
    value: int


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class BrokerService:
    def __init__(self, config: Config, log_: Log, kv: KV) -> None:
        self.config = config
        self.log = log_
        self.kv = kv
        self._owners = kv.table("topic_owners", TopicOwner)
        self._owner_cache: dict[str, str | None] = {}  # read on every request: keep off LMDB
        self._counters = kv.table("counters", Counter)
        self._round_robin: dict[str, itertools.count[int]] = {}
        g = config.groups
        self.groups = GroupCoordinator(
            kv,
            self._partition_count,
            clock_ms=monotonic_ms,
            wall_ms=now_ms,
            min_session_timeout_ms=g.min_session_timeout_ms,
            max_session_timeout_ms=g.max_session_timeout_ms,
            default_session_timeout_ms=g.default_session_timeout_ms,
            default_assignor=g.default_assignor,
        )
        self.stopping = False
        self._stop_waiters: set[asyncio.Future[None]] = set()

    def stop(self) -> None:
        """Refuse new work and answer every parked long poll now: shutdown must not wait
        out their ``max_wait_ms``."""
        self.stopping = True
        for fut in self._stop_waiters:
            if not fut.done():
                fut.set_result(None)

    # ------------------------------------------------------------------------ topics
    def _partition_count(self, topic: str) -> int | None:
        meta = self.log.topics.get(topic)
        return meta.partitions if meta else None

    def owner_of(self, topic: str) -> str | None:
        try:
            return self._owner_cache[topic]
        except KeyError:
            owner = self._owners.get(topic)
            tenant = self._owner_cache[topic] = owner.tenant if owner else None
            return tenant

    def _set_owner(self, topic: str, tenant: str | None) -> None:
        if tenant is None:
            self._owners.delete(topic)
        else:
            self._owners.put(topic, TopicOwner(tenant))
        self._owner_cache[topic] = tenant

    def visible(self, principal: Principal, topic: str) -> bool:
        if topic not in self.log.topics:
            return False
        if principal.operator:
            return True
        if is_internal(topic):
            return False
        return self.owner_of(topic) == principal.tenant

    def ensure_internal_topics(self) -> None:
        if EVENTS_TOPIC not in self.log.topics:
            self.log.create_topic(
                EVENTS_TOPIC,
                self.config.topics.events_partitions,
                self.config.partition_config(),
                internal=True,
            )
            self._set_owner(EVENTS_TOPIC, "*")

    def create_topic(
        self,
        principal: Principal,
        name: str,
        *,
        partitions: int | None = None,
        retention_ms: int | None = None,
        retention_bytes: int | None = None,
        exist_ok: bool = False,
    ) -> tuple[p.TopicInfo, bool]:
        principal.require("admin")
        validate_topic_name(name)
        n = self.config.topics.partitions if partitions is None else partitions
        if not 1 <= n <= 10_000:
            raise BadRequest("invalid_request", "partitions must be in [1, 10000]", "partitions")
        for fld, val in (("retention_ms", retention_ms), ("retention_bytes", retention_bytes)):
            if val is not None and val <= 0:
                raise BadRequest("invalid_request", f"{fld} must be positive", fld)
        if name in self.log.topics:
            if exist_ok and self.visible(principal, name):
                return self.topic_info(name), False
            raise TopicExists(f"topic {name!r} already exists")
        cfg = self.config.partition_config(
            retention_ms=retention_ms if retention_ms is not None else "default",
            retention_bytes=retention_bytes if retention_bytes is not None else "default",
        )
        self._set_owner(name, principal.tenant)
        self.log.create_topic(name, n, cfg)
        self.groups.topics_changed()
        log.info("event=topic_created topic=%s partitions=%d tenant=%s", name, n, principal.tenant)
        return self.topic_info(name), True

    async def delete_topic(self, principal: Principal, name: str) -> None:
        principal.require("admin")
        if not self.visible(principal, name) or is_internal(name):
            raise UnknownTopic(f"unknown topic {name!r}")
        await self.log.delete_topic(name)
        self._set_owner(name, None)
        self.groups.delete_topic_offsets(name)
        self.groups.topics_changed()
        log.info("event=topic_deleted topic=%s tenant=%s", name, principal.tenant)

    def topic_info(self, name: str) -> p.TopicInfo:
        meta = self.log.topics[name]
        parts = []
        for i in range(meta.partitions):
            part = self.log.partition(name, i)
            parts.append(
                p.PartitionInfo(
                    partition=i,
                    leader=self.config.node_id,
                    log_start_offset=part.log_start_offset,
                    high_watermark=part.high_watermark,
                    size_bytes=part.size_bytes,
                    segments=len(part.segments),
                )
            )
        return p.TopicInfo(
            name=name,
            partitions=parts,
            internal=meta.internal,
            retention_ms=meta.config.retention_ms,
            retention_bytes=meta.config.retention_bytes,
        )

    def metadata(
        self, principal: Principal, topics: Sequence[str] | None, *, auto_create: bool = False
    ) -> list[p.TopicInfo]:
        names = sorted(self.log.topics) if topics is None else list(topics)
        out = []
        for name in names:
            if auto_create and "produce" in principal.scopes:
                self._topic_for(principal, name, produce=True)
            if self.visible(principal, name):
                out.append(self.topic_info(name))
            elif topics is not None:
                raise UnknownTopic(f"unknown topic {name!r}")
        return out

    def _topic_for(self, principal: Principal, topic: str, *, produce: bool) -> int:
        """Partition count of a topic the principal may use, auto-creating on produce when
        the config allows it."""
        if not self.visible(principal, topic):
            if (
                produce
                and topic not in self.log.topics
                and self.config.topics.auto_create
                and not is_internal(topic)
            ):
                try:
                    validate_topic_name(topic)
                except InvalidTopic:
                    raise UnknownTopic(f"unknown topic {topic!r}") from None
                self._set_owner(topic, principal.tenant)
                self.log.create_topic(
                    topic, self.config.topics.partitions, self.config.partition_config()
                )
                self.groups.topics_changed()
                log.info("event=topic_auto_created topic=%s tenant=%s", topic, principal.tenant)
            else:
                raise UnknownTopic(f"unknown topic {topic!r}")
        return self.log.topics[topic].partitions

    def partition(self, principal: Principal, topic: str, index: int) -> Partition:
        n = self._topic_for(principal, topic, produce=False)
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
    ) -> tuple[int, Partition, AppendResult]:
        """Append to page cache; the caller awaits durability per ``acks``."""
        principal.require("produce")
        if self.stopping:
            raise BadRequest(p.Code.SHUTTING_DOWN, "the node is shutting down")
        limits = self.config.limits
        if len(batches) > limits.max_batches_per_request:
            raise BadRequest(
                p.Code.TOO_MANY_BATCHES,
                f"{len(batches)} batches exceed max_batches_per_request="
                f"{limits.max_batches_per_request}",
                "batches",
            )
        for b in batches:
            if len(b) > limits.max_batch_bytes:
                raise BadRequest(
                    p.Code.BATCH_TOO_LARGE,
                    f"batch of {len(b)} bytes exceeds max_batch_bytes={limits.max_batch_bytes}",
                    "batches",
                )
        n = self._topic_for(principal, topic, produce=True)
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
        part = self.log.partition(topic, partition)
        return partition, part, part.append_nowait(batches)

    def init_producer(self, principal: Principal) -> int:
        principal.require("produce")
        current = self._counters.get("producer_id")
        nxt = (current.value if current else 0) + 1
        self._counters.put("producer_id", Counter(nxt))
        return nxt

    # ------------------------------------------------------------------------- fetch
    async def fetch_pass(
        self, principal: Principal, req: p.Fetch
    ) -> tuple[list[p.FetchedPartition], int, list[Partition]]:
        """One pass over the requested partitions. Returns the results, the bytes found and
        the partitions that had nothing (for a long poll to wait on). Reads within the
        page-cache window are served at once; a read further back (a consumer catching up)
        runs in a worker thread (:meth:`Partition.read_async`), so the loop never waits on
        the disk."""
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
            try:
                if budget > 0:
                    data = await part.read_async(fp.offset, min(fp.max_bytes, budget))
            except OffsetOutOfRange as exc:
                error = exc.code
            except StorageError as exc:
                error = exc.code
            budget -= len(data)
            total += len(data)
            if not data and error is None:
                empty.append(part)
            # msgspec encodes any bytes-like object as bin: pass the read buffer as it is
            records_ = cast(bytes, data)
            results.append(
                p.FetchedPartition(
                    fp.topic,
                    fp.partition,
                    part.high_watermark,
                    part.log_start_offset,
                    records_,
                    error,
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
            if not self.visible(principal, t):
                raise UnknownTopic(f"unknown topic {t!r}")

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


def error_fields(exc: BaseException) -> tuple[str, str, bool]:
    """(code, message, retriable) for an exception raised by an operation."""
    code = getattr(exc, "code", None)
    if isinstance(exc, p.ProtocolError):
        return exc.code, exc.message, False
    if isinstance(code, str):
        return code, str(exc), code in p.RETRIABLE
    if isinstance(exc, Forbidden):
        return p.Code.FORBIDDEN, str(exc), False
    return p.Code.INTERNAL, f"internal error: {type(exc).__name__}", True
