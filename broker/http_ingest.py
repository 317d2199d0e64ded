"""The HTTP listener: every request is parsed here; ``POST /events`` and ``POST /events/batch``
are served here (the lean path), every other request is passed to aiohttp.

Why a lean path: aiohttp's per-request machinery (``RequestHandler``, application, router,
middleware, ``StreamWriter``) costs ~110 us of event-loop time per request, many times
Herald's own handler, and at one event per request that bounds ingest. Here a connection is
an ``asyncio.Protocol`` that parses with ``httptools`` (llhttp, the parser uvicorn uses),
calls the same :class:`~broker.http.HttpApi` methods as the aiohttp handlers
(``accept_event``, ``accept_batch``, ``error_answer``) and answers from the partition's sync
callback, with no task per request.

Every request, whichever path serves it, passes the same gate when its headers end, before
any of its body is read (``docs/SECURITY.md``):

- the head (request line and headers) is at most 64 KiB, counted as bytes arrive, before
  llhttp has a complete line to report, so a header that never ends is cut in linear time;
- the API key is checked (failed keys count against the source address; throttled, keys are
  not checked at all); on a node without keys, ``Host``, ``Origin`` and ``Sec-Fetch-Site``
  must show the request comes from this node's own clients; a body must be
  ``application/json`` and within ``limits.max-http-body-bytes``, and needs a valid key
  (but on the few routes whose :class:`~broker.http_policy.RouteRule` says otherwise: a
  one-click unsubscribe's form, a hook with its own secret; looked up only when a head fails
  these defaults);
- a refused request is answered at once and the connection closed: its body is never read.

Deadlines (``admission.header-timeout-ms``; ``body-timeout-ms`` plus one second per
``body-min-rate`` bytes received) close a connection that sends a request too slowly; a body
arriving in pieces averaging under 64 bytes is refused (each piece costs a Python call); body
bytes being received count against the node's ``admission.max-request-bytes-in-flight``.

Hand-off: the first request that is not one of the two ingest endpoints moves the connection
to aiohttp for good: once the answers before it are written, an aiohttp ``RequestHandler`` is
attached to the transport and gets, from then on, each request as this parser rebuilt it (the
same method, target, version and headers, and the body; chunk trailers are dropped). The
parser keeps no raw input: nothing grows with what a client sends but the body of the
request being received.

HTTP handled on the lean path: keep-alive (the HTTP/1.1 default; HTTP/1.0 only when asked),
``Connection: close``, ``Expect: 100-continue``, chunked bodies, pipelining (answers leave in
request order). Back-pressure: at ``limits.max-inflight-per-connection`` unanswered requests,
or a full socket buffer, the connection stops reading (the requests already in the chunk
being parsed are still served, so the cap is exceeded by at most one read's worth).
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Final, cast

import httptools
from aiohttp import web

from broker.admission import Ticket
from broker.auth import OPEN_PRINCIPAL, Principal
from broker.config import Config
from broker.errors import (
    AuthThrottled,
    HeadersTooLarge,
    HeraldError,
    Internal,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    ServerBusy,
    ShuttingDown,
    TooManyConnections,
    Unauthenticated,
    describe,
)
from broker.http import Accepted, HttpApi, HttpStats
from broker.http_policy import RouteRule, RouteRules, SitePolicy, check_json, rebuild_head
from broker.listener import Listener, NodeAdmission, refusal_http
from broker.openapi import Route

log = logging.getLogger("herald.http")

ROUTES: Final = {b"/events": "/events", b"/events/batch": "/events/batch"}
# request line and headers
MAX_HEAD_BYTES: Final = 64 * 1024
# input is parsed in slices of at most this many bytes (but for the rest of a body of known
# length): the head is counted per slice, so a head is cut within MAX_HEAD_BYTES + 2 slices
SLICE: Final = 16 * 1024
# a body may arrive in this many pieces, plus one per this many bytes: a client cannot buy
# one Python call per byte with 1-byte chunks or 1-byte segments
FREE_PIECES: Final = 64
BYTES_PER_PIECE: Final = 64
# an idle keep-alive connection is closed after this long (aiohttp's default)
KEEPALIVE_TIMEOUT_S: Final = 75.0
# after a fatal error answer, how long the rest of the request is read and dropped, so that
# closing with unread input (a TCP reset) does not destroy the answer before the client reads it
LINGER_S: Final = 2.0
# a full scan of the connections (idle keep-alive, stalled sends) every this many sweeps
_SCAN_EVERY: Final = 5
# requests one connection may have parsed in one turn of the event loop before the rest of
# its input waits for the next turn (see IngestConnection._consume)
TURN_REQUESTS: Final = 64
# request body bytes the whole port serves in one turn of the event loop: a request that
# would complete once they are spent waits for a later turn (TurnBudget). A
# batch of 1,000 events (~220 KB) is ~8-10 ms of loop; several completing in one turn held
# the loop 20-35 ms (issue 12's stall budget is 20) and every other connection of the node
# with it. A request larger than this alone is served when a turn starts.
TURN_BODY_BYTES: Final = 128 * 1024

_REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

# where the parser is in the current request
IDLE: Final = 0  # between requests
HEAD: Final = 1  # request line and headers
BODY: Final = 2  # headers ended, message not complete (trailers included)


class _Stop(Exception):
    """Raised from a parser callback to stop parsing this connection's input: it is closing
    or being handed off (the connection's state says which)."""


class _Reply:
    """One answer, in request order; ``body`` is None until it is known."""

    __slots__ = ("body", "close", "keep_alive_header", "linger", "status")

    def __init__(self, *, close: bool, keep_alive_header: bool = False) -> None:
        self.status = 0
        self.body: bytes | None = None
        self.close = close
        self.keep_alive_header = keep_alive_header  # HTTP/1.0 keep-alive must be confirmed
        self.linger = False


# connection states: reading requests (lean, or forwarding them to aiohttp) -> closing ->
# done; a fatal error answer lingers (drops input for LINGER_S) before done
OPEN: Final = "open"
FORWARDING: Final = "forwarding"  # requests go to aiohttp (attached once answers are out)
STOPPED: Final = "stopped"  # forwarding ended (a refusal or upgrade): aiohttp answers, closes
CLOSING: Final = "closing"  # no more requests: close once the answers are written
LINGERING: Final = "lingering"
DONE: Final = "done"  # closed


class IngestConnection(asyncio.Protocol):
    """One HTTP connection."""

    def __init__(self, server: IngestServer, ticket: Ticket) -> None:
        self.server = server
        self.api = server.api
        self.ticket = ticket
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.state = OPEN
        self.replies: deque[_Reply] = deque()
        self.last_active = server.loop.time()
        self._read_paused = False
        self._yielding = False  # the rest of a read waits for the next turn of the loop
        self._budget_wait = False  # ... and for the port's body budget (TurnBudget.wait)
        self._rest = b""
        self._turn = 0
        self._write_paused = False
        self._write_paused_at = 0.0
        self._linger: asyncio.TimerHandle | None = None
        # aiohttp's protocol once the connection is handed off, and what it has yet to get
        self.handler: Any = None
        self._fwd: list[bytes] = []
        self._eof = False
        # where the parser is, and since when (set when a read ends mid-head or mid-body)
        self._phase = IDLE
        self._head_bytes = 0
        self._framing = 0
        self._head_since: float | None = None
        self._body_since: float | None = None
        # the request being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._auth: bytes | None = None
        self._host: bytes | None = None
        self._origin: bytes | None = None
        self._fetch_site: bytes | None = None
        self._content_type: bytes | None = None
        self._length: int | None = None
        self._chunked = False
        self._expect = False
        self._route = ""
        self._principal: Principal | None = None
        self._body: bytes | bytearray = b""
        self._size = 0
        self._pieces = 0
        self._remaining = -1  # body bytes still to come, when the length is known
        self._reserved = 0  # body bytes charged to the node's request budget
        self._holder = ""  # whom they count against (set when the headers end)
        # the last head admitted (Host, Origin, Sec-Fetch-Site, Authorization) and its
        # principal, and the last Content-Type found to be JSON
        self._admitted: tuple[bytes | None, ...] | None = None
        self._admitted_principal: Principal | None = None
        self._json_type: bytes | None = None

    @property
    def idle(self) -> bool:
        return not self.replies and self._phase == IDLE

    # ---------------------------------------------------------------- transport
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = DONE
        self.server.connections.discard(self)
        self.server.watched.discard(self)
        self.server.admission.table.release(self.ticket)
        self.replies.clear()
        self._release_body()
        if self._linger is not None:
            self._linger.cancel()
        if self.handler is not None:
            self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_at = self.server.loop.time()
        if self.handler is not None:
            self.handler.pause_writing()
        else:
            self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.handler is not None:
            self.handler.resume_writing()
        else:
            self._update_reading()

    def eof_received(self) -> bool | None:
        if self.handler is not None:
            return cast(bool | None, self.handler.eof_received())
        if self.state in (FORWARDING, STOPPED):
            self._eof = True
            return True  # aiohttp answers what was sent, once attached
        if self.state in (OPEN, CLOSING) and self.replies:
            self.state = CLOSING  # the client is done sending: answer, then close
            return True
        return None  # close

    def data_received(self, data: bytes) -> None:
        """Parse ``data``: at most :data:`TURN_REQUESTS` requests in this turn of the event
        loop; the rest waits for the next turn, reading paused meanwhile, so a client
        pipelining cheap requests takes its turn like every other connection (libuv reads
        a busy socket up to 32 times a turn: ~1 s of such requests)."""
        state = self.state
        if state != OPEN and state != FORWARDING:
            return  # closing, lingering or stopped: the input is dropped
        self.last_active = self.server.loop.time()
        self._turn = 0
        rest: memoryview | None = None
        try:
            if len(data) <= SLICE and self._phase != BODY:
                # the common case, inlined: one slice, no body of known length pending
                self.parser.feed_data(data)
                phase = self._phase
                if phase == HEAD:
                    self._head_bytes += len(data)
                    if self._head_bytes > MAX_HEAD_BYTES + SLICE:
                        self._too_large_head()
                elif phase == IDLE:
                    self._head_bytes = 0
            else:
                rest = self._feed_slices(data)
        except _Stop:
            pass  # the connection's state says what happens next
        except httptools.HttpParserUpgrade:
            self._upgraded()
        except httptools.HttpParserCallbackError as exc:
            if self.state in (OPEN, FORWARDING):  # not one of our stops: a bug in a callback
                self._internal_error(exc.__context__ or exc)
        except httptools.HttpParserError as exc:
            self.server.admission.note(
                "http_malformed",
                "event=http_malformed peer=%s error=%s",
                self.peer,
                str(exc).replace(" ", "_")[:80],
            )
            self._fail(InvalidRequest(f"malformed HTTP request: {exc}"))
        except Exception as exc:
            self._internal_error(exc)
        if self._phase != IDLE or self._fwd or rest is not None:
            self._after_read(rest)

    def _after_read(self, rest: memoryview | None) -> None:
        """A read ended mid-request, with input for aiohttp, or with input left for the next
        turn: start the request's deadline, charge the body held so far to the request
        budget, hand aiohttp its input, or yield the turn."""
        phase = self._phase
        if phase == HEAD:
            if self._head_since is None:
                self._head_since = self.last_active
                self.server.watched.add(self)
        elif phase == BODY:
            if self._body_since is None:
                self._body_since = self.last_active
                self.server.watched.add(self)
            held = self._size - self._reserved
            # bytes of a body still incomplete at the end of a read are held across turns
            # of the loop: they count against the budget (a body that arrives and ends
            # within one read never does)
            if held > 0 and (self.state == OPEN or self.state == FORWARDING):
                if self.server.admission.requests.take(held, self._holder):
                    self._reserved += held
                else:
                    self.server.admission.note(
                        "request_budget",
                        "event=request_budget_spent listener=http peer=%s",
                        self.peer,
                    )
                    self._fail(ServerBusy("too many request bytes in flight on this node; retry"))
        if self._fwd:
            self._deliver()
        if rest is not None and (self.state == OPEN or self.state == FORWARDING):
            whole = rest.obj
            # a read deferred again before anything of it was parsed is kept, not copied
            self._rest = whole if type(whole) is bytes and len(whole) == len(rest) else bytes(rest)
            self._yielding = True
            self._update_reading()
            if self._budget_wait:
                self._budget_wait = False
                self.server.turn.wait(self._next_turn)
            else:
                self.server.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        data, self._rest = self._rest, b""
        self._yielding = False
        if data:
            self.data_received(data)
        if not self._yielding:
            self._update_reading()

    def _feed(self, piece: bytes | memoryview) -> None:
        """Parse one slice and count it: bytes fed while the parser is in a head count toward
        the head limit (an over-count of at most the slice that ended the previous body)."""
        self.parser.feed_data(piece)
        phase = self._phase
        if phase == HEAD:
            self._head_bytes += len(piece)
            if self._head_bytes > MAX_HEAD_BYTES + SLICE:
                self._too_large_head()
        elif phase == IDLE:
            self._head_bytes = 0

    def _feed_slices(self, data: bytes) -> memoryview | None:
        """Feed ``data`` slice by slice; returns what is left for the next turn, if any."""
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            # the rest of a body of known length goes in one piece
            step = self._remaining if self._phase == BODY and self._remaining > 0 else SLICE
            piece = view[pos : pos + step]
            if (
                self._phase == BODY
                and len(piece) == self._remaining
                and self.server.turn.spent()
                and self.state == OPEN
                and self.handler is None
            ):
                # it would complete a request: served in a later turn (TURN_BODY_BYTES)
                self._budget_wait = True
                return view[pos:]
            pos += len(piece)
            if self._phase == BODY:
                before = self._size
                self._feed(piece)
                if self._phase == BODY and self._size == before:
                    # a slice of chunk framing or trailers without body bytes: bounded like a
                    # head (httptools gathers a trailer value as it arrives)
                    self._framing += len(piece)
                    if self._framing > MAX_HEAD_BYTES + SLICE:
                        self._too_large_head()
                else:
                    self._framing = 0
            else:
                self._feed(piece)
            if self.state != OPEN and self.state != FORWARDING:
                return None
            if self._turn >= TURN_REQUESTS and pos < end and self.handler is None:
                return view[pos:]
        return None

    def _too_large_head(self) -> None:
        self._fail(HeadersTooLarge(f"request line and headers exceed {MAX_HEAD_BYTES} bytes"))
        raise _Stop

    # ------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        if self.state != OPEN and self.state != FORWARDING:
            raise _Stop
        self._phase = HEAD
        self._head_since = None
        self._url = b""
        self._headers = []
        self._auth = self._host = self._origin = self._fetch_site = None
        self._content_type = None
        self._length = None
        self._chunked = False
        self._expect = False
        self._principal = None
        self._body = b""
        self._size = 0
        self._pieces = 0
        self._remaining = -1

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._phase != HEAD:
            return  # a chunked body's trailer: never read, never passed on
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._too_large_head()
        self._headers.append((name, value))
        lower = name.lower()
        if lower == b"authorization":
            if self._auth is None:
                self._auth = value
        elif lower == b"content-length":
            self._length = int(value)  # llhttp accepts digits only
        elif lower == b"content-type":
            self._content_type = value
        elif lower == b"host":
            self._host = value
        elif lower == b"transfer-encoding":
            self._chunked = True  # llhttp refuses any framing it cannot parse
        elif lower == b"expect":
            self._expect = value.lower() == b"100-continue"
        elif lower == b"origin":
            self._origin = value
        elif lower == b"sec-fetch-site":
            self._fetch_site = value

    def _grow_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            self._too_large_head()

    def on_headers_complete(self) -> None:
        self._phase = BODY
        self._head_bytes = 0
        self._framing = 0
        self._body_since = None
        parser = self.parser
        forward = self.state == FORWARDING
        if not forward:
            route = ROUTES.get(self._url.partition(b"?")[0])
            if route is None or parser.get_method() != b"POST" or parser.should_upgrade():
                forward = True
                self.state = FORWARDING
                self._update_reading()  # paused until aiohttp is attached
            else:
                self._route = route
        try:
            self._admit(forward)
        except HeraldError as exc:
            self._refuse(exc)
            raise _Stop from None
        length = self._length
        self._remaining = length if length is not None else -1
        if forward:
            self._forward(
                rebuild_head(
                    parser.get_method(),
                    self._url,
                    parser.get_http_version(),
                    self._headers,
                    upgrade=parser.should_upgrade(),
                )
            )
        elif self._expect and parser.get_http_version() == "1.1":
            reply = _Reply(close=False)
            reply.status, reply.body = 100, b""
            self.replies.append(reply)
            self._flush()

    def _admit(self, forward: bool) -> None:
        """The gate at the end of the headers (see the module docstring). Raises the error
        to answer instead; sets the principal when there is one. A client sends the same
        ``Host``, ``Origin`` and key on every request of a connection: a head that matches
        the last one admitted is not checked again (the hot path pays a tuple compare)."""
        server = self.server
        has_body = self._chunked or bool(self._length)
        seen = (self._host, self._origin, self._fetch_site, self._auth)
        if seen == self._admitted:
            principal = self._principal = self._admitted_principal
        else:
            principal = self._check_head()
            self._admitted, self._admitted_principal = seen, principal
        rule = None
        if principal is None and (has_body or not forward):
            # no route taking a body (nor ingest) works without a key, but for the few that
            # prove the caller themselves (RouteRule.keyless_body): do not read it
            rule = self._rule()
            if not (forward and rule is not None and rule.keyless_body):
                raise Unauthenticated("an API key is required (Authorization: Bearer <key>)")
        if has_body and self._content_type != self._json_type:
            if rule is None:
                rule = self._rule()
            if rule is not None:
                rule.check_type(self._content_type)  # not remembered: another route may differ
            else:
                check_json(self._content_type)
                self._json_type = self._content_type
        if self._length is not None and self._length > server.max_body:
            raise PayloadTooLarge(f"request body exceeds max_http_body_bytes={server.max_body}")

    def _check_head(self) -> Principal | None:
        """The site checks or the key; the principal (None without a key)."""
        server = self.server
        admission = server.admission
        if server.site is not None:  # a node without keys
            server.site.check(self._host, self._origin, self._fetch_site)
            principal: Principal | None = OPEN_PRINCIPAL
        elif self._auth is not None:
            try:
                if not admission.key_allowed(self.ticket.address):
                    raise AuthThrottled("too many failed API keys from this address; wait")
                principal = self.api.auth.bearer(self._auth)
            except (Unauthenticated, AuthThrottled) as exc:
                rule = self._rule()
                if rule is not None and rule.own_auth:
                    principal = None  # the route's own secret, for the route to check
                else:
                    if isinstance(exc, Unauthenticated) and exc.key_given:
                        admission.key_failed(self.ticket.address, self.peer, "http")
                    raise
        else:
            principal = None
        self._principal = principal
        self._holder = admission.holder(
            principal.tenant if principal is not None else None, self.ticket.address
        )
        if principal is not None and not self.ticket.proven:
            admission.table.prove(self.ticket)
        return principal

    def _rule(self) -> RouteRule | None:
        """This request's route's :class:`RouteRule`, if it has one (asked only when a head
        fails a default)."""
        rules = self.server.rules
        return rules.find(self.parser.get_method(), self._url) if rules else None

    def on_body(self, body: bytes) -> None:
        n = len(body)
        size = self._size = self._size + n
        self._pieces += 1
        if self._remaining > 0:
            self._remaining -= n
        if size > self.server.max_body:
            self._fail(
                PayloadTooLarge(f"request body exceeds max_http_body_bytes={self.server.max_body}")
            )
            raise _Stop
        if self._pieces > FREE_PIECES and self._pieces > FREE_PIECES + size // BYTES_PER_PIECE:
            self._fail(
                InvalidRequest(
                    f"request body arrives in pieces averaging under {BYTES_PER_PIECE} bytes"
                )
            )
            raise _Stop
        if self.state == FORWARDING:
            self._forward(body if not self._chunked else b"%x\r\n%s\r\n" % (n, body))
        elif not self._body:
            self._body = body
        elif isinstance(self._body, bytes):
            self._body = bytearray(self._body)
            self._body += body
        else:
            self._body += body

    def on_message_complete(self) -> None:
        self._phase = IDLE
        self._head_since = self._body_since = None
        self._turn += 1
        if self.state == FORWARDING:
            if self._chunked:
                self._forward(b"0\r\n\r\n")
            if self._reserved:
                self._release_body()
            return
        parser = self.parser
        keep_alive = parser.should_keep_alive() and not self.server.draining
        reply = _Reply(
            close=not keep_alive,
            keep_alive_header=keep_alive and parser.get_http_version() == "1.0",
        )
        self.replies.append(reply)
        if not keep_alive:
            self.state = CLOSING
        self.api.stats.requests += 1
        body, self._body = self._body, b""
        self._serve(reply, body if isinstance(body, bytes) else bytes(body))
        if self._reserved:
            self._release_body()
        if not keep_alive:
            raise _Stop  # whatever follows on this connection is not read
        if len(self.replies) >= self.server.max_inflight:
            self._update_reading()

    def _release_body(self) -> None:
        if self._reserved:
            self.server.admission.requests.give(self._reserved, self._holder)
            self._reserved = 0

    # -------------------------------------------------------------------- serving
    def _serve(self, reply: _Reply, body: bytes) -> None:
        if len(body) > SLICE:
            self.server.turn.charge(len(body))
        api = self.api
        route = self._route
        principal = self._principal
        assert principal is not None  # _admit refused the request otherwise
        try:
            if route == "/events":
                accepted = api.accept_event(principal, body)
            else:
                accepted = api.accept_batch(principal, body)
        except Exception as exc:
            self._answer(reply, *api.error_answer(exc, route))
            return
        if accepted.durable is None:
            api.stats.events += accepted.events
            self._answer(reply, 200, accepted.answer)
        else:
            accepted.durable.add_done_callback(
                functools.partial(self._synced, reply, accepted, route)
            )

    def _synced(
        self, reply: _Reply, accepted: Accepted, route: str, fut: asyncio.Future[Any]
    ) -> None:
        """The events are durable (or their sync failed): answer."""
        try:
            exc = ShuttingDown("sync cancelled") if fut.cancelled() else fut.exception()
            if exc is None:
                self.api.stats.events += accepted.events
                self._answer(reply, 200, accepted.answer)
            else:
                self._answer(reply, *self.api.error_answer(exc, route))
        except Exception as exc:
            self._internal_error(exc)

    def _answer(self, reply: _Reply, status: int, answer: Any) -> None:
        reply.status = status
        reply.body = self.api.encode(answer)
        if self.replies and self.replies[0] is reply:
            self._flush()

    def _refuse(self, exc: HeraldError) -> None:
        """A request refused at the end of its headers: answered in order, its body unread,
        then the connection closes."""
        if self.state == FORWARDING:
            parser = self.parser
            self._forward(
                rebuild_head(
                    parser.get_method(),
                    self._url,
                    parser.get_http_version(),
                    self._headers,
                    reject=exc,
                )
            )
            self.state = STOPPED
            self._deliver()
        else:
            self._fail(exc)

    def _fail(self, exc: HeraldError) -> None:
        """Answer ``exc`` after the answers already due, then close: the input cannot be
        trusted (or is not worth reading) past this point. Once requests go to aiohttp, a
        request whose head was not passed on yet is replaced by one aiohttp answers with
        ``exc``; one whose body is being passed on cannot be answered: the connection is
        dropped."""
        state = self.state
        if state in (DONE, LINGERING, CLOSING, STOPPED):
            return
        if state == FORWARDING:
            if self._phase == BODY:
                self.close()
            else:
                self._forward(rebuild_head(b"GET", b"/", "1.1", [], reject=exc))
                self.state = STOPPED
                self._deliver()
            return
        err = describe(exc)
        self.api.stats.requests += 1
        self.api.stats.errors += 1
        reply = _Reply(close=True)
        reply.linger = True
        reply.status = err.http_status
        reply.body = self.api.encode(
            {"error": {"code": err.code, "message": err.message, "field": err.field}}
        )
        self.replies.append(reply)
        self._phase = IDLE
        self.state = CLOSING
        self._flush()

    def timed_out(self, what: str) -> None:
        """The request's head or body missed its deadline."""
        admission = self.server.admission
        admission.request_timeouts += 1
        admission.note(
            "request_timeout",
            "event=request_timeout listener=http peer=%s part=%s",
            self.peer,
            what,
        )
        self._fail(RequestTimeout(f"the request's {what} did not arrive in time"))

    def _internal_error(self, exc: BaseException) -> None:
        log.error("event=http_ingest_failed peer=%s state=%s", self.peer, self.state, exc_info=exc)
        if self.state in (DONE, LINGERING, FORWARDING, STOPPED):
            self.close()
        else:
            self.replies.clear()  # their order can no longer be kept: answer this and close
            self._fail(Internal("internal error"))

    # --------------------------------------------------------------------- output
    def _flush(self) -> None:
        """Write the answers that are due, in request order, one write each; then close or
        hand off if that is what the connection waits for."""
        replies = self.replies
        transport = self.transport
        if transport is None or self.state in (DONE, LINGERING):
            return
        server = self.server
        while replies and replies[0].body is not None:
            reply = replies.popleft()
            last = not replies and (
                self.state == CLOSING or (server.draining and self._phase == IDLE)
            )
            transport.write(self._render(reply, reply.close or last))
            if reply.close or last:
                self._close_after_write(reply.linger)
                return
        if not replies and self.state in (FORWARDING, STOPPED) and self.handler is None:
            self._attach()
            return
        self._update_reading()

    def _render(self, reply: _Reply, close: bool) -> bytes:
        body = reply.body
        assert body is not None
        if reply.status == 100:
            return _CONTINUE
        connection = (
            b"Connection: close\r\n"
            if close
            else b"Connection: keep-alive\r\n"
            if reply.keep_alive_header
            else b""
        )
        return (
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Date: %s\r\n%s\r\n%s"
            % (
                reply.status,
                _REASONS.get(reply.status, b"Unknown"),
                len(body),
                self.server.date(),
                connection,
                body,
            )
        )

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.handler is not None or self.state in (DONE, LINGERING):
            return
        pause = (
            self._write_paused
            or self._yielding
            or self.state != OPEN
            or len(self.replies) >= self.server.max_inflight
        )
        if pause and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif not pause and self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def _close_after_write(self, linger: bool) -> None:
        transport = self.transport
        assert transport is not None
        self.replies.clear()
        self._release_body()
        if linger and transport.can_write_eof():
            # send FIN after the answer, then read and drop what the client still sends
            self.state = LINGERING
            transport.write_eof()
            if self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            self._linger = self.server.loop.call_later(LINGER_S, transport.close)
        else:
            self.state = DONE
            transport.close()

    def close(self) -> None:
        """Close now (idle keep-alive connections at shutdown or after the idle timeout,
        a request that missed its deadline mid-body on its way to aiohttp)."""
        self.state = DONE
        self.replies.clear()
        if self.transport is None:
            return
        if self.handler is not None:
            self.transport.abort()  # aiohttp may be mid-answer: nothing more will be right
        else:
            self.transport.close()

    def check(self, now: float) -> None:
        """The once-in-a-while checks of :meth:`IngestServer.check`: idle keep-alive (lean
        connections; aiohttp keeps its own), and replies that have not moved for the send
        timeout."""
        if self._write_paused:
            if now - self._write_paused_at > self.server.send_timeout_s:
                admission = self.server.admission
                admission.send_timeouts += 1
                admission.note(
                    "send_timeout", "event=send_timeout listener=http peer=%s", self.peer
                )
                if self.transport is not None:
                    self.transport.abort()
        elif (
            self.state == OPEN
            and not self.replies
            and self._phase == IDLE
            and now - self.last_active > KEEPALIVE_TIMEOUT_S
        ):
            self.close()

    def check_deadline(self, now: float, paused_for: float) -> bool:
        """Apply the head or body deadline; False once the connection needs no more watching
        (between requests, or closed). ``paused_for`` seconds in which reading was paused
        (by the node, not the client) do not count."""
        if self.state not in (OPEN, FORWARDING) or self._phase == IDLE:
            return False
        transport = self.transport
        if transport is not None and not transport.is_reading():
            if self._head_since is not None:
                self._head_since += paused_for
            if self._body_since is not None:
                self._body_since += paused_for
            return True
        server = self.server
        if self._phase == HEAD:
            if self._head_since is not None and now - self._head_since > server.header_timeout_s:
                self.timed_out("head")
                return False
        elif self._body_since is not None:
            allowed = server.body_timeout_s + self._size / server.body_min_rate
            if now - self._body_since > allowed:
                self.timed_out("body")
                return False
        return True

    # ------------------------------------------------------------------ hand-off
    def _forward(self, data: bytes) -> None:
        self._fwd.append(data)

    def _deliver(self) -> None:
        """Give aiohttp what was parsed for it, once it is attached (the answers before the
        first forwarded request must leave first)."""
        if self.handler is None:
            if not self.replies and self.transport is not None:
                self._attach()
            return
        data = b"".join(self._fwd)
        self._fwd = []
        self.handler.data_received(data)

    def _attach(self) -> None:
        """Attach aiohttp's protocol: every answer of the lean path is written."""
        transport = self.transport
        assert transport is not None
        handler = self.server.aiohttp_server()
        self.handler = handler
        handler.connection_made(transport)
        if self._write_paused:
            handler.pause_writing()
        if self._read_paused:
            self._read_paused = False
            if self.state == FORWARDING:
                transport.resume_reading()
        if self._fwd:
            self._deliver()
        if self._eof:
            handler.eof_received()

    def _upgraded(self) -> None:
        """llhttp stopped at an upgrade request (its head was passed on without the upgrade):
        what follows is not HTTP; aiohttp answers the request and closes."""
        self.state = STOPPED
        self._phase = IDLE


def route_rules(routes: Iterable[Route]) -> RouteRules:
    """The routes whose heads the listener judges otherwise than by default: those that need
    no API key and may take a body (a route without scopes that is not a GET), those whose
    ``Authorization`` is their own secret, those whose body is not JSON."""
    rules = []
    for r in routes:
        rule = RouteRule(
            keyless_body=r.scopes is None and r.method != "GET",
            own_auth=r.own_auth,
            body_types=frozenset(t.encode() for t in r.body_types),
        )
        if rule != RouteRule():
            rules.append((r.method, r.path, rule))
    return RouteRules(rules)


class TurnBudget:
    """The request body bytes a port serves in one turn of the event loop (``limit``). Once
    they are spent, a request that would complete waits (:meth:`wait`), its connection's
    reading paused, and the waiting ones are resumed in arrival order at the start of the
    following turns, as many as each turn's budget allows: between two large requests the
    loop serves its timers and every other connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int, stats: HttpStats) -> None:
        self.loop = loop
        self.limit = limit
        self.used = 0  # request body bytes served in this turn
        self.stats = stats  # counts the requests that waited (``deferred``)
        self.waiting: deque[Callable[[], None]] = deque()
        self._turn_scheduled = False
        self._resuming = False  # in _next_turn: the one resumed goes before those waiting

    def charge(self, nbytes: int) -> None:
        """A request body of ``nbytes`` is being served in this turn."""
        self.used += nbytes
        self._schedule()

    def spent(self) -> bool:
        """Whether a request that would complete now must wait for a later turn: this
        turn's budget is spent, or others wait already (they go first)."""
        return self.used >= self.limit or (bool(self.waiting) and not self._resuming)

    def wait(self, resume: Callable[[], None]) -> None:
        """Call ``resume`` at the start of a later turn, after those waiting already."""
        self.stats.deferred += 1
        self.waiting.append(resume)
        self._schedule()

    def _schedule(self) -> None:
        if not self._turn_scheduled:
            self._turn_scheduled = True
            self.loop.call_soon(self._next_turn)  # runs at the start of the next turn

    def _next_turn(self) -> None:
        self._turn_scheduled = False
        self.used = 0
        waiting = self.waiting
        while waiting and self.used < self.limit:
            resume = waiting.popleft()
            self._resuming = True
            try:
                resume()  # serves its request (or finds its connection gone)
            finally:
                self._resuming = False
        if waiting:
            self._schedule()


class IngestServer:
    """The HTTP port: a :class:`~broker.listener.Listener` (admission, TLS) making an
    :class:`IngestConnection` per connection; keeps them, applies their deadlines, and drains
    them at shutdown. ``aiohttp_server`` (a set-up runner's ``web.Server``) makes the protocol
    for a connection handed to aiohttp; the runner's cleanup closes those."""

    def __init__(
        self,
        config: Config,
        api: HttpApi,
        aiohttp_server: web.Server,
        admission: NodeAdmission,
        ssl_context: Any = None,
    ) -> None:
        self.api = api
        self.aiohttp_server = aiohttp_server
        self.admission = admission
        self.max_body = config.limits.max_http_body_bytes
        self.max_inflight = config.limits.max_inflight_per_connection
        a = config.admission
        self.header_timeout_s = a.header_timeout_ms / 1000
        self.body_timeout_s = a.body_timeout_ms / 1000
        self.body_min_rate = a.body_min_rate
        self.send_timeout_s = a.send_timeout_ms / 1000
        self.site = (
            SitePolicy(config.listen.host, a.allowed_hosts, a.allowed_origins)
            if api.auth.open
            else None
        )
        self.rules = route_rules(api.route_table)
        self.connections: set[IngestConnection] = set()
        # connections whose current request spans reads: their deadlines are checked
        self.watched: set[IngestConnection] = set()
        self.draining = False
        self.loop = admission.loop
        refused = TooManyConnections("connection limit reached")
        self.listener = Listener(
            "http",
            admission,
            lambda ticket: IngestConnection(self, ticket),
            refusal=refusal_http(
                api.encode(
                    {"error": {"code": refused.code, "message": str(refused), "field": None}}
                )
            ),
            ssl_context=ssl_context,
        )
        self._sweeps = 0
        self._last_check = self.loop.time()
        self.turn = TurnBudget(self.loop, TURN_BODY_BYTES, api.stats)
        self._date = b""
        self._date_second = -1
        admission.add_check(self.check)

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (useful with 0)."""
        return await self.listener.start(host, port)

    def date(self) -> bytes:
        """The ``Date`` header's value, formatted once a second."""
        now = int(time.time())
        if now != self._date_second:
            self._date = email.utils.formatdate(now, usegmt=True).encode()
            self._date_second = now
        return self._date

    def check(self, now: float) -> None:
        """Once a second: the deadlines of requests in progress; every few seconds, idle and
        stalled connections."""
        elapsed, self._last_check = now - self._last_check, now
        for conn in list(self.watched):
            if not conn.check_deadline(now, elapsed):
                self.watched.discard(conn)
        self._sweeps += 1
        if self._sweeps % _SCAN_EVERY == 0:
            for conn in list(self.connections):
                conn.check(now)

    def stop_accepting(self) -> None:
        self.listener.stop_accepting()

    async def drain(self, grace_s: float) -> None:
        """Close idle connections now; let the others finish the requests they have (each
        answered with ``Connection: close``; requests arriving now get ``shutting_down``),
        up to ``grace_s``; then close whatever is left."""
        self.draining = True
        for conn in list(self.connections):
            if conn.idle and conn.handler is None:
                conn.close()
        deadline = self.loop.time() + grace_s
        while any(c.handler is None for c in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.handler is None:
                conn.close()
        await self.listener.wait_closed()
