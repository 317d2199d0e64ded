"""Listening sockets under the node's admission policy, with optional TLS: the I/O shell
around :mod:`broker.admission`, shared by the TCP server and the HTTP listener (the
WebSocket gateway applies the same :class:`NodeAdmission` to its own connections:
``gateway/server.py``).

A connection is admitted the moment it is accepted, before a byte is read and before any
TLS handshake, so neither a flood of idle sockets nor of stalled handshakes escapes the
connection budget. Admitted, it gets its protocol (or, with TLS, the handshake first, which
must finish within ``admission.handshake-timeout-ms``); refused, it gets a short refusal in
the protocol's own words (nothing over TLS, which cannot speak before its handshake) and is
closed. A TLS listener accepts connections itself (``add_reader`` on the listening socket,
then ``connect_accepted_socket`` once admitted), backing off for 100 ms when the process is
out of descriptors.

:class:`NodeAdmission` is the policy made live: the connection table, the node-wide byte
budgets, the key-guessing throttle and the log limiter, and one sweep a second that closes
pending connections past their deadline and lets each listener check its own (request
deadlines, idle and stalled connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any, Final

from broker.admission import (
    ANONYMOUS,
    Admission,
    AuthThrottle,
    ByteBudget,
    LogLimiter,
    Ticket,
    address_key,
    connection_capacity,
)
from broker.config import Config

log = logging.getLogger("herald.admission")

SWEEP_S: Final = 1.0
# connections a TLS listener accepts per readiness event, so a connection storm cannot hold
# the loop in the accept loop
_ACCEPTS_PER_TURN: Final = 64
# log lines of one kind (refusals, failed keys, malformed requests) per second, at most
LOG_LINES_PER_S: Final = 5.0


class NodeAdmission:
    """The node's admission policy, live. ``open_files_limit`` is the soft
    ``RLIMIT_NOFILE`` the node runs with; the connection budget is that minus
    ``admission.fd-reserve``."""

    def __init__(
        self,
        config: Config,
        open_files_limit: int,
        listeners: tuple[str, ...] = ("tcp", "http"),
        caps: Mapping[str, int] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        a = config.admission
        self.config = a
        self.keyed = bool(config.auth.keys)
        self.capacity = connection_capacity(open_files_limit, a.fd_reserve)
        self.table = Admission(
            capacity=self.capacity,
            # each listener's own cap (``caps``; else limits.max-connections) inside the budget
            listeners={
                name: (caps or {}).get(name, config.limits.max_connections) for name in listeners
            },
            unauthenticated_share=a.unauthenticated_share,
            max_unauthenticated_per_address=a.max_unauthenticated_per_address,
            max_per_address=a.max_connections_per_address,
            handshake_timeout_s=a.handshake_timeout_ms / 1000,
            clock=self.loop.time,
        )
        self.requests = ByteBudget(a.max_request_bytes_in_flight, a.max_request_bytes_per_tenant)
        self.replies = ByteBudget(a.max_reply_bytes_in_flight, a.max_reply_bytes_per_tenant)
        self.throttle = AuthThrottle(a.auth_failures_per_minute, self.loop.time)
        self.logs = LogLimiter(LOG_LINES_PER_S, self.loop.time)
        self.auth_failures = 0
        self.request_timeouts = 0
        self.send_timeouts = 0
        self.idle_closed = 0
        self._checks: list[Callable[[float], None]] = []
        self._sweeper: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def add_check(self, check: Callable[[float], None]) -> None:
        """``check(now)`` runs once a second: a listener's own deadlines."""
        self._checks.append(check)

    def _sweep(self) -> None:
        now = self.loop.time()
        try:
            expired = self.table.expire(now)
            if expired:
                self.note("handshake_timeout", "event=connections_expired count=%d", expired)
            for check in self._checks:
                check(now)
        except Exception:
            log.exception("event=admission_sweep_failed")
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    # ----------------------------------------------------------------- key checks
    def holder(self, tenant: str | None, address: str) -> str:
        """Who a connection's bytes count against in the budgets: its tenant once it showed
        a key, all unauthenticated connections together before; on a node without keys,
        its source address."""
        if not self.keyed:
            return address
        return ANONYMOUS if tenant is None else tenant

    def key_allowed(self, address: str) -> bool:
        """May a key from ``address`` be checked now (not throttled for failed ones)?"""
        return self.throttle.allowed(address)

    def key_failed(self, address: str, peer: str, listener: str) -> None:
        self.auth_failures += 1
        self.throttle.failed(address)
        self.note(
            "auth_failed",
            "event=auth_failed listener=%s peer=%s throttled=%s",
            listener,
            peer,
            "no" if self.throttle.allowed(address) else "yes",
            level=logging.WARNING,
        )

    def note(self, kind: str, msg: str, *args: Any, level: int = logging.INFO) -> None:
        """Log one line of ``kind``, at most :data:`LOG_LINES_PER_S` a second per kind; a
        line written after dropped ones says how many (``suppressed=N``)."""
        if not log.isEnabledFor(level):
            return
        dropped = self.logs.allow(kind)
        if dropped is None:
            return
        if dropped:
            log.log(level, msg + " suppressed=%d", *args, dropped)
        else:
            log.log(level, msg, *args)


class Listener:
    """One listening socket: each accepted connection is admitted (or refused with
    ``refusal``, written in the clear), then, with ``ssl_context``, handshaken, then handed
    to ``factory(ticket)``. The protocol must call ``admission.table.release(ticket)`` from
    ``connection_lost``."""

    def __init__(
        self,
        name: str,
        admission: NodeAdmission,
        factory: Callable[[Ticket], asyncio.Protocol],
        *,
        refusal: bytes,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.name = name
        self.admission = admission
        self.factory = factory
        self.refusal = refusal
        self.ssl_context = ssl_context
        self.loop = admission.loop
        self.refused = 0
        self.handshake_failures = 0
        self._server: asyncio.Server | None = None
        self._socket: socket.socket | None = None
        self._resume_accept: asyncio.TimerHandle | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (useful with 0)."""
        if self.ssl_context is None:
            self._server = await self.loop.create_server(
                lambda: _Gate(self), host, port, backlog=1024, reuse_address=True
            )
            return int(self._server.sockets[0].getsockname()[1])
        # TLS: the node accepts itself, so a connection is admitted before its handshake
        # (uvloop starts reading as soon as a protocol exists; a TLS handshake cannot be
        # started safely on a connection accepted by a server without one)
        sock = socket.create_server((host, port), backlog=1024, reuse_port=False)
        sock.setblocking(False)
        self._socket = sock
        self.loop.add_reader(sock.fileno(), self._accept_ready)
        return int(sock.getsockname()[1])

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._socket is not None:
            self.loop.remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
        if self._resume_accept is not None:
            self._resume_accept.cancel()
        for task in self._handshakes:
            task.cancel()

    async def wait_closed(self) -> None:
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def _admit(self, peer: Any, close: Callable[[], None]) -> Ticket | None:
        host = peer[0] if isinstance(peer, tuple) else ""
        address = address_key(host)
        ticket, reason = self.admission.table.admit(self.name, address, close)
        if ticket is None:
            self.refused += 1
            self.admission.note(
                "connection_refused",
                "event=connection_refused listener=%s address=%s reason=%s",
                self.name,
                address,
                reason,
            )
        return ticket

    def accept(self, transport: asyncio.Transport) -> None:
        """A plain connection, accepted by the server: admit it or refuse it in words."""
        ticket = self._admit(transport.get_extra_info("peername"), transport.abort)
        if ticket is None:
            transport.write(self.refusal)
            transport.close()
            return
        protocol = self.factory(ticket)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def _accept_ready(self) -> None:
        """The TLS listening socket is readable: accept what is waiting (a bounded number
        at a time), admit each connection, and start its handshake."""
        assert self._socket is not None
        for _ in range(_ACCEPTS_PER_TURN):
            try:
                conn, peer = self._socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # out of descriptors: keep serving the open connections, retry soon
                    self.admission.note(
                        "accept_failed",
                        "event=accept_failed listener=%s error=%s",
                        self.name,
                        errno.errorcode.get(exc.errno, exc.errno),
                        level=logging.WARNING,
                    )
                    self.loop.remove_reader(self._socket.fileno())
                    self._resume_accept = self.loop.call_later(0.1, self._accept_again)
                    return
                return  # ECONNABORTED and the like: that one connection is gone
            conn.setblocking(False)
            handshaking = _Handshaking()
            ticket = self._admit(peer, handshaking.cancel)
            if ticket is None:
                conn.close()  # nothing can be said before the handshake
                continue
            task = self.loop.create_task(self._handshake(conn, ticket))
            handshaking.task = task
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _accept_again(self) -> None:
        self._resume_accept = None
        if self._socket is not None:
            self.loop.add_reader(self._socket.fileno(), self._accept_ready)

    async def _handshake(self, conn: socket.socket, ticket: Ticket) -> None:
        assert self.ssl_context is not None
        table = self.admission.table
        started = False

        def protocol() -> asyncio.Protocol:
            nonlocal started
            started = True  # the transport owns the socket from here on
            return self.factory(ticket)

        try:
            remaining = ticket.since + table.handshake_timeout_s - self.loop.time()
            transport, _protocol = await self.loop.connect_accepted_socket(
                protocol,
                conn,
                ssl=self.ssl_context,
                ssl_handshake_timeout=max(0.1, remaining),
            )
        except BaseException as exc:
            if not started:
                conn.close()
            table.release(ticket)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, Exception):
                self.handshake_failures += 1
                self.admission.note(
                    "tls_handshake_failed",
                    "event=tls_handshake_failed listener=%s address=%s error=%s",
                    self.name,
                    ticket.address,
                    type(exc).__name__,
                )
                return
            raise
        ticket.close = transport.abort


class _Handshaking:
    """How to drop a connection still in its TLS handshake: cancel the handshake."""

    __slots__ = ("task",)

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class _Gate(asyncio.Protocol):
    """The protocol of a connection for the instant between accept and admission."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.listener.accept(transport)  # type: ignore[arg-type]


def refusal_http(body: bytes) -> bytes:
    """A complete HTTP 503 answer with ``body`` (JSON), for a connection refused at accept."""
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
