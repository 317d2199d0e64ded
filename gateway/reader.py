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
        self._decode_inapp = msgspec.json.Decoder(InAppMessage).decode
        self._decode_event = msgspec.json.Decoder(StoredEvent).decode
        self.indexed = 0
        self.pushed = 0
        self.duplicates = 0
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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
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
            ):
                last_commit = now
                self._commit = asyncio.get_running_loop().create_task(
                    self._commit_positions(dict(consumer.positions))
                )

    async def _commit_positions(self, positions: dict[tuple[str, int], int]) -> None:
        assert self.consumer is not None
        try:
            await self.consumer.commit(positions)
        except BrokerError as exc:
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
        if self.inbox.needs_reservation(len(messages)):
            self.inbox.reserve(len(messages))
            await self.kv.sync()  # no number of the new block goes out before it is durable
        # index and push in one loop step: a backfill never sees half of it
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
