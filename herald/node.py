"""One Herald node: its components started in order, each ready before the next starts, and
stopped in the exact reverse.

The node composes everything; nothing below it knows the whole. Order::

    data-dir lock -> state store (LMDB) -> log (open and recover every partition) ->
    broker (the front door, internal topics, the event index re-built from the log) ->
    listeners (TCP, HTTP) -> housekeeping loops (group sessions, offsets retention,
    producer-id expiry, retention, state-store sync, event-id expiry)

The notifications engine (``notify/engine.py``: fan-out, timers, delivery workers, retry
tiers, the audit indexer) and then the WebSocket gateway (``gateway/server.py``) are
components between the broker and the listeners. The gateway object is made before the
engine starts (its presence feeds the fan-out and the in-app channel) and started after it
(its marks and counts go through the engine). Their HTTP APIs (``notify/api.py``,
``gateway/http.py``) are added to the listeners' app here: the broker's app takes routes from
any package and knows none of them.

A :class:`Component` has ``start`` (returns once the component is ready: start-up order is
code, not sleeps) and ``stop``; the node pushes each ``stop`` on an ``AsyncExitStack`` as
soon as its ``start`` returns, so a failed start-up unwinds exactly what had started. On
SIGTERM/SIGINT the node first tells the broker to refuse new work (parked long polls answer
at once), then unwinds: listeners stop accepting and drain in-flight requests (bounded by
``shutdown_timeout``), the log is synced and checkpointed, the state store synced and closed,
the lock released.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from aiohttp import web

from broker.admission import raise_open_files_limit
from broker.auth import Authenticator, is_loopback
from broker.config import Config, ConfigError
from broker.errors import StateStoreFailed
from broker.events import EventIntake
from broker.groups import StoredOffset
from broker.http import HttpApi, HttpStats, QuietServerLog
from broker.http_ingest import IngestServer
from broker.listener import NodeAdmission
from broker.openapi import Route
from broker.service import BrokerService
from broker.tcp import TcpServer
from broker.tls import TlsError, server_context
from channels.base import Channel
from channels.inapp import InAppChannel
from gateway.edge import served_tenants
from gateway.http import retract_route
from gateway.outlet import InAppOutlet
from gateway.server import Gateway, tenants_of
from gateway.server import wall_ms as gateway_clock
from gateway.workers import GatewayWorkers
from herald.metrics import Metrics, ProductCollector, Stats
from notify.api import notify_routes
from notify.compose import Composer
from notify.directory import RegistryDirectory
from notify.edge import EdgeAudience, EngineEngagement
from notify.email_http import email_routes
from notify.engine import Engine, wall_ms
from notify.links import Signer, node_secret
from notify.ports import Directory
from notify.registry import Registry
from notify.sms_http import sms_hooks
from notify.templates import Templates
from storage.errors import StorageError
from storage.kv import KV
from storage.log import Log

log = logging.getLogger("herald.node")


class DataDirLocked(Exception):
    code = "data_dir_locked"


class Component(Protocol):
    name: str

    async def start(self) -> None:
        """Start; return once ready to serve its dependents."""

    async def stop(self) -> None:
        """Stop and release what ``start`` took; called once, after every dependent stopped."""


# -------------------------------------------------------------------------- components
class DataDirLock:
    """``<data>/LOCK`` held with ``flock``: a second node on the same directory exits with a
    message naming the holder's pid."""

    name = "data-dir-lock"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    async def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DataDirLocked(
                f"data directory {self.path} is in use by pid {holder}; "
                "stop that node or choose another --data-dir"
            ) from None
        # the pid is only for the message above: a disk with no byte free (where start-up
        # must still work, docs/STORAGE.md) must not stop the node here
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    async def stop(self) -> None:
        with contextlib.suppress(OSError):  # a full disk must not keep the lock
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


class StateStore:
    """The node's LMDB environment (``<data>/state``)."""

    name = "state-store"

    def __init__(self, path: Path, map_size: int) -> None:
        self.path = path
        self.map_size = map_size
        self.kv: KV | None = None

    async def start(self) -> None:
        self.kv = KV(self.path, map_size=self.map_size)

    async def stop(self) -> None:
        if self.kv is not None:
            try:
                self.kv.close()
            except StorageError as exc:
                log.error("event=state_store_close_failed error=%s", exc)


class LogComponent:
    """Every topic's partitions, opened and recovered in a worker thread."""

    name = "log"

    def __init__(
        self, data_dir: Path, io_threads: int, inline_sync_max_ms: float, sync_engine: str
    ) -> None:
        self.log = Log(
            data_dir,
            io_threads=io_threads,
            inline_sync_max_ms=inline_sync_max_ms,
            sync_engine=sync_engine,
        )

    async def start(self) -> None:
        started = time.perf_counter()
        reports = await asyncio.get_running_loop().run_in_executor(None, self.log.open)
        log.info(
            "event=log_recovered partitions=%d scanned_bytes=%d truncated_bytes=%d seconds=%.3f",
            len(reports),
            sum(r.scanned_bytes for r in reports),
            sum(r.truncated_bytes for r in reports),
            time.perf_counter() - started,
        )

    async def stop(self) -> None:
        await self.log.close()


class Broker:
    """The front door and the event intake; on start the internal topics exist and the
    event-id index is whole again (re-built from the log past its marks)."""

    name = "broker"

    def __init__(self, config: Config, log_: Log, kv: KV) -> None:
        self.service = BrokerService(config, log_, kv)
        self.intake = EventIntake(config, self.service)

    async def start(self) -> None:
        self.intake.start()
        await self.intake.recover()
        # what each tenant holds in the state store, for its quotas: whole-table reads
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.service.load_state)
        ids = await loop.run_in_executor(None, self.intake.ids.load)
        log.info(
            "event=quota_usage_loaded groups=%d producer_ids=%d event_ids=%d seconds=%.3f",
            len(self.service.groups.stored),
            len(self.service.producer_ids.live),
            ids,
            time.perf_counter() - started,
        )

    async def stop(self) -> None:
        self.service.stop()
        # topic creates in worker threads finish (or roll back) before the log closes
        await self.service.topics.settle()


class Listeners:
    """The TCP server and the HTTP listener (the ingest fast path, which hands every other
    request to the aiohttp app), both under the node's admission policy and, when
    configured, TLS. Stopped together: stop accepting, drain both within the grace period,
    close the aiohttp app's connections."""

    name = "listeners"

    def __init__(
        self,
        config: Config,
        broker: Broker,
        auth: Authenticator,
        grace_s: float,
        admission: NodeAdmission,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.config = config
        self.grace_s = grace_s
        self.ssl_context = ssl_context
        self.admission = admission
        self.tcp = TcpServer(
            config, broker.service, broker.intake, auth, self.admission, self.ssl_context
        )
        self.api = HttpApi(config, broker.service, broker.intake, auth)
        # other components' HTTP routes (the notification API, the gateway's retract), added
        # before start
        self.routes: list[Route] = []
        self.http: IngestServer | None = None
        self._runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        self.ports: dict[str, int] = {}

    async def start(self) -> None:
        host = self.config.listen.host
        self.admission.start()
        self.ports["tcp"] = await self.tcp.start(host, self.config.listen.tcp_port)
        app = self.app = self.api.app(self.routes)
        runner = self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            logger=QuietServerLog(self.admission.note),
        )
        await runner.setup()
        assert runner.server is not None
        self.http = IngestServer(
            self.config, self.api, runner.server, self.admission, self.ssl_context
        )
        self.ports["http"] = await self.http.start(host, self.config.listen.http_port)

    async def stop(self) -> None:
        self.admission.stop()
        await self.tcp.stop_accepting()
        drains: list[Awaitable[None]] = [self.tcp.drain(self.grace_s)]
        if self.http is not None:
            self.http.stop_accepting()
            drains.append(self.http.drain(self.grace_s))
        await asyncio.gather(*drains)
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._runner.cleanup(), self.grace_s)


class Housekeeping:
    """The node's periodic loops, in one task group: group session expiry (every 100 ms),
    offsets retention of empty groups, producer-id expiry, retention, the state store's sync
    (the event index's marks first), event-id expiry."""

    name = "housekeeping"

    def __init__(self, config: Config, broker: Broker, log_: Log, kv: KV) -> None:
        self.config = config
        self.broker = broker
        self.log = log_
        self.kv = kv
        self._group: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="housekeeping")
        await self._ready.wait()

    async def _run(self) -> None:
        cfg = self.config
        service = self.broker.service
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._expire_members(), name="groups")
            tg.create_task(
                self._every(
                    cfg.groups.offsets_retention_check_interval_ms / 1000,
                    service.groups.expire_offsets,
                ),
                name="offsets-retention",
            )
            tg.create_task(
                self._every(
                    cfg.quotas.producer_id_expiration_check_interval_ms / 1000,
                    service.expire_producers,
                ),
                name="producer-expiry",
            )
            tg.create_task(
                self.log.run_retention(cfg.storage.retention_check_interval_ms / 1000),
                name="retention",
            )
            tg.create_task(self._sync_state(), name="state-sync")
            tg.create_task(self._sweep_event_ids(), name="event-id-sweep")
            self._ready.set()

    async def stop(self) -> None:
        runner = self._runner
        if runner is None:
            return
        if runner.done():
            # it failed (the node is stopping because of it): the node reports the error
            if not runner.cancelled():
                runner.exception()
            return
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner

    async def _expire_members(self) -> None:
        """Group session expiry, as soon as the earliest deadline is due
        (:meth:`~broker.groups.GroupCoordinator.next_expiry_ms`)."""
        groups = self.broker.service.groups
        while True:
            await asyncio.sleep(groups.next_expiry_ms() / 1000)
            groups.expire()

    @staticmethod
    async def _every(interval: float, fn: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(interval)
            fn()

    async def _sync_state(self) -> None:
        interval = self.config.storage.offsets_sync_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            self.broker.intake.save_marks()
            try:
                await self.kv.sync()
            except StorageError as exc:
                # every acknowledgement that waits on the state store would now fail; a node
                # that cannot keep its promises stops with a clear error, not a traceback
                raise StateStoreFailed(str(exc)) from exc

    async def _sweep_event_ids(self) -> None:
        """Forget event ids past the idempotency window, a bounded slice at a time."""
        while True:
            await asyncio.sleep(60)
            while self.broker.intake.sweep(time.time_ns() // 1_000_000):
                await asyncio.sleep(0)


# ------------------------------------------------------------------------------ node
class Node:
    """``directory`` answers the engine's registry and policy questions (default: the
    registry of this node's state store); ``channels`` replaces channels by name and
    ``clock`` the wall clock (Unix ms) of the engine: both for tests."""

    def __init__(
        self,
        config: Config,
        *,
        shutdown_timeout: float = 4.0,
        directory: Callable[[KV], Directory] | None = None,
        channels: dict[str, Channel] | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self.shutdown_timeout = shutdown_timeout
        self.make_directory = directory
        self.channels = channels
        self.clock = clock
        self.engine: Engine | None = None
        self.gateway: Gateway | None = None
        self.gateway_workers: GatewayWorkers | None = None
        self.service: BrokerService | None = None
        self.tcp: TcpServer | None = None
        self.http_stats: HttpStats | None = None
        self.http_app: web.Application | None = None  # what the HTTP listener serves
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
        warn_if_quotas_overcommit(cfg)
        async with contextlib.AsyncExitStack() as stack:

            async def start(component: Component) -> None:
                started = time.perf_counter()
                try:
                    await component.start()
                except BaseException:
                    # half started (the gateway's reader runs, then its port is taken):
                    # stop what it did start before the components it uses are stopped
                    # under it (its reader would read a closed state store)
                    try:
                        await self._stop_component(component)
                    except Exception as exc:
                        log.warning(
                            "event=component_stop_failed component=%s error=%r",
                            component.name,
                            exc,
                        )
                    raise
                stack.push_async_callback(self._stop_component, component)
                log.info(
                    "event=component_ready component=%s seconds=%.3f",
                    component.name,
                    time.perf_counter() - started,
                )

            await start(DataDirLock(data_dir))
            state = StateStore(data_dir / "state", cfg.storage.kv_map_size)
            await start(state)
            assert state.kv is not None
            the_log = LogComponent(
                data_dir,
                cfg.storage.io_threads,
                cfg.storage.inline_sync_max_ms,
                cfg.storage.sync_engine,
            )
            await start(the_log)
            # one disk: a lone append's fdatasync runs on the loop only while the state
            # store is not syncing (storage/io_threads.py, busy_elsewhere)
            kv = state.kv
            the_log.log.io.busy_elsewhere.append(lambda: kv.syncing)
            broker = Broker(cfg, the_log.log, state.kv)
            self.service = broker.service
            await start(broker)
            try:
                ssl_context = server_context(cfg.tls)
            except TlsError as tls_error:
                raise ConfigError(str(tls_error)) from None
            # one admission policy for every door of the node: the gateway's connections come
            # out of the same descriptor budget as the TCP and HTTP listeners'
            admission = NodeAdmission(
                cfg,
                nofile,
                listeners=("tcp", "http", "ws"),
                caps={"ws": cfg.gateway.max_connections},
            )
            # the gateway exists before the engine starts: its presence feeds the fan-out's
            # recipient.online and the in-app channel, whose outlet appends to __inapp
            gateway = self.gateway = (
                Gateway(
                    cfg,
                    broker.service,
                    broker.intake,
                    state.kv,
                    admission,
                    tenants=tenants_of(k.tenant for k in cfg.auth.keys),
                    ssl_context=ssl_context,
                    clock=self.clock if self.clock is not None else gateway_clock,
                )
                if cfg.gateway.enabled
                else None
            )
            presence = gateway.present if gateway is not None else None
            channels = dict(self.channels or {})
            if "inapp" in cfg.notify.channels and "inapp" not in channels:
                outlet = InAppOutlet(broker.service, broker.intake, cfg.gateway.partitions)
                stack.push_async_callback(outlet.close)  # after the engine's workers stop
                show = gateway.show if gateway is not None else None
                channels["inapp"] = InAppChannel(outlet.append, presence, show)
            registry = Registry(
                state.kv, webhook_secret_overlap_ms=cfg.channels.webhook.secret_overlap_ms
            )
            directory = (
                self.make_directory(state.kv)
                if self.make_directory
                else RegistryDirectory(registry, presence=presence, clock=self.clock or wall_ms)
            )
            # templates and signed links (email unsubscribe, bounce references)
            templates = Templates(state.kv, cfg.notify.templates)
            signer = Signer(node_secret(state.kv, cfg.notify.link_secret))
            await state.kv.sync()
            composer = Composer(directory, registry, templates, signer, cfg)
            engine = self.engine = Engine(
                cfg,
                broker.service,
                broker.intake,
                state.kv,
                directory=directory,
                channels=channels,
                composer=composer,
                **({"clock": self.clock} if self.clock is not None else {}),
            )
            await start(engine)
            if gateway is not None:
                gateway.engagement = EngineEngagement(engine)
                gateway.audience = EdgeAudience(registry)
                await start(gateway)
                self.ports["ws"] = gateway.port
                if gateway.hub is not None:
                    # connections in worker processes sharing ws-port (docs/GATEWAY.md)
                    workers = self.gateway_workers = GatewayWorkers(
                        cfg,
                        gateway.hub,
                        secret=gateway.secret,
                        tenants=sorted(served_tenants(k.tenant for k in cfg.auth.keys)),
                        command=[sys.executable, "-m", "herald.gateway_worker"],
                    )
                    await start(workers)
                    self.ports["ws"] = workers.port
            listeners = Listeners(cfg, broker, auth, self.shutdown_timeout, admission, ssl_context)
            listeners.routes.extend(
                notify_routes(registry, engine, listeners.api.principal, engine.clock)
            )
            listeners.routes.extend(
                email_routes(
                    cfg,
                    registry,
                    templates,
                    signer,
                    composer,
                    listeners.api.principal,
                    engine.clock,
                    engine.record,
                )
            )
            if gateway is not None:
                listeners.routes.append(retract_route(gateway.retract, listeners.api.principal))
            sms = sms_hooks(
                cfg.channels.sms,
                registry,
                engine.clock,
                cfg.admission.auth_failures_per_minute,
                signer,
                engine.record,
            )
            listeners.routes.extend(sms.routes())
            self.tcp, self.http_stats = listeners.tcp, listeners.api.stats
            metrics = Metrics(
                Stats(
                    broker.service,
                    listeners.tcp,
                    listeners.api.stats,
                    listeners.admission,
                    audit_lag_s=engine.audit_lag_s,
                ),
                state.kv.table("offsets", StoredOffset),
                ProductCollector(engine, gateway, sms),
            )
            listeners.api.metrics_body = metrics.body
            await start(listeners)
            self.ports.update(listeners.ports)
            self.http_app = listeners.app
            housekeeping = Housekeeping(cfg, broker, the_log.log, state.kv)
            await start(housekeeping)
            log.info(
                "event=ready node_id=%d host=%s tcp_port=%d http_port=%d ws_port=%d data_dir=%s "
                "auth=%s tls=%s open_files_limit=%d connection_capacity=%d",
                cfg.node_id,
                cfg.listen.host,
                self.ports["tcp"],
                self.ports["http"],
                self.ports.get("ws", 0),
                data_dir,
                "api-keys" if not auth.open else "none(loopback-only)",
                "on" if listeners.ssl_context is not None else "off",
                nofile,
                listeners.admission.capacity,
            )
            if on_ready is not None:
                on_ready(self)
            stopped = asyncio.create_task(self._stop.wait())
            # a housekeeping loop that fails (the state store cannot sync) ends the node
            failed = housekeeping._runner
            assert failed is not None
            await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            log.info("event=stopping")
            broker.service.stop()  # refuse new work first; parked long polls answer now
            if failed.done() and not failed.cancelled() and failed.exception() is not None:
                exc = failed.exception()
                assert exc is not None
                raise _cause(exc)
        log.info("event=stopped")

    @staticmethod
    async def _stop_component(component: Component) -> None:
        started = time.perf_counter()
        await component.stop()
        log.info(
            "event=component_stopped component=%s seconds=%.3f",
            component.name,
            time.perf_counter() - started,
        )


def _cause(exc: BaseException) -> BaseException:
    """The one error inside a task group's exception group, if there is one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def warn_if_quotas_overcommit(cfg: Config) -> None:
    """The tenants' state-store quotas together may exceed the store: then they no longer
    keep one tenant from filling what the others need. Say so at start-up."""
    tenants = sorted({k.tenant for k in cfg.auth.keys if k.tenant != "*"} or {"default"})
    quotas = {t: cfg.quotas.for_tenant(t).state_store_bytes or 0 for t in tenants}
    unlimited = [t for t, q in quotas.items() if not q]
    total = sum(quotas.values())
    if (unlimited and len(tenants) > 1) or total > cfg.storage.kv_map_size:
        log.warning(
            "event=state_store_quotas_overcommit tenants=%d quota_total=%d kv_map_size=%d "
            "unlimited=%s",
            len(tenants),
            total,
            cfg.storage.kv_map_size,
            ",".join(unlimited) or "none",
        )


def install_signal_handlers(node: Node) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.stop)
