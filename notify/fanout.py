"""The fan-out engine: group ``notify.fanout`` over ``__events``, one shard per partition.

Per event (in partition order, so one topic's events keep their order):

- ``broadcast``: the event goes once to ``__broadcast`` for the gateways; nobody is fanned out;
- recipients: the event's ``users`` (sorted, deduplicated), else the topic's subscribers, read
  from the registry a page at a time (``fanout-page``) in user order: never the whole list in
  memory; a subscriber whose filter does not match the event is not a recipient;
- each recipient's run starts (``notify.runner``): the topic's workflow, else the default plan
  (one send per channel the user subscribed with; ``default-channels`` for an explicit
  recipient who is not subscribed); with ``deliver_at`` in the future the run parks until then.

Durability: outputs are appended (``acks=all``) and the LMDB rows they depend on written
(durable no later than the commit, ``notify.stage``) before the batch's offsets are committed.
A large fan-out flushes every ``fanout-flush-records`` outputs and then records a mark
(partition, offset, last recipient done): after a crash the event is resumed after that
recipient rather than redone from the start; whatever is redone
carries the same ids (``notify.ids``), so the workers and receivers see each delivery once.
Memory stays bounded by one page plus one flush of outputs, whatever the audience.

*In-app at once.* An in-app delivery's whole effect is a record (``__inapp``), so a batch's
in-app deliveries (up to :data:`HAND_OVER_MAX`) are handed straight to the in-app worker
(:meth:`DeliveryWorker.deliver_now`) instead of being appended to ``__deliver.inapp`` for
it to fetch: their messages, audit records and the ``queued`` pages the delivery pages
would have been go out in this batch's append, their dedupe rows are written once it is
acknowledged, and a redone batch finds them done. That takes a durable hop, a fetch and
a commit off every in-app notification's way (at 1,000 events/s the stage it saved was a
third of the loop's rounds). Only when nothing on ``__deliver.inapp`` could be overtaken:
the worker holds every partition of it, has fetched up to its end and has no batch in
hand, and none of this stage's batches that went that way is still unacknowledged;
otherwise the deliveries take the topic, in order behind the others.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import msgspec

from broker.client import ConsumerRecord
from broker.config import NotifyConfig
from broker.events import StoredEvent
from broker.local import LocalClient
from broker.topics import EVENTS_TOPIC
from notify.audit import AUDIT_TOPIC, queued_page
from notify.conditions import Scope
from notify.delivery import DeliveryWorker
from notify.model import DeliveryPage, FanoutMark, ParkedEvent
from notify.pages import MAX_PAGE_ROWS, DeliveryRows, encode_audit_page
from notify.plans import Plans
from notify.ports import Directory, Ruling, Subscriber
from notify.runner import BROADCAST_TOPIC, RunEvent, Runner, deliver_topic
from notify.runs import Layout
from notify.stage import Stage
from notify.workflows import Plan
from storage.kv import KV, ReadCache

log = logging.getLogger("herald.notify.fanout")

GROUP = "notify.fanout"
INAPP_DELIVER: Final = deliver_topic("inapp")
# in-app deliveries of one batch handed over at most (a page's worth): a larger fan-out's
# go through __deliver.inapp, the worker taking them while the fan-out goes on
HAND_OVER_MAX: Final = MAX_PAGE_ROWS


class Fanout(Stage):
    name = "notify-fanout"

    def __init__(
        self,
        client: LocalClient,
        kv: KV,
        *,
        directory: Directory,
        plans: Plans,
        runner: Runner,
        config: NotifyConfig,
        max_batch_bytes: int,
        inapp: DeliveryWorker | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__(
            client,
            kv,
            group=GROUP,
            topics=[EVENTS_TOPIC],
            batch=200,
            max_batch_bytes=max_batch_bytes,
            stopping=stopping,
        )
        self.linger_s = config.linger_ms / 1000  # Stage's linger: see docs/NOTIFY.md
        self.directory = directory
        self.plans = plans
        self.runner = runner
        self.config = config
        self.enabled = frozenset(config.channels)
        self.marks = kv.table("notify_fanout_marks", FanoutMark)
        # one key per partition of __events
        self._marks_read: ReadCache[str, FanoutMark | None] = ReadCache(self.marks)
        self._decode = msgspec.json.Decoder(StoredEvent).decode
        self.events = 0
        self.recipients = 0
        # the in-app worker, when deliveries may be handed over to it (engine: the in-app
        # channel enabled); batches whose in-app deliveries went to __deliver.inapp and
        # are not yet acknowledged; deliveries handed over
        self.inapp = inapp
        self._inapp_queued = 0
        self.handed_over = 0

    async def handle(self, recs: list[ConsumerRecord]) -> None:
        for rec in recs:
            try:
                ev = self._decode(rec.value)
            except msgspec.DecodeError as exc:
                log.error(
                    "event=fanout_bad_event partition=%d offset=%d error=%s",
                    rec.partition,
                    rec.offset,
                    exc,
                )
                continue
            await self._event(rec, ev)
            self.events += 1
            if len(self.outbox) >= self.config.fanout_flush_records:
                await self.flush()
            await self.take_turn()
        if self.inapp is not None:
            self._hand_over_inapp(self.inapp)

    def _hand_over_inapp(self, worker: DeliveryWorker) -> None:
        """The batch's in-app deliveries, handled here rather than appended to
        ``__deliver.inapp`` for the in-app worker, when nothing there waits that they could
        overtake (module docstring, *In-app at once*). Otherwise they go the usual way,
        and until those are acknowledged (so that the worker's fetch positions tell) the
        next batches' go that way too."""
        outbox = self.outbox
        groups = outbox.groups_of(INAPP_DELIVER)
        if not groups:
            return
        if (
            self._inapp_queued
            or outbox.has_records(INAPP_DELIVER)
            or sum(len(g) for g in groups) > HAND_OVER_MAX
            or not worker.drained()
        ):
            self._inapp_queued += 1
            self.after_sent(self._inapp_acknowledged)
            return
        pages: list[DeliveryPage] = []
        for g in outbox.take_groups(INAPP_DELIVER):
            assert isinstance(g, DeliveryRows)
            pages += g.pages()
        for page in pages:  # the queued transitions the delivery pages would have been
            outbox.add(
                AUDIT_TOPIC,
                f"{page.tenant}\0{page.event_id}".encode(),
                encode_audit_page(queued_page(page)),
            )
        worker.deliver_now(pages, outbox, self.after_sent)
        self.handed_over += sum(len(page.users) for page in pages)

    def _inapp_acknowledged(self) -> None:
        self._inapp_queued -= 1

    async def abandoned(self) -> None:
        self._inapp_queued = 0  # the batches that went the usual way are given up too

    async def _event(self, rec: ConsumerRecord, ev: StoredEvent) -> None:
        if ev.broadcast:
            self.outbox.add(BROADCAST_TOPIC, ev.tenant.encode(), rec.value)
            return
        mark_key = str(rec.partition)
        mark = self._mark(mark_key)
        after = mark.after if mark is not None and mark.offset == rec.offset else None
        pages_left = self._pages(ev, after)
        first = next(pages_left, None)
        if first is None and after is None:
            return  # nobody to reach (no subscribers, no users): nothing to plan or run
        data = bytes(ev.data) if ev.data is not None else bytes(ev.payload)
        parked = ParkedEvent(
            tenant=ev.tenant,
            event_id=ev.event_id,
            topic=ev.topic,
            priority=ev.priority,
            category=ev.category,
            data=data,
            received_ms=ev.received_ms,
            cancellation_key=ev.cancellation_key,
        )
        workflow = self.directory.workflow(ev.tenant, ev.topic)
        plan = None
        if workflow is not None:
            try:
                plan = self.plans.for_workflow(workflow)
            except Exception as exc:  # a stored body this node refuses: default plan
                log.error(
                    "event=fanout_bad_workflow tenant=%s topic=%s error=%s",
                    ev.tenant,
                    ev.topic,
                    exc,
                )
        run_event = RunEvent.of(parked, strict_order=plan[1].strict_order if plan else False)
        if parked.category is None and plan is not None and plan[1].category is not None:
            # the event's category, else its workflow's: what preferences and caps key on
            parked.category = plan[1].category
            run_event = RunEvent.of(parked, strict_order=plan[1].strict_order)
        if after is not None:
            log.warning(
                "event=fanout_resumed event_id=%s partition=%d offset=%d after=%s pages=%d",
                ev.event_id,
                rec.partition,
                rec.offset,
                after,
                mark.pages if mark is not None else 0,
            )
        started = time.perf_counter()
        before = self.recipients
        pages = 0
        default = tuple(c for c in self.config.default_channels if c in self.enabled)
        plan_of: dict[tuple[str, ...], tuple[str, Plan, Layout]] = {}
        for page in itertools.chain(() if first is None else (first,), pages_left):
            users = [s.user for s in page]
            rulings = self.directory.rulings(ev.tenant, users)
            runs: list[tuple[str, Ruling | None, tuple[str, Plan, Layout]]] = []
            for sub in page:
                if sub.filter is not None:
                    who = rulings.get(sub.user)
                    scope = Scope(
                        run_event.data,
                        who.fields() if who is not None else {"id": sub.user},
                        run_event.occasion.fields,
                    )
                    if not sub.filter.matches(scope):
                        continue
                if plan is not None:
                    user_plan = plan
                else:
                    found = plan_of.get(sub.channels)
                    if found is None:
                        chans = tuple(c for c in sub.channels if c in self.enabled) or (
                            default if not sub.channels else ()
                        )
                        if not chans:
                            continue
                        found = plan_of[sub.channels] = self.plans.for_channels(chans)
                    user_plan = found
                runs.append((sub.user, rulings.get(sub.user), user_plan))
            self.runner.start_many(self.outbox, run_event, runs, deliver_at_ms=ev.deliver_at_ms)
            self.recipients += len(runs)
            pages += 1
            if len(self.outbox) >= self.config.fanout_flush_records:
                await self.flush()
                self.marks.put(
                    mark_key, FanoutMark(offset=rec.offset, after=users[-1], pages=pages)
                )
            await self.take_turn()  # a large audience: the loop serves others between pages
        if pages > 1 or after is not None:
            self.marks.delete(mark_key)
            log.info(
                "event=fanout_done event_id=%s tenant=%s topic=%s recipients=%d pages=%d "
                "seconds=%.3f",
                ev.event_id,
                ev.tenant,
                ev.topic,
                self.recipients - before,
                pages,
                time.perf_counter() - started,
            )

    def _mark(self, key: str) -> FanoutMark | None:
        """The resume mark of a partition's large fan-out, read once per change of the
        marks table (asked for every event; written only by fan-outs of several pages)."""
        return self._marks_read.get(key, lambda: self.marks.get(key))

    def _pages(self, ev: StoredEvent, after: str | None) -> Iterator[Sequence[Subscriber]]:
        size = self.config.fanout_page
        if ev.users is not None:
            users = sorted(set(ev.users))
            if after is not None:
                users = [u for u in users if u > after]
            for i in range(0, len(users), size):
                chunk = users[i : i + size]
                subs = self.directory.subscriptions(ev.tenant, chunk, ev.topic)
                yield [subs.get(u) or Subscriber(u, ()) for u in chunk]
            return
        while True:
            page = self.directory.subscribers(ev.tenant, ev.topic, after, size)
            if not page:
                return
            yield page
            if len(page) < size:
                return
            after = page[-1].user
