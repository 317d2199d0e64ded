"""The HTTP API (aiohttp): event ingest, raw records, topics and groups admin, health and
metrics. Reference: ``docs/HTTP.md``.

Every error is JSON ``{"error": {"code", "message", "field"}}`` with a 4xx/5xx status; request
bodies are decoded into ``msgspec`` structs, so a bad body names the offending field.

``POST /events`` validates the event, gives it an ``event_id`` (UUID) unless the producer
chose one, appends it durably to the internal ``__events`` topic (partitioned by ``key``; an
event without one goes to the partition the :class:`StickyPartitioner` has open, so the
keyless events of one group-commit round share one fsync) and answers once it is synced;
delivery is asynchronous. A repeated ``event_id`` inside the idempotency window is answered
with the original partition and offset and not appended again.

The two ingest endpoints are also served without aiohttp by ``broker/http_ingest.py`` (the
listener's fast path); both paths call :meth:`HttpApi.accept_event` /
:meth:`HttpApi.accept_batch` and :meth:`HttpApi.error_answer`, so validation, idempotency,
stats and error bodies are the same whichever path served the request.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from aiohttp import web

from broker import protocol as p
from broker.auth import Authenticator, AuthError, Principal
from broker.config import Config
from broker.idempotency import EventIds, SeenEvent
from broker.service import BadRequest, BrokerService, error_fields
from broker.topics import EVENTS_TOPIC, StickyPartitioner, partition_for_key
from storage import records
from storage.errors import CorruptBatch
from storage.partition import Partition

log = logging.getLogger("herald.http")

_STATUS = {
    p.Code.INVALID_REQUEST: 400,
    p.Code.BAD_FRAME: 400,
    p.Code.CORRUPT_BATCH: 400,
    p.Code.INVALID_TOPIC: 400,
    p.Code.TOO_MANY_BATCHES: 413,
    p.Code.BATCH_TOO_LARGE: 413,
    "payload_too_large": 413,
    p.Code.UNAUTHENTICATED: 401,
    p.Code.FORBIDDEN: 403,
    p.Code.UNKNOWN_TOPIC: 404,
    p.Code.UNKNOWN_PARTITION: 404,
    p.Code.UNKNOWN_GROUP: 404,
    "not_found": 404,
    p.Code.TOPIC_EXISTS: 409,
    p.Code.TOPIC_BEING_DELETED: 409,
    p.Code.OFFSET_OUT_OF_RANGE: 416,
    p.Code.OUT_OF_ORDER_SEQUENCE: 409,
    p.Code.STORAGE_FULL: 507,
    p.Code.LOG_OFFLINE: 503,
    p.Code.SHUTTING_DOWN: 503,
    p.Code.TIMEOUT: 504,
}
_FIELD = re.compile(r"at `\$\.?([^`]*)`")
_NAMED_FIELD = re.compile(r"(?:missing required|contains unknown) field `([^`]*)`")
_UUID = re.compile(r"^[0-9a-fA-F-]{8,64}$")


def _field_of(message: str) -> str | None:
    """The path of the field a msgspec validation message is about: ``at `$.a[1]``` gives
    the location, and a missing or unknown field is named only in the message itself."""
    at = _FIELD.search(message)
    path = at.group(1) if at else ""
    named = _NAMED_FIELD.search(message)
    if named:
        path = f"{path}.{named.group(1)}" if path else named.group(1)
    return path or None


class HttpStats:
    """Counters of both HTTP paths (aiohttp and the ingest fast path), read by ``/metrics``."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.events = 0


@dataclass(slots=True)
class Accepted:
    """An ingest request validated and appended: the ``answer`` to send once ``durable`` (None
    when there is nothing to wait for) resolves, and the ``events`` it counts in the stats.
    ``durable`` fails with the storage error (``LogOffline``, ``StorageFull``) if the sync
    does."""

    answer: dict[str, Any]
    events: int
    durable: asyncio.Future[Any] | None


# ---------------------------------------------------------------------------- bodies
class EventIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    topic: str
    payload: msgspec.Raw
    event_id: str | None = None
    key: str | None = None
    users: list[str] | None = None
    priority: Literal["low", "normal", "high", "critical"] = "normal"
    metadata: dict[str, str] | None = None


class EventBatchIn(msgspec.Struct, forbid_unknown_fields=True):
    events: list[EventIn]


class StoredEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The record value written to ``__events`` (JSON, so any consumer can read it)."""

    event_id: str
    tenant: str
    topic: str
    payload: msgspec.Raw
    received_ms: int
    priority: str = "normal"
    key: str | None = None
    users: list[str] | None = None
    metadata: dict[str, str] | None = None


class TopicIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    partitions: int | None = None
    retention_ms: int | None = None
    retention_bytes: int | None = None
    exist_ok: bool = False


class RecordIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    value: str | None = None
    value_b64: str | None = None
    key: str | None = None
    headers: dict[str, str] | None = None
    timestamp: int | None = None


class RecordsIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    records: list[RecordIn]
    partition: int | None = None
    key: str | None = None
    acks: Literal[0, 1, -1] = -1


def _text_or_b64(data: bytes | None) -> tuple[str | None, str]:
    if data is None:
        return None, "none"
    try:
        return data.decode("utf-8"), "utf8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode(), "base64"


class EventIdGenerator:
    """Random (version 4) UUIDs as strings, drawing the randomness for many at once: one
    ``os.urandom`` call per 4096 ids instead of one per id."""

    _BATCH = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> str:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(16 * self._BATCH), 0
        raw = bytearray(self._pool[self._at : self._at + 16])
        self._at += 16
        raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
        h = raw.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class HttpApi:
    IDEMPOTENCY_WINDOW_MS = 24 * 3600 * 1000

    def __init__(self, config: Config, service: BrokerService, auth: Authenticator) -> None:
        self.config = config
        self.service = service
        self.auth = auth
        self.stats = HttpStats()
        self.event_ids = EventIds(service.kv, self.IDEMPOTENCY_WINDOW_MS)
        self._ids = EventIdGenerator()
        self._sticky = StickyPartitioner()
        self._events_partitions: list[Partition] = []
        self._event_dec = msgspec.json.Decoder(EventIn)
        self._batch_dec = msgspec.json.Decoder(EventBatchIn)
        self._enc = msgspec.json.Encoder()
        self.metrics_body: Callable[[], bytes] = lambda: b""

    # ------------------------------------------------------------------- plumbing
    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.limits.max_http_body_bytes,
            middlewares=[self._errors],
        )
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.metrics)
        r.add_post("/events", self.post_event)
        r.add_post("/events/batch", self.post_events_batch)
        r.add_get("/topics", self.list_topics)
        r.add_post("/topics", self.create_topic)
        r.add_get("/topics/{topic}", self.describe_topic)
        r.add_delete("/topics/{topic}", self.delete_topic)
        r.add_post("/topics/{topic}/records", self.produce_records)
        r.add_get("/topics/{topic}/partitions/{partition}/records", self.fetch_records)
        r.add_get("/topics/{topic}/partitions/{partition}/offsets", self.list_offsets)
        r.add_get("/groups", self.list_groups)
        r.add_get("/groups/{group}", self.describe_group)
        return app

    def encode(self, body: Any) -> bytes:
        return self._enc.encode(body)

    def json(self, body: Any, status: int = 200) -> web.Response:
        return web.Response(
            body=self._enc.encode(body), status=status, content_type="application/json"
        )

    def error(self, status: int, code: str, message: str, field: str | None = None) -> web.Response:
        self.stats.errors += 1
        return self.json({"error": {"code": code, "message": message, "field": field}}, status)

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.stats.requests += 1
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
                exc.status, "http_error"
            )
            return self.error(exc.status, code, exc.reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status, body = self.error_answer(exc, request.path)
            return self.json(body, status)

    def error_answer(self, exc: BaseException, path: str) -> tuple[int, dict[str, Any]]:
        """The status and ``{"error": {"code", "message", "field"}}`` body for an exception
        raised while serving ``path``, the same for every HTTP path; counts the error. An
        unexpected exception is logged with its traceback and answered 500."""
        field: str | None = None
        if isinstance(exc, msgspec.ValidationError):
            status, code, message = 400, p.Code.INVALID_REQUEST, str(exc)
            field = _field_of(message)
        elif isinstance(exc, msgspec.DecodeError):
            status, code, message = 400, p.Code.INVALID_REQUEST, f"body is not valid JSON: {exc}"
        elif isinstance(exc, BadRequest):
            status, code, message, field = _STATUS.get(exc.code, 400), exc.code, str(exc), exc.field
        else:
            code, message, _retriable = error_fields(exc)
            status = _STATUS.get(code, 500)
            if status == 500:
                log.error("event=http_error path=%s", path, exc_info=exc)
        self.stats.errors += 1
        return status, {"error": {"code": code, "message": message, "field": field}}

    def principal(self, request: web.Request) -> Principal:
        return self.auth.bearer(request.headers.get("Authorization"))

    async def body(self, request: web.Request) -> bytes:
        if not request.can_read_body:
            raise BadRequest(p.Code.INVALID_REQUEST, "a JSON body is required")
        return await request.read()

    @staticmethod
    def _partition_param(request: web.Request) -> int:
        try:
            return int(request.match_info["partition"])
        except ValueError:
            raise BadRequest(
                p.Code.INVALID_REQUEST, "partition must be an integer", "partition"
            ) from None

    @staticmethod
    def _int_param(request: web.Request, name: str, default: int | None = None) -> int:
        raw = request.query.get(name)
        if raw is None:
            if default is None:
                raise BadRequest(
                    p.Code.INVALID_REQUEST, f"query parameter {name} is required", name
                )
            return default
        try:
            return int(raw)
        except ValueError:
            raise BadRequest(p.Code.INVALID_REQUEST, f"{name} must be an integer", name) from None

    # --------------------------------------------------------------------- health
    async def healthz(self, request: web.Request) -> web.Response:
        svc = self.service
        offline = [part.name for part in svc.log.partitions.values() if part.offline]
        status = "shutting_down" if svc.stopping else ("degraded" if offline else "ok")
        return self.json(
            {
                "status": status,
                "node_id": self.config.node_id,
                "topics": len(svc.log.topics),
                "partitions": len(svc.log.partitions),
                "offline_partitions": offline,
            },
            200 if status == "ok" else 503,
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics_body(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    # --------------------------------------------------------------------- events
    def _prepare_event(
        self, principal: Principal, ev: EventIn, now: int, index: int | None = None
    ) -> tuple[str, int | None, bytes | None, SeenEvent | None]:
        """Validate one event; returns (event_id, partition by key or None without a key,
        value or None if duplicate, original if duplicate)."""
        where = "" if index is None else f"events[{index}]."
        if not ev.topic or len(ev.topic) > 200:
            raise BadRequest(
                p.Code.INVALID_REQUEST, "topic must be 1-200 characters", where + "topic"
            )
        if len(ev.payload) > self.config.limits.max_event_bytes:
            raise BadRequest(
                "payload_too_large",
                f"payload of {len(ev.payload)} bytes exceeds max_event_bytes="
                f"{self.config.limits.max_event_bytes}",
                where + "payload",
            )
        if ev.event_id is not None:
            if not _UUID.match(ev.event_id):
                raise BadRequest(
                    p.Code.INVALID_REQUEST,
                    "event_id must be a UUID (8-64 hex digits and dashes)",
                    where + "event_id",
                )
            event_id = ev.event_id.lower()
            seen = self.event_ids.get(principal.tenant, event_id, now)
            if seen is not None:
                return event_id, seen.partition, None, seen
        else:
            event_id = self._ids.next()
        value = self._enc.encode(
            StoredEvent(
                event_id=event_id,
                tenant=principal.tenant,
                topic=ev.topic,
                payload=ev.payload,
                received_ms=now,
                priority=ev.priority,
                key=ev.key,
                users=ev.users,
                metadata=ev.metadata,
            )
        )
        partition = None
        if ev.key:
            n = self.service.log.topics[EVENTS_TOPIC].partitions
            partition = partition_for_key(ev.key.encode(), n)
        return event_id, partition, value, None

    def _keyless_partition(self, size: int) -> int:
        parts = self._events_partitions
        if not parts:  # __events is internal: never deleted, so its partitions never change
            n = self.service.log.topics[EVENTS_TOPIC].partitions
            parts[:] = [self.service.log.partition(EVENTS_TOPIC, i) for i in range(n)]
        return self._sticky.choose(parts, size)

    async def post_event(self, request: web.Request) -> web.Response:
        return await self._answer(
            self.accept_event(self.principal(request), await self.body(request))
        )

    async def post_events_batch(self, request: web.Request) -> web.Response:
        return await self._answer(
            self.accept_batch(self.principal(request), await self.body(request))
        )

    async def _answer(self, accepted: Accepted) -> web.Response:
        if accepted.durable is not None:
            await accepted.durable
        self.stats.events += accepted.events
        return self.json(accepted.answer)

    def accept_event(self, principal: Principal, body: bytes) -> Accepted:
        """``POST /events``: validate, append and return what to answer once synced. Raises
        what :meth:`error_answer` maps (auth, validation, limits, storage)."""
        principal.require("produce")
        if not body:
            raise BadRequest(p.Code.INVALID_REQUEST, "a JSON body is required")
        ev = self._event_dec.decode(body)
        now = time.time_ns() // 1_000_000
        event_id, partition, value, seen = self._prepare_event(principal, ev, now)
        if seen is not None:
            answer = {
                "event_id": event_id,
                "partition": seen.partition,
                "offset": seen.offset,
                "duplicate": True,
            }
            return Accepted(answer, 0, None)
        assert value is not None
        if partition is None:
            partition = self._keyless_partition(len(value))
        part = self.service.log.partition(EVENTS_TOPIC, partition)
        batch = records.encode_batch(
            [(0, (ev.key or event_id).encode(), value)], first_timestamp=now
        )
        result = self._append(part, [batch])
        if ev.event_id is not None:
            # only ids the producer chose can come back; remembering generated ones is waste
            self.event_ids.put_many(
                [(principal.tenant, event_id, SeenEvent(partition, result, now))]
            )
        answer = {"event_id": event_id, "partition": partition, "offset": result}
        return Accepted(answer, 1, part.durable_future(result + 1))

    def _append(self, part: Partition, batches: list[bytes]) -> int:
        if self.service.stopping:
            raise BadRequest(p.Code.SHUTTING_DOWN, "the node is shutting down")
        return part.append_nowait(batches).base_offset

    def accept_batch(self, principal: Principal, body: bytes) -> Accepted:
        """``POST /events/batch``: like :meth:`accept_event` for every event, one batch per
        partition; answers in request order."""
        principal.require("produce")
        if not body:
            raise BadRequest(p.Code.INVALID_REQUEST, "a JSON body is required")
        events = self._batch_dec.decode(body).events
        limit = self.config.limits.max_events_per_batch
        if not events:
            raise BadRequest(p.Code.INVALID_REQUEST, "events must not be empty", "events")
        if len(events) > limit:
            raise BadRequest(
                "payload_too_large",
                f"{len(events)} events exceed max_events_per_batch={limit}",
                "events",
            )
        now = time.time_ns() // 1_000_000
        results: list[dict[str, Any]] = [{} for _ in events]
        by_partition: dict[int, list[tuple[int, str, str | None, bytes]]] = {}
        keyless: list[tuple[int, str, str | None, bytes]] = []
        seen_here: set[str] = set()
        for i, ev in enumerate(events):
            event_id, partition, value, seen = self._prepare_event(principal, ev, now, i)
            if seen is not None:
                results[i] = {
                    "event_id": event_id,
                    "partition": seen.partition,
                    "offset": seen.offset,
                    "duplicate": True,
                }
                continue
            if ev.event_id is not None:
                if event_id in seen_here:
                    raise BadRequest(
                        p.Code.INVALID_REQUEST,
                        f"event_id {event_id} appears twice in the batch",
                        f"events[{i}].event_id",
                    )
                seen_here.add(event_id)
            assert value is not None
            item = (i, event_id, ev.key, value)
            if partition is None:
                keyless.append(item)
            else:
                by_partition.setdefault(partition, []).append(item)
        if keyless:
            # one partition for all of them: chosen per event, the partition would still look
            # idle (nothing is appended yet) and they would be dealt over every partition
            partition = self._keyless_partition(sum(len(item[3]) for item in keyless))
            by_partition.setdefault(partition, []).extend(keyless)
        waits: list[asyncio.Future[None]] = []
        seen_rows: list[tuple[str, str, SeenEvent]] = []
        for partition, items in by_partition.items():
            part = self.service.log.partition(EVENTS_TOPIC, partition)
            batch = records.encode_batch(
                [(0, (key or eid).encode(), value) for _i, eid, key, value in items],
                first_timestamp=now,
            )
            base = self._append(part, [batch])
            for j, (i, eid, _key, _value) in enumerate(items):
                results[i] = {"event_id": eid, "partition": partition, "offset": base + j}
                if eid in seen_here:  # chosen by the producer: remember it
                    seen_rows.append((principal.tenant, eid, SeenEvent(partition, base + j, now)))
            fut = part.durable_future(base + len(items))
            if fut is not None:
                waits.append(fut)
        if seen_rows:
            self.event_ids.put_many(seen_rows)
        durable: asyncio.Future[Any] | None = None
        if len(waits) == 1:
            durable = waits[0]
        elif waits:
            durable = asyncio.gather(*waits)
        return Accepted({"results": results}, len(events), durable)

    # --------------------------------------------------------------------- topics
    async def list_topics(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        return self.json({"topics": self.service.metadata(principal, None)})

    async def create_topic(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        t = msgspec.json.decode(await self.body(request), type=TopicIn)
        info, created = self.service.create_topic(
            principal,
            t.name,
            partitions=t.partitions,
            retention_ms=t.retention_ms,
            retention_bytes=t.retention_bytes,
            exist_ok=t.exist_ok,
        )
        return self.json({"topic": info, "created": created}, 201 if created else 200)

    async def describe_topic(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        (info,) = self.service.metadata(principal, [request.match_info["topic"]])
        return self.json(info)

    async def delete_topic(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        await self.service.delete_topic(principal, request.match_info["topic"])
        return self.json({"deleted": request.match_info["topic"]})

    # -------------------------------------------------------------------- records
    async def produce_records(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        body = msgspec.json.decode(await self.body(request), type=RecordsIn)
        if not body.records:
            raise BadRequest(p.Code.INVALID_REQUEST, "records must not be empty", "records")
        now = time.time_ns() // 1_000_000
        rows: list[records.RecordInput] = []
        first_ts = min((r.timestamp for r in body.records if r.timestamp is not None), default=now)
        for i, r in enumerate(body.records):
            if (r.value is None) == (r.value_b64 is None):
                raise BadRequest(
                    p.Code.INVALID_REQUEST,
                    "give exactly one of value and value_b64",
                    f"records[{i}].value",
                )
            if r.value is not None:
                value = r.value.encode()
            else:
                try:
                    value = base64.b64decode(r.value_b64 or "", validate=True)
                except ValueError:
                    raise BadRequest(
                        p.Code.INVALID_REQUEST, "value_b64 is not base64", f"records[{i}].value_b64"
                    ) from None
            delta = (r.timestamp if r.timestamp is not None else now) - first_ts
            key = r.key.encode() if r.key is not None else None
            if r.headers:
                rows.append((delta, key, value, [(k, v.encode()) for k, v in r.headers.items()]))
            else:
                rows.append((delta, key, value))
        batch = records.encode_batch(rows, first_timestamp=first_ts)
        try:
            partition, part, result = self.service.produce(
                principal,
                request.match_info["topic"],
                [batch],
                partition=body.partition,
                key=body.key.encode() if body.key is not None else None,
            )
        except CorruptBatch as exc:
            raise BadRequest(p.Code.BATCH_TOO_LARGE, str(exc), "records") from None
        end = result.last_offset + 1
        fut = part.durable_future(end) if body.acks == -1 else None
        if body.acks == 1:
            fut = part.written_future(end)
        if fut is not None:
            await fut
        return self.json(
            {
                "partition": partition,
                "base_offset": result.base_offset,
                "last_offset": result.last_offset,
            }
        )

    async def fetch_records(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        topic = request.match_info["topic"]
        partition = self._partition_param(request)
        offset = self._int_param(request, "offset", 0)
        max_bytes = self._int_param(request, "max_bytes", 1024 * 1024)
        max_wait = self._int_param(request, "max_wait_ms", 0)
        limit = self._int_param(request, "limit", 1000)
        req = p.Fetch(
            id=0,
            partitions=[p.FetchPartition(topic, partition, offset, max_bytes)],
            max_wait_ms=max_wait,
        )
        (res,) = await self.service.fetch(principal, req)
        if res.error is not None:
            status = _STATUS.get(res.error, 400)
            return self.error(status, res.error, f"{topic}/{partition}: {res.error}")
        out: list[dict[str, Any]] = []
        next_offset = offset
        for _pos, header in records.iter_batches(res.records):
            batch = res.records[_pos : _pos + header.batch_length]
            for i, rec in enumerate(records.decode_records(batch, header)):
                off = header.base_offset + i
                if off < offset or len(out) >= limit:
                    continue
                value, venc = _text_or_b64(rec.value)
                key, kenc = _text_or_b64(rec.key)
                item: dict[str, Any] = {
                    "offset": off,
                    "timestamp": header.first_timestamp + rec.timestamp_delta,
                    "key": key,
                    "value": value,
                }
                if venc == "base64" or kenc == "base64":
                    item["encoding"] = {"key": kenc, "value": venc}
                if rec.headers:
                    item["headers"] = {k: _text_or_b64(v)[0] for k, v in rec.headers}
                out.append(item)
                next_offset = off + 1
        return self.json(
            {
                "records": out,
                "next_offset": next_offset,
                "high_watermark": res.high_watermark,
                "log_start_offset": res.log_start_offset,
            }
        )

    async def list_offsets(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        topic = request.match_info["topic"]
        partition = self._partition_param(request)
        raw = request.query.get("spec", "latest")
        spec: Literal["earliest", "latest"] | int
        if raw in ("earliest", "latest"):
            spec = raw  # type: ignore[assignment]
        else:
            try:
                spec = int(raw)
            except ValueError:
                raise BadRequest(
                    p.Code.INVALID_REQUEST, "spec is earliest, latest or a timestamp (ms)", "spec"
                ) from None
        off = self.service.list_offsets(principal, topic, partition, spec)
        return self.json({"topic": topic, "partition": partition, "offset": off})

    # --------------------------------------------------------------------- groups
    async def list_groups(self, request: web.Request) -> web.Response:
        return self.json({"groups": self.service.list_groups(self.principal(request))})

    async def describe_group(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        return self.json(self.service.describe_group(principal, request.match_info["group"]))


__all__ = ["AuthError", "HttpApi"]
