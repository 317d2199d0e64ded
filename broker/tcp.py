"""The msgpack TCP server: a thin asyncio ``Protocol`` around :mod:`broker.protocol` and
:class:`BrokerService`.

Hot path: bytes -> frames -> requests, dispatched by op through a table of handlers
(:func:`handler_table`) inside ``data_received``. A handler calls the front door and returns
the reply, or a :class:`Pending` reply when the front door handed back an acknowledgement to
wait for (a produce or publish: a callback on the future, no task per request), or a
coroutine for requests that must wait (long-poll fetches, topic deletion, offset commits and
producer ids, which wait for the state store's sync): those get a task owned by the
connection and cancelled with it. Replies collected during one loop iteration leave in one
``writelines``; the reply to the last request a connection waits for leaves at once (nothing
could share that write, and a lone request saves a loop turn).

Back-pressure: when a connection has ``max_inflight_per_connection`` requests waiting, or its
socket's write buffer is full, the server stops reading from it until that drains; the kernel's
receive window then slows the client. Limits: frame size (fatal error frame + close),
connections (error frame + close), batches per request and batch size (error frame).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, get_args

from broker import protocol as p
from broker.auth import Authenticator, Principal
from broker.config import Config
from broker.dispatch import Pending, handler_table
from broker.errors import (
    ShuttingDown,
    TooManyConnections,
    Unauthenticated,
    UnsupportedVersion,
    describe,
)
from broker.events import EventIntake
from broker.service import BrokerService

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
            exc = TooManyConnections("connection limit reached")
            transport.write(  # type: ignore[attr-defined]
                p.encode_message(p.Error(id=0, code=exc.code, message=str(exc), retriable=True))
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
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                self.transport.writelines(out)

    def send_error(self, rid: int, exc: BaseException) -> None:
        err = describe(exc)
        self.server.stats.errors += 1
        if err.http_status >= 500 and err.code == "internal_error":
            log.error("event=request_failed peer=%s id=%d", self.peer, rid, exc_info=exc)
        self.send(p.Error(id=rid, code=err.code, message=err.message, retriable=err.retriable))

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
        """Answer one request: at once, when its acknowledgement resolves, or (for requests
        that must wait) from a task owned by this connection."""
        principal = self.principal
        if isinstance(req, p.Hello):
            self.on_hello(req)
            return
        if principal is None:
            raise Unauthenticated("send a hello with an API key first")
        outcome = self.server.handlers[type(req)](principal, req)
        if isinstance(outcome, Pending):
            self._track(outcome.ack, req.id, outcome.reply)
        elif asyncio.iscoroutine(outcome):
            self._spawn(req.id, outcome)
        else:
            self.send(outcome)

    def on_hello(self, req: p.Hello) -> None:
        if req.version != p.PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"protocol version {req.version} unsupported; this node speaks {p.PROTOCOL_VERSION}"
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
    def _track(self, ack: asyncio.Future[Any], rid: int, reply: Any) -> None:
        """Send ``reply`` once ``ack`` resolves (or the error it fails with). A callback,
        not a task: a produce costs no task per request."""
        self.inflight += 1
        if self.inflight >= self.max_inflight:
            self._update_reading()

        def finished(fut: asyncio.Future[Any]) -> None:
            self.inflight -= 1
            exc = fut.exception() if not fut.cancelled() else ShuttingDown("cancelled")
            if exc is not None:
                self.send_error(rid, exc)
            else:
                self.send(reply)
            if not self.inflight:
                # the last reply this connection waits for: nothing else could share the
                # write, so it leaves now rather than one loop turn later
                self._flush()
            self._update_reading()

        ack.add_done_callback(finished)

    def _spawn(self, rid: int, coro: Coroutine[Any, Any, Any]) -> None:
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
                else:
                    self.send(t.result())
                if not self.inflight:
                    self._flush()  # nothing else could share the write (see _track)
            self._update_reading()

        task.add_done_callback(finished)


class TcpServer:
    def __init__(
        self, config: Config, service: BrokerService, intake: EventIntake, auth: Authenticator
    ) -> None:
        self.config = config
        self.service = service
        self.auth = auth
        self.handlers = handler_table(service, intake, config.node_id)
        # every op of the protocol has a handler (hello is the connection's own)
        assert set(self.handlers) | {p.Hello} == set(get_args(p.Request))
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
