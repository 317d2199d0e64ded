"""The HTTP listener: a lean HTTP/1.1 path for ``POST /events`` and ``POST /events/batch``,
aiohttp for every other request.

Why: aiohttp's per-request machinery (``RequestHandler``, application, router, middleware,
``StreamWriter``) costs ~110 us of event-loop time per request, many times Herald's own
handler, and at one event per request that bounds ingest. Here a connection is an
``asyncio.Protocol`` that parses with ``httptools`` (llhttp, the parser uvicorn uses), calls
the same :class:`~broker.http.HttpApi` methods as the aiohttp handlers (``accept_event``,
``accept_batch``, ``error_answer``: one validation, idempotency, stats and error mapping for
both paths) and answers from the partition's sync callback, with no task per request.

Hand-off: a connection starts here. The first request that is not one of the two ingest
endpoints (another method or path, or an upgrade) gives the connection to aiohttp for good:
once the answers to the requests before it are written, an aiohttp ``RequestHandler`` becomes
the transport's protocol and receives every byte from that request's first byte on.

HTTP handled here: keep-alive (the HTTP/1.1 default; HTTP/1.0 only when asked),
``Connection: close``, ``Expect: 100-continue``, chunked bodies, pipelining (answers leave in
request order), a body over ``limits.max-http-body-bytes`` (413, then close) and malformed
HTTP (400, then close). Back-pressure: at ``limits.max-inflight-per-connection`` unanswered
requests, or a full socket buffer, the connection stops reading (the requests already in the
chunk being parsed are still served, so the cap is exceeded by at most one read's worth).

Memory per connection: the body being received (at most ``max-http-body-bytes``) and the raw
bytes since the last request boundary, kept in case the connection is handed off mid-stream:
up to twice the body limit while a large body arrives, a few hundred bytes otherwise.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import time
from collections import deque
from http import HTTPStatus
from typing import Any, Final, cast

import httptools
from aiohttp import web

from broker.config import Config
from broker.errors import Internal, InvalidRequest, PayloadTooLarge, ShuttingDown
from broker.http import Accepted, HttpApi

log = logging.getLogger("herald.http")

ROUTES: Final = {b"/events": "/events", b"/events/batch": "/events/batch"}
# request line and headers: aiohttp's own limit is 8190 bytes per line
MAX_HEAD_BYTES: Final = 64 * 1024
# an idle keep-alive connection is closed after this long (aiohttp's default)
KEEPALIVE_TIMEOUT_S: Final = 75.0
# after a fatal error answer, how long the rest of the request is read and dropped, so that
# closing with unread input (a TCP reset) does not destroy the answer before the client reads it
LINGER_S: Final = 2.0
# how far one parser runs ahead of the other in request_start
_STEP: Final = 4096

_REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def request_start(raw: bytes, index: int) -> int:
    """Where request ``index`` (from 0) begins in ``raw``: a stream of HTTP/1.x requests that
    starts at a request boundary and holds at least ``index`` whole requests.

    httptools reports no positions, so this parses ``raw`` again with two parsers, one a step
    of ``_STEP`` bytes behind the other; once the leader has seen ``index`` requests end, the
    other one is fed byte by byte to the exact position. Linear in ``len(raw)``, and run once
    per connection, when it is handed to aiohttp. Empty lines between requests (which llhttp
    skips) are skipped."""
    end = 0
    if index > 0:
        lead, lag = _Count(), _Count()
        lead_parser, lag_parser = (
            httptools.HttpRequestParser(lead),
            httptools.HttpRequestParser(lag),
        )
        view = memoryview(raw)
        while end < len(raw):
            piece = view[end : end + _STEP]
            try:
                lead_parser.feed_data(piece)
            except httptools.HttpParserError:
                pass  # past the request wanted: only what comes before it matters
            if lead.done >= index:
                break
            lag_parser.feed_data(piece)
            end += len(piece)
        while lag.done < index and end < len(raw):
            lag_parser.feed_data(view[end : end + 1])
            end += 1
    while raw[end : end + 1] in (b"\r", b"\n"):
        end += 1
    return end


class _Count:
    def __init__(self) -> None:
        self.done = 0

    def on_message_complete(self) -> None:
        self.done += 1


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


# connection states: reading requests -> (closing | handing off) -> done; a fatal error
# answer lingers (drops input for LINGER_S) before done
OPEN: Final = "open"
CLOSING: Final = "closing"  # no more requests: close once the answers are written
HANDING_OFF: Final = "handing_off"  # give the connection to aiohttp once the answers are written
LINGERING: Final = "lingering"
DONE: Final = "done"  # closed, or aiohttp's


class IngestConnection(asyncio.Protocol):
    """One HTTP connection until it closes or is handed to aiohttp."""

    def __init__(self, server: IngestServer) -> None:
        self.server = server
        self.api = server.api
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.state = OPEN
        self.replies: deque[_Reply] = deque()
        self.last_active = server.loop.time()
        self._read_paused = False
        self._write_paused = False
        self._linger: asyncio.TimerHandle | None = None
        # the input since the last request boundary, and how many requests began in it: all
        # a hand-off needs to find the first byte of the request it hands over
        self._since: list[bytes] = []
        self._begun = 0
        self._in_request = False
        self._handoff = b""
        # the request being parsed
        self._url = b""
        self._head = 0
        self._auth: bytes | None = None
        self._length: int | None = None
        self._expect = False
        self._route = ""
        self._body: list[bytes] = []
        self._size = 0

    @property
    def idle(self) -> bool:
        return not self.replies and not self._in_request

    # ---------------------------------------------------------------- transport
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = DONE
        self.server.connections.discard(self)
        self.replies.clear()
        if self._linger is not None:
            self._linger.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def eof_received(self) -> bool | None:
        if self.state == HANDING_OFF:
            return True  # aiohttp answers what was sent
        if self.state in (OPEN, CLOSING) and self.replies:
            self.state = CLOSING  # the client is done sending: answer, then close
            return True
        return None  # close

    def data_received(self, data: bytes) -> None:
        if self.state != OPEN:
            if self.state == HANDING_OFF:  # reading is paused; should more come, it is aiohttp's
                self._handoff += data
            return  # closing or lingering: the input is dropped
        self.last_active = self.server.loop.time()
        self._since.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if self.state == OPEN:  # not one of our stops: a bug in a callback
                self._internal_error(exc.__context__ or exc)
        except httptools.HttpParserError as exc:
            self._fail(400, InvalidRequest.code, f"malformed HTTP request: {exc}")
        except Exception as exc:
            self._internal_error(exc)
        if not self._in_request:
            self._since.clear()  # a request boundary: nothing before it can be handed off
            self._begun = 0
        if self.state == HANDING_OFF and not self.replies:
            self._guarded(self._hand_off)

    # ------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        if self.state != OPEN:
            raise _Stop
        self._in_request = True
        self._begun += 1
        self._url = b""
        self._head = 0
        self._auth = None
        self._length = None
        self._expect = False
        self._body = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow_head(len(name) + len(value))
        name = name.lower()
        if name == b"authorization":
            if self._auth is None:
                self._auth = value
        elif name == b"content-length":
            self._length = int(value)  # llhttp accepts digits only
        elif name == b"expect":
            self._expect = value.lower() == b"100-continue"

    def _grow_head(self, n: int) -> None:
        self._head += n
        if self._head > MAX_HEAD_BYTES:
            self._fail(
                400,
                InvalidRequest.code,
                f"request line and headers exceed {MAX_HEAD_BYTES} bytes",
            )
            raise _Stop

    def on_headers_complete(self) -> None:
        parser = self.parser
        route = ROUTES.get(self._url.partition(b"?")[0])
        if route is None or parser.get_method() != b"POST" or parser.should_upgrade():
            self._hand_off_from(self._begun - 1)
            raise _Stop
        self._route = route
        if self._length is not None and self._length > self.server.max_body:
            self._too_large()
            raise _Stop
        if self._expect and parser.get_http_version() == "1.1":
            reply = _Reply(close=False)
            reply.status, reply.body = 100, b""
            self.replies.append(reply)
            self._flush()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.server.max_body:
            self._too_large()
            raise _Stop
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_request = False
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
        self._serve(reply, b"".join(self._body))
        if not keep_alive:
            raise _Stop  # whatever follows on this connection is not read
        if len(self.replies) >= self.server.max_inflight:
            self._update_reading()

    # -------------------------------------------------------------------- serving
    def _serve(self, reply: _Reply, body: bytes) -> None:
        api = self.api
        route = self._route
        try:
            auth = self._auth.decode("utf-8", "surrogateescape") if self._auth else None
            principal = api.auth.bearer(auth)
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

    def _fail(self, status: int, code: str, message: str) -> None:
        """Answer after the answers already due, then close: the input cannot be trusted (or
        is not worth reading) past this point."""
        if self.state in (DONE, LINGERING):
            return
        self.api.stats.requests += 1
        self.api.stats.errors += 1
        reply = _Reply(close=True)
        reply.linger = True
        reply.status = status
        reply.body = self.api.encode({"error": {"code": code, "message": message, "field": None}})
        self.replies.append(reply)
        self._in_request = False
        self.state = CLOSING
        self._flush()

    def _too_large(self) -> None:
        limit = self.server.max_body
        self._fail(413, PayloadTooLarge.code, f"request body exceeds max_http_body_bytes={limit}")

    def _internal_error(self, exc: BaseException) -> None:
        log.error("event=http_ingest_failed peer=%s state=%s", self.peer, self.state, exc_info=exc)
        if self.state in (DONE, LINGERING):
            self.close()
        else:
            self.replies.clear()  # their order can no longer be kept: answer this and close
            self._fail(500, Internal.code, "internal error")

    def _guarded(self, step: Any) -> None:
        try:
            step()
        except Exception as exc:
            self._internal_error(exc)

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
                self.state == CLOSING or (server.draining and not self._in_request)
            )
            transport.write(self._render(reply, reply.close or last))
            if reply.close or last:
                self._close_after_write(reply.linger)
                return
        if not replies and self.state == HANDING_OFF:
            self._hand_off()
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
        if transport is None or self.state in (DONE, LINGERING):
            return
        pause = (
            self._write_paused
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
        self._since = []
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
        """Close now (idle keep-alive connections at shutdown or after the idle timeout)."""
        self.state = DONE
        self.replies.clear()
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ hand-off
    def _hand_off_from(self, index: int) -> None:
        """Request ``index`` of the input since the last boundary is aiohttp's: keep the bytes
        from its first one on, stop reading, and hand off once the earlier answers are out."""
        raw = b"".join(self._since)
        self._handoff = raw[request_start(raw, index) :]
        self._since = []
        self._in_request = False
        self.state = HANDING_OFF
        self._update_reading()

    def _hand_off(self) -> None:
        transport = self.transport
        assert transport is not None
        data, self._handoff = self._handoff, b""
        self.state = DONE
        self.server.connections.discard(self)
        handler = self.server.aiohttp_server()
        handler.connection_made(transport)
        transport.set_protocol(handler)
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        if data:
            handler.data_received(data)


class IngestServer:
    """The HTTP port: accepts connections as :class:`IngestConnection`, keeps them, closes
    the idle ones, and drains them at shutdown. ``aiohttp_server`` (a set-up runner's
    ``web.Server``) makes the protocol for a connection handed to aiohttp; the runner's
    cleanup closes those."""

    def __init__(self, config: Config, api: HttpApi, aiohttp_server: web.Server) -> None:
        self.api = api
        self.aiohttp_server = aiohttp_server
        self.max_body = config.limits.max_http_body_bytes
        self.max_inflight = config.limits.max_inflight_per_connection
        self.connections: set[IngestConnection] = set()
        self.draining = False
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._date = b""
        self._date_second = -1

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (useful with 0)."""
        self._server = server = await self.loop.create_server(
            lambda: IngestConnection(self), host, port, backlog=1024, reuse_address=True
        )
        self._sweeper = self.loop.call_later(KEEPALIVE_TIMEOUT_S / 5, self._close_idle)
        return int(server.sockets[0].getsockname()[1])

    def date(self) -> bytes:
        """The ``Date`` header's value, formatted once a second."""
        now = int(time.time())
        if now != self._date_second:
            self._date = email.utils.formatdate(now, usegmt=True).encode()
            self._date_second = now
        return self._date

    def _close_idle(self) -> None:
        deadline = self.loop.time() - KEEPALIVE_TIMEOUT_S
        for conn in list(self.connections):
            # no answer owed and nothing read for the timeout: idle, or stalled mid-request
            if not conn.replies and conn.last_active < deadline:
                conn.close()
        self._sweeper = self.loop.call_later(KEEPALIVE_TIMEOUT_S / 5, self._close_idle)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def drain(self, grace_s: float) -> None:
        """Close idle connections now; let the others finish the requests they have (each
        answered with ``Connection: close``; requests arriving now get ``shutting_down``),
        up to ``grace_s``; then close whatever is left."""
        self.draining = True
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        deadline = self.loop.time() + grace_s
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close()
