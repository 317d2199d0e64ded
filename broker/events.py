"""The event front door: validation, event ids, the idempotency window and placement of events
in the internal ``__events`` topic. ``POST /events`` (HTTP), the ``publish`` op (TCP) and the
node's engines all publish through :class:`EventIntake`.

An event is stored as one record of ``__events`` (JSON, so any consumer can read it) on the
partition of its ``key``, or, without a key, of its tenant and topic: the events of one topic
then keep their publishing order through the fan-out, which is what keeps notifications in
order per (user, topic) (a producer that gives keys takes that on: events of one key keep
their order). Events that arrive together on one partition share one fsync.

Quotas: an event counts toward its tenant's produce rate (a throttled publish is answered
after the throttle time, which the answer reports), and an indexed ``event_id`` toward its
state-store bytes: a publish whose ids would take the tenant past that quota is refused
before anything is appended, so an answer never says "error" for stored events.

Idempotency: an event may carry a producer-chosen ``event_id``; a repeat inside the window
(24 h) is answered with the original partition and offset and not stored again. The promise
behind a ``duplicate`` answer is that the original *is stored*, so:

- an id is remembered only once its event is durable (until then a repeat waits for the
  original's outcome and shares it: stored, or the same error, so a retry after a failure is
  stored, never wrongly answered as a duplicate);
- the index (LMDB) is not synced per event: it can be rebuilt from the log. Each partition's
  *mark* (the offset below which every event's id is in the index) is written before each
  periodic sync of the state store; on start :meth:`EventIntake.recover` reads the log from
  the marks to the end and re-indexes what a power cut took from the index.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import msgspec

from broker import protocol as p
from broker.auth import NODE_PRINCIPAL, Principal
from broker.config import Config
from broker.errors import InvalidRequest, PayloadTooLarge, ShuttingDown
from broker.idempotency import EventIds, SeenEvent, row_estimate
from broker.quotas import TenantUsage, delayed
from broker.service import BrokerService
from broker.topics import EVENTS_TOPIC, partition_for_key
from storage import records
from storage.errors import StorageError

log = logging.getLogger("herald.events")

_UUID: Final = re.compile(r"^[0-9a-fA-F-]{8,64}$")
# the records section of a batch: msgpack array header + per-record framing; a generous bound
_RECORD_OVERHEAD: Final = 64


class EventIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, gc=False):
    """An event as a producer publishes it (``payload`` is any JSON value). Not tracked by
    the cycle collector (``gc=False``: decoded JSON cannot form a cycle): a batch of many
    small events would otherwise trigger collections while it is decoded."""

    topic: str
    payload: msgspec.Raw
    event_id: str | None = None
    key: str | None = None
    users: list[str] | None = None
    priority: Literal["low", "normal", "high", "critical"] = "normal"
    metadata: dict[str, str] | None = None
    # the notifications core (docs/NOTIFY.md): who, when, and how to call it off
    broadcast: bool = False
    cancellation_key: str | None = None
    category: str | None = None
    deliver_at: str | None = None  # RFC 3339 with an offset or Z
    data: msgspec.Raw | None = None  # for templates and conditions; else the payload is


class EventBatchIn(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    events: list[EventIn]


class StoredEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The record value written to ``__events``."""

    event_id: str
    tenant: str
    topic: str
    payload: msgspec.Raw
    received_ms: int
    priority: str = "normal"
    key: str | None = None
    users: list[str] | None = None
    metadata: dict[str, str] | None = None
    # the producer chose event_id: index it for the idempotency window
    dedupe: bool = False
    broadcast: bool = False
    cancellation_key: str | None = None
    category: str | None = None
    deliver_at_ms: int | None = None
    data: msgspec.Raw | None = None


class _IdOnly(msgspec.Struct):
    """What re-indexing reads of a stored event."""

    event_id: str
    tenant: str
    received_ms: int
    dedupe: bool = False


class EventResult(msgspec.Struct, omit_defaults=True):
    event_id: str
    partition: int
    offset: int
    duplicate: bool = False
    throttle_ms: int = 0  # set on a single event's answer only (a batch reports it once)


@dataclass(slots=True)
class Accepted:
    """Events validated and appended: the ``results`` to answer with once ``ack`` resolves
    (at once if None; it fails with the storage error if the append does) and how many
    ``events`` were stored (duplicates excluded)."""

    results: list[EventResult]
    events: int
    ack: asyncio.Future[None] | None
    throttle_ms: int = 0


class EventIdGenerator:
    """Random (version 4) UUIDs as strings, made :data:`_BATCH` at a time: one
    ``os.urandom`` call, the version and variant bits set for all of them by two
    ``bytes.translate`` calls over strided slices, one ``hex``, then one f-string of five
    slices per id; :meth:`next` pops one (643-665 ns a call, against 709-751 when each id
    was formatted on its own with its bits set in Python, in a loop of 400,000 calls)."""

    _BATCH = 4096

    def __init__(self) -> None:
        self._ids: list[str] = []

    def next(self) -> str:
        ids = self._ids
        if not ids:
            ids = self._ids = self._draw(self._BATCH)
        return ids.pop()

    @staticmethod
    def _draw(n: int) -> list[str]:
        raw = bytearray(os.urandom(16 * n))
        # the version nibble becomes 4; the variant's two high bits 10 (RFC 4122), keeping
        # the two random low bits: 122 random bits, as uuid.uuid4()
        raw[6::16] = raw[6::16].translate(_VERSION_4)
        raw[8::16] = raw[8::16].translate(_RFC_4122)
        h = raw.hex()
        return [
            f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-{h[i + 12 : i + 16]}-{h[i + 16 : i + 20]}-"
            f"{h[i + 20 : i + 32]}"
            for i in range(0, 32 * n, 32)
        ]


_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))
_RFC_4122 = bytes((b & 0x3F) | 0x80 for b in range(256))


class _Prepared:
    __slots__ = ("event_id", "index", "key", "partition", "value")

    def __init__(
        self, index: int, event_id: str, key: str | None, value: bytes, partition: int
    ) -> None:
        self.index = index
        self.event_id = event_id
        self.key = key
        self.value = value
        self.partition = partition


class EventIntake:
    """Publishes events into ``__events``; owns the idempotency index and its recovery."""

    IDEMPOTENCY_WINDOW_MS = 24 * 3600 * 1000

    def __init__(self, config: Config, service: BrokerService) -> None:
        self.config = config
        self.service = service
        self.quotas = service.quotas
        self.ids = EventIds(service.kv, self.IDEMPOTENCY_WINDOW_MS, service.quotas)
        # per tenant: state-store bytes the ids of appended, not yet durable events will take
        self._reserved: dict[str, int] = {}
        self._gen = EventIdGenerator()
        self._enc = msgspec.json.Encoder()
        self._event_dec = msgspec.json.Decoder(EventIn)
        self._batch_dec = msgspec.json.Decoder(EventBatchIn)
        self._id_dec = msgspec.json.Decoder(_IdOnly)
        # producer-chosen ids whose events are appended but not yet durable:
        # (tenant, id) -> (placement, the append's ack)
        self._inflight: dict[tuple[str, str], tuple[EventResult, asyncio.Future[None]]] = {}
        # per partition: every event below this offset is indexed (or needs no index)
        self._indexed: dict[int, int] = {}
        self._saved_marks: dict[int, int] | None = None  # as last written (None: not yet)
        # durable appends whose ids are not written yet: (partition, end, rows)
        self._to_index: list[tuple[int, int, list[tuple[str, str, SeenEvent]]]] = []
        # partitions with ids whose write failed: their marks stay put until a restart
        self._unindexed: set[int] = set()

    @property
    def partitions(self) -> int:
        return self.service.log.topics[EVENTS_TOPIC].partitions

    def start(self) -> None:
        """Create ``__events`` if needed and load the marks."""
        self.service.topics.ensure_internal(EVENTS_TOPIC, self.config.topics.events_partitions)
        self._indexed = self.ids.marks()
        self._saved_marks = dict(self._indexed)

    # ------------------------------------------------------------------------ publish
    def decode_one(self, body: bytes) -> EventIn:
        if not body:
            raise InvalidRequest("a JSON body is required")
        return self._event_dec.decode(body)

    def decode_many(self, body: bytes) -> list[EventIn]:
        if not body:
            raise InvalidRequest("a JSON body is required")
        return self._batch_dec.decode(body).events

    def publish(self, principal: Principal, events: Sequence[EventIn], *, batch: bool) -> Accepted:
        """Validate, append and return what to answer once durable. ``batch`` names fields
        ``events[i].…`` in errors. Nothing is appended if any event is invalid."""
        principal.require("produce")
        if self.service.stopping:
            raise ShuttingDown("the node is shutting down")
        limit = self.config.limits.max_events_per_batch
        if not events:
            raise InvalidRequest("events must not be empty", field="events")
        if len(events) > limit:
            raise PayloadTooLarge(
                f"{len(events)} events exceed max_events_per_batch={limit}", field="events"
            )
        now = time.time_ns() // 1_000_000
        tenant = principal.tenant
        if len(events) == 1:
            return self._publish_one(tenant, events[0], now, batch)
        results: list[EventResult | None] = [None] * len(events)
        waits: list[asyncio.Future[None]] = []
        fresh: list[_Prepared] = []
        chosen_here: set[str] = set()
        for i, ev in enumerate(events):
            where = f"events[{i}]." if batch else ""
            prepared = self._prepare(tenant, ev, now, i, where)
            if isinstance(prepared, tuple):  # a repeat of a stored or in-flight event
                results[i], wait = prepared
                if wait is not None:
                    waits.append(wait)
                continue
            if ev.event_id is not None:
                if prepared.event_id in chosen_here:
                    raise InvalidRequest(
                        f"event_id {prepared.event_id} appears twice in the batch",
                        field=f"{where}event_id",
                    )
                chosen_here.add(prepared.event_id)
            fresh.append(prepared)
        usage = self.quotas.tenants.get(tenant) or self.quotas.of(tenant)
        if chosen_here and not usage.exempt:
            # the ids will be indexed once durable: refuse now, before anything is stored,
            # rather than store events whose ids cannot be kept
            reserved = self._reserved.get(tenant, 0)
            self.quotas.admit(
                usage,
                "state_store_bytes",
                reserved + len(chosen_here) * row_estimate(tenant),
                field="events" if batch else "event_id",
            )
        if fresh:
            waits.extend(self._append(tenant, fresh, chosen_here, results, now))
        ack: asyncio.Future[None] | None = None
        if len(waits) == 1:
            ack = waits[0]
        elif waits:
            ack = asyncio.ensure_future(_all(waits))
        size = 0
        for e in fresh:
            size += len(e.value)
        ack, throttle_ms = self._charge(usage, size, ack)
        done = [r for r in results if r is not None]
        assert len(done) == len(results)
        return Accepted(done, len(fresh), ack, throttle_ms)

    def _publish_one(self, tenant: str, ev: EventIn, now: int, batch: bool) -> Accepted:
        """:meth:`publish` of one event (``POST /events``), the same steps without the
        bookkeeping a batch needs (placements per partition, repeats within the batch)."""
        prepared = self._prepare(tenant, ev, now, 0, "events[0]." if batch else "")
        if isinstance(prepared, tuple):  # a repeat of a stored or in-flight event
            result, wait = prepared
            return Accepted([result], 0, wait)
        usage = self.quotas.tenants.get(tenant) or self.quotas.of(tenant)
        chosen = ev.event_id is not None
        if chosen and not usage.exempt:
            self.quotas.admit(
                usage,
                "state_store_bytes",
                self._reserved.get(tenant, 0) + row_estimate(tenant),
                field="events" if batch else "event_id",
            )
        batches = self._batches([prepared], now)
        self.service.check_batches(batches)
        results: list[EventResult | None] = [None]
        ids = (prepared.event_id,) if chosen else ()
        ack = self._append_partition(
            tenant, prepared.partition, [prepared], batches, ids, results, now
        )
        ack, throttle_ms = self._charge(usage, len(prepared.value), ack)
        assert results[0] is not None
        return Accepted([results[0]], 1, ack, throttle_ms)

    def _charge(
        self, usage: TenantUsage, size: int, ack: asyncio.Future[None] | None
    ) -> tuple[asyncio.Future[None] | None, int]:
        """Count ``size`` produced bytes; the ack, delayed by the produce quota's throttle,
        and the throttle in ms."""
        usage.produced_bytes += size
        if usage.produce is not None and size:
            delay = self.quotas.throttle(usage, usage.produce, size, "produce")
            if delay:
                return delayed(ack, delay), int(delay * 1000)
        return ack, 0

    def _prepare(
        self, tenant: str, ev: EventIn, now: int, index: int, where: str
    ) -> _Prepared | tuple[EventResult, asyncio.Future[None] | None]:
        if not ev.topic or len(ev.topic) > 200:
            raise InvalidRequest("topic must be 1-200 characters", field=where + "topic")
        chosen = ev.event_id is not None
        if ev.event_id is not None:
            if not _UUID.match(ev.event_id):
                raise InvalidRequest(
                    "event_id must be a UUID (8-64 hex digits and dashes)",
                    field=where + "event_id",
                )
            event_id = ev.event_id.lower()
            seen = self.ids.get(tenant, event_id, now)
            if seen is not None:
                return EventResult(event_id, seen.partition, seen.offset, True), None
            inflight = self._inflight.get((tenant, event_id))
            if inflight is not None:
                first, ack = inflight
                if ack.done() and not ack.cancelled() and ack.exception() is None:
                    # durable, its id not written yet (_index_durable)
                    return EventResult(event_id, first.partition, first.offset, True), None
                return EventResult(event_id, first.partition, first.offset, True), ack
        else:
            event_id = self._gen.next()
        deliver_at_ms = None
        if ev.deliver_at is not None:
            deliver_at_ms = _rfc3339_ms(ev.deliver_at)
            if deliver_at_ms is None:
                raise InvalidRequest(
                    "deliver_at must be an RFC 3339 time with an offset or Z",
                    field=where + "deliver_at",
                )
        if ev.cancellation_key is not None and not 1 <= len(ev.cancellation_key) <= 256:
            raise InvalidRequest(
                "cancellation_key must be 1-256 characters", field=where + "cancellation_key"
            )
        if ev.users is not None and len(ev.users) > self.config.limits.max_events_per_batch:
            raise PayloadTooLarge(
                f"{len(ev.users)} users exceed {self.config.limits.max_events_per_batch}; "
                "subscribe them to a topic instead",
                field=where + "users",
            )
        value = self._enc.encode(
            StoredEvent(
                event_id=event_id,
                tenant=tenant,
                topic=ev.topic,
                payload=ev.payload,
                received_ms=now,
                priority=ev.priority,
                key=ev.key,
                users=ev.users,
                metadata=ev.metadata,
                dedupe=chosen,
                broadcast=ev.broadcast,
                cancellation_key=ev.cancellation_key,
                category=ev.category,
                deliver_at_ms=deliver_at_ms,
                data=ev.data,
            )
        )
        limit = self.config.limits.max_event_bytes
        if len(value) > limit:
            raise PayloadTooLarge(
                f"event of {len(value)} bytes (as stored) exceeds max_event_bytes={limit}",
                field=where + ("payload" if len(ev.payload) > limit // 2 else "event"),
            )
        key = ev.key.encode() if ev.key else f"{tenant}\0{ev.topic}".encode()
        return _Prepared(index, event_id, ev.key, value, partition_for_key(key, self.partitions))

    def _append(
        self,
        tenant: str,
        fresh: list[_Prepared],
        chosen: set[str],
        results: list[EventResult | None],
        now: int,
    ) -> list[asyncio.Future[None]]:
        by_partition: dict[int, list[_Prepared]] = {}
        for e in fresh:
            by_partition.setdefault(e.partition, []).append(e)
        batches = {part: self._batches(items, now) for part, items in by_partition.items()}
        for bs in batches.values():
            self.service.check_batches(bs)  # every limit before any append
        waits = []
        for part, items in by_partition.items():
            ack = self._append_partition(tenant, part, items, batches[part], chosen, results, now)
            if ack is not None:
                waits.append(ack)
        return waits

    def _append_partition(
        self,
        tenant: str,
        part: int,
        items: list[_Prepared],
        batches: list[bytes],
        chosen: Collection[str],
        results: list[EventResult | None],
        now: int,
    ) -> asyncio.Future[None] | None:
        """Append ``items`` (already checked as ``batches``) to partition ``part`` of
        ``__events``; fills their ``results``; keeps the producer-``chosen`` ids in flight
        until durable, then indexed. The append's ack, None if it is already durable."""
        appended = self.service.append(EVENTS_TOPIC, part, batches, -1)
        rows: list[tuple[str, str, SeenEvent]] = []
        for j, e in enumerate(items):
            result = EventResult(e.event_id, part, appended.base_offset + j)
            results[e.index] = result
            if chosen and e.event_id in chosen:
                rows.append((tenant, e.event_id, SeenEvent(part, result.offset, now)))
        end = appended.last_offset + 1
        ack = appended.ack
        if rows:  # released by _index_durable, or by a failed append's done-callback
            self._reserve(tenant, len(rows) * row_estimate(tenant))
        if ack is None:  # already durable (cannot happen for a new append; be safe)
            self._to_index.append((part, end, rows))
            self._index_durable()
            return None
        for _t, eid, seen in rows:
            self._inflight[(tenant, eid)] = (EventResult(eid, part, seen.offset), ack)
        ack.add_done_callback(self._on_durable(part, end, rows))
        return ack

    def _batches(self, items: list[_Prepared], now: int) -> list[bytes]:
        """Records in batches of at most ``max_batch_bytes`` (an event is smaller)."""
        cap = self.config.limits.max_batch_bytes - records.HEADER_SIZE
        out: list[bytes] = []
        rows: list[records.RecordInput] = []
        size = 0
        for e in items:
            need = len(e.value) + len(e.key or e.event_id) + _RECORD_OVERHEAD
            if rows and size + need > cap:
                out.append(records.encode_batch(rows, first_timestamp=now))
                rows, size = [], 0
            rows.append((0, (e.key or e.event_id).encode(), e.value))
            size += need
        out.append(records.encode_batch(rows, first_timestamp=now))
        return out

    def _on_durable(
        self, partition: int, end: int, rows: list[tuple[str, str, SeenEvent]]
    ) -> Callable[[asyncio.Future[None]], None]:
        def done(fut: asyncio.Future[None]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                # not stored: forget the ids, so that a retry of the same id stores it
                for tenant, eid, _seen in rows:
                    self._inflight.pop((tenant, eid), None)
                if rows:
                    self._reserve(rows[0][0], -len(rows) * row_estimate(rows[0][0]))
                return
            to_index = self._to_index
            if not rows and not to_index:
                # no producer-chosen id and none waiting to be written: only the mark moves
                # (queued behind waiting ids, it must not pass them: _index_durable moves it)
                if partition not in self._unindexed and end > self._indexed.get(partition, 0):
                    self._indexed[partition] = end
                return
            # durable: indexed with every other append of this loop turn in one LMDB
            # transaction (a flush round resolves many appends' acks at once); until
            # then they stay in flight, so a repeat is still answered as a duplicate
            if not to_index:
                asyncio.get_running_loop().call_soon(self._index_durable)
            to_index.append((partition, end, rows))

        return done

    def _index_durable(self) -> None:
        """Loop: write the ids of the appends made durable since the last call."""
        done, self._to_index = self._to_index, []
        rows = [row for _p, _e, part_rows in done for row in part_rows]
        if rows:
            try:
                self.ids.put_many(rows)
            except Exception:
                # the events are stored and acknowledged; only their index entries are
                # missing. The marks stay behind them: the next start re-indexes them
                log.exception("event=event_index_failed appends=%d", len(done))
                # and no mark moves past them before that start, not even by later appends
                self._unindexed.update(p for p, _e, _r in done)
            finally:
                for tenant, eid, _seen in rows:
                    self._inflight.pop((tenant, eid), None)
                for tenant, nbytes in _reservations(rows).items():
                    self._reserve(tenant, -nbytes)
        for partition, end, _rows in done:
            if partition not in self._unindexed and end > self._indexed.get(partition, 0):
                self._indexed[partition] = end

    def _reserve(self, tenant: str, nbytes: int) -> None:
        left = self._reserved.get(tenant, 0) + nbytes
        if left > 0:
            self._reserved[tenant] = left
        else:
            self._reserved.pop(tenant, None)

    # ---------------------------------------------------------------- index upkeep
    def save_marks(self) -> None:
        """Write the marks; called before each periodic sync of the state store, so a synced
        mark never runs ahead of the index rows below it."""
        if self._indexed == self._saved_marks:
            return  # unchanged: no write (and so no sync) on an idle node
        try:
            marks = dict(self._indexed)
            self.ids.put_marks(marks)
            self._saved_marks = marks
        except StorageError as exc:
            # a full state store: the marks stay where they were (a restart re-indexes a
            # little more); nothing acknowledged depends on them, so the node keeps serving
            log.error("event=event_index_marks_not_saved error=%r", exc)

    async def recover(self) -> int:
        """Re-index the ids of events stored past each partition's mark (what a power cut
        may have taken from the index). Returns how many ids were re-indexed."""
        now = time.time_ns() // 1_000_000
        restored = 0
        for part in range(self.partitions):
            offset = self._indexed.get(part, 0)
            while True:
                results, _size, _empty = await self.service.fetch_pass(
                    NODE_PRINCIPAL, _fetch(part, offset)
                )
                (res,) = results
                if res.error == "offset_out_of_range" and offset < res.log_start_offset:
                    offset = res.log_start_offset
                    continue
                if res.error is not None or not res.records:
                    break
                rows: list[tuple[str, str, SeenEvent]] = []
                data = res.records
                for pos, header in records.iter_batches(data):
                    batch = data[pos : pos + header.batch_length]
                    for i, rec in enumerate(records.decode_records(batch, header)):
                        off = header.base_offset + i
                        if off < offset or rec.value is None:
                            continue
                        ev = self._id_dec.decode(rec.value)
                        if ev.dedupe and now - ev.received_ms < self.IDEMPOTENCY_WINDOW_MS:
                            seen = SeenEvent(part, off, ev.received_ms)
                            rows.append((ev.tenant, ev.event_id, seen))
                    offset = max(offset, header.base_offset + header.record_count)
                if rows:
                    try:
                        self.ids.put_many(rows)
                    except StorageError as exc:
                        # the state store is full: start anyway (the events are stored;
                        # only their dedupe is missing); the mark stays, so a later start
                        # with room tries again
                        log.error(
                            "event=event_ids_reindex_failed partition=%d offset=%d error=%r",
                            part,
                            offset,
                            exc,
                        )
                        break
                    restored += len(rows)
                self._indexed[part] = offset
        if restored:
            log.warning("event=event_ids_reindexed count=%d", restored)
        self.save_marks()
        return restored

    def sweep(self, now_ms: int) -> int:
        return self.ids.sweep(now_ms)


def _reservations(rows: list[tuple[str, str, SeenEvent]]) -> dict[str, int]:
    """Per tenant, the state-store bytes reserved for ``rows`` while they were in flight."""
    count: dict[str, int] = {}
    for tenant, _eid, _seen in rows:
        count[tenant] = count.get(tenant, 0) + 1
    return {tenant: n * row_estimate(tenant) for tenant, n in count.items()}


def _rfc3339_ms(text: str) -> int | None:
    """Unix ms of an RFC 3339 time that carries its offset (or Z); None otherwise."""
    if len(text) > 64:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return int(when.timestamp() * 1000)


def _fetch(partition: int, offset: int) -> p.Fetch:
    return p.Fetch(
        id=0, partitions=[p.FetchPartition(EVENTS_TOPIC, partition, offset, 4 * 1024 * 1024)]
    )


async def _all(waits: list[asyncio.Future[None]]) -> None:
    """Wait for every future; fail with the first failure (after all are done, so none is
    left with an unretrieved exception)."""
    outcomes = await asyncio.gather(*waits, return_exceptions=True)
    for o in outcomes:
        if isinstance(o, BaseException):
            raise o
