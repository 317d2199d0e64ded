"""The HTTP listener without a network: an :class:`IngestConnection` fed a stream cut at any
points answers its lean requests in order and hands aiohttp exactly the requests it does not
serve, rebuilt (hypothesis); the head is cut at its limit in linear time whatever the cuts; a
key is checked when the headers end and a trailer's key is never seen; a body of tiny
pieces is refused."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.admission import Admission, AuthThrottle, ByteBudget, LogLimiter
from broker.auth import Authenticator
from broker.config import ApiKey
from broker.errors import describe
from broker.http import Accepted, HttpStats
from broker.http_ingest import MAX_HEAD_BYTES, SLICE, TURN_BODY_BYTES, IngestConnection, TurnBudget
from broker.http_policy import RouteRules, SitePolicy

KEY = "a-key-of-sixteen-chars"


def post(n: int, *, chunked: bool = False, version: str = "1.1", extra: str = "") -> bytes:
    body = json.dumps({"topic": "t", "payload": n}).encode()
    head = f"POST /events HTTP/{version}\r\nContent-Type: application/json\r\n{extra}"
    if chunked:
        half = len(body) // 2
        framed = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            half,
            body[:half],
            len(body) - half,
            body[half:],
        )
        return f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + framed
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


GET = b"GET /topics HTTP/1.1\r\nHost: localhost\r\nX-Trace: a b  \r\n\r\n"


# ------------------------------------------------------------ a connection, no network
class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.reading = True

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    abort = close

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading


class FakeHandler:
    """Stands for aiohttp's RequestHandler: records what it is given."""

    def __init__(self) -> None:
        self.data = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class FakeApi:
    """Answers ``{"n": payload}`` at once (nothing to wait for)."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.auth = Authenticator(keys)
        self.stats = HttpStats()
        self.bodies: list[bytes] = []

    def accept_event(self, principal: Any, body: bytes) -> Accepted:
        self.bodies.append(body)
        return Accepted({"n": json.loads(body)["payload"]}, 1, None)

    def encode(self, body: Any) -> bytes:
        return json.dumps(body).encode()

    def error_answer(self, exc: BaseException, path: str) -> tuple[int, dict[str, Any]]:
        err = describe(exc)
        return err.http_status, {"error": {"code": err.code}}


class FakeAdmission:
    def __init__(self, clock: Any) -> None:
        self.table = Admission(
            capacity=100,
            listeners={"http": 100},
            unauthenticated_share=0.5,
            max_unauthenticated_per_address=100,
            max_per_address=100,
            handshake_timeout_s=10,
            clock=clock,
        )
        self.requests = ByteBudget(1 << 30)
        self.throttle = AuthThrottle(30, clock)
        self.logs = LogLimiter(5, clock)
        self.request_timeouts = 0

    def note(self, *args: Any, **kwargs: Any) -> None:
        pass

    def key_allowed(self, address: str) -> bool:
        return self.throttle.allowed(address)

    def holder(self, tenant: str | None, address: str) -> str:
        return tenant or "-"

    def key_failed(self, address: str, peer: str, listener: str) -> None:
        self.throttle.failed(address)


class FakeServer:
    def __init__(self, keys: list[ApiKey] | None = None) -> None:
        self.api = FakeApi(keys or [])
        self.loop = asyncio.new_event_loop()
        self.admission = FakeAdmission(self.loop.time)
        self.site = SitePolicy("127.0.0.1", [], []) if not keys else None
        self.rules = RouteRules([])  # no route with a rule of its own
        self.max_body = 1 << 20
        self.max_inflight = 1024
        self.header_timeout_s = self.body_timeout_s = 10.0
        self.body_min_rate = 1024
        self.draining = False
        self.connections: set[Any] = set()
        self.watched: set[Any] = set()
        self.handlers: list[FakeHandler] = []
        self.turn = TurnBudget(self.loop, TURN_BODY_BYTES, self.api.stats)

    def date(self) -> bytes:
        return b"Thu, 01 Jan 2026 00:00:00 GMT"

    def aiohttp_server(self) -> FakeHandler:
        self.handlers.append(FakeHandler())
        return self.handlers[-1]


def connect(server: FakeServer) -> tuple[IngestConnection, FakeTransport]:
    transport = FakeTransport()
    ticket, _ = server.admission.table.admit("http", "127.0.0.1", transport.close)
    assert ticket is not None
    conn = IngestConnection(server, ticket)  # type: ignore[arg-type]
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def feed(
    stream: bytes, cuts: list[int], *, keys: list[ApiKey] | None = None
) -> tuple[FakeServer, FakeTransport, list[Any]]:
    server = FakeServer(keys)
    try:
        conn, transport = connect(server)
        bounds = [0, *sorted(set(cuts)), len(stream)]
        for a, b in itertools.pairwise(bounds):
            if a < b:
                conn.data_received(stream[a:b])
        answers = [json.loads(w.partition(b"\r\n\r\n")[2]) for w in transport.written]
        return server, transport, answers
    finally:
        server.loop.close()


class _Requests:
    """Parses what the handler got back into (method, target, headers, body) tuples."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.got: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = []

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body = b"", [], b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.got.append((self.parser.get_method(), self._url, self._headers, self._body))


def requests_in(data: bytes) -> list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]]:
    parsed = _Requests()
    parsed.parser.feed_data(data)
    return parsed.got


@settings(max_examples=150, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["plain", "chunked", "crlf"]), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
    then_aiohttp=st.booleans(),
)
def test_any_cut_of_a_pipelined_stream_is_answered_in_order_and_handed_off_exactly(
    kinds: list[str], cuts: list[int], then_aiohttp: bool
) -> None:
    stream = b""
    n = 0
    for kind in kinds:
        if kind == "crlf":
            stream += b"\r\n"  # an empty line between requests, which llhttp allows
            continue
        stream += post(n, chunked=kind == "chunked")
        n += 1
    tail = GET + post(99, chunked=True) + post(100) if then_aiohttp else b""
    server, transport, answers = feed(stream + tail, [c % (len(stream + tail) + 1) for c in cuts])
    assert answers == [{"n": i} for i in range(n)]
    assert all(w.startswith(b"HTTP/1.1 200 OK\r\n") for w in transport.written)
    assert not transport.closed
    if then_aiohttp:
        (handler,) = server.handlers
        got = requests_in(handler.data)
        want = requests_in(tail)
        assert [(m, u, b) for m, u, _h, b in got] == [(m, u, b) for m, u, _h, b in want]
        # the same headers, in order (a chunked body is re-framed as chunked)
        assert [h for _m, _u, h, _b in got] == [h for _m, _u, h, _b in want]
    else:
        assert server.handlers == []
    assert server.api.stats.requests == n


def test_http_1_0_is_answered_and_closed() -> None:
    _server, transport, answers = feed(post(1, version="1.0") + post(2), [])
    assert answers == [{"n": 1}]
    assert b"Connection: close\r\n" in transport.written[0]
    assert transport.closed


def test_garbage_is_answered_400_after_the_good_requests_and_closed() -> None:
    _server, transport, answers = feed(post(1) + b"\x00\x01garbage\r\n\r\n", [])
    assert answers[0] == {"n": 1}
    assert answers[1]["error"]["code"] == "invalid_request"
    assert transport.written[1].startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert transport.closed


# ------------------------------------------------------------------------ the gate
@pytest.mark.serial  # bounds elapsed time: run alone (make test)
def test_a_header_that_never_ends_is_cut_at_the_head_limit_in_linear_time() -> None:
    server = FakeServer()
    try:
        conn, transport = connect(server)
        conn.data_received(b"POST /events HTTP/1.1\r\nX-Long: ")
        fed = 0
        started = time.perf_counter()
        piece = b"a" * 1024  # small reads: the worst case for a parser that gathers a value
        while not transport.written and fed < 64 * MAX_HEAD_BYTES:
            conn.data_received(piece)
            fed += len(piece)
        elapsed = time.perf_counter() - started
    finally:
        server.loop.close()
    assert transport.written[0].startswith(b"HTTP/1.1 431 ")
    assert fed <= MAX_HEAD_BYTES + 2 * SLICE
    assert transport.closed
    assert elapsed < 0.5


def test_a_pipelined_stream_cut_mid_request_keeps_no_raw_input() -> None:
    """What made the old hand-off buffer grow byte for byte: requests cut mid-way, read
    after read. Nothing but the request being parsed is kept now."""
    server = FakeServer()
    try:
        conn, transport = connect(server)
        one = post(7)
        for _ in range(2000):
            conn.data_received(one[:50])
            conn.data_received(one[50:] + one[:10])
            conn.data_received(one[10:50])
            conn.data_received(one[50:])
        assert len(transport.written) == 4000
        assert not hasattr(conn, "_since")
        assert conn._fwd == []
    finally:
        server.loop.close()


def test_the_key_is_checked_when_the_headers_end_and_the_body_is_never_read() -> None:
    big = b'{"topic": "t", "payload": "' + b"x" * 100_000 + b'"}'
    head = (
        b"POST /events HTTP/1.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer wrong-key-of-16-chars\r\nContent-Length: %d\r\n\r\n" % len(big)
    )
    server, transport, answers = feed(head + big, [len(head)], keys=[ApiKey(key=KEY)])
    assert answers[0]["error"]["code"] == "unauthenticated"
    assert transport.written[0].startswith(b"HTTP/1.1 401 ")
    assert server.api.bodies == []
    assert server.admission.requests.used == 0
    assert transport.closed


def test_a_key_in_a_chunked_trailer_is_ignored() -> None:
    body = json.dumps({"topic": "t", "payload": 1}).encode()
    stream = (
        b"POST /events HTTP/1.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nAuthorization: Bearer %s\r\n\r\n"
        % (len(body), body, KEY.encode())
    )
    server, transport, _answers = feed(stream, [], keys=[ApiKey(key=KEY)])
    assert transport.written[0].startswith(b"HTTP/1.1 401 ")
    assert server.api.bodies == []


def test_a_trailer_that_never_ends_is_cut_like_a_head() -> None:
    server = FakeServer()
    try:
        conn, transport = connect(server)
        body = json.dumps({"topic": "t", "payload": 1}).encode()
        conn.data_received(
            b"POST /events HTTP/1.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nX-T: " % (len(body), body)
        )
        fed = 0
        while not transport.written and fed < 64 * MAX_HEAD_BYTES:
            conn.data_received(b"a" * 32768)
            fed += 32768
    finally:
        server.loop.close()
    assert transport.written[0].startswith(b"HTTP/1.1 431 ")
    assert fed <= MAX_HEAD_BYTES + 3 * SLICE


def test_a_body_of_one_byte_chunks_is_refused_early() -> None:
    framed = b"".join(b"1\r\n%c\r\n" % c for c in b'{"topic": "t", "payload": "' + b"x" * 10_000)
    stream = (
        b"POST /events HTTP/1.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + framed
    )
    server, transport, answers = feed(stream, [])
    assert answers[0]["error"]["code"] == "invalid_request"
    assert transport.closed
    assert server.api.bodies == []


def test_a_body_that_is_not_json_is_415_before_it_is_read() -> None:
    stream = b"POST /events HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    server, transport, answers = feed(stream, [])
    assert transport.written[0].startswith(b"HTTP/1.1 415 ")
    assert answers[0]["error"]["code"] == "unsupported_media_type"
    assert server.api.bodies == []


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.loop.close()


def connect_each(server: FakeServer, streams: list[bytes]) -> list[tuple[Any, FakeTransport]]:
    """A connection per stream, each fed its stream in one read."""
    conns = [connect(server) for _ in streams]
    for (conn, _transport), stream in zip(conns, streams, strict=True):
        conn.data_received(stream)
    return conns


def run_turns(server: FakeServer, n: int = 1) -> None:
    """``n`` turns of the server's loop: what is ready at each runs, then it stops."""
    for _ in range(n):
        server.loop.call_soon(server.loop.stop)
        server.loop.run_forever()


def big_post(n: int) -> bytes:
    body = json.dumps({"topic": "t", "payload": n, "pad": "x" * (TURN_BODY_BYTES + 1)}).encode()
    head = "POST /events HTTP/1.1\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def test_large_requests_completing_in_one_turn_are_served_one_turn_after_another(
    server: FakeServer,
) -> None:
    """Once a turn's body bytes are spent, a request that would complete waits for the next
    turn, its connection's reading paused; it is then served, in order, nothing lost."""
    conns = connect_each(server, [big_post(i) for i in range(3)])
    served = [len(t.written) for _c, t in conns]
    assert served == [1, 0, 0]  # the first spent the turn
    assert [t.reading for _c, t in conns] == [True, False, False]
    run_turns(server)
    assert [len(t.written) for _c, t in conns] == [1, 1, 0]
    run_turns(server)
    assert [len(t.written) for _c, t in conns] == [1, 1, 1]
    assert [t.reading for _c, t in conns] == [True, True, True]
    answers = [json.loads(t.written[0].partition(b"\r\n\r\n")[2]) for _c, t in conns]
    assert answers == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert server.api.stats.deferred >= 2


def test_small_requests_are_not_held_by_the_turn_budget(server: FakeServer) -> None:
    """Requests of a slice or less are served as they complete, however many in a turn."""
    conns = connect_each(server, [post(i) for i in range(50)])
    assert all(len(t.written) == 1 for _c, t in conns)
    assert server.api.stats.deferred == 0


def test_pipelined_large_requests_on_one_connection_are_answered_in_order(
    server: FakeServer,
) -> None:
    ((_conn, transport),) = connect_each(server, [big_post(1) + big_post(2) + post(3)])
    assert len(transport.written) == 1 and not transport.reading
    run_turns(server, 4)
    answers = [json.loads(w.partition(b"\r\n\r\n")[2]) for w in transport.written]
    assert answers == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert transport.reading and not transport.closed


def test_a_waiting_connection_that_goes_away_gives_its_turn_to_the_next(
    server: FakeServer,
) -> None:
    conns = connect_each(server, [big_post(i) for i in range(3)])
    conns[1][0].connection_lost(None)  # waiting, then gone
    run_turns(server)
    assert [len(t.written) for _c, t in conns] == [1, 0, 1]
    assert not server.turn.waiting
