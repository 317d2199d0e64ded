"""A gateway worker process (``gateway.workers`` > 0): :func:`run`, the body of
``python -m herald.gateway_worker FD``, started by the node (``gateway/workers.py``) with its
end of a Unix socket pair as ``FD``.

It holds connections and nothing else: it shares ``listen.ws-port`` with its siblings
(``SO_REUSEPORT``), admits connections under its own admission policy (its own open files;
at most its share of ``gateway.max-connections``), checks tokens with the node's secret, and
keeps the same per-connection limits as the in-process gateway (``gateway/edge.py``,
``gateway/sessions.py``). Everything that needs the node's state goes over the link
(``gateway/link.py``, ``gateway/hub.py``): a session's backfill is asked for with an
``Open`` once the session is registered, marks go as ``Mark``, and the node sends the
numbered messages for the devices here, retractions and counts.

It exits when the node tells it to (SIGTERM: every client gets 1001 "going away" and
reconnects elsewhere with its cursor) and when its link ends (the node is gone, even by
SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
from collections.abc import Callable

import msgspec

from broker.admission import raise_open_files_limit
from broker.config import Config
from broker.listener import NodeAdmission
from broker.tls import server_context
from gateway import frames, link
from gateway.edge import Edge
from gateway.link import Backfill, Broadcast, Push, Tell, Write
from gateway.sessions import Session

log = logging.getLogger("herald.gateway")

PAGE = 200  # backfill messages written before waiting for the client to read them
LINK_READ_BYTES = 256 * 1024  # one read of the link: many messages, handled at once


class WorkerEdge(Edge):
    """The edge of a worker: backfills and marks go to the node over ``writer``."""

    def __init__(
        self,
        config: Config,
        admission: NodeAdmission,
        writer: asyncio.StreamWriter,
        *,
        secret: bytes,
        tenants: frozenset[str],
        index: int,
    ) -> None:
        super().__init__(
            config,
            admission,
            tenants=tenants.__contains__,
            ssl_context=server_context(config.tls),
        )
        self.secret = secret
        self.index = index
        self.writer = writer
        self._sids = itertools.count(1)
        self.sid_of: dict[Session, int] = {}
        self.open: dict[int, Session] = {}
        self.waiting: dict[int, asyncio.Future[Backfill]] = {}

    def send(self, msg: link.ToNode) -> None:
        self.writer.write(link.encode(msg))

    async def _backfill(self, session: Session, cursor: int | None) -> None:
        sid = next(self._sids)
        self.sid_of[session] = sid
        self.open[sid] = session
        answer = self.waiting[sid] = asyncio.get_running_loop().create_future()
        self.send(link.Open(sid, session.tenant, session.user, cursor))
        plan = await answer
        sent = 0
        session.last_seq = plan.after
        for i, (seq, message) in enumerate(plan.messages, 1):
            if seq > session.last_seq and session.write(message):
                session.last_seq = seq
                sent += 1
            if session.cut_off is not None:
                return
            if i % PAGE == 0:
                await session.conn.drain()  # the client reads a page before the next one
        session.finish_backfill()
        session.write(frames.ready(frames.format_cursor(session.last_seq), sent, plan.truncated))
        session.write(frames.counts(plan.unseen, plan.unread))

    async def _engage(self, session: Session, what: str, ids: list[str]) -> None:
        sid = self.sid_of.get(session)
        if sid is not None:
            self.send(link.Mark(sid, session.tenant, session.user, what, ids))

    def _closed(self, session: Session) -> None:
        sid = self.sid_of.pop(session, None)
        if sid is None:
            return
        self.open.pop(sid, None)
        self.waiting.pop(sid, None)
        self.send(link.Gone(sid, session.tenant, session.user))

    def dispatch(self, msg: link.ToWorker) -> None:
        """One message from the node."""
        sessions = self.sessions
        if isinstance(msg, Push):
            sessions.offer_user(msg.tenant, msg.user, msg.seq, msg.frame)
        elif isinstance(msg, Broadcast):
            deny = frozenset(msg.deny)
            sessions.offer_tenant(msg.tenant, msg.seq, msg.frame, lambda users: set(users) - deny)
        elif isinstance(msg, Write):
            sessions.write_user(msg.tenant, msg.user, msg.frame)
        elif isinstance(msg, Backfill):
            waiter = self.waiting.pop(msg.sid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(msg)
        elif isinstance(msg, Tell):
            session = self.open.get(msg.sid)
            if session is not None:
                session.write(msg.frame)


async def run(fd: int, on_config: Callable[[Config], None] | None = None) -> None:
    """Serve as worker over the link ``fd`` until told to stop or the link ends;
    ``on_config`` is called with the node's config as soon as it arrives (logging)."""
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    body = await link.read(reader)
    if body is None:
        return
    hello = link.decode_to_worker(body)
    if not isinstance(hello, link.Hello):
        raise link.LinkError(f"expected hello, got {type(hello).__name__}")
    config = msgspec.msgpack.decode(hello.config, type=Config)
    if on_config is not None:
        on_config(config)
    nofile = raise_open_files_limit()
    admission = NodeAdmission(config, nofile, listeners=("ws",), caps={"ws": hello.max_connections})
    admission.start()
    edge = WorkerEdge(
        config,
        admission,
        writer,
        secret=hello.secret,
        tenants=frozenset(hello.tenants),
        index=hello.index,
    )
    await edge.listen(hello.port, reuse_port=True)
    writer.write(link.encode(link.Listening(os.getpid(), edge.port)))
    log.info(
        "event=gateway_worker_ready worker=%d pid=%d port=%d max_connections=%d "
        "open_files_limit=%d",
        hello.index,
        os.getpid(),
        edge.port,
        hello.max_connections,
        nofile,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def follow() -> None:
        # every whole message of a read at once, each connection's frames held and written
        # in one send (a Push and the counts behind it are two frames to the same device)
        splitter = link.Splitter()
        sessions = edge.sessions
        while True:
            try:
                data = await reader.read(LINK_READ_BYTES)
            except ConnectionError:
                data = b""
            if not data:
                log.warning("event=gateway_worker_orphaned worker=%d", hello.index)
                return
            bodies = splitter.feed(data)
            if not bodies:
                continue
            sessions.hold()
            try:
                for body in bodies:
                    edge.dispatch(link.decode_to_worker(body))
            finally:
                sessions.release()

    following = loop.create_task(follow(), name="gateway-worker-link")
    stopping = loop.create_task(stop.wait())
    await asyncio.wait([following, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    await edge.close()
    following.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await following
    admission.stop()
    writer.close()
    log.info("event=gateway_worker_stopped worker=%d accepted=%d", hello.index, edge.accepted)
