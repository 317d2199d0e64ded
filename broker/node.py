"""One Herald node: storage, the TCP and HTTP servers and the background loops, started in
order and stopped in the exact reverse.

Start: lock the data directory -> open the state store -> open and recover the log -> the
broker service and internal topics -> TCP and HTTP listeners -> background loops (group
session expiry, retention, state-store sync). Stop (SIGTERM/SIGINT): refuse new work, stop
accepting, let in-flight requests finish (bounded by ``shutdown_timeout``), then sync and
checkpoint every partition, sync and close the state store, release the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from aiohttp import web

from broker.auth import Authenticator, is_loopback
from broker.config import Config, ConfigError
from broker.http import HttpApi, HttpStats
from broker.http_ingest import IngestServer
from broker.metrics import make_registry, render
from broker.service import BrokerService
from broker.tcp import TcpServer
from storage.kv import KV
from storage.log import Log

log = logging.getLogger("herald.node")


class DataDirLocked(Exception):
    code = "data_dir_locked"


@contextlib.contextmanager
def lock_data_dir(path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DataDirLocked(
            f"data directory {path} is in use by pid {holder}; "
            "stop that node or choose another --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
        yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def raise_open_files_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class Node:
    def __init__(self, config: Config, *, shutdown_timeout: float = 4.0) -> None:
        self.config = config
        self.shutdown_timeout = shutdown_timeout
        self.service: BrokerService | None = None
        self.tcp: TcpServer | None = None
        self.http_stats: HttpStats | None = None
        self.ports: dict[str, int] = {}
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, on_ready: Callable[[Node], None] | None = None) -> None:
        cfg = self.config
        auth = Authenticator(cfg.auth.keys)
        if auth.open and not is_loopback(cfg.listen.host):
            raise ConfigError(
                f"no API keys are configured, so the node serves loopback only; "
                f"listen.host={cfg.listen.host!r} is not a loopback address "
                "(configure [[auth.keys]] to listen elsewhere)"
            )
        data_dir = Path(cfg.storage.data_dir)
        nofile = raise_open_files_limit()
        with lock_data_dir(data_dir):
            kv = KV(data_dir / "state", map_size=cfg.storage.kv_map_size)
            try:
                await self._serve(kv, data_dir, auth, nofile, on_ready)
            finally:
                kv.close()
        log.info("event=stopped")

    async def _serve(
        self,
        kv: KV,
        data_dir: Path,
        auth: Authenticator,
        nofile: int,
        on_ready: Callable[[Node], None] | None,
    ) -> None:
        cfg = self.config
        started = time.perf_counter()
        the_log = Log(data_dir)
        reports = await asyncio.get_running_loop().run_in_executor(None, the_log.open)
        truncated = sum(r.truncated_bytes for r in reports)
        log.info(
            "event=log_recovered partitions=%d scanned_bytes=%d truncated_bytes=%d seconds=%.3f",
            len(reports),
            sum(r.scanned_bytes for r in reports),
            truncated,
            time.perf_counter() - started,
        )
        service = self.service = BrokerService(cfg, the_log, kv)
        try:
            service.ensure_internal_topics()
            self.tcp = TcpServer(cfg, service, auth)
            api = HttpApi(cfg, service, auth)
            self.http_stats = api.stats
            registry = make_registry(self)
            api.metrics_body = lambda: render(registry)
            host = cfg.listen.host
            self.ports["tcp"] = await self.tcp.start(host, cfg.listen.tcp_port)
            # the HTTP port is the ingest fast path's; it hands every other request's
            # connection to the aiohttp app through the runner's low-level server
            runner = web.AppRunner(api.app(), access_log=None, handle_signals=False)
            await runner.setup()
            assert runner.server is not None
            http = IngestServer(cfg, api, runner.server)
            self.ports["http"] = await http.start(host, cfg.listen.http_port)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._expire_members(service), name="group-expiry")
                    tg.create_task(
                        the_log.run_retention(cfg.storage.retention_check_interval_ms / 1000),
                        name="retention",
                    )
                    tg.create_task(self._sync_state(kv), name="state-sync")
                    tg.create_task(self._sweep_event_ids(api), name="event-id-sweep")
                    log.info(
                        "event=ready node_id=%d host=%s tcp_port=%d http_port=%d data_dir=%s "
                        "auth=%s open_files_limit=%d",
                        cfg.node_id,
                        host,
                        self.ports["tcp"],
                        self.ports["http"],
                        data_dir,
                        "api-keys" if not auth.open else "none(loopback-only)",
                        nofile,
                    )
                    if on_ready is not None:
                        on_ready(self)
                    await self._stop.wait()
                    log.info("event=stopping")
                    service.stop()
                    await self.tcp.stop_accepting()
                    http.stop_accepting()
                    await asyncio.gather(
                        self.tcp.drain(self.shutdown_timeout), http.drain(self.shutdown_timeout)
                    )
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(runner.cleanup(), self.shutdown_timeout)
                    raise _Stop
            except* _Stop:
                pass
        finally:
            await the_log.close()
            kv.sync_now()

    async def _expire_members(self, service: BrokerService) -> None:
        while True:
            await asyncio.sleep(0.1)
            service.groups.expire()

    async def _sweep_event_ids(self, api: HttpApi) -> None:
        """Forget event ids past the idempotency window, a bounded slice at a time."""
        while True:
            await asyncio.sleep(60)
            while api.event_ids.sweep(time.time_ns() // 1_000_000) and not self._stop.is_set():
                await asyncio.sleep(0)

    async def _sync_state(self, kv: KV) -> None:
        interval = self.config.storage.offsets_sync_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await kv.sync()


class _Stop(Exception):
    """Ends the node's task group once shutdown has drained the servers."""


def install_signal_handlers(node: Node) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.stop)
