"""A webhook receiver for tests: an aiohttp app on 127.0.0.1 and a free port that records
every request and answers as its path says.

    /status/<code>[?retry_after=...]  that status (3xx with a Location)
    /flaky          503 while ``fail_next`` > 0 (counting down), then 200
    /slow           200 after ``delay_s``
    /hang           never answers
    /reset-before   resets the connection (RST) before answering
    /reset-mid/<code>  sends the status and part of a body, then resets
    /huge           200 with an endless body
    /cookie         200 with a Set-Cookie
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict


class Received:
    __slots__ = ("at", "body", "headers", "path", "peer")

    def __init__(self, path: str, headers: CIMultiDict[str], body: bytes, peer: object) -> None:
        self.path = path
        self.headers = headers
        self.body = body
        self.peer = peer
        self.at = time.monotonic()


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_next = 0
        self.delay_s = 0.0
        self.huge_bytes_sent = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/status/{code}", self._status)
        app.router.add_post("/flaky", self._flaky)
        app.router.add_post("/slow", self._slow)
        app.router.add_post("/hang", self._hang)
        app.router.add_post("/reset-before", self._reset_before)
        app.router.add_post("/reset-mid/{code}", self._reset_mid)
        app.router.add_post("/huge", self._huge)
        app.router.add_post("/cookie", self._cookie)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _record(self, request: web.Request) -> None:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(Received(request.path, CIMultiDict(request.headers), body, peer))

    def _enter(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    async def _status(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        code = int(request.match_info["code"])
        headers = {}
        if 300 <= code < 400:
            headers["Location"] = self.url("/status/200")
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        return web.Response(status=code, text=f"answer {code}", headers=headers)

    async def _flaky(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503, text="down")
        return web.Response(status=200, text="ok")

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        self._enter()
        try:
            await self._record(request)
            await asyncio.sleep(self.delay_s)
            return web.Response(status=204)
        finally:
            self.in_flight -= 1

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        await asyncio.sleep(3600)
        return web.Response(status=200)

    @staticmethod
    def _rst(request: web.Request) -> None:
        transport = request.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def _reset_before(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        self._rst(request)
        return web.Response(status=200)  # never sent

    async def _reset_mid(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        resp = web.StreamResponse(status=int(request.match_info["code"]))
        resp.content_length = 100_000
        await resp.prepare(request)
        await resp.write(b"x" * 100)
        await asyncio.sleep(0.05)
        self._rst(request)
        return resp

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        resp = web.StreamResponse(status=200)
        await resp.prepare(request)
        chunk = b"y" * 65536
        try:
            while self.huge_bytes_sent < 1 << 30:
                await resp.write(chunk)
                self.huge_bytes_sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    async def _cookie(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        resp = web.Response(status=200)
        resp.set_cookie("session", "tenant-a-secret")
        return resp


class StaticResolver(AbstractResolver):
    """DNS for tests: fixed answers per name (to play a name that resolves somewhere else)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host=ip, port=port, family=socket.AF_INET, proto=0, flags=0
            )
            for ip in self.answers[host]
        ]

    async def close(self) -> None:
        pass
