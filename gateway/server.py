"""The WebSocket gateway as one component of the node (``herald/node.py``): started after the
notifications engine, before the listeners; stopped in reverse.

A thin shell over the pieces: ``frames`` (the protocol), ``auth`` (tokens), ``inbox`` (what a
client may still be sent), ``reader`` (the log -> inbox -> sessions), ``sessions`` (who is
connected, bounded sends). Per connection (``_serve``):

1. admission (``broker/listener.py``'s :class:`NodeAdmission`, the node's one policy for
   every door): a connection is admitted the moment it is accepted, before a byte is read,
   out of the node's descriptor budget, within the ``ws`` listener's cap
   (``gateway.max-connections``) and the per-address caps; refused, it gets an HTTP 503 and
   is closed. It is *pending* until its token checks out: its messages may be at most
   ``admission.max-unauthenticated-frame-bytes``, it may be evicted for room, and it is
   dropped past ``admission.handshake-timeout-ms``; failed tokens count against the source
   address's ``admission.auth-failures-per-minute`` like failed API keys;
2. the token, from ``?token=`` or the first message (within ``auth-timeout-ms``); refused
   with a close code and reason (``frames.CLOSE``): missing, invalid, expired, a tenant this
   node does not serve or not the one the URL names;
3. the session is registered (live messages wait in it from here), then the backfill: every
   message numbered above the cursor (``?cursor=``; without one, above the last the user
   marked seen), at most ``backfill-max`` (the newest; ``ready.truncated`` says so), paged,
   waiting for the client to read each page; then ``ready``, ``counts`` and the live stream;
4. client messages: ``seen``/``read``/``archived`` recorded through ``engagement`` (the
   notifications core's marks: the audit, ``GET /events/{id}``, ``wait_seen``), then fresh
   ``counts`` to every device of the user; at most ``messages-per-second`` (else 4009).

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
from pathlib import Path
from typing import Protocol, cast
from urllib.parse import parse_qs, urlsplit

import websockets
from websockets.asyncio.server import Server, ServerConnection, serve

from broker.admission import Ticket, address_key
from broker.config import Config
from broker.events import EventIntake
from broker.listener import NodeAdmission, refusal_http
from broker.local import LocalClient
from broker.service import BrokerService
from channels.inapp import INAPP_TOPIC
from gateway import auth, frames
from gateway.inbox import BROADCAST_PREFIX, Inbox
from gateway.reader import BROADCAST_TOPIC, Audience, Reader, everyone
from gateway.sessions import Session, SessionTable
from storage.kv import KV

log = logging.getLogger("herald.gateway")
# websockets logs every connection's open and close at INFO: one line per connection is too
# many at 50,000 of them; its warnings and errors still show
_ws_log = logging.getLogger("herald.gateway.websockets")
_ws_log.setLevel(logging.WARNING)

PAGE = 200  # backfill messages per page (one LMDB snapshot, then wait for the client)


class Engagement(Protocol):
    """What the gateway asks the notifications core (``notify/edge.py`` answers)."""

    async def mark(self, tenant: str, user: str, event_id: str, what: str) -> bool:
        """Record that ``user`` saw / read / archived their notification of ``event_id``;
        durable before it returns. False if the core does not know it."""

    def counts(self, tenant: str, user: str) -> tuple[int, int]:
        """(unseen, unread) of the user's feed."""


class NoEngagement:
    async def mark(self, tenant: str, user: str, event_id: str, what: str) -> bool:
        return False

    def counts(self, tenant: str, user: str) -> tuple[int, int]:
        return (0, 0)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Gateway:
    """The gateway of one node. ``sessions`` exists from construction, so the in-app
    channel and the fan-out can be given its presence before the gateway starts."""

    name = "gateway"

    def __init__(
        self,
        config: Config,
        service: BrokerService,
        intake: EventIntake,
        kv: KV,
        admission: NodeAdmission,
        *,
        tenants: Callable[[str], bool] = lambda t: True,
        engagement: Engagement | None = None,
        audience: Audience = everyone,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        self.config = config
        self.gcfg = g = config.gateway
        self.service = service
        self.intake = intake
        self.kv = kv
        self.tenants = tenants
        self.engagement: Engagement = engagement or NoEngagement()
        self.audience = audience
        self.ssl_context = ssl_context
        self.admission = admission
        self.clock = clock
        self.sessions = SessionTable(
            send_buffer_bytes=g.send_buffer_bytes,
            close_timeout=g.close_timeout_ms / 1000,
            messages_per_second=g.messages_per_second,
            message_burst=g.message_burst,
        )
        self.inbox: Inbox | None = None
        self.reader: Reader | None = None
        self.client: LocalClient | None = None
        self.secret = b""
        self._server: Server | None = None
        self.port = 0
        self.refused: dict[str, int] = {}
        self.accepted = 0

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        g = self.gcfg
        loop = asyncio.get_running_loop()
        self.secret = await loop.run_in_executor(
            None,
            auth.load_or_create_secret,
            Path(self.config.storage.data_dir),
            g.token_secret,
        )
        # the in-app channel's outlet makes __inapp when the channel is on; the reader
        # needs both topics either way (__broadcast is the engine's)
        self.service.topics.ensure_internal(INAPP_TOPIC, g.partitions)
        self.service.topics.ensure_internal(BROADCAST_TOPIC, self.config.notify.partitions)
        self.inbox = Inbox(self.kv)
        self.client = LocalClient(self.service, self.intake, client_id="herald-gateway")
        self.reader = Reader(
            self.client,
            self.kv,
            self.inbox,
            self.sessions,
            group=f"gateway.{self.config.node_id}",
            audience=lambda t, users, topic, cat: self.audience(t, users, topic, cat),
            retention_ms=g.inbox_retention_ms,
            clock=self.clock,
        )
        await self.reader.start()
        ping = g.ping_interval_ms / 1000 or None
        tls: dict[str, object] = {}
        if self.ssl_context is not None:
            tls = {
                "ssl": self.ssl_context,
                "ssl_handshake_timeout": self.admission.config.handshake_timeout_ms / 1000,
            }
        self._server = await serve(
            self._serve,
            self.config.listen.host,
            self.config.listen.ws_port,
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
            **tls,  # type: ignore[arg-type]
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        log.info(
            "event=gateway_ready port=%d max_connections=%d inbox_head=%d",
            self.port,
            g.max_connections,
            self.inbox.head,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.gcfg.close_timeout_ms / 1000 + 1):
                    await self._server.wait_closed()
        if self.reader is not None:
            await self.reader.stop()
        if self.client is not None:
            await self.client.close()

    # ------------------------------------------------------------- the handshake
    def _refuse(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1

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

    async def _backfill(self, session: Session, cursor: int | None) -> None:
        inbox = self.inbox
        assert inbox is not None
        tenant, user = session.tenant, session.user
        after = cursor if cursor is not None else inbox.last_seen(tenant, user)
        limit = self.gcfg.backfill_max
        floor = inbox.newest_floor(tenant, user, limit)
        truncated = floor > after
        after = max(after, floor)
        allowed: dict[tuple[str, str | None], bool] = {}

        def allows(topic: str, category: str | None) -> bool:
            hit = allowed.get((topic, category))
            if hit is None:
                hit = allowed[(topic, category)] = user in self.audience(
                    tenant, (user,), topic, category
                )
            return hit

        sent = 0
        session.last_seq = after
        while sent < limit:
            page = inbox.backfill(tenant, user, session.last_seq, min(PAGE, limit - sent), allows)
            for seq, frame in page:
                if seq > session.last_seq and session.write(frame):
                    session.last_seq = seq
                    sent += 1
            if session.cut_off is not None:
                return
            if len(page) < PAGE:
                break
            await session.conn.drain()  # the client reads a page before the next one
        session.finish_backfill()
        session.write(frames.ready(frames.format_cursor(session.last_seq), sent, truncated))
        unseen, unread = self.engagement.counts(tenant, user)
        session.write(frames.counts(unseen, unread))

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

    async def _engage(self, session: Session, what: str, ids: list[str]) -> None:
        inbox = self.inbox
        assert inbox is not None
        tenant, user = session.tenant, session.user
        top = 0
        unknown = []
        marks = []
        for wid in dict.fromkeys(ids):
            seq = inbox.lookup(tenant, user, wid)
            if seq is None:
                unknown.append(wid)
                continue
            top = max(top, seq)
            if not wid.startswith(BROADCAST_PREFIX):
                event_id = inbox.event_of(tenant, user, seq)
                if event_id is not None:
                    marks.append(self.engagement.mark(tenant, user, event_id, what))
        if marks:
            await asyncio.gather(*marks)
        if top and what in ("seen", "read"):
            inbox.mark_seen(tenant, user, top)
        if unknown:
            session.write(
                frames.error("unknown_ids", f"not in your inbox: {', '.join(unknown[:10])}")
            )
        unseen, unread = self.engagement.counts(tenant, user)
        self.sessions.write_user(tenant, user, frames.counts(unseen, unread))

    # ----------------------------------------------------------------- retraction
    async def retract(self, tenant: str, event_id: str) -> int:
        """Take back every in-app message and broadcast of the event: removed from every
        inbox (no backfill returns it; a copy still on its way is dropped on arrival) and
        ``retract`` sent to every connected device that may have it. Durable before it
        returns. Returns how many messages went."""
        inbox = self.inbox
        assert inbox is not None
        gone = inbox.retract(tenant, event_id, self.clock())
        for r in gone:
            self.sessions.write_user(r.tenant, r.user, frames.retract(r.id))
        await self.kv.sync()
        log.info(
            "event=gateway_retract tenant=%s event_id=%s messages=%d", tenant, event_id, len(gone)
        )
        return len(gone)

    # ------------------------------------------------------------------- tokens
    def mint(self, user: str, *, tenant: str = "default", ttl_s: int = 3600) -> str:
        """A token for ``user`` signed with this node's secret (tests, the CLI's twin)."""
        return auth.mint(self.secret, user, tenant=tenant, now_s=self.clock() // 1000, ttl_s=ttl_s)

    def stats(self) -> dict[str, object]:
        reader = self.reader
        return {
            "connections": self.sessions.count,
            "accepted": self.accepted,
            "refused": dict(self.refused),
            "cut_off": dict(self.sessions.cut_offs),
            "indexed": reader.indexed if reader else 0,
            "pushed": reader.pushed if reader else 0,
        }


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


def tenants_of(keys: Iterable[str]) -> Callable[[str], bool]:
    """The tenants a node serves: those of its API keys (``default`` when it has none)."""
    known = set(keys) - {"*"} or {"default"}
    return known.__contains__
