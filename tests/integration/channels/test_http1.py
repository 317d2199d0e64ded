"""The webhook channel's HTTP/1.1 client (``channels/http1.py``) against real servers on
127.0.0.1: raw-socket servers that answer byte by byte as a test scripts them (stale
keep-alive connections, chunked and oversized answers, ``Connection: close``, slow bodies),
aiohttp receivers for the pool bound under a flood, and a TLS receiver with a throwaway CA."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from standardwebhooks import Webhook

from channels.base import Delivered, Outcome, Permanent, Retry
from channels.http1 import HttpClient
from channels.signing import generate_secret
from channels.webhook import WebhookChannel

from ..tls_certs import make_tls_files
from .conftest import ChannelFactory, delivery
from .receiver import Receiver

Request = tuple[bytes, dict[str, str], bytes]  # request line, headers (lower-case), body
Script = Callable[["Conn"], Awaitable[None]]


class Conn:
    """One accepted connection of a :class:`RawServer`, read request by request."""

    def __init__(
        self, server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer

    async def read_request(self) -> Request | None:
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        line, *lines = head[:-4].split(b"\r\n")
        headers = {}
        for raw in lines:
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        request = (line, headers, body)
        self.server.requests.append(request)
        return request

    async def answer(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


class RawServer:
    """A TCP server on 127.0.0.1 whose every connection runs ``script``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[Request] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        conn = Conn(self, reader, writer)
        try:
            await self.script(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def client_of(channel: WebhookChannel) -> HttpClient:
    assert channel.client is not None
    return channel.client


def retry(outcome: Outcome) -> Retry:
    assert isinstance(outcome, Retry), outcome
    return outcome


# ---------------------------------------------------------------------------- keep-alive
async def test_one_connection_carries_every_request_in_turn(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    channel = webhook_factory()
    for i in range(30):
        outcome = await channel.send(delivery(receiver.url("/status/204"), delivery_id=f"d{i}"))
        assert isinstance(outcome, Delivered)
    assert client_of(channel).opened == 1
    assert len({r.peer for r in receiver.requests}) == 1
    assert [r.headers["webhook-id"] for r in receiver.requests] == [f"d{i}" for i in range(30)]


async def test_a_connection_the_server_closed_while_idle_is_not_used(
    webhook_factory: ChannelFactory,
) -> None:
    async def answer_once_then_close(conn: Conn) -> None:
        if await conn.read_request() is not None:
            await conn.answer(OK)  # keep-alive by default, then closed by the server anyway

    async with RawServer(answer_once_then_close) as server:
        channel = webhook_factory()
        assert isinstance(await channel.send(delivery(server.url(), delivery_id="a")), Delivered)
        await asyncio.sleep(0.05)  # the server's FIN arrives: the pool drops the connection
        assert isinstance(await channel.send(delivery(server.url(), delivery_id="b")), Delivered)
        assert server.connections == 2 and len(server.requests) == 2


async def test_a_close_crossing_the_request_is_retried_once_on_a_new_connection(
    webhook_factory: ChannelFactory,
) -> None:
    """The stale keep-alive race: the server closes a pooled connection just as the next
    request is sent (it reads it and closes without a byte of answer). The send is delivered
    on a new connection, not failed; the receiver sees the same webhook-id twice and
    deduplicates on it."""

    async def serve_one_then_drop_the_next(conn: Conn) -> None:
        if await conn.read_request() is None:
            return
        await conn.answer(OK)
        await conn.read_request()  # the next request arrives; closed without an answer

    async with RawServer(serve_one_then_drop_the_next) as server:
        channel = webhook_factory()
        secret = generate_secret()
        assert isinstance(await channel.send(delivery(server.url(), secret)), Delivered)
        again = await channel.send(delivery(server.url(), secret, delivery_id="dlv-2"))
        assert isinstance(again, Delivered), again
        assert server.connections == 2
        ids = [headers["webhook-id"] for _, headers, _ in server.requests]
        assert ids == ["dlv-1", "dlv-2", "dlv-2"]
        breaker = channel.endpoints.get(f"http://127.0.0.1:{server.port}").breaker
        assert breaker.failure_rate() == (2, 0)  # two calls, no failed attempt counted


async def test_a_server_that_drops_every_request_fails_the_attempt_after_one_retry(
    webhook_factory: ChannelFactory,
) -> None:
    async def serve_first_then_drop(conn: Conn) -> None:
        if server.connections == 1 and await conn.read_request() is not None:
            await conn.answer(OK)
            await conn.read_request()
        else:
            await conn.read_request()

    async with RawServer(serve_first_then_drop) as server:
        channel = webhook_factory()
        assert isinstance(await channel.send(delivery(server.url())), Delivered)
        assert retry(await channel.send(delivery(server.url()))).reason == "connection_lost"
        assert server.connections == 2  # the pooled one, and one fresh retry: not more
        assert len(server.requests) == 3


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
)
async def test_connection_close_and_http10_answers_are_not_reused(
    webhook_factory: ChannelFactory, answer: bytes
) -> None:
    async def answer_and_keep_open(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.answer(answer)  # the server keeps the socket open: the client closes

    async with RawServer(answer_and_keep_open) as server:
        channel = webhook_factory()
        for _ in range(3):
            assert isinstance(await channel.send(delivery(server.url())), Delivered)
        assert server.connections == 3 and client_of(channel).open == 0


# --------------------------------------------------------------------- response framing
async def test_a_chunked_answer_is_read_and_the_connection_reused(
    webhook_factory: ChannelFactory,
) -> None:
    chunked = (
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n"
        b"Retry-After: 7\r\n\r\n"
        b"5\r\nbusy,\r\n9\r\n try late\r\n2\r\nr!\r\n0\r\n\r\n"
    )

    async def answer_chunked(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.answer(chunked)

    async with RawServer(answer_chunked) as server:
        channel = webhook_factory()
        first = retry(await channel.send(delivery(server.url())))
        assert first.reason == "http_503" and first.after_s == 7
        assert first.detail == "HTTP 503: busy, try later!"
        assert retry(await channel.send(delivery(server.url()))).reason == "http_503"
        assert server.connections == 1


async def test_a_body_ended_by_the_close_is_a_whole_answer(
    webhook_factory: ChannelFactory,
) -> None:
    async def answer_until_close(conn: Conn) -> None:
        await conn.read_request()
        await conn.answer(b"HTTP/1.1 404 Not Found\r\n\r\nno such hook")
        conn.close()

    async with RawServer(answer_until_close) as server:
        outcome = await webhook_factory().send(delivery(server.url()))
        assert isinstance(outcome, Permanent) and outcome.reason == "http_404"
        assert outcome.detail == "HTTP 404: no such hook"


async def test_interim_1xx_answers_are_skipped(webhook_factory: ChannelFactory) -> None:
    async def answer_with_early_hints(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)

    async with RawServer(answer_with_early_hints) as server:
        channel = webhook_factory()
        assert isinstance(await channel.send(delivery(server.url())), Delivered)
        assert isinstance(await channel.send(delivery(server.url())), Delivered)
        assert server.connections == 1


async def test_an_oversized_chunked_body_is_cut_and_the_connection_dropped(
    webhook_factory: ChannelFactory,
) -> None:
    sent = [0]

    async def endless_chunks(conn: Conn) -> None:
        await conn.read_request()
        await conn.answer(b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"z" * 0x10000 + b"\r\n"
        while sent[0] < 256 << 20:
            await conn.answer(chunk)
            sent[0] += len(chunk)

    async with RawServer(endless_chunks) as server:
        channel = webhook_factory(max_response_bytes=500)
        outcome = retry(await channel.send(delivery(server.url())))
        assert outcome.reason == "http_500" and outcome.detail.endswith("...")
        await asyncio.sleep(0.2)
        assert sent[0] < 32 << 20  # dropped, not drained
        assert client_of(channel).open == 0


async def test_an_endless_response_head_is_a_bad_response(
    webhook_factory: ChannelFactory,
) -> None:
    async def endless_headers(conn: Conn) -> None:
        await conn.read_request()
        await conn.answer(b"HTTP/1.1 200 OK\r\n")
        for i in range(100_000):
            await conn.answer(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000))

    async with RawServer(endless_headers) as server:
        outcome = retry(await webhook_factory().send(delivery(server.url())))
        assert outcome.reason == "bad_response" and "head longer" in outcome.detail


async def test_bytes_that_are_not_http_are_a_bad_response(
    webhook_factory: ChannelFactory,
) -> None:
    async def speak_smtp(conn: Conn) -> None:
        await conn.read_request()
        await conn.answer(b"220 mail.example.com ESMTP\r\n")
        await asyncio.sleep(1)

    async with RawServer(speak_smtp) as server:
        outcome = retry(await webhook_factory().send(delivery(server.url())))
        assert outcome.reason == "bad_response"


# -------------------------------------------------------------------------- timeouts
async def test_a_slow_body_after_the_head_times_out_as_its_status_says(
    webhook_factory: ChannelFactory,
) -> None:
    async def head_then_stall(conn: Conn) -> None:
        line, _, _ = await conn.read_request() or (b"", {}, b"")
        status = b"200 OK" if b"/ok" in line else b"502 Bad Gateway"
        await conn.answer(b"HTTP/1.1 " + status + b"\r\nContent-Length: 100\r\n\r\nsome")
        await asyncio.sleep(5)

    async with RawServer(head_then_stall) as server:
        channel = webhook_factory(timeout_ms=300, connect_timeout_ms=300)
        start = time.monotonic()
        delivered = await channel.send(delivery(server.url("/ok")))
        assert isinstance(delivered, Delivered) and "cut short" in delivered.detail
        assert 0.25 < time.monotonic() - start < 2
        failed = retry(await channel.send(delivery(server.url("/bad"))))
        assert failed.reason == "timeout"
        assert client_of(channel).open == 0  # neither half-read connection is kept


async def test_a_connect_that_never_completes_is_a_connect_timeout(
    webhook_factory: ChannelFactory,
) -> None:
    # a listening socket whose backlog is full: further SYNs go unanswered
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        try:
            channel = webhook_factory(connect_timeout_ms=200, timeout_ms=5000)
            start = time.monotonic()
            outcome = retry(await channel.send(delivery(f"http://127.0.0.1:{port}/x")))
            assert outcome.reason == "connect_timeout"
            assert time.monotonic() - start < 2
        finally:
            for s in fillers:
                s.close()


# ------------------------------------------------------------------------- the pool
async def test_the_pool_bound_holds_under_a_flood_to_many_endpoints(
    webhook_factory: ChannelFactory,
) -> None:
    receivers = [Receiver() for _ in range(4)]
    for r in receivers:
        await r.start()
        r.delay_s = 0.02
    try:
        channel = webhook_factory(pool_size=5, concurrency_per_endpoint=8)
        sends = [
            channel.send(delivery(r.url("/slow"), delivery_id=f"d{i}-{n}"))
            for n, r in enumerate(receivers)
            for i in range(40)
        ]
        outcomes = await asyncio.gather(*sends)
        assert all(isinstance(o, Delivered) for o in outcomes)
        client = client_of(channel)
        assert client.peak_open == 5 and client.open <= 5
        assert sum(r.max_in_flight for r in receivers) >= 5
        assert max(r.max_in_flight for r in receivers) <= 5
        assert sum(len(r.requests) for r in receivers) == 160
    finally:
        for r in receivers:
            await r.stop()


async def test_idle_connections_are_closed_after_the_keepalive(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    channel = webhook_factory(keepalive_ms=100)
    assert isinstance(await channel.send(delivery(receiver.url("/status/200"))), Delivered)
    assert client_of(channel).open == 1
    await asyncio.sleep(0.3)
    assert client_of(channel).open == 0
    assert isinstance(await channel.send(delivery(receiver.url("/status/200"))), Delivered)
    assert client_of(channel).opened == 2


# ------------------------------------------------------------------------------ TLS
@pytest.fixture
async def tls_receiver(tmp_path: Path) -> AsyncIterator[tuple[str, Path, list[dict[str, str]]]]:
    files = make_tls_files(tmp_path / "tls")
    seen: list[dict[str, str]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append({**request.headers, "body": (await request.read()).decode()})
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(files.cert_file, files.key_file)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}/hook", files.ca_file, seen
    finally:
        await runner.cleanup()


async def test_tls_is_verified_against_the_trusted_authorities(
    tls_receiver: tuple[str, Path, list[dict[str, str]]],
) -> None:
    from channels.config import WebhookConfig

    url, ca_file, seen = tls_receiver
    config = WebhookConfig(allow_networks=["127.0.0.1/32"], require_https=True)
    trusting = WebhookChannel(config, ssl_context=ssl.create_default_context(cafile=ca_file))
    default = WebhookChannel(config)  # the system's authorities: the test CA is not one
    try:
        secret = generate_secret()
        for i in range(3):
            outcome = await trusting.send(delivery(url, secret, delivery_id=f"t{i}"))
            assert isinstance(outcome, Delivered), outcome
        assert client_of(trusting).opened == 1  # TLS connections are kept alive too
        body = seen[0].pop("body").encode()
        Webhook(secret).verify(body, seen[0])

        refused = retry(await default.send(delivery(url)))
        assert refused.reason == "connect_error" and "certificate" in refused.detail.lower()
        assert len(seen) == 3
    finally:
        await trusting.close()
        await default.close()


async def test_tls_checks_the_host_name(
    tls_receiver: tuple[str, Path, list[dict[str, str]]],
) -> None:
    from channels.config import WebhookConfig
    from channels.ssrf import AddressPolicy

    from .receiver import StaticResolver

    url, ca_file, seen = tls_receiver
    port = url.split(":")[2].split("/")[0]
    config = WebhookConfig(allow_networks=["127.0.0.1/32"])
    assert AddressPolicy(config.allow_networks).refusal("127.0.0.1") is None
    channel = WebhookChannel(
        config,
        resolver=StaticResolver({"hooks.example.com": ["127.0.0.1"]}),
        ssl_context=ssl.create_default_context(cafile=ca_file),
    )
    try:
        outcome = retry(await channel.send(delivery(f"https://hooks.example.com:{port}/hook")))
        assert outcome.reason == "connect_error" and "hooks.example.com" in outcome.detail
        assert seen == []
    finally:
        await channel.close()


# ---------------------------------------------------------------------------- uvloop
def test_the_client_keeps_alive_retries_stale_and_cuts_bodies_on_uvloop() -> None:
    """The node runs uvloop, whose transports are not asyncio's: the same paths on it."""
    import uvloop

    from channels.config import WebhookConfig

    async def scenario() -> None:
        async def serve(conn: Conn) -> None:
            while (request := await conn.read_request()) is not None:
                if b"/drop" in request[0] and server.connections == 1:
                    return  # closed with no answer: the stale race
                if b"/huge" in request[0]:
                    await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 900000\r\n\r\n")
                    await conn.answer(b"h" * 900_000)
                    continue
                await conn.answer(OK)

        async with RawServer(serve) as server:
            channel = WebhookChannel(
                WebhookConfig(allow_networks=["127.0.0.1/32"], max_response_bytes=100)
            )
            try:
                for _ in range(3):
                    assert isinstance(await channel.send(delivery(server.url())), Delivered)
                assert server.connections == 1
                assert isinstance(await channel.send(delivery(server.url("/drop"))), Delivered)
                assert server.connections == 2
                huge = await channel.send(delivery(server.url("/huge")))
                assert isinstance(huge, Delivered) and huge.detail.endswith("...")
                assert isinstance(await channel.send(delivery(server.url())), Delivered)
                assert server.connections == 3
            finally:
                await channel.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
