"""The gateway's worker processes (``gateway.workers`` = N > 0), a component of the node
after the gateway: it starts N worker processes (``command``: ``python -m
herald.gateway_worker``, which runs ``gateway/worker.py``) sharing
``listen.ws-port``, each linked to the node's :class:`gateway.hub.Hub` by a Unix socket
pair, and keeps them running.

- **Start**: the node binds the port first (``SO_REUSEPORT``, never listening: it only holds
  the port, so port 0 resolves once and a moment with no worker is a refused connection, not
  another program's port); each worker binds it too and says so (``Listening``) before
  :meth:`start` returns.
- **Restart**: a worker that exits or is killed while the node runs is started again (at
  once, then backing off to :data:`MAX_BACKOFF_S` while it keeps dying within
  :data:`STABLE_S`); its devices stop being present the moment its link ends, and its clients
  reconnect with their cursors, to any worker.
- **Stop** (before the gateway and the engine stop): SIGTERM to each (its clients get 1001
  and close), SIGKILL to any still running ``close-timeout-ms`` + 2 s later.
- **Killed with the node**: a worker's link ends when the node's process does, however it
  ends; the worker then closes its connections and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import subprocess
import time

import msgspec

from broker.config import Config
from gateway import link
from gateway.hub import Hub

log = logging.getLogger("herald.gateway")

STABLE_S = 10.0  # a worker that ran this long before it died is restarted at once
MAX_BACKOFF_S = 5.0
READY_TIMEOUT_S = 30.0


class Worker:
    """One worker slot: its current process and link."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.link_task: asyncio.Task[None] | None = None
        self.started = 0.0
        self.restarts = 0

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0


class GatewayWorkers:
    """The supervisor (see the module docstring). ``port`` is the shared port once
    started; ``workers[i].pid`` the current process of slot ``i``."""

    name = "gateway-workers"

    def __init__(
        self,
        config: Config,
        hub: Hub,
        *,
        secret: bytes,
        tenants: list[str],
        command: list[str],
    ) -> None:
        self.config = config
        self.command = command  # the worker's program; its link's fd is appended
        self.hub = hub
        self.secret = secret
        self.tenants = tenants
        n = config.gateway.workers
        self.per_worker = math.ceil(config.gateway.max_connections / n)
        self.workers = [Worker(i) for i in range(n)]
        self.port = 0
        self._holder: socket.socket | None = None
        self._keepers: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        self._holder = _hold_port(self.config.listen.host, self.config.listen.ws_port)
        self.port = self._holder.getsockname()[1]
        try:
            for w in self.workers:
                await self._spawn(w)
        except BaseException:
            await self.stop()
            raise
        loop = asyncio.get_running_loop()
        self._keepers = [
            loop.create_task(self._keep(w), name=f"gateway-worker-{w.index}") for w in self.workers
        ]
        log.info(
            "event=gateway_workers_ready port=%d workers=%d per_worker=%d pids=%s",
            self.port,
            len(self.workers),
            self.per_worker,
            ",".join(str(w.pid) for w in self.workers),
        )

    async def _spawn(self, w: Worker) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            w.proc = await asyncio.create_subprocess_exec(
                *self.command,
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        w.started = time.monotonic()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        writer.write(
            link.encode(
                link.Hello(
                    msgspec.msgpack.encode(self.config),
                    self.secret,
                    self.tenants,
                    self.port,
                    w.index,
                    self.per_worker,
                )
            )
        )
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                body = await link.read(reader)
        except TimeoutError:
            body = None
        ready = link.decode_to_node(body) if body is not None else None
        if not isinstance(ready, link.Listening):
            writer.close()
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            await w.proc.wait()
            raise RuntimeError(
                f"gateway worker {w.index} did not start (exit code {w.proc.returncode})"
            )
        w.link_task = asyncio.get_running_loop().create_task(
            self.hub.serve(w.index, reader, writer), name=f"gateway-link-{w.index}"
        )

    async def _keep(self, w: Worker) -> None:
        """Restart the slot's worker whenever it ends, until the node stops."""
        failures = 0
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            if w.link_task is not None:
                with contextlib.suppress(Exception):
                    await w.link_task  # its devices are gone from presence
            if self._stopping:
                return
            ran = time.monotonic() - w.started
            failures = failures + 1 if ran < STABLE_S else 0
            delay = 0.0 if failures == 0 else min(MAX_BACKOFF_S, 0.1 * 2**failures)
            log.warning(
                "event=gateway_worker_died worker=%d pid=%d exit_code=%s ran_s=%.1f "
                "restart_in_s=%.1f",
                w.index,
                w.pid,
                code,
                ran,
                delay,
            )
            await asyncio.sleep(delay)
            try:
                await self._spawn(w)
            except Exception as exc:
                log.error("event=gateway_worker_start_failed worker=%d error=%s", w.index, exc)
                w.started = time.monotonic()
                failures += 1
                continue
            w.restarts += 1
            log.info("event=gateway_worker_restarted worker=%d pid=%d", w.index, w.pid)

    async def stop(self) -> None:
        self._stopping = True
        for task in self._keepers:
            task.cancel()
        for task in self._keepers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        live = [w for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for w in live:
            assert w.proc is not None
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        grace = self.config.gateway.close_timeout_ms / 1000 + 2
        for w in live:
            assert w.proc is not None
            try:
                async with asyncio.timeout(grace):
                    await w.proc.wait()
            except TimeoutError:
                log.warning("event=gateway_worker_killed worker=%d pid=%d", w.index, w.pid)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
        for w in self.workers:
            if w.link_task is not None:
                with contextlib.suppress(Exception):
                    await w.link_task
        if self._holder is not None:
            self._holder.close()
            self._holder = None

    def stats(self) -> dict[str, object]:
        return {
            "workers": len(self.workers),
            "pids": [w.pid for w in self.workers],
            "restarts": sum(w.restarts for w in self.workers),
            "connections": self.hub.per_worker(),
        }


def _hold_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` with ``SO_REUSEPORT`` without listening: the workers share it."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
