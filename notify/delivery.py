"""Channel workers: group ``notify.deliver.<channel>`` over ``__deliver.<channel>``.

Per batch of deliveries (records keyed by user, so one user's deliveries are on one partition,
in order), users are served concurrently (at most ``deliver-concurrency`` at once) while each
user's deliveries go one at a time, in order: order per (user, topic) holds up to the channel
call. For each delivery:

1. **dedupe** on its delivery id (``notify_dedupe``): one already finished (delivered, dead,
   suppressed, shed), or already handed to a retry tier at this attempt, is skipped. A DLQ
   replay carries a higher replay generation and passes once. Rows older than
   ``dedupe-ttl-ms`` are swept in slices while the worker is idle. A row's key is the
   event's id then the delivery id (:func:`dedupe_key`), so one event's rows are side by
   side in LMDB: a fan-out to 10,000 users writes ~150 new pages, not one page each among
   all the rows of the last day (a delivery id alone is a hash, so its rows landed all over
   the table: ~2.7 us per row once it held ~40 such fan-outs, against ~0.5). Rows of the
   older form (the delivery id alone) are still read while any are left.
2. **strict order**: when its workflow asks for it and an earlier delivery of the same (user,
   channel) waits in retry, it is held (``notify_held``) behind that one, and sent, in order,
   once the blocker is delivered or dead.
3. **back-pressure**: above ``queue-depth-bound`` deliveries waiting (the batch in hand and,
   estimated from the consumer's lag in records, those behind it), low
   priority deliveries are shed, normal ones above twice the bound; high and critical never.
   Each is recorded as ``shed``.
4. **legal opt-out**: checked again just before the send (a STOP or an unsubscribe that
   arrived after the fan-out wins, over mandatory and critical too) -> ``suppressed
   legal_opt_out``.
4b. **compose** (``notify/compose.py``): the user's current address and the content rendered
   from the tenant's template; no usable address -> ``suppressed`` (``no_channel_data``,
   ``address_invalid``); a template that cannot render -> the DLQ with ``render_error``.
5. **send** (``channel.send``; the channel's own breaker answers ``retry(circuit_open)``
   without calling a failing endpoint) and act on the outcome: delivered; retry -> the retry
   tier (``notify.retry``) with the attempt recorded; permanent or attempts exhausted -> the
   dead-letter queue (``notify.dlq``) with the reason and every attempt, and contact data the
   channel found dead is invalidated through the directory.

Every transition is an audit record. The batch's retry, DLQ and audit records are appended
(``acks=all``), then its dedupe rows written (LMDB: durable no later than the commit that
follows them), and only then the batch committed: a crash redoes it, and the dedupe set (plus
the receiver's own, on ``webhook-id``) keeps the effect once. The dedupe rows wait for the
outputs (``Stage.after_sent``): a row written before them could outlive a crash that lost
them, and the redo would skip a delivery whose retry record, audit record or in-app message
was never durable.

A channel whose effect is a record of the log (``inapp``, :class:`~channels.base.AppendsToLog`)
is not awaited per delivery: its record (one ``__inapp`` message) is an output of the batch,
appended with the audit records, and ``delivered`` is what the audit says once both are
durable; a failed append fails the batch, which is redone after a pause (the stage's retry,
not the delivery's backoff). One append round per batch instead of one append per delivery
followed by the audit's.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Final

import msgspec

from broker.client import ConsumerRecord
from broker.config import NotifyConfig
from broker.local import LocalClient
from channels.base import AcceptsAll, AppendsToLog, Channel, Delivered, Permanent, Retry
from channels.base import Delivery as ChannelDelivery
from notify import ids
from notify.compose import Composer, Refused
from notify.dlq import DeadLetters, dlq_topic, letter_of
from notify.latency import Latency
from notify.model import Attempt, AuditRecord, DedupeRow, Delivery, DeliveryPage
from notify.pages import AuditRows, decode_delivery_page, expand, is_page
from notify.ports import Directory
from notify.retry import next_attempt, retried, tier_topic
from notify.runner import AUDIT_TOPIC, emit_audit
from notify.stage import Outbox, Stage, TopicPartition
from storage.kv import KV

log = logging.getLogger("herald.notify.delivery")

FINAL: Final = True
_encode = msgspec.json.Encoder().encode
_decode_dedupe: Final = msgspec.msgpack.Decoder(DedupeRow).decode
# the dedupe sweep (DeliveryWorker.idle): rows per slice; the least gap after a slice that
# found nothing past the TTL, and after a whole pass over the table. Where rows are due to
# go, slices follow one another at once (with rows of random keys living a day, every slice
# holds some); where none are, a slice a second costs ~0.1% of the loop (a slice of 2,000
# rows is ~0.75 ms: at 100 ms it was still 1.5% at 1,000 in-app events/s). With event ids
# that sort by time (a producer's own ULIDs) the rows past the TTL sit together, and once
# they are gone the rest of a pass goes at a slice a second: a row may then outlive the TTL
# by up to a pass (rows / 2,000 seconds). That costs disk, never a repeat.
SWEEP_ROWS: Final = 2000
SWEEP_GAP_MS: Final = 1000
SWEEP_PASS_GAP_MS: Final = 10_000


class Blocker(msgspec.Struct, array_like=True):
    delivery_id: str


class Held(msgspec.Struct, array_like=True):
    record: bytes


def dedupe_key(event_id: str, delivery_id: str) -> bytes:
    """The ``notify_dedupe`` key of a delivery: ``\x01 event_id \0 delivery_id`` (the
    first byte sets them apart from the rows of the older form, a delivery id alone)."""
    return f"\x01{event_id}\0{delivery_id}".encode()


class DeliveryWorker(Stage):
    def __init__(
        self,
        client: LocalClient,
        kv: KV,
        *,
        channel: Channel,
        directory: Directory,
        dead: DeadLetters,
        config: NotifyConfig,
        clock: Callable[[], int],
        log_end: Callable[[str, int], int],
        max_batch_bytes: int,
        log_tail: Callable[[str, int], int] | None = None,
        stopping: Callable[[], bool] = lambda: False,
        rand: Callable[[], float] = random.random,
        composer: Composer | None = None,
    ) -> None:
        name = channel.name
        super().__init__(
            client,
            kv,
            group=f"notify.deliver.{name}",
            topics=[f"__deliver.{name}"],
            batch=config.limits(name)[1],
            max_batch_bytes=max_batch_bytes,
            stopping=stopping,
        )
        self.name = f"notify-deliver-{name}"
        self.linger_s = config.linger_ms / 1000  # Stage's linger: see docs/NOTIFY.md
        self.channel = channel
        self.channel_name = name
        # a channel whose effect is a record of the log: appended with the batch's outputs
        self.to_log = channel if isinstance(channel, AppendsToLog) else None
        # asked once: isinstance of a runtime-checkable Protocol walks its members each time
        self.accepts_all = channel if isinstance(channel, AcceptsAll) else None
        self.directory = directory
        self.composer = composer or Composer(directory)
        self.dead = dead
        self.config = config
        self.schedule = config.schedule(name)
        # this channel's own pool: sends at once and the depth past which it sheds
        self.concurrency, _batch, self.queue_depth_bound = config.limits(name)
        self.clock = clock
        self.log_end = log_end  # the high watermark: what a fetch can have
        self.log_tail = log_tail or log_end  # the log end offset: what is appended
        self.rand = rand
        self.dedupe = kv.table("notify_dedupe", DedupeRow)
        self.blockers = kv.table("notify_blockers", Blocker)
        self.held = kv.table("notify_held", Held)
        self._decode = msgspec.json.Decoder(Delivery).decode
        self._rows: dict[bytes, DedupeRow] = {}  # by dedupe_key
        self._known: dict[str, DedupeRow | None] = {}  # by delivery id
        self._sweep_after: bytes | None = None
        self._sweep_due = 0  # (clock, ms) when idle() may walk the next slice of dedupe rows
        self._legacy = self._has_legacy_rows()
        self.sent = 0
        self.delivered = 0
        self.skipped = 0
        # fan-out to delivery, first attempts and retries alike (herald_notify_delivery_seconds)
        self.latency = Latency()

    # ---------------------------------------------------------------------- a batch
    async def handle(self, recs: list[ConsumerRecord]) -> dict[TopicPartition, int] | None:
        self._rows = {}
        # one record is one delivery, or a page of many (``notify.pages``)
        items: list[DeliveryPage | Delivery] = []
        pages_only = True
        count = 0
        for rec in recs:
            try:
                if is_page(rec.value):
                    page = decode_delivery_page(rec.value)
                    items.append(page)
                    count += len(page.users)
                    pages_only = pages_only and not page.strict_order
                else:
                    items.append(self._decode(rec.value))
                    count += 1
                    pages_only = False
            except (msgspec.DecodeError, TypeError) as exc:
                log.error(
                    "event=delivery_bad_record partition=%d offset=%d error=%s",
                    rec.partition,
                    rec.offset,
                    exc,
                )
        # deliveries waiting: this batch's (a page is many) and, estimated from the record
        # lag by this batch's mix of pages and single deliveries, those behind it
        lag = count + self._lag(recs) * count // max(1, len(recs))
        if pages_only and self.accepts_all is not None:
            pages = [i for i in items if isinstance(i, DeliveryPage)]
            if self._accept_all(pages, self.accepts_all, lag):
                return None
        by_user: dict[bytes, list[Delivery]] = {}
        for item in items:
            for d in expand(item) if isinstance(item, DeliveryPage) else (item,):
                by_user.setdefault(f"{d.tenant}\0{d.user}".encode(), []).append(d)
        self._known = self._load_known(by_user.values())
        # a few workers take users from one queue (one user's deliveries in order, by one
        # worker): a task per worker, not per user
        queue = list(by_user.values())
        queue.reverse()

        async def work() -> None:
            while queue:
                await self._user(queue.pop(), lag)
                await self.take_turn()

        # a channel whose effect is a record of this batch (in-app) waits on nothing per
        # delivery: its users go one after another in this task, not in tasks of their own
        # (a loop turn to start them and one as each ends, on every in-app message's way)
        n = 1 if self.to_log is not None else min(self.concurrency, len(queue))
        if n <= 1:
            await work()
        else:
            await asyncio.gather(*(work() for _ in range(n)))
        if self._rows:
            # once the batch's outputs are durable (see the module's docstring)
            self.after_sent(partial(self.dedupe.put_many, list(self._rows.items())))
        return None

    def _load_known(self, groups: Iterable[list[Delivery]]) -> dict[str, DedupeRow | None]:
        """The dedupe row of every delivery of ``groups``, in one read."""
        known: dict[str, DedupeRow | None] = {}
        with self.kv.snapshot() as txn:
            get = self.dedupe.get
            legacy = self._legacy
            for ds in groups:
                for d in ds:
                    row = get(dedupe_key(d.event_id, d.delivery_id), txn=txn)
                    if row is None and legacy:
                        row = get(d.delivery_id, txn=txn)
                    known[d.delivery_id] = row
        return known

    # ------------------------------------------------- deliveries handed over at once
    def drained(self) -> bool:
        """Whether no delivery of this channel's topic waits: this worker holds every
        partition of it, has fetched up to the end of each (what is appended, synced or
        not) and has no batch in hand. A delivery handed over now (:meth:`deliver_now`)
        then overtakes none of the user's earlier ones."""
        consumer = self.consumer
        if consumer is None or self._busy or self._stop:
            return False
        assignment = consumer.assignment
        if not assignment or len(assignment) != self.outbox.partitions(self.topics[0]):
            return False
        positions = consumer.positions
        tail = self.log_tail
        for t, p in assignment:
            pos = positions.get((t, p))
            if pos is None or pos < tail(t, p):
                return False
        return True

    def deliver_now(
        self,
        pages: list[DeliveryPage],
        outbox: Outbox,
        after_sent: Callable[[Callable[[], object]], object],
    ) -> None:
        """Handle the deliveries of ``pages`` now, as if fetched from this channel's topic,
        their outputs going to the caller's ``outbox`` and their dedupe rows to the
        caller's ``after_sent`` (the fan-out's: they are then part of its batch, redone
        with it after a crash, with the same ids). Only for a channel whose effect is a
        record (in-app), where nothing is awaited: the worker's own batch, between two
        awaits of its loop, never sees the swapped outbox. The caller checks
        :meth:`drained` first."""
        to_log = self.to_log
        assert to_log is not None, "only a channel that appends to the log is handed over"
        by_user: dict[tuple[str, str], list[Delivery]] = {}
        for page in pages:
            for d in expand(page):
                by_user.setdefault((d.tenant, d.user), []).append(d)
        own = self.outbox, self._rows, self._known
        self.outbox, self._rows = outbox, {}
        try:
            self._known = self._load_known(by_user.values())
            lag = sum(len(page.users) for page in pages)  # nothing waits behind them
            for ds in by_user.values():
                queue = ds
                while queue:
                    released = self._one_now(queue.pop(0), lag, to_log)
                    if released:
                        queue[0:0] = released
            if self._rows:
                after_sent(partial(self.dedupe.put_many, list(self._rows.items())))
        finally:
            self.outbox, self._rows, self._known = own

    def _accept_all(self, pages: list[DeliveryPage], channel: AcceptsAll, lag: int) -> bool:
        """A batch of pages to a channel that answers all alike (``null``), handled as a
        whole: one dedupe read and one write for the batch, the legal opt-out per user, one
        call to the channel, one audit page per page. What :meth:`_one` does per delivery,
        minus the view and the await. Returns False (nothing done) if the channel refused
        the call: the batch then goes the general way."""
        keys: list[bytes] = []
        for page in pages:  # dedupe_key, its head made once per page
            head = f"\x01{page.event_id}\0"
            keys += [(head + did).encode() for did in page.delivery_ids]
        seen = self.dedupe.found_raw(keys)
        if self._legacy:  # rows of the older form, by delivery id alone, seen alike
            old = [did.encode() for page in pages for did in page.delivery_ids]
            found = self.dedupe.found_raw(old)
            seen.update((k, found[o]) for k, o in zip(keys, old, strict=True) if o in found)
        # a page's deliveries are at their first attempt, never replayed: any dedupe row
        # means already handled (see _seen); so does an earlier copy in this batch
        clean = not seen and len(set(keys)) == len(keys)
        bound = self.config.queue_depth_bound
        opt_out = self.directory.legal_opt_out
        name = self.channel_name
        now = self.clock()
        take: list[tuple[DeliveryPage, list[int] | None]] = []  # None: the whole page
        shed: list[tuple[DeliveryPage, list[int] | None]] = []
        handled: list[bytes] = keys if clean else []
        done: set[bytes] = set()
        accepted = 0
        for page in pages:
            fresh: list[int] | None = None
            if not clean:
                fresh = []
                for i, did in enumerate(page.delivery_ids):
                    k = dedupe_key(page.event_id, did)
                    if k in seen or k in done:
                        self.skipped += 1
                        continue
                    done.add(k)
                    handled.append(k)
                    fresh.append(i)
                if not fresh:
                    continue
            if (page.priority == "low" and lag > bound) or (
                page.priority == "normal" and lag > 2 * bound
            ):
                shed.append((page, fresh))
                continue
            tenant, users = page.tenant, page.users
            topic, category = page.topic, page.category  # a scoped opt-out too
            out = [
                i
                for i in (range(len(users)) if fresh is None else fresh)
                if opt_out(tenant, users[i], name, topic=topic, category=category) is not None
            ]
            keep = fresh
            if out:
                gone = set(out)
                keep = [i for i in (range(len(users)) if fresh is None else fresh) if i not in gone]
                for i in out:
                    d = expand(_one_of(page, i))[0]
                    why = opt_out(tenant, users[i], name, topic=topic, category=category)
                    self._audit(d, "suppressed", reason="legal_opt_out", detail=why)
                    self._rows[dedupe_key(d.event_id, d.delivery_id)] = DedupeRow(
                        at_ms=now, final=FINAL
                    )
            n = len(users) if keep is None else len(keep)
            if n:
                take.append((page, keep))
                accepted += n
        outcome: Any = None
        if accepted:
            try:
                outcome = channel.accept(accepted)
            except Exception as exc:
                log.warning("event=channel_accept_failed channel=%s error=%r", name, exc)
                outcome = None
            if not isinstance(outcome, Delivered):  # refused alike: one by one
                self.outbox.clear()
                self._rows = {}
                return False
        self.sent += accepted
        self.delivered += accepted
        done_at = self.clock()
        for page, which in take:
            n = len(page.users) if which is None else len(which)
            self.latency.observe((done_at - page.created_ms) / 1000, n)
        detail = outcome.detail or None if outcome is not None else None
        for page, which in take:
            self._audit_page(page, which, "delivered", None, detail, 1, done_at)
        for page, which in shed:
            self._audit_page(page, which, "shed", "queue_depth", f"{lag} waiting", None, now)
        final = self.dedupe.encode(DedupeRow(at_ms=done_at, final=FINAL))
        # the rows once the batch's outputs (its delivered, shed and suppressed audit) are
        # acknowledged, as the general path writes them (:meth:`Stage.after_sent`): written
        # now, a crash before those outputs are durable would leave the deliveries marked
        # done and their statuses at queued for good (the redo would skip them)
        if self._rows:  # the suppressed: their rows as the general path writes them
            handled = [k for k in handled if k not in self._rows]
            self.after_sent(partial(self.dedupe.put_many, list(self._rows.items())))
            self._rows = {}
        if handled:
            handled.sort()
            self.after_sent(partial(self.dedupe.put_raw_many, [(k, final) for k in handled]))
        return True

    def _audit_page(
        self,
        page: DeliveryPage,
        which: list[int] | None,
        status: str,
        reason: str | None,
        detail: str | None,
        attempt: int | None,
        at_ms: int,
    ) -> None:
        audit = self.outbox.group(
            AUDIT_TOPIC,
            f"{page.tenant}\0{page.event_id}".encode(),
            ("w", page.tenant, page.event_id, status, reason, detail, attempt, at_ms),
            lambda: AuditRows(
                tenant=page.tenant,
                event_id=page.event_id,
                topic=page.topic,
                channel=self.channel_name,
                status=status,
                reason=reason,
                detail=detail,
                attempt=attempt,
                at_ms=at_ms,
            ),
            rows=len(page.users) if which is None else len(which),
        )
        assert isinstance(audit, AuditRows)
        users, run_ids, dids = page.users, page.run_ids, page.delivery_ids
        if which is None:
            audit.extend(users, run_ids, dids)
            return
        for i in which:
            audit.add(users[i], run_ids[i], dids[i])

    def _lag(self, recs: list[ConsumerRecord]) -> int:
        """Deliveries waiting behind this batch: what the queue-depth bound applies to."""
        consumer = self.consumer
        if consumer is None:
            return 0
        lag = 0
        for t, p in consumer.assignment:
            pos = consumer.positions.get((t, p))
            if pos is not None:
                lag += max(0, self.log_end(t, p) - pos)
        return lag

    async def _user(self, ds: list[Delivery], lag: int) -> None:
        queue = ds
        while queue:
            d = queue.pop(0)
            released = await self._one(d, lag)
            if released:
                queue[0:0] = released

    # ---------------------------------------------------------------- one delivery
    def _seen(self, d: Delivery) -> bool:
        row = self._rows.get(dedupe_key(d.event_id, d.delivery_id))
        if row is None:
            if d.delivery_id in self._known:
                row = self._known[d.delivery_id]
            else:
                row = self.dedupe.get(dedupe_key(d.event_id, d.delivery_id))
                if row is None and self._legacy:
                    row = self.dedupe.get(d.delivery_id)
        if row is None or d.replay > row.replay:
            return False
        return row.final or d.attempt <= row.attempt

    def _mark(self, d: Delivery, *, final: bool) -> None:
        self._rows[dedupe_key(d.event_id, d.delivery_id)] = DedupeRow(
            at_ms=self.clock(), attempt=d.attempt, final=final, replay=d.replay
        )

    async def _one(self, d: Delivery, lag: int) -> list[Delivery]:
        """Handle one delivery; returns deliveries released from behind it (strict order)."""
        if self.to_log is not None:  # the effect is an output of this batch (in-app)
            return self._one_now(d, lag, self.to_log)
        ready = self._prepare(d, lag)
        if isinstance(ready, list):
            return ready
        view, now = ready
        try:
            outcome: Any = await self.channel.send(view)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a channel must answer outcomes; be safe if one raises
            outcome = self._raised(d, exc)
        return self._settle(d, outcome, now)

    def _one_now(self, d: Delivery, lag: int, to_log: AppendsToLog) -> list[Delivery]:
        """:meth:`_one` for a channel whose effect is a record: nothing awaited."""
        ready = self._prepare(d, lag)
        if isinstance(ready, list):
            return ready
        view, now = ready
        try:
            self.outbox.add(*to_log.record(view))
            outcome: Any = to_log.recorded(view)
        except Exception as exc:  # as a channel's send that raised
            outcome = self._raised(d, exc)
        return self._settle(d, outcome, now)

    def _raised(self, d: Delivery, exc: Exception) -> Retry:
        log.exception(
            "event=channel_raised channel=%s delivery_id=%s", self.channel_name, d.delivery_id
        )
        return Retry(after_s=None, reason="channel_error", detail=repr(exc)[:200])

    def _prepare(self, d: Delivery, lag: int) -> tuple[ChannelDelivery, int] | list[Delivery]:
        """Everything before the channel is called: the delivery as the channel sees it and
        the time, or (it is settled here: a repeat, held, shed, opted out, refused by
        compose) the deliveries it released."""
        if self._seen(d):
            self.skipped += 1
            return []
        block_key = self._block_key(d)
        if d.strict_order:
            blocker = self.blockers.get(block_key)
            if blocker is not None and blocker.delivery_id != d.delivery_id:
                self.held.put(
                    f"{block_key}\0{self.clock():016d}\0{d.delivery_id}", Held(_encode(d))
                )
                self._audit(
                    d, "deferred", reason="strict_order", detail=f"behind {blocker.delivery_id}"
                )
                return []
        bound = self.queue_depth_bound
        if (d.priority == "low" and lag > bound) or (d.priority == "normal" and lag > 2 * bound):
            self._mark(d, final=FINAL)
            self._audit(d, "shed", reason="queue_depth", detail=f"{lag} waiting")
            return self._settled(d, block_key)
        opt_out = self.directory.legal_opt_out(
            d.tenant, d.user, self.channel_name, topic=d.topic, category=d.category
        )
        if opt_out is not None:
            self._mark(d, final=FINAL)
            self._audit(d, "suppressed", reason="legal_opt_out", detail=opt_out)
            return self._settled(d, block_key)
        now = self.clock()
        prepared = self.composer.compose(d)  # the current address, the rendered content
        if isinstance(prepared, Refused):
            self._mark(d, final=FINAL)
            if prepared.status == "dead_lettered":
                d = msgspec.structs.replace(d, first_attempt_ms=d.first_attempt_ms or now)
                letter = letter_of(d, prepared.reason, now)
                raw = self.dead.record(None, letter, 0)
                self.outbox.add(dlq_topic(self.channel_name), ids.user_key(d.tenant, d.user), raw)
            self._audit(d, prepared.status, reason=prepared.reason, detail=prepared.detail)
            return self._settled(d, block_key)
        view = ChannelDelivery(
            delivery_id=d.delivery_id,
            tenant=d.tenant,
            user=d.user,
            topic=d.topic,
            event_id=d.event_id,
            created_ms=d.created_ms,
            attempt=d.attempt,
            first_attempt_ms=d.first_attempt_ms or now,
            priority=d.priority,
            category=d.category,
            payload=d.data,
            activities=tuple(d.activities) if d.activities is not None else None,
            address=prepared.address,
            content=prepared.content,
        )
        return view, now

    def _block_key(self, d: Delivery) -> str:
        return f"{d.tenant}\0{d.user}\0{self.channel_name}"

    def _settle(self, d: Delivery, outcome: Any, now: int) -> list[Delivery]:
        """Act on the channel's outcome: the audit, the dedupe row, a retry or a dead
        letter; returns the deliveries released from behind ``d``."""
        block_key = self._block_key(d)
        self.sent += 1
        done = self.clock()
        attempt = Attempt(at_ms=done, outcome=_kind(outcome), detail=_detail(outcome))
        d = msgspec.structs.replace(
            d, attempts=[*d.attempts, attempt], first_attempt_ms=d.first_attempt_ms or now
        )
        dead_tokens: tuple[str, ...] = getattr(outcome, "dead_tokens", ())
        if dead_tokens and not (isinstance(outcome, Permanent) and outcome.invalidates):
            # some of the user's devices are gone though the delivery itself went on
            self._invalidate(d, "token", "dead_tokens", outcome.detail, dead_tokens)
        if isinstance(outcome, Delivered):
            self.delivered += 1
            self.latency.observe((done - d.created_ms) / 1000)
            self._mark(d, final=FINAL)
            detail = outcome.detail
            if outcome.provider_message_id:  # the provider's id: how its support finds it
                pid = f"provider_message_id={outcome.provider_message_id}"
                detail = f"{pid}; {detail}" if detail else pid
            status = "sent" if outcome.awaiting_receipt else "delivered"
            self._audit(d, status, detail=detail[:300] or None, attempt=d.attempt)
            return self._settled(d, block_key)
        if isinstance(outcome, Retry):
            nxt = next_attempt(self.schedule, d.attempt, done, self.rand(), outcome.after_s)
            if nxt is not None:
                tier, due = nxt
                again = retried(msgspec.structs.replace(d, last_error=outcome.reason), due_ms=due)
                self.outbox.add(
                    tier_topic(self.channel_name, tier),
                    ids.user_key(d.tenant, d.user),
                    _encode(again),
                )
                self._mark(d, final=False)
                self._audit(
                    d,
                    "undelivered",
                    reason=outcome.reason,
                    detail=outcome.detail or None,
                    attempt=d.attempt,
                    until_ms=due,
                )
                if d.strict_order:
                    self.blockers.put(block_key, Blocker(d.delivery_id))
                return []
            reason = f"attempts_exhausted:{outcome.reason}"
        else:
            assert isinstance(outcome, Permanent)
            reason = outcome.reason
            if outcome.invalidates is not None:
                self._invalidate(
                    d, outcome.invalidates, outcome.reason, outcome.detail, outcome.dead_tokens
                )
        letter = letter_of(d, reason, done)
        raw = self.dead.record(None, letter, 0)
        self.outbox.add(dlq_topic(self.channel_name), ids.user_key(d.tenant, d.user), raw)
        self._mark(d, final=FINAL)
        self._audit(d, "dead_lettered", reason=reason, detail=_detail(outcome), attempt=d.attempt)
        return self._settled(d, block_key)

    def _invalidate(
        self, d: Delivery, what: str, reason: str, detail: str, tokens: tuple[str, ...]
    ) -> None:
        """Contact data the channel found dead (or consent revoked at the provider): marked
        through the directory, and audited."""
        self.directory.invalidate(d.tenant, d.user, self.channel_name, what, detail, tokens=tokens)
        named = f" {','.join(t[:12] for t in tokens)}" if tokens else ""
        self._audit(
            d, "contact_invalidated", reason=reason, detail=f"{what}{named}: {detail}"[:300]
        )

    def _settled(self, d: Delivery, block_key: str) -> list[Delivery]:
        """``d`` is finished: if it held others back (strict order), release them."""
        if not d.strict_order:
            return []
        blocker = self.blockers.get(block_key)
        if blocker is None or blocker.delivery_id != d.delivery_id:
            return []
        self.blockers.delete(block_key)
        held = list(self.held.scan(f"{block_key}\0".encode()))
        self.held.delete_many([k for k, _v in held])
        return [self._decode(h.record) for _k, h in held]

    def _audit(
        self,
        d: Delivery,
        status: str,
        *,
        reason: str | None = None,
        detail: str | None = None,
        attempt: int | None = None,
        until_ms: int | None = None,
    ) -> None:
        emit_audit(
            self.outbox,
            AuditRecord(
                tenant=d.tenant,
                event_id=d.event_id,
                user=d.user,
                run_id=d.run_id,
                channel=self.channel_name,
                delivery_id=d.delivery_id,
                status=status,
                reason=reason,
                detail=detail,
                until_ms=until_ms,
                attempt=attempt,
                topic=d.topic,
                at_ms=self.clock(),
            ),
        )

    # ------------------------------------------------------------------- upkeep
    async def idle(self) -> None:
        """Forget dedupe rows past the TTL, a slice of :data:`SWEEP_ROWS` at a time: the
        next slice at the next idle turn while slices find rows to forget, else not before
        :data:`SWEEP_GAP_MS`, and a new pass over the table not before
        :data:`SWEEP_PASS_GAP_MS` (a worker goes idle between most batches: at 1,000
        in-app deliveries/s walking a slice at every turn was 2.3% of the loop, for
        nothing)."""
        now = self.clock()
        if now < self._sweep_due:
            return
        rows = self.dedupe.scan_raw(b"", after=self._sweep_after, limit=SWEEP_ROWS)
        if not rows:
            self._sweep_after = None
            self._sweep_due = now + SWEEP_PASS_GAP_MS
            self._legacy = self._legacy and self._has_legacy_rows()
            return
        self._sweep_after = rows[-1][0]
        cutoff = now - self.config.dedupe_ttl_ms
        dec = _decode_dedupe
        old: list[bytes | str] = [k for k, v in rows if dec(v).at_ms < cutoff]
        if old:
            self.dedupe.delete_many(old)
            self._sweep_due = now
        else:
            self._sweep_due = now + SWEEP_GAP_MS

    def _has_legacy_rows(self) -> bool:
        """Whether rows keyed by a delivery id alone (before :func:`dedupe_key`) are left:
        their keys begin with a hex digit, after every ``\x01`` key."""
        return bool(self.dedupe.scan_raw(b"", after=b"\x02", limit=1))


def _one_of(page: DeliveryPage, i: int) -> DeliveryPage:
    """The page of the ``i``-th delivery of ``page`` alone."""
    return msgspec.structs.replace(
        page,
        users=[page.users[i]],
        run_ids=[page.run_ids[i]],
        delivery_ids=[page.delivery_ids[i]],
        steps=[page.steps[i]],
    )


def _kind(outcome: object) -> str:
    if isinstance(outcome, Delivered):
        return "delivered"
    if isinstance(outcome, Retry):
        return "retry"
    return "permanent"


def _detail(outcome: object) -> str:
    reason = getattr(outcome, "reason", "")
    detail = getattr(outcome, "detail", "")
    return f"{reason}: {detail}"[:300] if reason else str(detail)[:300]
