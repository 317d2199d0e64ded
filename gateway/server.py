"""The WebSocket gateway as one component of the node (``herald/node.py``): started after the
notifications engine, before the listeners; stopped in reverse.

A thin shell over the pieces: ``edge`` (the websockets server and a connection's handshake,
token and messages), ``frames`` (the protocol), ``auth`` (tokens), ``inbox`` (what a client
may still be sent), ``reader`` (the log -> inbox -> sessions), ``sessions`` (who is
connected, bounded sends). This class adds what needs the node's state: the backfill
(``_backfill``: every message numbered above the cursor, or above the last the user marked
seen, at most ``backfill-max``, the newest, paged, waiting for the client to read each page;
then ``ready``, ``counts`` and the live stream), the marks (``_engage``: through
``engagement``, the notifications core's marks: the audit, ``GET /events/{id}``,
``wait_seen``; then fresh ``counts`` to every device of the user) and retraction.

With ``gateway.workers`` = N > 0 the connections live in N worker processes
(``gateway/worker.py``, started by ``gateway/workers.py``) and this object serves none
itself: its reader's messages, retractions and counts go to ``hub`` (``gateway/hub.py``),
which routes them to the workers and answers their backfills and marks with the methods
below (``plan_backfill``, ``engage``, ``send_counts``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from broker.config import Config
from broker.events import EventIntake
from broker.listener import NodeAdmission
from broker.local import LocalClient
from broker.service import BrokerService
from channels.inapp import INAPP_TOPIC, InAppMessage
from gateway import auth, frames
from gateway.edge import AdmittedConnection, Edge, tenants_of, wall_ms
from gateway.hub import Hub
from gateway.inbox import BROADCAST_PREFIX, Inbox
from gateway.reader import BROADCAST_TOPIC, Audience, Reader, everyone
from gateway.sessions import Recipients, Session
from storage.kv import KV

__all__ = ["AdmittedConnection", "Engagement", "Gateway", "NoEngagement", "tenants_of", "wall_ms"]

log = logging.getLogger("herald.gateway")

PAGE = 200  # backfill messages per page (one LMDB snapshot, then wait for the client)
# a message shown but not yet in the feed is counted for at most this long (the audit
# indexer's lag is milliseconds; a notification the feed never gets must not count forever)
UNFOLDED_S = 30.0


class Engagement(Protocol):
    """What the gateway asks the notifications core (``notify/edge.py`` answers)."""

    async def mark(self, tenant: str, user: str, event_id: str, what: str) -> bool:
        """Record that ``user`` saw / read / archived their notification of ``event_id``;
        durable before it returns. False if the core does not know it."""

    def counts(self, tenant: str, user: str) -> tuple[int, int]:
        """(unseen, unread) of the user's feed."""

    def not_in_feed(self, tenant: str, user: str, event_ids: list[str]) -> list[str]:
        """Those of ``event_ids`` whose notification to the user the feed does not hold yet
        (it folds a notification in some ms after the fan-out, more under load; an in-app
        message may be shown before that): each will count as unseen and unread once it
        does."""

    def counts_after(
        self, tenant: str, user: str, before: tuple[int, int], missing: int
    ) -> tuple[int, int]:
        """(unseen, unread) cheaply (no feed scan) after new notifications reached the user,
        given the counts sent ``before`` them and ``missing``, the ones shown that the feed
        does not hold yet: unread as the feed holds it plus ``missing``; unseen grown by as
        much as unread grew (a new notification is both), within what ``counts`` scans."""


class NoEngagement:
    async def mark(self, tenant: str, user: str, event_id: str, what: str) -> bool:
        return False

    def not_in_feed(self, tenant: str, user: str, event_ids: list[str]) -> list[str]:
        return []

    def counts_after(
        self, tenant: str, user: str, before: tuple[int, int], missing: int
    ) -> tuple[int, int]:
        return (0, 0)

    def counts(self, tenant: str, user: str) -> tuple[int, int]:
        return (0, 0)


class Gateway(Edge):
    """The gateway of one node. ``recipients`` (the session table, or the hub of the worker
    processes) exists from construction, so the in-app channel and the fan-out can be given
    its presence (:meth:`present`) before the gateway starts."""

    name = "gateway"

    def __init__(
        self,
        config: Config,
        service: BrokerService,
        intake: EventIntake,
        kv: KV,
        admission: NodeAdmission,
        *,
        tenants: Callable[[str], bool] = lambda t: True,
        engagement: Engagement | None = None,
        audience: Audience = everyone,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        super().__init__(config, admission, tenants=tenants, ssl_context=ssl_context, clock=clock)
        self.service = service
        self.intake = intake
        self.kv = kv
        self.engagement: Engagement = engagement or NoEngagement()
        self.audience = audience
        self.hub = (
            Hub(self, max_buffer=self.gcfg.worker_buffer_bytes) if self.gcfg.workers else None
        )
        self.recipients: Recipients = self.hub if self.hub is not None else self.sessions
        self.inbox: Inbox | None = None
        self.reader: Reader | None = None
        self.client: LocalClient | None = None
        # (tenant, user) -> [(event id, when shown)]: shown, maybe not in the feed yet
        self._unfolded: dict[tuple[str, str], list[tuple[str, float]]] = {}
        # (tenant, user) -> the last (unseen, unread) sent to the user's devices
        self._counted: dict[tuple[str, str], tuple[int, int]] = {}

    def present(self, tenant: str, user: str) -> int:
        """How many devices of the user are connected to this node (in any process)."""
        return self.recipients.present(tenant, user)

    def show(self, messages: list[InAppMessage]) -> None:
        """In-app messages whose records the in-app worker is appending: stored and pushed
        now (:meth:`Reader.show`); before the reader runs, they wait for their records."""
        if self.reader is not None:
            self.reader.show(messages)

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        g = self.gcfg
        loop = asyncio.get_running_loop()
        self.secret = await loop.run_in_executor(
            None,
            auth.load_or_create_secret,
            Path(self.config.storage.data_dir),
            g.token_secret,
        )
        # the in-app channel's outlet makes __inapp when the channel is on; the reader
        # needs both topics either way (__broadcast is the engine's)
        self.service.topics.ensure_internal(INAPP_TOPIC, g.partitions)
        self.service.topics.ensure_internal(BROADCAST_TOPIC, self.config.notify.partitions)
        self.inbox = Inbox(self.kv)
        self.client = LocalClient(self.service, self.intake, client_id="herald-gateway")
        self.reader = Reader(
            self.client,
            self.kv,
            self.inbox,
            self.recipients,
            group=f"gateway.{self.config.node_id}",
            audience=lambda t, users, topic, cat: self.audience(t, users, topic, cat),
            retention_ms=g.inbox_retention_ms,
            clock=self.clock,
            delivered=self._counts_after_delivery,
        )
        await self.reader.start()
        if self.hub is None:
            await self.listen(self.config.listen.ws_port)
        # else: the worker processes listen (gateway/workers.py, the next component)
        log.info(
            "event=gateway_ready port=%d workers=%d max_connections=%d inbox_head=%d",
            self.port,
            g.workers,
            g.max_connections,
            self.inbox.head,
        )

    async def stop(self) -> None:
        await self.close()
        if self.reader is not None:
            await self.reader.stop()
        if self.hub is not None:
            await self.hub.close()
        if self.client is not None:
            await self.client.close()

    # ------------------------------------------------------------------ backfill
    async def _backfill(self, session: Session, cursor: int | None) -> None:
        inbox = self.inbox
        assert inbox is not None
        tenant, user = session.tenant, session.user
        after = cursor if cursor is not None else inbox.last_seen(tenant, user)
        limit = self.gcfg.backfill_max
        floor = inbox.newest_floor(tenant, user, limit)
        truncated = floor > after
        after = max(after, floor)
        allows = self._allows(tenant, user)
        sent = 0
        session.last_seq = after
        while sent < limit:
            page = inbox.backfill(tenant, user, session.last_seq, min(PAGE, limit - sent), allows)
            for seq, frame in page:
                if seq > session.last_seq and session.write(frame):
                    session.last_seq = seq
                    sent += 1
            if session.cut_off is not None:
                return
            if len(page) < PAGE:
                break
            await session.conn.drain()  # the client reads a page before the next one
        session.finish_backfill()
        session.write(frames.ready(frames.format_cursor(session.last_seq), sent, truncated))
        session.write(frames.counts(*self.counts(tenant, user)))

    def plan_backfill(
        self, tenant: str, user: str, cursor: int | None
    ) -> tuple[int, list[tuple[int, bytes]], bool]:
        """For a worker's session: (start, [(number, message)], truncated), the same
        messages :meth:`_backfill` would send, read now in one go (at most
        ``backfill-max``)."""
        inbox = self.inbox
        assert inbox is not None
        after = cursor if cursor is not None else inbox.last_seen(tenant, user)
        limit = self.gcfg.backfill_max
        floor = inbox.newest_floor(tenant, user, limit)
        truncated = floor > after
        start = last = max(after, floor)
        allows = self._allows(tenant, user)
        out: list[tuple[int, bytes]] = []
        while len(out) < limit:
            page = inbox.backfill(tenant, user, last, min(PAGE, limit - len(out)), allows)
            out.extend(page)
            if page:
                last = page[-1][0]
            if len(page) < PAGE:
                break
        return start, out, truncated

    def _allows(self, tenant: str, user: str) -> Callable[[str, str | None], bool]:
        """The user's preferences at the edge, per (topic, category), asked once each."""
        allowed: dict[tuple[str, str | None], bool] = {}

        def allows(topic: str, category: str | None) -> bool:
            hit = allowed.get((topic, category))
            if hit is None:
                hit = allowed[(topic, category)] = user in self.audience(
                    tenant, (user,), topic, category
                )
            return hit

        return allows

    # -------------------------------------------------------------------- marks
    async def _engage(self, session: Session, what: str, ids: list[str]) -> None:
        unknown = await self.engage(session.tenant, session.user, what, ids)
        if unknown:
            session.write(
                frames.error("unknown_ids", f"not in your inbox: {', '.join(unknown[:10])}")
            )
        self.send_counts(session.tenant, session.user)

    async def engage(self, tenant: str, user: str, what: str, ids: list[str]) -> list[str]:
        """Record ``what`` (seen/read/archived) of the user's messages ``ids`` through the
        notifications core; a seen or read one moves where a connect without a cursor
        starts. Returns the ids the inbox does not know."""
        inbox = self.inbox
        assert inbox is not None
        top = 0
        unknown = []
        marks = []
        for wid in dict.fromkeys(ids):
            seq = inbox.lookup(tenant, user, wid)
            if seq is None:
                unknown.append(wid)
                continue
            top = max(top, seq)
            if not wid.startswith(BROADCAST_PREFIX):
                event_id = inbox.event_of(tenant, user, seq)
                if event_id is not None:
                    marks.append(self.engagement.mark(tenant, user, event_id, what))
        if marks:
            await asyncio.gather(*marks)
        if top and what in ("seen", "read"):
            inbox.mark_seen(tenant, user, top)
        return unknown

    def counts(self, tenant: str, user: str) -> tuple[int, int]:
        """(unseen, unread) from the feed, plus the in-app messages shown to the user that
        the feed has not folded in yet (each will be unseen and unread there). Reads up to
        200 feed items (~1 ms for a full feed): after the backfill and after marks only;
        a delivery's counts are :meth:`_counts_after_delivery`'s."""
        unseen, unread = self.engagement.counts(tenant, user)
        missing = self._not_folded(tenant, user)
        counted = self._counted[(tenant, user)] = (unseen + missing, unread + missing)
        return counted

    def _not_folded(self, tenant: str, user: str) -> int:
        key = (tenant, user)
        shown = self._unfolded.get(key)
        if not shown:
            return 0
        floor = time.monotonic() - UNFOLDED_S
        recent = {e: t for e, t in shown if t >= floor}
        missing = set(self.engagement.not_in_feed(tenant, user, list(recent)))
        if missing:
            self._unfolded[key] = [(e, t) for e, t in recent.items() if e in missing]
        else:
            del self._unfolded[key]
        return len(missing)

    def _counts_after_delivery(self, reached: dict[tuple[str, str], list[str]]) -> None:
        """Fresh counts to every device of each user whom a batch of the reader reached:
        once per user per batch, right behind its messages. Cheap (no feed scan): unread is
        the feed's count (one read) plus the messages it has not folded in yet; unseen is
        the last counts sent to the user grown by as much as unread grew
        (``Engagement.counts_after``)."""
        now = time.monotonic()
        if len(self._unfolded) > 10_000:  # users who left: forget what is past counting
            floor = now - UNFOLDED_S
            for key, shown in list(self._unfolded.items()):
                if shown[-1][1] < floor:
                    del self._unfolded[key]
        if len(self._counted) > 2 * self.recipients_count() + 10_000:
            for key in [k for k in self._counted if not self.recipients.present(*k)]:
                del self._counted[key]
        for (tenant, user), event_ids in reached.items():
            key = (tenant, user)
            self._unfolded.setdefault(key, []).extend((e, now) for e in event_ids)
            last = self._counted.get(key)
            if last is None:
                unseen, unread = self.counts(tenant, user)
            else:
                missing = self._not_folded(tenant, user)
                unseen, unread = self.engagement.counts_after(tenant, user, last, missing)
                self._counted[key] = (unseen, unread)
            self.recipients.write_user(tenant, user, frames.counts(unseen, unread))

    def recipients_count(self) -> int:
        return self.hub.count if self.hub is not None else self.sessions.count

    def send_counts(self, tenant: str, user: str) -> None:
        self.recipients.write_user(tenant, user, frames.counts(*self.counts(tenant, user)))

    # ----------------------------------------------------------------- retraction
    async def retract(self, tenant: str, event_id: str) -> int:
        """Take back every in-app message and broadcast of the event: removed from every
        inbox (no backfill returns it; a copy still on its way is dropped on arrival) and
        ``retract`` sent to every connected device that may have it. Durable before it
        returns. Returns how many messages went."""
        inbox = self.inbox
        assert inbox is not None
        gone = inbox.retract(tenant, event_id, self.clock())
        for r in gone:
            self.recipients.write_user(r.tenant, r.user, frames.retract(r.id))
        await self.kv.sync()
        log.info(
            "event=gateway_retract tenant=%s event_id=%s messages=%d", tenant, event_id, len(gone)
        )
        return len(gone)

    # ------------------------------------------------------------------- tokens
    def mint(self, user: str, *, tenant: str = "default", ttl_s: int = 3600) -> str:
        """A token for ``user`` signed with this node's secret (tests, the CLI's twin)."""
        return auth.mint(self.secret, user, tenant=tenant, now_s=self.clock() // 1000, ttl_s=ttl_s)

    def stats(self) -> dict[str, object]:
        reader = self.reader
        return {
            "connections": self.hub.count if self.hub is not None else self.sessions.count,
            "accepted": self.accepted,
            "refused": dict(self.refused),
            "cut_off": dict(self.sessions.cut_offs),
            "indexed": reader.indexed if reader else 0,
            "pushed": reader.pushed if reader else 0,
        }
