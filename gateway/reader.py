"""The gateway's reader: one consumer of ``__inapp`` and ``__broadcast`` (group
``gateway.<node id>``, so a restarted node resumes where its index is), indexing each new
message into the inbox and pushing it to the sessions it is for, in the same loop step.

Per batch: decode; reserve inbox numbers (and sync, rarely: one block per
:data:`~gateway.inbox.SEQ_BLOCK` messages); store the batch in one LMDB transaction; push
each new message: an in-app one to its user's sessions, a broadcast to the tenant's sessions
that the user's preferences let through (``audience``), the frame encoded once. Offsets are
committed at most every ``commit_interval`` in the background; the commit syncs the state
store before it is answered, so the index rows are durable no later than the offsets that
cover them, and a crash re-reads at most the uncommitted tail, which the inbox drops as
duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import msgspec

from broker.client import BrokerError, Consumer, ConsumerRecord
from broker.local import LocalClient
from channels.inapp import INAPP_TOPIC, InAppMessage
from gateway.inbox import Inbox, Indexed, StoredEvent
from gateway.sessions import Recipients
from storage.kv import KV

log = logging.getLogger("herald.gateway")

BROADCAST_TOPIC = "__broadcast"
# allows(tenant, users, topic, category) -> the users the broadcast may reach
Audience = Callable[[str, Iterable[str], str, str | None], set[str]]
# delivered({(tenant, user): [event ids]}): the in-app messages of one batch that reached a
# connected device, by user (the gateway sends each user fresh counts once per batch)
Delivered = Callable[[dict[tuple[str, str], list[str]]], None]


def everyone(tenant: str, users: Iterable[str], topic: str, category: str | None) -> set[str]:
    return set(users)


class Reader:
    def __init__(
        self,
        client: LocalClient,
        kv: KV,
        inbox: Inbox,
        sessions: Recipients,
        *,
        group: str,
        audience: Audience = everyone,
        retention_ms: int,
        clock: Callable[[], int],
        commit_interval: float = 0.2,
        delivered: Delivered | None = None,
    ) -> None:
        self.client = client
        self.kv = kv
        self.inbox = inbox
        self.sessions = sessions
        self.group = group
        self.audience = audience
        self.retention_ms = retention_ms
        self.clock = clock
        self.commit_interval = commit_interval
        self.delivered = delivered
        self.consumer: Consumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._commit: asyncio.Task[None] | None = None
        # the positions the last commit carried: an idle reader commits nothing (each
        # commit is a state-store write and sync)
        self._committed: dict[tuple[str, int], int] = {}
        self._decode_inapp = msgspec.json.Decoder(InAppMessage).decode
        self._decode_event = msgspec.json.Decoder(StoredEvent).decode
        self.indexed = 0
        self.pushed = 0
        self.duplicates = 0
        # in-app messages handed over by the in-app worker as it appends their records
        # (:meth:`show`), waiting for a reservation of inbox numbers to be durable
        self._early: list[InAppMessage] = []
        self._early_task: asyncio.Task[None] | None = None
        # the reservation being synced: no number of its block goes out before it is done
        self._reservation: asyncio.Future[None] | None = None
        # a test or benchmark waits for the index to reach an offset
        self.on_batch: Callable[[], None] | None = None

    async def start(self) -> None:
        self.consumer = Consumer(
            self.client,
            [INAPP_TOPIC, BROADCAST_TOPIC],
            group=self.group,
            auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self.consumer.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway-reader")

    async def stop(self) -> None:
        for task in (self._task, self._early_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._commit is not None:
            with contextlib.suppress(Exception):
                await self._commit
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.commit()
            with contextlib.suppress(Exception):
                await self.consumer.close()

    async def _run(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        last_commit = time.monotonic()
        while True:
            try:
                recs = await consumer.getmany(timeout_ms=500, max_records=5000)
            except asyncio.CancelledError:
                raise
            except BrokerError as exc:
                log.warning("event=gateway_fetch_failed error=%s", exc)
                await asyncio.sleep(0.5)
                continue
            if recs:
                await self.handle(recs)
                if self.on_batch is not None:
                    self.on_batch()
            else:
                self.inbox.sweep(self.clock() - self.retention_ms)
            now = time.monotonic()
            if (
                now - last_commit >= self.commit_interval
                and (self._commit is None or self._commit.done())
                and consumer.positions
                and consumer.positions != self._committed
            ):
                last_commit = now
                self._committed = dict(consumer.positions)
                self._commit = asyncio.get_running_loop().create_task(
                    self._commit_positions(self._committed)
                )

    async def _commit_positions(self, positions: dict[tuple[str, int], int]) -> None:
        assert self.consumer is not None
        try:
            await self.consumer.commit(positions)
        except BrokerError as exc:
            self._committed = {}  # tried again at the next interval
            log.warning("event=gateway_commit_failed error=%s", exc)

    async def handle(self, recs: Sequence[ConsumerRecord]) -> None:
        messages: list[InAppMessage | StoredEvent] = []
        for rec in recs:
            try:
                if rec.topic == INAPP_TOPIC:
                    messages.append(self._decode_inapp(rec.value))
                else:
                    messages.append(self._decode_event(rec.value))
            except msgspec.DecodeError as exc:
                log.error(
                    "event=gateway_bad_record topic=%s partition=%d offset=%d error=%s",
                    rec.topic,
                    rec.partition,
                    rec.offset,
                    exc,
                )
        await self._reserved_for(len(messages))
        self._index_and_push(messages)

    async def _reserved_for(self, count: int) -> None:
        """Until ``count`` inbox numbers are reserved durably: a new block is synced before
        any number of it goes out, and one reservation is synced at a time (the reader and
        :meth:`show` both number messages)."""
        while self._reservation is not None:
            await asyncio.shield(self._reservation)
        if not self.inbox.needs_reservation(count):
            return
        done = self._reservation = asyncio.get_running_loop().create_future()
        try:
            self.inbox.reserve(count)
            await self.kv.sync()  # no number of the new block goes out before it is durable
        finally:
            self._reservation = None
            done.set_result(None)

    def show(self, messages: Sequence[InAppMessage]) -> None:
        """Store and push in-app messages now, as the in-app worker appends their records to
        ``__inapp`` (before they are durable): the third durable hop is then off the way of
        a connected device. When this reader later reads a record it finds the message in
        the inbox and drops it by id. A redone batch, or a power cut before the record is
        durable, shows a message again with the same id (docs/GATEWAY.md). Messages wait,
        in order, for inbox numbers whose reservation is not durable yet."""
        if self._task is None or self._task.done():
            return  # not reading: the records are shown when they are read
        self._early.extend(messages)
        if self._early_task is None:
            self._show_early()

    def _show_early(self) -> None:
        early = self._early
        if not early:
            return
        if self._reservation is not None or self.inbox.needs_reservation(len(early)):
            self._early_task = asyncio.get_running_loop().create_task(self._reserve_early())
            return
        self._early = []
        self._index_and_push(list(early))

    async def _reserve_early(self) -> None:
        try:
            await self._reserved_for(len(self._early))
        except Exception as exc:  # the sync failed: the reader shows them once durable
            log.warning("event=gateway_early_show_failed error=%r", exc)
            self._early = []
            return
        finally:
            self._early_task = None
        self._show_early()

    def _index_and_push(self, messages: list[InAppMessage | StoredEvent]) -> None:
        """Store ``messages`` in the inbox (one transaction) and push the new ones, in one
        loop step: a backfill never sees half of it. The numbers are reserved."""
        indexed = self.inbox.add(messages)
        self.indexed += len(indexed)
        self.duplicates += len(messages) - len(indexed)
        sessions = self.sessions
        reached: dict[tuple[str, str], list[str]] = {}
        # each connection's frames of this batch (messages, then counts) in one write
        sessions.hold()
        try:
            self._push(indexed, reached)
            if reached and self.delivered is not None:
                self.delivered(reached)
        finally:
            sessions.release()

    def _push(self, indexed: list[Indexed], reached: dict[tuple[str, str], list[str]]) -> None:
        sessions = self.sessions
        for item in indexed:
            if item.user is not None:
                n = sessions.offer_user(item.tenant, item.user, item.seq, item.frame)
                if n:
                    self.pushed += n
                    reached.setdefault((item.tenant, item.user), []).append(item.event_id)
            else:
                self.pushed += sessions.offer_tenant(
                    item.tenant,
                    item.seq,
                    item.frame,
                    functools.partial(self._allowed, item.tenant, item.topic, item.category),
                )

    def _allowed(
        self, tenant: str, topic: str, category: str | None, users: Iterable[str]
    ) -> set[str]:
        return self.audience(tenant, users, topic, category)
