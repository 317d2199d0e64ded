"""The ingest fast path without a network: ``request_start`` finds request boundaries in a
pipelined stream, and an :class:`IngestConnection` fed a stream cut at any points answers
its requests in order and hands aiohttp exactly the bytes from the first request it does not
serve, whatever the cuts (hypothesis)."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.auth import OPEN_PRINCIPAL, Principal
from broker.http import Accepted, HttpStats
from broker.http_ingest import IngestConnection, request_start


def post(n: int, *, chunked: bool = False, version: str = "1.1") -> bytes:
    body = json.dumps({"topic": "t", "payload": n}).encode()
    if chunked:
        half = len(body) // 2
        framed = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            half,
            body[:half],
            len(body) - half,
            body[half:],
        )
        return (
            f"POST /events HTTP/{version}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + framed
        )
    head = f"POST /events HTTP/{version}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


GET = b"GET /topics HTTP/1.1\r\nHost: x\r\n\r\n"


# --------------------------------------------------------------------- request_start
def test_request_start_finds_each_boundary() -> None:
    parts = [post(0), GET, post(1, chunked=True), b"\r\n", post(2), GET]
    raw = b"".join(parts)
    assert request_start(raw, 0) == 0
    assert request_start(raw, 1) == len(parts[0])
    assert request_start(raw, 2) == len(b"".join(parts[:2]))
    # the empty line between requests is skipped, as llhttp skips it
    assert request_start(raw, 3) == len(b"".join(parts[:4]))
    assert request_start(raw, 4) == len(b"".join(parts[:5]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3 * 4096), min_size=1, max_size=5))
def test_request_start_is_exact_for_requests_larger_than_a_parsing_step(sizes: list[int]) -> None:
    parts = [big_post(size) for size in sizes]
    raw = b"".join(parts) + GET
    for index in range(len(parts) + 1):
        assert request_start(raw, index) == len(b"".join(parts[:index]))


def big_post(size: int) -> bytes:
    body = json.dumps({"topic": "t", "payload": "x" * size}).encode()
    return b"POST /events HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_request_start_of_a_request_still_arriving() -> None:
    raw = post(0) + GET[:10]
    assert request_start(raw, 1) == len(post(0))


# ------------------------------------------------------------ a connection, no network
class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.reading = True
        self.protocol: Any = None

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


class FakeHandler:
    """Stands for aiohttp's RequestHandler: records what it is given."""

    def __init__(self) -> None:
        self.data = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data


class FakeAuth:
    def bearer(self, header: str | None) -> Principal:
        return OPEN_PRINCIPAL


class FakeApi:
    """Answers ``{"n": payload}`` at once (nothing to wait for)."""

    def __init__(self) -> None:
        self.auth = FakeAuth()
        self.stats = HttpStats()

    def accept_event(self, principal: Principal, body: bytes) -> Accepted:
        return Accepted({"n": json.loads(body)["payload"]}, 1, None)

    def encode(self, body: Any) -> bytes:
        return json.dumps(body).encode()


class FakeServer:
    def __init__(self) -> None:
        self.api = FakeApi()
        self.loop = asyncio.new_event_loop()
        self.max_body = 1 << 20
        self.max_inflight = 1024
        self.draining = False
        self.connections: set[Any] = set()
        self.handlers: list[FakeHandler] = []

    def date(self) -> bytes:
        return b"Thu, 01 Jan 2026 00:00:00 GMT"

    def aiohttp_server(self) -> FakeHandler:
        self.handlers.append(FakeHandler())
        return self.handlers[-1]


def feed(stream: bytes, cuts: list[int]) -> tuple[FakeServer, FakeTransport, list[Any]]:
    server = FakeServer()
    try:
        transport = FakeTransport()
        conn = IngestConnection(server)  # type: ignore[arg-type]
        conn.connection_made(transport)  # type: ignore[arg-type]
        bounds = [0, *sorted(set(cuts)), len(stream)]
        for a, b in itertools.pairwise(bounds):
            if a < b:  # after a hand-off the transport gives the rest to the new protocol
                (transport.protocol or conn).data_received(stream[a:b])
        answers = [json.loads(w.partition(b"\r\n\r\n")[2]) for w in transport.written]
        return server, transport, answers
    finally:
        server.loop.close()


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
    tail = GET + post(99) if then_aiohttp else b""
    server, transport, answers = feed(stream + tail, [c % (len(stream + tail) + 1) for c in cuts])
    assert answers == [{"n": i} for i in range(n)]
    assert all(w.startswith(b"HTTP/1.1 200 OK\r\n") for w in transport.written)
    assert not transport.closed
    if then_aiohttp:
        (handler,) = server.handlers
        assert handler.data == tail
        assert transport.protocol is handler
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
