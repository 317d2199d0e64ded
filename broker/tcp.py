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

Admission (``broker/listener.py`` admits the connection before this protocol exists): until a
successful ``hello`` (on a node without keys: until its first well-formed request) a
connection is *pending*: its frames may be at most ``admission.max-unauthenticated-frame-bytes``
(on a node with keys) and it must prove itself within ``admission.handshake-timeout-ms``.
Failed keys count against the source address (``AuthThrottle``). A connection with nothing
in flight and no input for ``admission.idle-timeout-ms`` is closed, as is one whose replies
have not moved for ``admission.send-timeout-ms``.

Back-pressure and memory:

- requests: at ``max_inflight_per_connection`` requests waiting, or a full socket write
  buffer, the server stops reading (the kernel's receive window then slows the client); the
  bytes of partial frames count against the node's ``admission.max-request-bytes-in-flight``.
- replies: a fetch reserves its largest possible reply (its ``max_bytes``, capped by
  ``limits.max-fetch-bytes``, plus one batch, which a fetch may return past ``max_bytes``)
  against the connection's ``admission.max-reply-bytes-per-connection`` and the node's
  ``admission.max-reply-bytes-in-flight`` before it is served, and holds it until the reply has
  left the socket buffer. A request that does not fit waits, in order with the ones behind it,
  and reading stops; so a client that never reads its replies makes the node hold at most the
  per-connection budget (plus one reply), however many fetches it pipelines.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any, Final, get_args

from broker import protocol as p
from broker.admission import Ticket
from broker.auth import Authenticator, Principal
from broker.config import Config
from broker.dispatch import Pending, handler_table
from broker.errors import (
    AuthThrottled,
    ServerBusy,
    ShuttingDown,
    TooManyConnections,
    Unauthenticated,
    UnsupportedVersion,
    describe,
)
from broker.events import EventIntake
from broker.listener import Listener, NodeAdmission
from broker.service import BrokerService
from storage.ack import Ack

log = logging.getLogger("herald.tcp")

# a full scan of the connections (idle, stalled sends) every this many sweeps of a second
_SCAN_EVERY: Final = 5
# requests one connection may have handled in one turn of the event loop; the rest wait for
# the next turn, reading paused: libuv reads a busy socket up to 32 times a turn, so a client
# pipelining cheap requests could otherwise hold the loop for ~1 s at a time
TURN_REQUESTS: Final = 128
# reply bytes a fetch may carry besides its records: per partition, the topic name and four
# integers; bounded by the request's own size (each partition is named in it)
_FETCH_OVERHEAD: Final = 1024


class ConnectionStats:
    def __init__(self) -> None:
        self.open = 0
        self.total = 0
        self.rejected = 0
        self.requests = 0
        self.errors = 0


class BrokerProtocol(asyncio.Protocol):
    def __init__(self, server: TcpServer, ticket: Ticket) -> None:
        self.server = server
        self.service = server.service
        self.ticket = ticket
        self.admission = server.admission
        limits = server.config.limits
        self.max_frame_bytes = limits.max_frame_bytes
        self.decoder = p.FrameDecoder(
            server.config.admission.max_unauthenticated_frame_bytes
            if server.keyed
            else limits.max_frame_bytes
        )
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
        self._turn_scheduled = False
        self._write_paused = False
        self._write_paused_at = 0.0
        self.closed = False
        self.loop = server.loop
        self.last_active = self.loop.time()
        # request bytes of partial frames, charged to the node's request budget, and who they
        # count against (the tenant once it showed a key)
        self._buffered = 0
        self._holder = self.admission.holder(None, ticket.address)
        # reply budget: bytes reserved by fetches in flight and by their replies until these
        # left the socket buffer (``_draining``: written while the buffer was over its mark)
        self._reserved = 0
        self._unflushed = 0
        self._draining = 0
        # requests decoded but not yet handled, waiting for reply budget (in order)
        self._held: deque[tuple[p.Request, int]] = deque()
        self._waiting_budget = False

    # ---------------------------------------------------------------- connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        stats = self.server.stats
        stats.open += 1
        stats.total += 1
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.server.stats.open -= 1
        self.closed = True
        self.server.connections.discard(self)
        self.admission.table.release(self.ticket)
        for task in self.tasks:
            task.cancel()
        self._held.clear()
        if self._buffered:
            self.admission.requests.give(self._buffered, self._holder)
            self._buffered = 0
        charged = self._reserved + self._unflushed + self._draining
        if charged:
            self._reserved = self._unflushed = self._draining = 0
            self.admission.replies.give(charged, self._holder)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_at = self.loop.time()
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._draining:
            drained, self._draining = self._draining, 0
            self.admission.replies.give(drained, self._holder)
        self._update_reading()
        if self._held:
            self._handle_held()

    def _update_reading(self) -> None:
        if self.transport is None or self.closed:
            return
        want_pause = self._write_paused or self.inflight >= self.max_inflight or bool(self._held)
        if want_pause and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()
        elif not want_pause and self._paused_reading:
            self._paused_reading = False
            self.transport.resume_reading()

    def check(self, now: float) -> None:
        """The once-in-a-while checks of :meth:`TcpServer.check`: a connection idle past
        its timeout, or whose replies have not moved past the send timeout, is closed."""
        cfg = self.server.config.admission
        if self._write_paused:
            if now - self._write_paused_at > cfg.send_timeout_ms / 1000:
                self.admission.send_timeouts += 1
                self.admission.note(
                    "send_timeout", "event=send_timeout listener=tcp peer=%s", self.peer
                )
                self.abort()
        elif (
            not self.inflight
            and not self._held
            and now - self.last_active > cfg.idle_timeout_ms / 1000
        ):
            self.admission.idle_closed += 1
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -------------------------------------------------------------------- output
    def send(self, msg: Any, *, now: bool = False) -> None:
        """Queue ``msg``; it leaves with the replies of this loop turn, or at once with
        ``now`` (the last reply the connection waits for: nothing could share the write,
        and a lone request saves the loop turn and the scheduled callback)."""
        if self.closed:
            return
        self._out.append(p.encode_message(msg))
        if now:
            self._flush()
        elif not self._flush_scheduled:
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
            if self._unflushed:
                # the reserved replies are in the socket buffer now: free once it drains
                written, self._unflushed = self._unflushed, 0
                if self._write_paused:
                    self._draining += written
                else:
                    self.admission.replies.give(written, self._holder)
                    if self._held:
                        self._handle_held()

    def send_error(self, rid: int, exc: BaseException, *, now: bool = False) -> None:
        err = describe(exc)
        self.server.stats.errors += 1
        if err.http_status >= 500 and err.code == "internal_error":
            log.error("event=request_failed peer=%s id=%d", self.peer, rid, exc_info=exc)
        self.send(
            p.Error(id=rid, code=err.code, message=err.message, retriable=err.retriable), now=now
        )

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
        self.last_active = self.loop.time()
        decoder = self.decoder
        try:
            frames = decoder.feed(data)
        except p.ProtocolError as exc:
            self._bad_request(exc)
            self.close_with(0, exc)
            return
        buffered = decoder.buffered
        if buffered != self._buffered:
            self._charge_partial(buffered)
            if self.closed:
                return
        turn = 0
        for frame in frames:
            if self.closed:
                return
            self.server.stats.requests += 1
            try:
                req = p.decode_request(frame)
            except p.ProtocolError as exc:
                self._bad_request(exc)
                self.send_error(p.request_id_of(frame), exc)
                continue
            if self._held or turn >= TURN_REQUESTS or not self._dispatch(req, len(frame)):
                self._held.append((req, len(frame)))
            turn += 1
        if self._held:
            self._update_reading()
            if turn > TURN_REQUESTS:
                self._next_turn()

    def _next_turn(self) -> None:
        """Handle the held requests in the next turn of the loop (see TURN_REQUESTS)."""
        if not self._turn_scheduled:
            self._turn_scheduled = True
            self.loop.call_soon(self._turn_due)

    def _turn_due(self) -> None:
        self._turn_scheduled = False
        self._handle_held()

    def _charge_partial(self, buffered: int) -> None:
        """Charge the bytes of a partial frame to the node's request budget (a frame being
        received is memory the client made the node hold)."""
        budget = self.admission.requests
        grow = buffered - self._buffered
        if grow > 0 and not budget.take(grow, self._holder):
            self.admission.note(
                "request_budget", "event=request_budget_spent listener=tcp peer=%s", self.peer
            )
            self.close_with(0, ServerBusy("too many request bytes in flight on this node"))
            return
        if grow < 0:
            budget.give(-grow, self._holder)
        self._buffered = buffered

    def _bad_request(self, exc: BaseException) -> None:
        self.admission.note(
            "bad_request",
            "event=bad_request listener=tcp peer=%s code=%s",
            self.peer,
            describe(exc).code,
        )

    def _dispatch(self, req: p.Request, size: int) -> bool:
        """Handle ``req`` now if its reply fits the reply budgets; False (and nothing done)
        if it must wait."""
        need = 0
        if isinstance(req, p.Fetch):
            limits = self.server.config.limits
            need = (
                max(0, min(req.max_bytes, limits.max_fetch_bytes))
                + limits.max_batch_bytes
                + _FETCH_OVERHEAD
                + 2 * size
            )
            if not self._reserve(need):
                return False
        elif self._write_paused and self._queued() >= self.server.reply_budget:
            return False
        try:
            self.handle(req, need)
        except Exception as exc:
            self._unreserve(need)
            self.send_error(req.id, exc)
        return True

    def _queued(self) -> int:
        transport = self.transport
        wbuf = transport.get_write_buffer_size() if transport is not None else 0
        return self._reserved + self._unflushed + self._draining + wbuf

    def _reserve(self, need: int) -> bool:
        charged = self._reserved + self._unflushed + self._draining
        if charged and charged + need > self.server.reply_budget:
            return False  # wait for this connection's own replies to drain
        if not self.admission.replies.take(need, self._holder):
            self._wait_node_budget()
            return False
        self._reserved += need
        return True

    def _unreserve(self, need: int) -> None:
        if need:
            self._reserved -= need
            self.admission.replies.give(need, self._holder)

    def _wait_node_budget(self) -> None:
        if not self._waiting_budget:
            self._waiting_budget = True
            self.admission.replies.when_available(self._node_budget_freed)

    def _node_budget_freed(self) -> None:
        self._waiting_budget = False
        if self._held and not self.closed:
            self.loop.call_soon(self._handle_held)

    def _handle_held(self) -> None:
        """Handle held requests, in order, while their replies fit, a turn's worth at most."""
        held = self._held
        turn = 0
        while held and not self.closed:
            if turn >= TURN_REQUESTS:
                self._next_turn()
                break
            req, size = held[0]
            if not self._dispatch(req, size):
                break
            held.popleft()
            turn += 1
        self._update_reading()

    def handle(self, req: p.Request, reserved: int = 0) -> None:
        """Answer one request: at once, when its acknowledgement resolves, or (for requests
        that must wait) from a task owned by this connection. ``reserved`` reply bytes are
        released once the reply is written."""
        principal = self.principal
        if isinstance(req, p.Hello):
            self.on_hello(req)
            return
        if principal is None:
            raise Unauthenticated("send a hello with an API key first")
        if not self.ticket.proven:
            self._proven()
        outcome = self.server.handlers[type(req)](principal, req)
        if isinstance(outcome, Pending):
            self._track(outcome.ack, req.id, outcome.reply)
        elif asyncio.iscoroutine(outcome):
            self._spawn(req.id, outcome, reserved)
        else:
            self.send(outcome)

    def _proven(self) -> None:
        admission = self.admission
        admission.table.prove(self.ticket)
        self.decoder.max_frame_bytes = self.max_frame_bytes
        assert self.principal is not None
        holder = admission.holder(self.principal.tenant, self.ticket.address)
        if holder != self._holder:
            if self._buffered:  # a partial frame already charged: it is the tenant's now
                admission.requests.give(self._buffered, self._holder)
                admission.requests.force(self._buffered, holder)
            self._holder = holder

    def on_hello(self, req: p.Hello) -> None:
        if req.version != p.PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"protocol version {req.version} unsupported; this node speaks {p.PROTOCOL_VERSION}"
            )
        auth = self.server.auth
        if not auth.open and req.api_key:
            address = self.ticket.address
            if not self.admission.key_allowed(address):
                self.close_with(
                    req.id, AuthThrottled("too many failed API keys from this address; wait")
                )
                return
            try:
                principal = auth.authenticate(req.api_key)
            except Unauthenticated as exc:
                if exc.key_given:
                    self.admission.key_failed(address, self.peer, "tcp")
                raise
        else:
            principal = auth.authenticate(req.api_key)
        self.principal = principal
        self._proven()
        self.send(
            p.HelloOk(
                id=req.id,
                version=p.PROTOCOL_VERSION,
                node_id=self.server.config.node_id,
                tenant=principal.tenant,
                scopes=sorted(principal.scopes),
            )
        )

    # ------------------------------------------------------------ waiting requests
    def _track(self, ack: asyncio.Future[Any], rid: int, reply: Any) -> None:
        """Send ``reply`` once ``ack`` resolves (or the error it fails with). A callback,
        not a task: a produce costs no task per request. A partition's own acknowledgement
        (an :class:`~storage.ack.Ack`) calls it directly when it resolves, so the reply
        leaves in the loop turn of the sync rather than in the next one."""
        self.inflight += 1
        if self.inflight >= self.max_inflight:
            self._update_reading()

        def finished(fut: asyncio.Future[Any]) -> None:
            self.inflight -= 1
            exc = fut.exception() if not fut.cancelled() else ShuttingDown("cancelled")
            # the last reply this connection waits for leaves now (see send)
            last = not self.inflight
            if exc is not None:
                self.send_error(rid, exc, now=last)
            else:
                self.send(reply, now=last)
            self._update_reading()

        if isinstance(ack, Ack):
            ack.when_done(finished)
        else:
            ack.add_done_callback(finished)

    def _spawn(self, rid: int, coro: Coroutine[Any, Any, Any], reserved: int = 0) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        self.inflight += 1
        self._update_reading()

        def finished(t: asyncio.Task[Any]) -> None:
            self.tasks.discard(t)
            self.inflight -= 1
            if reserved and not self.closed:
                # the reply (if any) is queued: its reservation now waits for the write
                self._reserved -= reserved
                self._unflushed += reserved
            if not t.cancelled():
                exc = t.exception()
                last = not self.inflight  # nothing else could share the write (see send)
                if exc is not None:
                    self.send_error(rid, exc, now=last)
                else:
                    self.send(t.result(), now=last)
            self._update_reading()

        task.add_done_callback(finished)


class TcpServer:
    """The TCP port: a :class:`~broker.listener.Listener` (admission, TLS) making a
    :class:`BrokerProtocol` per connection."""

    def __init__(
        self,
        config: Config,
        service: BrokerService,
        intake: EventIntake,
        auth: Authenticator,
        admission: NodeAdmission,
        ssl_context: Any = None,
    ) -> None:
        self.config = config
        self.service = service
        self.auth = auth
        self.keyed = not auth.open
        self.admission = admission
        self.loop = admission.loop
        self.reply_budget = config.admission.max_reply_bytes_per_connection
        self.handlers = handler_table(service, intake, config.node_id)
        # every op of the protocol has a handler (hello is the connection's own)
        assert set(self.handlers) | {p.Hello} == set(get_args(p.Request))
        self.stats = ConnectionStats()
        self.connections: set[BrokerProtocol] = set()
        refused = TooManyConnections("connection limit reached")
        self.listener = Listener(
            "tcp",
            admission,
            lambda ticket: BrokerProtocol(self, ticket),
            refusal=bytes(
                p.encode_message(
                    p.Error(id=0, code=refused.code, message=str(refused), retriable=True)
                )
            ),
            ssl_context=ssl_context,
        )
        self._sweeps = 0
        admission.add_check(self.check)

    async def start(self, host: str, port: int) -> int:
        return await self.listener.start(host, port)

    def check(self, now: float) -> None:
        """Every few seconds: idle and stalled connections (see :meth:`BrokerProtocol.check`)."""
        self.stats.rejected = self.listener.refused
        self._sweeps += 1
        if self._sweeps % _SCAN_EVERY:
            return
        for conn in list(self.connections):
            conn.check(now)

    async def stop_accepting(self) -> None:
        self.listener.stop_accepting()

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
        await self.listener.wait_closed()
