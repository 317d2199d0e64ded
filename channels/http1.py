"""A lean HTTP/1.1 keep-alive client for one-shot POSTs (the webhook channel's sender).

Why not aiohttp's ``ClientSession``: at 1,000 webhooks/s its request machinery (request and
response objects, header multidicts, the stream reader, the timer context, the connector's
bookkeeping) was 15-20% of the node's loop time at 1,000 webhooks/s; the channel's CPU per
webhook went from ~125 us on it to ~50 us on this client (``python -m bench.webhooks``,
signing included). A webhook needs
little of it: one POST with prebuilt bytes, the status, two headers (``Retry-After``,
``Location``) and at most ``max_body`` bytes of the answer. This client is that, on asyncio
Protocols, with llhttp (``httptools``, already used by the lean ingest path) parsing the
responses: chunked and ``Content-Length`` bodies, bodies ended by the connection closing,
1xx interim answers skipped, ``Connection: close`` and HTTP/1.0 answers not reused.

What it keeps from the aiohttp setup it replaces, on purpose:

- **SSRF guard at connect time**: names are resolved by a
  :class:`~channels.ssrf.GuardedResolver` (refused addresses dropped, the lookup failed when
  none is left; answers cached for ``dns_cache_s`` only after the check), and the exact
  address of every connect is checked once more by :meth:`AddressPolicy.check` just before
  the socket is made, the only check for an IP literal. A connection is only ever made to an
  address that passed, so a second, different DNS answer cannot slip in.
- **TLS with verification**: ``https`` origins use ``ssl_context`` (the system's default,
  verifying, context unless given) with SNI and host name checking on the URL's host.
- **Timeouts**: ``connect_timeout_s`` for resolving, TCP and the TLS handshake; ``timeout_s``
  for the whole request, waiting for a pooled connection included.
- **Bounded reads**: at most ``max_body`` bytes of a body are kept; past that the connection
  is dropped, never drained. A response head past :data:`MAX_HEAD_BYTES` is refused.
- **No redirects followed, no cookies, no proxies, no decompression**: none is implemented.

The pool: at most ``pool_size`` connections open (idle, busy or being opened) across all
origins. A request takes the most recently used idle connection of its origin, else opens a
new one if under the bound, else closes the least recently used idle connection of any
origin, else waits (within ``timeout_s``) for one to be released or closed. Idle connections
live ``keepalive_s``. The bound per origin is the caller's (the webhook channel's
per-endpoint concurrency limit): a new connection is opened only when the origin has no idle
one, so an origin never has more connections than it once had requests in flight.

Stale connections: a server may close an idle keep-alive connection at any time. One whose
close has already arrived is dropped from the pool when it arrives; one that closes while
the request is on its way (nothing of a response came back) is retried once, at once, on a
new connection rather than counted as a failed attempt.

Costs: one file descriptor and one llhttp parser (~1 KiB) per open connection, plus the
kernel's socket buffers; per request one future, one timer, one ``write``.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
import ssl
from collections.abc import Callable
from typing import NamedTuple, cast

import httptools

from channels.errors import (
    BadResponse,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    DnsError,
    ForbiddenAddress,
    RequestTimeout,
)
from channels.ssrf import AddressPolicy, GuardedResolver

MAX_HEAD_BYTES = 65_536
"""Bytes of a response's status line and headers read at most (aiohttp allowed ~8 KiB per
line and 32 KiB in all); a longer head is a ``BadResponse``."""


class Route(NamedTuple):
    """Where a request goes and how its first lines read; made once per URL."""

    key: str  # the origin, ``scheme://host:port``: what shares a pool of connections
    host: str  # what is resolved or, for an IP literal, connected to
    port: int
    tls: bool
    start: bytes  # b"POST <path?query> HTTP/1.1\r\nHost: <host[:port]>\r\n"


def route(scheme: str, host: str, port: int, raw_host: str, default_port: bool, path: str) -> Route:
    """The :class:`Route` of a URL's parts (``raw_host`` IDNA-encoded, ``path`` with its
    query, percent-encoded: neither can hold a CR or LF)."""
    netloc = f"[{raw_host}]" if ":" in raw_host else raw_host
    if not default_port:
        netloc = f"{netloc}:{port}"
    start = f"POST {path or '/'} HTTP/1.1\r\nHost: {netloc}\r\n".encode("ascii")
    return Route(f"{scheme}://{host}:{port}", host, port, scheme == "https", start)


class Answer(NamedTuple):
    """One response: its status, the headers a sender acts on, and up to ``max_body`` bytes.

    ``truncated``: the body went on past ``max_body`` (the connection was dropped).
    ``cut_short``: the head arrived but not the whole body, and why (``connection_lost`` or
    ``timeout``, with ``detail``); ``None`` for a whole answer.
    """

    status: int
    retry_after: str | None
    location: str | None
    body: bytes
    truncated: bool = False
    cut_short: str | None = None
    detail: str = ""


# ------------------------------------------------------------------------- one connection
_IDLE, _WAITING, _BROKEN = 0, 1, 2


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses its response with llhttp, and
    resolves the request's future with an :class:`Answer` (or an error)."""

    def __init__(self, pool: HttpClient, key: str, max_body: int) -> None:
        self._pool = pool
        self.key = key
        self._max_body = max_body
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = True  # counted in the pool's open connections until discarded
        self.reused = False
        self.idle_since = 0.0
        self._state = _IDLE
        self._waiter: asyncio.Future[Answer] | None = None
        self._reset()

    def _reset(self) -> None:
        self.got_bytes = False
        self.head_done = False
        self._head_bytes = 0
        self._status = 0
        self._retry_after: str | None = None
        self._location: str | None = None
        self._until_eof = True  # no Content-Length, no Transfer-Encoding: ends at close
        self._body: list[bytes] = []
        self._size = 0

    # ------------------------------------------------------------- the caller's side
    def request(self, data: bytes) -> asyncio.Future[Answer]:
        """Send ``data`` (a whole request) and return the future of its answer."""
        assert self.transport is not None and self._state == _IDLE
        self._reset()
        waiter = self._waiter = self._pool.loop.create_future()
        self._state = _WAITING
        self.transport.write(data)
        return waiter

    def partial(self, reason: str, detail: str) -> Answer:
        """What arrived of a response whose head came and whose body did not all come."""
        return Answer(
            self._status,
            self._retry_after,
            self._location,
            b"".join(self._body),
            cut_short=reason,
            detail=detail,
        )

    @property
    def reusable(self) -> bool:
        return (
            self._state == _IDLE
            and not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def abort(self) -> None:
        self._state = _BROKEN
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._state != _WAITING:  # bytes nobody asked for: the connection is unusable
            self.abort()
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("the server switched protocols"))
        except httptools.HttpParserError as exc:
            if self._state == _WAITING:
                self._fail(BadResponse(f"not an HTTP response: {exc}"))
            else:  # bytes after a complete answer: never reused
                self.abort()
        if self._state == _BROKEN:
            self.abort()
        elif not self.head_done:  # llhttp keeps no head bytes, httptools a partial header's
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(BadResponse(f"response head longer than {MAX_HEAD_BYTES} bytes"))

    def eof_received(self) -> bool:
        return False  # close our side too: the connection is done

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == _WAITING:
            waiter = self._waiter
            if self.head_done and self._until_eof:  # the body was "until the close"
                self._finish(truncated=False)
            elif waiter is not None and not waiter.done():
                why = str(exc) if exc is not None else "closed by the server"
                waiter.set_exception(ConnectionLost(why))
        self._state = _BROKEN
        self._pool.lost(self)

    # ------------------------------------------------------------- llhttp callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.lower()
        if n == b"retry-after":
            self._retry_after = value.decode("latin-1")
        elif n == b"location":
            self._location = value.decode("latin-1")
        elif n == b"content-length" or n == b"transfer-encoding":
            self._until_eof = False

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self.head_done = True
        status = self._status
        if status < 200 or status == 204 or status == 304:
            self._until_eof = False

    def on_body(self, body: bytes) -> None:
        if self._state != _WAITING or self._status < 200:
            return
        self._size += len(body)
        self._body.append(body)
        if self._size > self._max_body:
            self._finish(truncated=True)

    def on_message_complete(self) -> None:
        if self._state != _WAITING:
            return
        if 100 <= self._status < 200:  # 100 Continue, 103 Early Hints: the answer follows
            self._reset()
            self.got_bytes = True
            return
        self._finish(truncated=False)

    # ------------------------------------------------------------------ internals
    def _finish(self, *, truncated: bool) -> None:
        body = b"".join(self._body)
        if truncated:
            body = body[: self._max_body]
            self._state = _BROKEN  # dropped, not drained
        elif self.closed or not self._parser.should_keep_alive():
            self._state = _BROKEN  # Connection: close, HTTP/1.0, or ended by the close
        else:
            self._state = _IDLE
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(
                Answer(self._status, self._retry_after, self._location, body, truncated)
            )

    def _fail(self, exc: Exception) -> None:
        self._state = _BROKEN
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


# ------------------------------------------------------------------------------ the pool
class HttpClient:
    """POSTs over a bounded pool of keep-alive connections. See the module docstring.

    ``policy`` is the SSRF policy every connected address must pass; ``resolver`` an aiohttp
    ``AbstractResolver`` (wrapped in a :class:`GuardedResolver`; the threaded
    ``getaddrinfo`` resolver unless given); ``ssl_context`` verifies TLS servers (the
    default verifying context unless given); ``headers`` are sent with every request
    (``Name: value`` lines, each ending in CRLF); ``clock`` is the loop's monotonic time.
    """

    def __init__(
        self,
        *,
        policy: AddressPolicy,
        resolver: GuardedResolver,
        ssl_context: ssl.SSLContext | None,
        pool_size: int,
        timeout_s: float,
        connect_timeout_s: float,
        keepalive_s: float,
        dns_cache_s: float,
        max_body: int,
        headers: bytes = b"",
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._policy = policy
        self._resolver = resolver
        self._ssl = ssl_context
        self.pool_size = pool_size
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._dns_cache_s = dns_cache_s
        self._max_body = max_body
        self._headers = headers
        self.open = 0  # connections open or being opened: never above pool_size
        self.peak_open = 0
        self.opened = 0  # connections ever opened (tests, metrics)
        self._idle: dict[str, list[_Connection]] = {}
        self._idle_lru: collections.OrderedDict[_Connection, None] = collections.OrderedDict()
        self._busy: set[_Connection] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._dns: dict[tuple[str, int], tuple[float, list[tuple[int, str]]]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    # ------------------------------------------------------------------- request
    async def post(self, route: Route, headers: bytes, body: bytes) -> Answer:
        """POST ``body`` with ``headers`` (CRLF-ended lines, no ``Content-Length``) to
        ``route``; the answer, whatever its status.

        Raises :class:`ForbiddenAddress` (refused by the SSRF policy; nothing was sent),
        :class:`DnsError`, :class:`ConnectError`, :class:`ConnectTimeout` (nothing was sent),
        :class:`ConnectionLost`, :class:`BadResponse`, :class:`RequestTimeout` (the request
        may have been acted on). A head that arrived before a loss or the timeout gives an
        :class:`Answer` with ``cut_short`` set, not an error.
        """
        data = b"%s%s%sContent-Length: %d\r\n\r\n%s" % (
            route.start,
            self._headers,
            headers,
            len(body),
            body,
        )
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                conn = await self._acquire(route, fresh=False)
                try:
                    answer = await conn.request(data)
                except ConnectionLost:
                    if not conn.reused or conn.got_bytes:
                        raise
                    # A pooled connection the server closed while the request was on its way
                    # (a stale keep-alive connection): nothing of an answer came back. Sending
                    # again on a new connection is safe because the receiver deduplicates on
                    # the request's idempotency key (a webhook's webhook-id), and it is what
                    # any keep-alive client must do; once, so a server that drops every
                    # request still fails the attempt.
                    self._discard(conn)
                    conn = await self._acquire(route, fresh=True)
                    answer = await conn.request(data)
        except TimeoutError:
            if conn is not None and conn.head_done:
                self._discard(conn)
                detail = f"no whole answer within {self._timeout_s * 1000:.0f} ms"
                return conn.partial("timeout", detail)
            if conn is not None:
                self._discard(conn)
            raise RequestTimeout(f"no answer within {self._timeout_s * 1000:.0f} ms") from None
        except ConnectionLost as exc:
            assert conn is not None
            self._discard(conn)
            if conn.head_done:
                return conn.partial("connection_lost", str(exc))
            raise
        except BaseException:
            if conn is not None:
                self._discard(conn)
            raise
        self._release(conn)
        return answer

    # ------------------------------------------------------------------- the pool
    async def _acquire(self, route: Route, *, fresh: bool) -> _Connection:
        """An idle connection of ``route``'s origin, or a new one within the bound."""
        while True:
            if self._closed:
                raise ConnectError("the client is closed")
            if not fresh:
                conn = self._pop_idle(route.key)
                if conn is not None:
                    conn.reused = True
                    self._busy.add(conn)
                    return conn
            if self.open < self.pool_size:
                break
            if self._idle_lru:  # at the bound: close the least recently used idle one
                oldest = next(iter(self._idle_lru))
                self._discard(oldest)
                continue
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken and then cancelled: pass the turn on
                else:
                    waiter.cancel()
                raise
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        conn = _Connection(self, route.key, self._max_body)
        try:
            await self._connect(route, conn)
        except BaseException:
            conn.counted = False
            self.open -= 1
            self._wake()
            if conn.transport is not None:
                conn.transport.abort()
            raise
        self.opened += 1
        self._busy.add(conn)
        return conn

    def _pop_idle(self, key: str) -> _Connection | None:
        stack = self._idle.get(key)
        now = self.loop.time()
        while stack:
            conn = stack.pop()  # the most recently used: the least likely to be stale
            del self._idle_lru[conn]
            if conn.reusable and now - conn.idle_since < self._keepalive_s:
                return conn
            self._discard(conn)
        if stack is not None and not stack:
            self._idle.pop(key, None)
        return None

    def _release(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if not conn.reusable or self._closed:
            self._discard(conn)
            return
        conn.idle_since = self.loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        self._idle_lru[conn] = None
        if self._sweep is None:
            self._sweep = self.loop.call_later(self._keepalive_s, self._expire)
        self._wake()  # an idle connection can be closed to make room for a waiter

    def _discard(self, conn: _Connection) -> None:
        """Close ``conn`` and stop counting it. Idempotent."""
        self._busy.discard(conn)
        if conn in self._idle_lru:
            del self._idle_lru[conn]
            stack = self._idle.get(conn.key)
            if stack is not None and conn in stack:
                stack.remove(conn)
                if not stack:  # many origins seen once must not stay
                    del self._idle[conn.key]
        conn.abort()
        if conn.counted:
            conn.counted = False
            self.open -= 1
            self._wake()

    def lost(self, conn: _Connection) -> None:
        """``conn``'s connection closed (the server closed an idle one, or it was aborted)."""
        if conn not in self._busy:
            self._discard(conn)  # an idle one: gone from the pool before anyone takes it

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _expire(self) -> None:
        self._sweep = None
        now = self.loop.time()
        for conn in list(self._idle_lru):
            if now - conn.idle_since < self._keepalive_s:
                break  # oldest first: the rest are younger
            self._discard(conn)
        if self._idle_lru:
            oldest = next(iter(self._idle_lru)).idle_since
            self._sweep = self.loop.call_at(oldest + self._keepalive_s, self._expire)

    # ------------------------------------------------------------------- connect
    async def _connect(self, route: Route, conn: _Connection) -> None:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await self._connect_any(route, conn)
        except TimeoutError:
            raise ConnectTimeout(
                f"no connection to {route.key} within {self._connect_timeout_s * 1000:.0f} ms"
            ) from None

    async def _connect_any(self, route: Route, conn: _Connection) -> None:
        addresses = await self._addresses(route)
        error: BaseException | None = None
        for family, address in addresses:
            # the last word of the SSRF guard: the exact address about to be connected to
            self._policy.check(address)
            try:
                await self.loop.create_connection(
                    _factory(conn),
                    address,
                    route.port,
                    family=family,
                    ssl=self._ssl_context() if route.tls else None,
                    server_hostname=route.host if route.tls else None,
                )
                return
            except ssl.SSLError as exc:  # certificate refused, handshake failed: not retried
                raise ConnectError(f"TLS with {route.key} failed: {exc}") from exc
            except OSError as exc:
                error = exc
        raise ConnectError(f"cannot connect to {route.key}: {error}") from error

    async def _addresses(self, route: Route) -> list[tuple[int, str]]:
        """The addresses to try, in order: the IP literal itself, or the resolver's allowed
        answers (cached for ``dns_cache_s``)."""
        host = route.host
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            pass
        else:
            return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, host)]
        key = (host, route.port)
        cached = self._dns.get(key)
        now = self.loop.time()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            results = await self._resolver.resolve(host, route.port, socket.AF_UNSPEC)
        except ForbiddenAddress:
            raise
        except OSError as exc:
            raise DnsError(f"cannot resolve {host}: {exc}") from exc
        addresses = [(int(r["family"]), str(r["host"])) for r in results]
        if self._dns_cache_s > 0:
            if len(self._dns) >= 4096:
                self._dns.clear()
            self._dns[key] = (now + self._dns_cache_s, addresses)
        return addresses

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    # ------------------------------------------------------------------- close
    async def close(self) -> None:
        """Close every connection, idle or busy; later requests raise ``ConnectError``."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in [*self._idle_lru, *self._busy]:
            self._discard(conn)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # wakes into the closed check
        await self._resolver.close()
        await asyncio.sleep(0)  # let the transports' close callbacks run


def _factory(conn: _Connection) -> Callable[[], _Connection]:
    return lambda: conn
