"""The gateway's edge: the ``websockets`` server and what it does with one connection up to
the point where the inbox is needed. Shared by the in-process gateway (``gateway/server.py``,
``gateway.workers = 0``) and by each worker process (``gateway/worker.py``); the two differ
only in where a backfill comes from and where a mark goes (:meth:`Edge._backfill`,
:meth:`Edge._engage`).

Per connection (``_serve``):

1. admission (``broker/listener.py``'s :class:`NodeAdmission`, the node's one policy for
   every door; in a worker, the worker's own, over its own descriptors): a connection is
   admitted the moment it is accepted, before a byte is read, out of the descriptor budget,
   within the ``ws`` listener's cap and the per-address caps; refused, it gets an HTTP 503
   and is closed. It is *pending* until its token checks out: its messages may be at most
   ``admission.max-unauthenticated-frame-bytes``, it may be evicted for room, and it is
   dropped past ``admission.handshake-timeout-ms``; failed tokens count against the source
   address's ``admission.auth-failures-per-minute`` like failed API keys;
2. the token, from ``?token=`` or the first message (within ``auth-timeout-ms``); refused
   with a close code and reason (``frames.CLOSE``): missing, invalid, expired, a tenant this
   node does not serve or not the one the URL names;
3. the session is registered (live messages wait in it from here), then the backfill, then
   ``ready``, ``counts`` and the live stream;
4. client messages: ``seen``/``read``/``archived`` (``_engage``), at most
   ``messages-per-second`` (else 4009).

Keepalive pings and their timeout are websockets' own (``ping-interval-ms``,
``ping-timeout-ms``); a connection that sends no message for ``idle-timeout-ms`` (if set) is
closed 4011.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from typing import cast
from urllib.parse import parse_qs, urlsplit

import websockets
from websockets.asyncio.server import Server, ServerConnection, serve

from broker.admission import Ticket, address_key
from broker.config import Config
from broker.listener import NodeAdmission, refusal_http
from gateway import auth, frames
from gateway.sessions import Session, SessionTable

log = logging.getLogger("herald.gateway")
# websockets logs every connection's open and close at INFO: one line per connection is too
# many at 50,000 of them; its warnings and errors still show
_ws_log = logging.getLogger("herald.gateway.websockets")
_ws_log.setLevel(logging.WARNING)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Edge:
    """The WebSocket side of a gateway: ``listen`` opens the server, ``close`` closes it
    (every connection gets 1001). Subclasses say where backfills and marks go."""

    def __init__(
        self,
        config: Config,
        admission: NodeAdmission,
        *,
        tenants: Callable[[str], bool] = lambda t: True,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        self.config = config
        self.gcfg = g = config.gateway
        self.tenants = tenants
        self.ssl_context = ssl_context
        self.admission = admission
        self.clock = clock
        self.sessions = SessionTable(
            send_buffer_bytes=g.send_buffer_bytes,
            close_timeout=g.close_timeout_ms / 1000,
            messages_per_second=g.messages_per_second,
            message_burst=g.message_burst,
        )
        self.secret = b""
        self._server: Server | None = None
        self.port = 0
        self.refused: dict[str, int] = {}
        self.accepted = 0

    # ---------------------------------------------------------------- lifecycle
    async def listen(self, port: int, *, reuse_port: bool = False) -> None:
        """Serve ``port`` (0: any) on ``listen.host``; with ``reuse_port``, one of several
        processes sharing the port (``SO_REUSEPORT``: the kernel spreads new connections
        over them by a hash of the address pair)."""
        g = self.gcfg
        ping = g.ping_interval_ms / 1000 or None
        extra: dict[str, object] = {}
        if self.ssl_context is not None:
            extra = {
                "ssl": self.ssl_context,
                "ssl_handshake_timeout": self.admission.config.handshake_timeout_ms / 1000,
            }
        if reuse_port:
            extra["reuse_port"] = True
        self._server = await serve(
            self._serve,
            self.config.listen.host,
            port,
            create_connection=_admitted_connection(self.admission),
            compression=None,
            # until the token checks out; then max-frame-bytes (_serve)
            max_size=min(g.max_frame_bytes, self.admission.config.max_unauthenticated_frame_bytes),
            max_queue=4,
            ping_interval=ping,
            ping_timeout=(g.ping_timeout_ms / 1000 or None) if ping else None,
            close_timeout=g.close_timeout_ms / 1000,
            open_timeout=g.auth_timeout_ms / 1000,
            server_header=None,
            logger=_ws_log,
            **extra,  # type: ignore[arg-type]
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.gcfg.close_timeout_ms / 1000 + 1):
                    await self._server.wait_closed()

    def _refuse(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1

    # ------------------------------------------------------------ what differs
    async def _backfill(self, session: Session, cursor: int | None) -> None:
        """Send what the session missed above ``cursor`` (None: above the last the user
        marked seen), then ``ready`` and ``counts``; the session goes live."""
        raise NotImplementedError

    async def _engage(self, session: Session, what: str, ids: list[str]) -> None:
        """Record ``seen``/``read``/``archived`` of ``ids``; fresh ``counts`` follow."""
        raise NotImplementedError

    def _closed(self, session: Session) -> None:
        """The session is gone (its connection closed)."""

    # ---------------------------------------------------------------- a connection
    async def _serve(self, conn: ServerConnection) -> None:
        assert conn.request is not None
        query = parse_qs(urlsplit(conn.request.path).query)
        token = _one(query, "token")
        ticket = conn.ticket if isinstance(conn, AdmittedConnection) else None
        address = ticket.address if ticket is not None else "local"
        try:
            if token is None:
                token = await self._auth_message(conn)
            if not self.admission.key_allowed(address):
                # too many bad tokens from this address: not even checked until it refills
                raise auth.TokenInvalid("too many invalid tokens from this address")
            claims = auth.verify(self.secret, token, now_s=self.clock() / 1000)
            wanted = _one(query, "tenant")
            if (wanted is not None and wanted != claims.tenant) or not self.tenants(claims.tenant):
                raise auth.TenantRefused("tenant refused")
            cursor = frames.parse_cursor(_one(query, "cursor"))
        except auth.TokenError as exc:
            self._refuse(exc.code)
            if exc.code == "token_invalid":  # a forged or garbled token, as a wrong API key
                self.admission.key_failed(address, str(conn.remote_address), "ws")
            close = frames.CLOSE[exc.code]
            await conn.close(close.code, close.reason)
            return
        except frames.ProtocolViolation as exc:
            self._refuse("protocol_error")
            await conn.close(frames.CLOSE["protocol_error"].code, str(exc)[:120])
            return
        except (TimeoutError, websockets.ConnectionClosed):
            return
        if ticket is not None:
            self.admission.table.prove(ticket)  # never evicted for room from here on
        conn.protocol.max_message_size = self.gcfg.max_frame_bytes
        session = Session(self.sessions, conn, claims.tenant, claims.sub)
        self.sessions.add(session)
        self.accepted += 1
        try:
            await self._backfill(session, cursor)
            await self._listen(session)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.sessions.remove(session)
            self._closed(session)

    async def _auth_message(self, conn: ServerConnection) -> str:
        try:
            async with asyncio.timeout(self.gcfg.auth_timeout_ms / 1000):
                data = await conn.recv()
        except TimeoutError:
            raise auth.TokenMissing("no auth message in time") from None
        try:
            msg = frames.decode_client(data)
        except frames.ProtocolViolation:
            raise auth.TokenMissing("the first message is not an auth message") from None
        if not isinstance(msg, frames.Auth):
            raise auth.TokenMissing("the first message is not an auth message")
        return msg.token

    async def _listen(self, session: Session) -> None:
        conn = session.conn
        idle = self.gcfg.idle_timeout_ms / 1000 or None
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(idle):
                    data = await conn.recv()
            except TimeoutError:
                session.cut("idle_timeout")
                await conn.wait_closed()
                return
            if not session.allow_message(loop.time()):
                session.cut("rate_limited")
                await conn.wait_closed()
                return
            try:
                msg = frames.decode_client(data)
            except frames.ProtocolViolation as exc:
                session.write(frames.error(exc.code, str(exc)))
                continue
            if isinstance(msg, frames.Auth):
                session.write(frames.error("bad_message", "already authenticated"))
                continue
            await self._engage(session, frames.engagement_of(msg), msg.ids)


class AdmittedConnection(ServerConnection):
    """A websockets connection under the node's admission policy (made by
    :func:`_admitted_connection` for one :class:`NodeAdmission`): admitted in
    ``connection_made``, the moment the socket is accepted and before a byte is read (with TLS,
    once its handshake is done: asyncio makes the protocol only then, so a stalled TLS
    handshake is bounded by ``ssl_handshake_timeout`` rather than by the budget); refused
    with an HTTP 503 and closed; released in ``connection_lost``."""

    admission: NodeAdmission
    ticket: Ticket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = address_key(peer[0] if isinstance(peer, tuple) else "")
        t = cast(asyncio.Transport, transport)
        ticket, reason = self.admission.table.admit("ws", address, t.abort)
        if ticket is None:
            self.admission.note(
                "connection_refused",
                "event=connection_refused listener=ws address=%s reason=%s",
                address,
                reason,
            )
            t.write(_REFUSAL)
            t.close()
            return
        self.ticket = ticket
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.ticket is not None:
            super().data_received(data)

    def eof_received(self) -> None:
        if self.ticket is not None:
            super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ticket is None:
            return  # refused: websockets never saw it
        self.admission.table.release(self.ticket)
        super().connection_lost(exc)


_REFUSAL = refusal_http(
    b'{"error":{"code":"connection_limit","message":"connection limit reached: try again later",'
    b'"field":null}}'
)


def _admitted_connection(admission: NodeAdmission) -> type[AdmittedConnection]:
    return type("AdmittedConnection", (AdmittedConnection,), {"admission": admission})


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def served_tenants(keys: Iterable[str]) -> frozenset[str]:
    """The tenants a node serves: those of its API keys (``default`` when it has none)."""
    return frozenset(set(keys) - {"*"} or {"default"})


def tenants_of(keys: Iterable[str]) -> Callable[[str], bool]:
    return served_tenants(keys).__contains__
