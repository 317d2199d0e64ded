"""The msgpack TCP server: a thin asyncio ``Protocol`` around :mod:`broker.protocol` and
:class:`BrokerService`.

Hot path: bytes -> frames -> requests, handled inside ``data_received``; a produce with
``acks=all`` registers a callback on the partition's next sync instead of spawning a task, and
replies collected during one loop iteration leave in one ``writelines``. Only requests that
must wait (long-poll fetches, topic deletion) get a task, owned by the connection and
cancelled with it.

Back-pressure: when a connection has ``max_inflight_per_connection`` requests waiting, or its
socket's write buffer is full, the server stops reading from it until that drains; the kernel's
receive window then slows the client. Limits: frame size (fatal error frame + close),
connections (error frame + close), batches per request and batch size (error frame).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from broker import protocol as p
from broker.auth import Authenticator, AuthError, Principal
from broker.config import Config
from broker.service import BrokerService, error_fields
from storage.errors import StorageError
from storage.partition import AppendResult

log = logging.getLogger("herald.tcp")


class ConnectionStats:
    def __init__(self) -> None:
        self.open = 0
        self.total = 0
        self.rejected = 0
        self.requests = 0
        self.errors = 0


class BrokerProtocol(asyncio.Protocol):
    def __init__(self, server: TcpServer) -> None:
        self.server = server
        self.service = server.service
        limits = server.config.limits
        self.decoder = p.FrameDecoder(limits.max_frame_bytes)
        self.max_inflight = limits.max_inflight_per_connection
        self.transport: asyncio.Transport | None = None
        self.principal: Principal | None = (
            server.auth.authenticate(None) if server.auth.open else None
        )
        self.peer = "?"
        self.inflight = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self._out: list[bytes | bytearray] = []
        self._flush_scheduled = False
        self._paused_reading = False
        self._write_paused = False
        self.closed = False
        self.loop = asyncio.get_running_loop()

    # ---------------------------------------------------------------- connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        stats = self.server.stats
        if stats.open >= self.server.config.limits.max_connections:
            stats.rejected += 1
            transport.write(  # type: ignore[attr-defined]
                p.encode_message(
                    p.Error(
                        id=0,
                        code="too_many_connections",
                        message="connection limit reached",
                        retriable=True,
                    )
                )
            )
            transport.close()
            self.closed = True
            return
        stats.open += 1
        stats.total += 1
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.server.stats.open -= 1
        self.closed = True
        self.server.connections.discard(self)
        for task in self.tasks:
            task.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        if self.transport is None or self.closed:
            return
        want_pause = self._write_paused or self.inflight >= self.max_inflight
        if want_pause and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()
        elif not want_pause and self._paused_reading:
            self._paused_reading = False
            self.transport.resume_reading()

    # -------------------------------------------------------------------- output
    def send(self, msg: Any) -> None:
        if self.closed:
            return
        self._out.append(p.encode_message(msg))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.closed and self.transport is not None:
            out, self._out = self._out, []
            self.transport.writelines(out)

    def send_error(self, rid: int, exc: BaseException) -> None:
        code, message, retriable = error_fields(exc)
        self.server.stats.errors += 1
        if code == p.Code.INTERNAL:
            log.exception("event=request_failed peer=%s id=%d", self.peer, rid, exc_info=exc)
        self.send(p.Error(id=rid, code=code, message=message, retriable=retriable))

    def close_with(self, rid: int, exc: BaseException) -> None:
        self.send_error(rid, exc)
        self._flush()
        if self.transport is not None:
            self.transport.close()
        if not self.closed:
            self.server.stats.open -= 1
            self.server.connections.discard(self)
        self.closed = True

    # --------------------------------------------------------------------- input
    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            frames = self.decoder.feed(data)
        except p.ProtocolError as exc:
            self.close_with(0, exc)
            return
        for frame in frames:
            if self.closed:
                return
            self.server.stats.requests += 1
            try:
                req = p.decode_request(frame)
            except p.ProtocolError as exc:
                self.send_error(p.request_id_of(frame), exc)
                continue
            try:
                self.handle(req)
            except Exception as exc:
                self.send_error(req.id, exc)

    def handle(self, req: p.Request) -> None:
        if isinstance(req, p.Hello):
            self.on_hello(req)
            return
        principal = self.principal
        if principal is None:
            raise AuthError("send a hello with an API key first")
        svc = self.service
        if isinstance(req, p.Produce):
            partition, part, result = svc.produce(
                principal, req.topic, req.batches, partition=req.partition, key=req.key
            )
            if req.acks != 0 and not result.duplicate:
                end = result.last_offset + 1
                fut = part.durable_future(end) if req.acks == -1 else part.written_future(end)
                if fut is not None:
                    self._track(fut, self._produced_cb(req, partition, result))
                    return
            self.send(self._produced(req, partition, result))
        elif isinstance(req, p.Fetch):
            self._spawn(req.id, self._fetch(principal, req))
        elif isinstance(req, p.ListOffsets):
            off = svc.list_offsets(principal, req.topic, req.partition, req.spec)
            self.send(p.Offsets(id=req.id, topic=req.topic, partition=req.partition, offset=off))
        elif isinstance(req, p.Metadata):
            self.send(
                p.MetadataResult(
                    id=req.id,
                    node_id=self.server.config.node_id,
                    topics=svc.metadata(principal, req.topics, auto_create=req.auto_create),
                )
            )
        elif isinstance(req, p.CreateTopic):
            info, created = svc.create_topic(
                principal,
                req.topic,
                partitions=req.partitions,
                retention_ms=req.retention_ms,
                retention_bytes=req.retention_bytes,
                exist_ok=req.exist_ok,
            )
            self.send(p.TopicCreated(id=req.id, topic=info, created=created))
        elif isinstance(req, p.DeleteTopic):
            self._spawn(req.id, self._delete_topic(principal, req))
        elif isinstance(req, p.InitProducer):
            self.send(p.ProducerId(id=req.id, producer_id=svc.init_producer(principal)))
        else:
            self.handle_group(principal, req)

    def handle_group(self, principal: Principal, req: p.Request) -> None:
        svc = self.service
        coord = svc.groups
        if isinstance(req, p.ListGroups):
            self.send(p.GroupsListed(id=req.id, groups=svc.list_groups(principal)))
            return
        principal.require("consume")
        if isinstance(req, p.JoinGroup):
            svc._check_topics(principal, req.topics)
            member, group, assignment = coord.join(
                principal.qualify_group(req.group),
                req.topics,
                member_id=req.member_id,
                session_timeout_ms=req.session_timeout_ms,
                assignor=req.assignor,
                client_id=req.client_id,
            )
            self.send(
                p.Joined(
                    id=req.id,
                    group=req.group,
                    member_id=member.member_id,
                    generation=group.generation,
                    session_timeout_ms=member.session_timeout_ms,
                    heartbeat_interval_ms=max(100, member.session_timeout_ms // 3),
                    assignment=assignment,
                )
            )
        elif isinstance(req, p.Heartbeat):
            group, assignment = coord.heartbeat(
                principal.qualify_group(req.group), req.member_id, req.owned
            )
            self.send(
                p.HeartbeatResult(
                    id=req.id,
                    generation=group.generation,
                    assignment=assignment,
                    rebalancing=group.rebalancing,
                )
            )
        elif isinstance(req, p.LeaveGroup):
            coord.leave(principal.qualify_group(req.group), req.member_id)
            self.send(p.Left(id=req.id))
        elif isinstance(req, p.CommitOffsets):
            svc._check_topics(principal, {t for t, _p, _o in req.offsets})
            n = coord.commit(
                principal.qualify_group(req.group),
                req.offsets,
                member_id=req.member_id,
                metadata=req.metadata,
            )
            self.send(p.Committed(id=req.id, count=n))
        elif isinstance(req, p.FetchOffsets):
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
            self.send(p.OffsetsFetched(id=req.id, offsets=found))
        elif isinstance(req, p.DescribeGroup):
            self.send(p.GroupDescribed(id=req.id, group=svc.describe_group(principal, req.group)))
        else:  # pragma: no cover - the union is exhaustive
            raise p.ProtocolError(p.Code.INVALID_REQUEST, f"unsupported op {type(req).__name__}")

    def on_hello(self, req: p.Hello) -> None:
        if req.version != p.PROTOCOL_VERSION:
            raise p.ProtocolError(
                p.Code.UNSUPPORTED_VERSION,
                f"protocol version {req.version} unsupported; "
                f"this node speaks {p.PROTOCOL_VERSION}",
            )
        self.principal = self.server.auth.authenticate(req.api_key)
        self.send(
            p.HelloOk(
                id=req.id,
                version=p.PROTOCOL_VERSION,
                node_id=self.server.config.node_id,
                tenant=self.principal.tenant,
                scopes=sorted(self.principal.scopes),
            )
        )

    # ------------------------------------------------------------ waiting requests
    @staticmethod
    def _produced(req: p.Produce, partition: int, result: AppendResult) -> p.Produced:
        return p.Produced(
            id=req.id,
            topic=req.topic,
            partition=partition,
            base_offset=result.base_offset,
            last_offset=result.last_offset,
            duplicate=result.duplicate,
        )

    def _produced_cb(
        self, req: p.Produce, partition: int, result: AppendResult
    ) -> Callable[[asyncio.Future[None]], None]:
        def done(fut: asyncio.Future[None]) -> None:
            exc = fut.exception() if not fut.cancelled() else StorageError("cancelled")
            if exc is not None:
                self.send_error(req.id, exc)
            else:
                self.send(self._produced(req, partition, result))

        return done

    def _track(self, fut: asyncio.Future[None], cb: Callable[[asyncio.Future[None]], None]) -> None:
        self.inflight += 1
        if self.inflight >= self.max_inflight:
            self._update_reading()

        def finished(f: asyncio.Future[None]) -> None:
            self.inflight -= 1
            cb(f)
            self._update_reading()

        fut.add_done_callback(finished)

    def _spawn(self, rid: int, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        self.inflight += 1
        self._update_reading()

        def finished(t: asyncio.Task[Any]) -> None:
            self.tasks.discard(t)
            self.inflight -= 1
            if not t.cancelled():
                exc = t.exception()
                if exc is not None:
                    self.send_error(rid, exc)
            self._update_reading()

        task.add_done_callback(finished)

    async def _fetch(self, principal: Principal, req: p.Fetch) -> None:
        results = await self.service.fetch(principal, req)
        self.send(p.Fetched(id=req.id, partitions=results))

    async def _delete_topic(self, principal: Principal, req: p.DeleteTopic) -> None:
        await self.service.delete_topic(principal, req.topic)
        self.send(p.TopicDeleted(id=req.id, topic=req.topic))


class TcpServer:
    def __init__(self, config: Config, service: BrokerService, auth: Authenticator) -> None:
        self.config = config
        self.service = service
        self.auth = auth
        self.stats = ConnectionStats()
        self.connections: set[BrokerProtocol] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: BrokerProtocol(self), host, port, backlog=1024, reuse_address=True
        )
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, grace_s: float) -> None:
        """Wait for in-flight requests to finish (up to ``grace_s``), then close."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while any(c.inflight for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn._flush()
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
