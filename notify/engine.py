"""The notifications engine as one component of the node (``herald/node.py``): started after
the broker, before the listeners, stopped in reverse.

``start`` creates the internal topics (``docs/NOTIFY.md`` § Topics), opens the channels and
starts, in order: the audit indexer, the retry tiers, the delivery workers, the timer loop and
the fan-out (consumers first, so nothing waits on a stage that is not there yet). ``stop``
stops them in reverse: each stage finishes the batch in hand (bounded) or abandons it
uncommitted, to be redone after the restart.

The methods below are what the HTTP API (``notify/api.py``) and the CLI call: cancel by key,
dead letters (list, show, replay, purge), event status, the user's feed, engagement marks.
Every one takes the caller's tenant and sees only that tenant's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from broker.client import Producer
from broker.config import Config
from broker.events import EventIntake
from broker.local import LocalClient
from broker.service import BrokerService
from channels.base import Channel
from channels.registry import make_channel
from notify.audit import AUDIT_TOPIC, AuditIndex, AuditIndexer
from notify.compose import Composer
from notify.delivery import DeliveryWorker
from notify.digests import Digests
from notify.dlq import DeadLetters, dlq_topic
from notify.erasure import EngineTables, Held, erase, find
from notify.fanout import Fanout
from notify.model import AuditRecord, DeadLetter, TimerRow
from notify.plans import Plans
from notify.ports import Directory
from notify.retry import RetryTier, tier_delays, tier_topic
from notify.runner import BROADCAST_TOPIC, Runner, deliver_topic, emit_audit
from notify.stage import Outbox, Stage
from notify.timers import TimerLoop, TimerStore
from storage.kv import KV

log = logging.getLogger("herald.notify")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Engine:
    """The notifications core inside one node."""

    name = "notify"

    def __init__(
        self,
        config: Config,
        service: BrokerService,
        intake: EventIntake,
        kv: KV,
        *,
        directory: Directory,
        channels: dict[str, Channel] | None = None,
        clock: Callable[[], int] = wall_ms,
        composer: Composer | None = None,
    ) -> None:
        self.config = config
        self.ncfg = config.notify
        self.service = service
        self.intake = intake
        self.kv = kv
        self.directory = directory
        # the address and rendered content each delivery is sent with (notify/compose.py)
        self.composer = composer or Composer(directory, config=config)
        self.clock = clock
        self._given_channels = channels or {}
        self.channels: dict[str, Channel] = {}
        self.plans = Plans(kv)
        self.timers = TimerStore(kv)
        self.digests = Digests(kv, self.timers)
        self.dead = DeadLetters(kv)
        self.index = AuditIndex(kv)
        self.runner = Runner(
            directory,
            self.plans,
            self.timers,
            self.digests,
            frozenset(self.ncfg.channels),
            clock,
        )
        self.client: LocalClient | None = None
        self.stages: list[Stage] = []
        self.workers: dict[str, DeliveryWorker] = {}
        self.tiers: list[RetryTier] = []
        self.fanout: Fanout | None = None
        self.audit: AuditIndexer | None = None
        self.timer_loop: TimerLoop | None = None
        self._timer_outbox: Outbox | None = None
        self._own_producer: Producer | None = None

    # ----------------------------------------------------------------- lifecycle
    def topics(self) -> list[tuple[str, int]]:
        n = self.ncfg
        out = [(BROADCAST_TOPIC, n.partitions), (AUDIT_TOPIC, n.audit_partitions)]
        for ch in n.channels:
            out.append((deliver_topic(ch), n.partitions))
            out.append((dlq_topic(ch), n.partitions))
            for delay in tier_delays(n.schedule(ch)):
                out.append((tier_topic(ch, delay), n.retry_partitions))
        return out

    async def start(self) -> None:
        started = time.perf_counter()
        for name, partitions in self.topics():
            self.service.topics.ensure_internal(name, partitions)
        client = self.client = LocalClient(self.service, self.intake, client_id="herald-notify")
        for name in self.ncfg.channels:
            self.channels[name] = self._given_channels.get(name) or make_channel(
                name, self.config.channels
            )
        common: dict[str, Any] = {
            "max_batch_bytes": self.config.limits.max_batch_bytes,
            "stopping": lambda: self.service.stopping,
        }
        self.audit = AuditIndexer(
            client,
            self.kv,
            self.index,
            retention_ms=self.ncfg.audit_retention_ms,
            clock=self.clock,
            deliveries_waiting=self._deliveries_waiting,
            max_lag_ms=self.ncfg.audit_max_lag_ms,
            log_end=self._log_end,
            # the fan-out's delivery pages are their deliveries' `queued` transitions
            deliver_topics=[deliver_topic(ch) for ch in self.ncfg.channels],
            **common,
        )
        stages: list[Stage] = [self.audit]
        for name, channel in self.channels.items():
            for delay in tier_delays(self.ncfg.schedule(name)):
                tier = RetryTier(
                    client, self.kv, channel=name, delay_ms=delay, clock=self.clock, **common
                )
                self.tiers.append(tier)
                stages.append(tier)
            worker = DeliveryWorker(
                client,
                self.kv,
                channel=channel,
                directory=self.directory,
                dead=self.dead,
                config=self.ncfg,
                clock=self.clock,
                log_end=self._log_end,
                log_tail=self._log_tail,
                composer=self.composer,
                **common,
            )
            self.workers[name] = worker
            stages.append(worker)
        for stage in stages:
            await stage.start()
            self.stages.append(stage)
        # the timer loop appends through its own outbox and producer (made on first use: a
        # node on a full disk starts, degraded, and gets it once there is room)
        self._timer_outbox = Outbox(
            lambda t: self.service.topics.partition_count(t) or 1,
            self.config.limits.max_batch_bytes,
        )
        self.timer_loop = TimerLoop(
            self.timers, self._fire, self.clock, batch=self.ncfg.timer_batch
        )
        self.timer_loop.start()
        inapp = self.workers.get("inapp")
        self.fanout = Fanout(
            client,
            self.kv,
            directory=self.directory,
            plans=self.plans,
            runner=self.runner,
            config=self.ncfg,
            # in-app deliveries handed straight to the in-app worker (docs/NOTIFY.md)
            inapp=inapp if inapp is not None and inapp.to_log is not None else None,
            **common,
        )
        await self.fanout.start()
        self.stages.append(self.fanout)
        log.info(
            "event=notify_ready channels=%s stages=%d next_timer_ms=%s seconds=%.3f",
            ",".join(self.channels),
            len(self.stages),
            self.timers.next_due(),
            time.perf_counter() - started,
        )

    def audit_lag_s(self) -> float:
        """How far behind the audit index is (``AuditIndexer.lag_s``; 0 before it starts)."""
        return self.audit.lag_s() if self.audit is not None else 0.0

    def _log_end(self, topic: str, partition: int) -> int:
        return self.service.log.partition(topic, partition).high_watermark

    def _log_tail(self, topic: str, partition: int) -> int:
        return self.service.log.partition(topic, partition).log_end_offset

    def _deliveries_waiting(self) -> bool:
        """Whether the fan-out or a delivery worker has a batch in hand, one finishing, or
        records it has not fetched yet: what the audit indexer gives way to."""
        stages: list[Stage] = list(self.workers.values())
        if self.fanout is not None:
            stages.append(self.fanout)
        log_end = self._log_end
        for stage in stages:
            if not stage.settled:
                return True
            consumer = stage.consumer
            if consumer is None:
                continue
            for t, p in consumer.assignment:
                pos = consumer.positions.get((t, p))
                if pos is not None and log_end(t, p) > pos:
                    return True
        return False

    async def stop(self) -> None:
        if self.fanout is not None:
            await self.fanout.stop()
        if self.timer_loop is not None:
            await self.timer_loop.stop()
        for stage in reversed(self.stages):
            if stage is not self.fanout:
                await stage.stop()
        for channel in self.channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        if self.client is not None:
            await self.client.close()

    async def _producer(self) -> Producer:
        """The engine's own producer (timers, cancel, replay, marks), made on first use.
        Raises the broker's error (e.g. the retriable storage_full) if it cannot be made."""
        if self._own_producer is None:
            assert self.client is not None
            self._own_producer = await self.client.producer(acks=-1, linger_ms=0)
        return self._own_producer

    # ------------------------------------------------------------------- timers
    async def _fire(self, rows: list[TimerRow]) -> None:
        """Resume fired timers; their outputs durable first, then their rows gone."""
        outbox = self._timer_outbox
        assert outbox is not None
        done = self.runner.fire(outbox, rows, self.index.seen)
        try:
            await outbox.send(await self._producer())
        except BaseException:
            outbox.clear()
            raise
        with self.kv.transaction() as txn:
            for row, forget in done:
                self.timers.remove(row, txn)
                if forget is not None:
                    forget(txn)

    def poke(self) -> None:
        """Look at timers and retry tiers again now (a test moved the injected clock)."""
        if self.timer_loop is not None:
            self.timer_loop.poke()
        for tier in self.tiers:
            tier.poke()

    # ------------------------------------------------------------ what the API calls
    async def cancel(self, tenant: str, key: str, users: Sequence[str] | None = None) -> int:
        """Cancel every run of ``tenant`` with cancellation key ``key`` (of ``users`` only,
        if given) still parked in a delay, a deferral or a batch window; each is recorded
        as ``cancelled``. A cancelled batch member leaves its window; the others stay.
        Returns how many runs were cancelled. Runs already sent are not reached."""
        refs = []
        for user in users if users is not None else [None]:
            refs.extend(self.timers.cancel_refs(tenant, key, user))
        cancelled: list[tuple[str, str, str]] = []
        with self.kv.transaction() as txn:
            for ref_key, ref in refs:
                user = ref_key.split(b"\0")[2].decode()
                if ref.kind == "timer":
                    row = self.timers.get(ref.ref.decode(), txn=txn)
                    if row is None:
                        self.timers.cancels.delete(ref_key, txn=txn)
                        continue
                    self.timers.remove(row, txn)
                elif not self.digests.leave(txn, ref_key, ref):
                    continue
                cancelled.append((ref.event_id, user, ref.run_id))
        if not cancelled:
            return 0
        assert self.client is not None
        outbox = Outbox(
            lambda t: self.service.topics.partition_count(t) or 1,
            self.config.limits.max_batch_bytes,
        )
        now = self.clock()
        for event_id, user, run_id in cancelled:
            emit_audit(
                outbox,
                AuditRecord(
                    tenant=tenant,
                    event_id=event_id,
                    user=user,
                    run_id=run_id,
                    status="cancelled",
                    reason="cancellation_key",
                    detail=f"cancelled by key {key!r}",
                    at_ms=now,
                ),
            )
        await asyncio.gather(outbox.send(await self._producer()), self.kv.sync())
        return len(cancelled)

    def dlq_list(
        self, tenant: str, channel: str, *, after: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        return self.dead.page(tenant, channel, after=after, limit=limit)

    def dlq_show(self, tenant: str, channel: str, delivery_id: str) -> DeadLetter | None:
        return self.dead.show(tenant, channel, delivery_id)

    async def dlq_replay(
        self, tenant: str, channel: str, delivery_ids: Sequence[str] | None = None
    ) -> list[str]:
        """Send dead letters again (``delivery_ids``, or every one of the tenant's on the
        channel) with a fresh attempt count and the same delivery ids."""
        replayed = await self.dead.replay(
            await self._producer(), tenant, channel, delivery_ids, now_ms=self.clock()
        )
        await self.kv.sync()
        return replayed

    async def dlq_purge(self, tenant: str, channel: str, delivery_id: str) -> bool:
        gone = self.dead.purge(tenant, channel, delivery_id)
        await self.kv.sync()
        return gone

    def _tables(self) -> EngineTables:
        return EngineTables(
            self.kv, self.index, self.timers, self.digests, self.dead, tuple(self.ncfg.channels)
        )

    async def held_on(self, tenant: str, user: str) -> Held:
        """Every row the engine holds on the user (``notify.erasure``), found in a worker
        thread: the scans must not stall the loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, find, self._tables(), tenant, user)

    async def erase_user(self, tenant: str, user: str) -> tuple[Held, int]:
        """Erase what the engine holds on the user (feed, statuses, parked runs, batch
        windows, dead letters); durable before it returns. Returns what was found and how
        many rows went. See ``notify.erasure`` for what is out of reach."""
        held = await self.held_on(tenant, user)
        gone = erase(self._tables(), tenant, user, held)
        await self.kv.sync()
        return held, gone

    def event_status(self, tenant: str, event_id: str) -> list[dict[str, Any]]:
        return self.index.status(tenant, event_id)

    def feed(
        self, tenant: str, user: str, *, before: str | None = None, limit: int = 50
    ) -> dict[str, Any]:
        return self.index.feed(tenant, user, before=before, limit=limit)

    async def record(self, record: AuditRecord) -> None:
        """Append one transition to ``__audit`` (an engagement, a provider's receipt),
        durable before it returns; the audit indexer folds it into the event's status."""
        producer = await self._producer()
        await producer.send_nowait(
            AUDIT_TOPIC,
            _audit_bytes(record),
            key=f"{record.tenant}\0{record.event_id}".encode(),
        )

    async def mark(self, tenant: str, user: str, notification_id: str, what: str) -> bool:
        """Record an engagement (seen, read, clicked, archived) of a notification (the id
        in the feed). Durable before it returns; ``wait_seen`` reacts to ``seen``."""
        now = self.clock()
        if not self.index.mark(tenant, user, notification_id, what, now):
            return False
        note = self.index.notes.get(f"{tenant}\0{user}\0{notification_id}")
        assert note is not None
        engagement = AuditRecord(
            tenant=tenant,
            event_id=note.event_id,
            user=user,
            run_id=notification_id,
            status=what,
            at_ms=now,
        )
        await asyncio.gather(self.record(engagement), self.kv.sync())
        return True


def _audit_bytes(record: AuditRecord) -> bytes:
    import msgspec

    return msgspec.msgpack.encode(record)
