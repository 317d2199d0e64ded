"""The HTTP API (aiohttp): event ingest, raw records, topics and groups admin, health and
metrics. Reference: ``docs/HTTP.md``.

Every error is JSON ``{"error": {"code", "message", "field"}}`` with a 4xx/5xx status; request
bodies are decoded into ``msgspec`` structs, so a bad body names the offending field.

A transport only: it parses, authenticates, calls the front door (:class:`BrokerService`, and
the event intake of ``broker/events.py`` for ``POST /events``) and encodes. Statuses and
error codes come from the error classes themselves (``broker/errors.py``).

The two ingest endpoints are also served without aiohttp by ``broker/http_ingest.py`` (the
listener's fast path); both paths call :meth:`HttpApi.accept_event` /
:meth:`HttpApi.accept_batch` and :meth:`HttpApi.error_answer`, so validation, idempotency,
stats and error bodies are the same whichever path served the request.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from aiohttp import web

from broker import errors
from broker import protocol as p
from broker.auth import NODE_PRINCIPAL, Authenticator, Principal
from broker.config import Config
from broker.errors import (
    BatchTooLarge,
    HeraldError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    describe,
    error_class,
)
from broker.events import EventBatchIn, EventIn, EventIntake, EventResult
from broker.http_policy import REJECT_HEADER
from broker.openapi import Param, Route, add_routes, build_openapi
from broker.service import BrokerService
from broker.topics import TopicPending, created
from storage import records
from storage.errors import CorruptBatch

log = logging.getLogger("herald.http")

_BY_STATUS: dict[int, type[Exception]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}
# records of a JSON fetch answer, at most (the query's ``limit`` is capped here)
MAX_FETCH_LIMIT = 10_000


class QuietServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger aiohttp's ``RequestHandler`` reports protocol errors to: one line at info,
    without a traceback, at most a few a second (a malformed request is the client's fault,
    and a flood of them must not become a flood of tracebacks). Herald's own handlers never
    reach it: their errors are answered by the middleware, bugs logged there with a trace."""

    def __init__(self, note: Callable[..., None]) -> None:
        super().__init__(logging.getLogger("herald.http"), {})
        self._note = note

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        what = type(exc).__name__ if isinstance(exc, BaseException) else "error"
        self._note("http_malformed", "event=http_malformed path=aiohttp error=%s", what)

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        if kwargs.get("exc_info"):
            self.exception(msg, *args, **kwargs)
        else:
            super().error(msg, *args, **kwargs)


async def _no_metrics(principal: Principal) -> bytes:
    return b""


class HttpStats:
    """Counters of both HTTP paths (aiohttp and the ingest fast path), read by ``/metrics``."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.events = 0
        # large requests that waited for a later turn of the loop (the port's per-turn body
        # budget, broker.http_ingest.TurnBudget)
        self.deferred = 0


@dataclass(slots=True)
class Accepted:
    """An ingest request validated and appended: the ``answer`` to send once ``durable`` (None
    when there is nothing to wait for) resolves, and the ``events`` it counts in the stats.
    ``durable`` fails with the storage error (``LogOffline``, ``StorageFull``) if the sync
    does."""

    answer: Any
    events: int
    durable: asyncio.Future[Any] | None


OPENAPI_VERSION = "0.1.0"


class BatchAnswer(msgspec.Struct):
    results: list[EventResult]


class TopicIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    partitions: int | None = None
    retention_ms: int | None = None
    retention_bytes: int | None = None
    exist_ok: bool = False


class RecordIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, gc=False):
    # gc=False: decoded JSON cannot form a cycle, and many small records must not trigger
    # collections while they are decoded
    value: str | None = None
    value_b64: str | None = None
    key: str | None = None
    headers: dict[str, str] | None = None
    timestamp: int | None = None


class RecordsIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, gc=False):
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


class HttpApi:
    def __init__(
        self, config: Config, service: BrokerService, intake: EventIntake, auth: Authenticator
    ) -> None:
        self.config = config
        self.service = service
        self.intake = intake
        self.auth = auth
        self.stats = HttpStats()
        self._enc = msgspec.json.Encoder()
        self.metrics_body: Callable[[Principal], Awaitable[bytes]] = _no_metrics
        self.openapi_doc = b""
        self.route_table: list[Route] = []

    # ------------------------------------------------------------------- plumbing
    def app(self, extra: Sequence[Route] = ()) -> web.Application:
        """The aiohttp app: the broker's routes, then ``extra`` (other packages' routes,
        composed by the node), and ``GET /openapi.json`` describing all of them."""
        app = web.Application(
            client_max_size=self.config.limits.max_http_body_bytes,
            middlewares=[self._errors],
        )
        table = [*self.routes(), *extra]
        table.append(
            Route(
                "GET",
                "/openapi.json",
                self.openapi,
                "This document: OpenAPI 3.1, generated from the route table",
                "operations",
                scopes=None,
            )
        )
        self.openapi_doc = self.encode(
            build_openapi(
                table,
                title="Herald HTTP API",
                version=OPENAPI_VERSION,
                description="Reference with examples: docs/HTTP.md and docs/API.md.",
            )
        )
        self.route_table = table
        add_routes(app, table)
        return app

    def routes(self) -> list[Route]:
        """The broker's own routes (docs/HTTP.md)."""
        topic = {"topic": "a topic name of your tenant"}
        part = {**topic, "partition": "a partition number, from 0"}
        return [
            Route("GET", "/healthz", self.healthz, "Health", "operations", scopes=None,
                  errors=(503,)),
            Route("GET", "/metrics", self.metrics, "Prometheus metrics", "operations",
                  scopes=("metrics",), answer=bytes),
            Route("POST", "/events", self.post_event, "Publish an event", "events",
                  scopes=("produce",), body=EventIn, answer=EventResult, errors=(413, 503, 507)),
            Route("POST", "/events/batch", self.post_events_batch, "Publish events",
                  "events", scopes=("produce",), body=EventBatchIn, answer=BatchAnswer,
                  errors=(413, 503, 507)),
            Route("GET", "/topics", self.list_topics, "List your topics", "topics"),
            Route("POST", "/topics", self.create_topic, "Create a topic", "topics",
                  scopes=("admin",), body=TopicIn, status=201, errors=(409, 507)),
            Route("GET", "/topics/{topic}", self.describe_topic, "Describe a topic", "topics",
                  path_params=topic, errors=(404,)),
            Route("DELETE", "/topics/{topic}", self.delete_topic, "Delete a topic", "topics",
                  scopes=("admin",), path_params=topic, errors=(404, 409)),
            Route("POST", "/topics/{topic}/records", self.produce_records, "Append records",
                  "topics", scopes=("produce",), body=RecordsIn, path_params=topic,
                  errors=(404, 413, 503, 507)),
            Route("GET", "/topics/{topic}/partitions/{partition}/records", self.fetch_records,
                  "Read records", "topics", scopes=("consume",), path_params=part,
                  query=(Param("offset", int, "first offset (default 0)", minimum=0),
                         Param("max_bytes", int, "bytes to read at most", minimum=1),
                         Param("max_wait_ms", int, "long poll up to this long", minimum=0),
                         Param("limit", int, "records at most", minimum=1,
                               maximum=MAX_FETCH_LIMIT)),
                  errors=(404, 416)),
            Route("GET", "/topics/{topic}/partitions/{partition}/offsets", self.list_offsets,
                  "Look up an offset", "topics", scopes=("consume",), path_params=part,
                  query=(Param("spec", str, "earliest, latest or a timestamp (ms)"),),
                  errors=(404,)),
            Route("GET", "/groups", self.list_groups, "List consumer groups", "groups",
                  scopes=("consume",)),
            Route("GET", "/groups/{group}", self.describe_group, "Describe a group", "groups",
                  scopes=("consume",), path_params={"group": "a group name"}, errors=(404,)),
        ]  # fmt: skip

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self.openapi_doc, content_type="application/json")

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
        reject = request.headers.get(REJECT_HEADER)
        if reject is not None:
            # the listener refused this request at its headers (broker/http_ingest.py) and
            # passed it on only so that the answer keeps its place among the others
            code, _, message = reject.partition(" ")
            cls = error_class(code)
            exc = cls(message) if issubclass(cls, HeraldError) else InvalidRequest(message)
            status, body = self.error_answer(exc, request.path)
            return self.json(body, status)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            err = _BY_STATUS.get(exc.status, InvalidRequest)
            status, body = self.error_answer(err(exc.reason), request.path)
            return self.json(body, exc.status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status, body = self.error_answer(exc, request.path)
            return self.json(body, status)

    def error_answer(self, exc: BaseException, path: str) -> tuple[int, dict[str, Any]]:
        """The status and ``{"error": {"code", "message", "field"}}`` body for an exception
        raised while serving ``path``, the same for every HTTP path; counts the error. An
        unexpected exception is logged with its traceback and answered 500."""
        err = describe(exc)
        if err.code == "internal_error":
            log.error("event=http_error path=%s", path, exc_info=exc)
        self.stats.errors += 1
        return err.http_status, {
            "error": {"code": err.code, "message": err.message, "field": err.field}
        }

    def principal(self, request: web.Request) -> Principal:
        return self.auth.bearer(request.headers.get("Authorization"))

    def principal_or_none(self, request: web.Request) -> Principal | None:
        try:
            return self.principal(request)
        except errors.Unauthenticated:
            return None

    async def body(self, request: web.Request) -> bytes:
        if not request.can_read_body:
            raise InvalidRequest("a JSON body is required")
        return await request.read()

    @staticmethod
    def _partition_param(request: web.Request) -> int:
        try:
            return int(request.match_info["partition"])
        except ValueError:
            raise InvalidRequest("partition must be an integer", field="partition") from None

    @staticmethod
    def _int_param(request: web.Request, name: str, default: int | None = None) -> int:
        raw = request.query.get(name)
        if raw is None:
            if default is None:
                raise InvalidRequest(f"query parameter {name} is required", field=name)
            return default
        try:
            return int(raw)
        except ValueError:
            raise InvalidRequest(f"{name} must be an integer", field=name) from None

    # --------------------------------------------------------------------- health
    async def healthz(self, request: web.Request) -> web.Response:
        """Up or down for anyone (load balancers, probes); the details (topic and partition
        counts, offline partitions) only with a valid key or on a node without keys."""
        health = self.service.health()
        status = 200 if health["status"] == "ok" else 503
        if self.principal_or_none(request) is None:
            return self.json({"status": health["status"]}, status)
        return self.json(health, status)

    async def metrics(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        principal.require("metrics")
        if self.auth.open:
            principal = NODE_PRINCIPAL  # loopback only: the operator's own view
        return web.Response(
            body=await self.metrics_body(principal),
            headers={"Content-Type": "text/plain; version=0.0.4"},
        )

    # --------------------------------------------------------------------- events
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
        """``POST /events``: validate, append and return what to answer once durable.
        Raises what :meth:`error_answer` maps (auth, validation, limits, storage)."""
        principal.require("produce")
        ev = self.intake.decode_one(body)
        accepted = self.intake.publish(principal, [ev], batch=False)
        (result,) = accepted.results
        if accepted.throttle_ms:
            result = msgspec.structs.replace(result, throttle_ms=accepted.throttle_ms)
        return Accepted(result, accepted.events, accepted.ack)

    def accept_batch(self, principal: Principal, body: bytes) -> Accepted:
        """``POST /events/batch``: like :meth:`accept_event` for every event; answers in
        request order."""
        principal.require("produce")
        events = self.intake.decode_many(body)
        accepted = self.intake.publish(principal, events, batch=True)
        answer: dict[str, Any] = {"results": accepted.results}
        if accepted.throttle_ms:
            answer["throttle_ms"] = accepted.throttle_ms
        return Accepted(answer, accepted.events, accepted.ack)

    # --------------------------------------------------------------------- topics
    async def list_topics(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        return self.json({"topics": self.service.metadata(principal, None)})

    async def create_topic(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        t = msgspec.json.decode(await self.body(request), type=TopicIn)
        req = p.CreateTopic(
            id=0,
            topic=t.name,
            partitions=t.partitions,
            retention_ms=t.retention_ms,
            retention_bytes=t.retention_bytes,
            exist_ok=t.exist_ok,
        )
        info, created = await self.service.create_topic(principal, req)
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
            raise InvalidRequest("records must not be empty", field="records")
        max_records = self.config.limits.max_records_per_batch
        if len(body.records) > max_records:
            # checked before the per-record work: the records become one batch
            raise BatchTooLarge(
                f"{len(body.records)} records exceed max_records_per_batch={max_records}",
                field="records",
            )
        now = time.time_ns() // 1_000_000
        rows: list[records.RecordInput] = []
        first_ts = min((r.timestamp for r in body.records if r.timestamp is not None), default=now)
        for i, r in enumerate(body.records):
            if (r.value is None) == (r.value_b64 is None):
                raise InvalidRequest(
                    "give exactly one of value and value_b64", field=f"records[{i}].value"
                )
            if r.value is not None:
                value = r.value.encode()
            else:
                try:
                    value = base64.b64decode(r.value_b64 or "", validate=True)
                except ValueError:
                    raise InvalidRequest(
                        "value_b64 is not base64", field=f"records[{i}].value_b64"
                    ) from None
            delta = (r.timestamp if r.timestamp is not None else now) - first_ts
            key = r.key.encode() if r.key is not None else None
            if r.headers:
                rows.append((delta, key, value, [(k, v.encode()) for k, v in r.headers.items()]))
            else:
                rows.append((delta, key, value))
        batch = records.encode_batch(rows, first_timestamp=first_ts)
        while True:
            try:
                appended = self.service.produce(
                    principal,
                    request.match_info["topic"],
                    [batch],
                    partition=body.partition,
                    key=body.key.encode() if body.key is not None else None,
                    acks=body.acks,
                )
                break
            except TopicPending as pending:  # being auto-created
                await created(pending)
            except CorruptBatch as exc:  # records too large for one batch
                raise BatchTooLarge(str(exc), field="records") from None
        if appended.ack is not None:
            await appended.ack
        answer: dict[str, Any] = {
            "partition": appended.partition,
            "base_offset": appended.base_offset,
            "last_offset": appended.last_offset,
        }
        if appended.throttle_ms:
            answer["throttle_ms"] = appended.throttle_ms
        return self.json(answer)

    async def fetch_records(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        topic = request.match_info["topic"]
        partition = self._partition_param(request)
        offset = self._int_param(request, "offset", 0)
        max_bytes = self._int_param(request, "max_bytes", 1024 * 1024)
        max_wait = self._int_param(request, "max_wait_ms", 0)
        limit = self._int_param(request, "limit", 1000)
        if not 1 <= limit <= MAX_FETCH_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_FETCH_LIMIT}", field="limit")
        req = p.Fetch(
            id=0,
            partitions=[p.FetchPartition(topic, partition, offset, max_bytes)],
            max_wait_ms=max_wait,
        )
        (res,), throttle_ms = await self.service.fetch(principal, req)
        if res.error is not None:
            status = errors.http_status_of(res.error)
            return self.error(status, res.error, f"{topic}/{partition}: {res.error}")
        out: list[dict[str, Any]] = []
        next_offset = offset
        for _pos, header in records.iter_batches(res.records):
            if len(out) >= limit:
                break  # decode no further than the answer needs
            if header.next_offset <= offset:
                continue  # wholly before the offset asked for
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
        answer: dict[str, Any] = {
            "records": out,
            "next_offset": next_offset,
            "high_watermark": res.high_watermark,
            "log_start_offset": res.log_start_offset,
        }
        if throttle_ms:
            answer["throttle_ms"] = throttle_ms
        return self.json(answer)

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
                raise InvalidRequest(
                    "spec is earliest, latest or a timestamp (ms)", field="spec"
                ) from None
        off = self.service.list_offsets(principal, topic, partition, spec)
        return self.json({"topic": topic, "partition": partition, "offset": off})

    # --------------------------------------------------------------------- groups
    async def list_groups(self, request: web.Request) -> web.Response:
        return self.json({"groups": self.service.list_groups(self.principal(request))})

    async def describe_group(self, request: web.Request) -> web.Response:
        principal = self.principal(request)
        return self.json(self.service.describe_group(principal, request.match_info["group"]))


__all__ = ["Accepted", "HttpApi"]
