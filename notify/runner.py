"""Runs a run and turns what it produced into effects: delivery records and audit records in
the stage's outbox, parked timers and batch memberships in LMDB, cap and throttle counts
through the directory. Shared by the fan-out (a run's start) and the timers (its resumption).

The pure decisions are ``notify.runs``; this module only wires them to the directory (the
registry and policy seam, ``notify.ports``) and to storage. LMDB writes happen at once, in
the caller's transaction, and are idempotent (keyed by stable ids): the caller appends the
outbox and syncs before it commits its input (fan-out) or deletes the fired timer (timers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import xxhash

from notify import ids
from notify.conditions import Scope
from notify.digests import Digests
from notify.model import AuditRecord, Delivery, ParkedEvent, TimerRow
from notify.pages import DeliveryRows
from notify.plans import Plans
from notify.ports import Directory, Occasion, Ruling
from notify.runs import Go, Layout, Progress, Skip, Verdict, advance
from notify.stage import Outbox
from notify.timers import TimerStore
from notify.workflows import Plan, Send, Throttle
from storage.kv import Txn

AUDIT_TOPIC: Final = "__audit"
BROADCAST_TOPIC: Final = "__broadcast"


def deliver_topic(channel: str) -> str:
    return f"__deliver.{channel}"


_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode
_audit_encode = msgspec.msgpack.Encoder().encode
_h = ids._h
_partition = xxhash.xxh3_64_intdigest  # broker.protocol.partition_for_key, without its call


@dataclass(slots=True)
class RunEvent:
    """One event as its runs see it: the parked form plus what is decoded once per event."""

    parked: ParkedEvent
    data: Any
    occasion: Occasion
    strict_order: bool = False

    @classmethod
    def of(cls, parked: ParkedEvent, *, strict_order: bool = False) -> RunEvent:
        try:
            data = _json_decode(parked.data)
        except msgspec.DecodeError:
            data = None
        fields = {
            "topic": parked.topic,
            "priority": parked.priority,
            "event_id": parked.event_id,
        }
        if parked.category is not None:
            fields["category"] = parked.category
        occasion = Occasion(
            parked.tenant, parked.topic, parked.category, parked.priority, data, fields
        )
        return cls(parked, data, occasion, strict_order)


class _Anyone:
    """The ruling for a user the directory knows nothing of."""

    def __init__(self, user: str) -> None:
        self.user = user

    def fields(self) -> dict[str, Any]:
        return {"id": self.user}


class Runner:
    def __init__(
        self,
        directory: Directory,
        plans: Plans,
        timers: TimerStore,
        digests: Digests,
        channels: frozenset[str],
        clock: Callable[[], int],
    ) -> None:
        self.directory = directory
        self.plans = plans
        self.timers = timers
        self.digests = digests
        self.channels = channels
        self.clock = clock
        self._plain: dict[str, tuple[tuple[Send, str], ...] | None] = {}

    # ---------------------------------------------------------------- entry points
    def start(
        self,
        outbox: Outbox,
        event: RunEvent,
        user: str,
        ruling: Ruling | None,
        plan: tuple[str, Plan, Layout],
        *,
        deliver_at_ms: int | None = None,
    ) -> None:
        """Start the run of ``event`` for ``user`` (or park it until ``deliver_at_ms``)."""
        ref, p, where = plan
        now = self.clock()
        run_id = ids.run_id(event.parked.tenant, event.parked.event_id, user)
        if deliver_at_ms is not None and deliver_at_ms > now:
            self._park_timer(
                outbox,
                event.parked,
                user,
                run_id,
                ref,
                kind="deliver_at",
                until=deliver_at_ms,
                resume_at=where.first,
                step=where.first,
                now=now,
                note=True,
            )
            return
        self._run(outbox, event, user, ruling, ref, p, where, where.first, run_id, run_id)

    def start_many(
        self,
        outbox: Outbox,
        event: RunEvent,
        runs: list[tuple[str, Ruling | None, tuple[str, Plan, Layout]]],
        *,
        deliver_at_ms: int | None = None,
    ) -> None:
        """Start the runs of ``event`` for a page of recipients (``(user, ruling, plan)``),
        as :meth:`start` would one by one. A plan of channel steps only, whose every step the
        policy lets through, takes the page's fast path: ids, the policy's verdicts and
        rows added to the page's delivery page, nothing else per user (the deliveries'
        ``queued`` transition is not an audit record of its own: the indexer reads it off
        the delivery page, ``notify.audit``). Anything else (a deferral, a suppression, a
        delay...) runs the general way."""
        now = self.clock()
        if deliver_at_ms is not None and deliver_at_ms > now:
            for user, ruling, plan in runs:
                self.start(outbox, event, user, ruling, plan, deliver_at_ms=deliver_at_ms)
            return
        pe = event.parked
        tenant, event_id = pe.tenant, pe.event_id
        occasion = event.occasion
        decide = self.directory.decide
        record = self.directory.record
        prefix = f"{tenant}\0{event_id}\0"
        # the open delivery pages by (channel, partition, strict), looked up here rather
        # than through the outbox per row; their rows are counted at the end
        pages: dict[tuple[str, int, bool], DeliveryRows] = {}
        counts: dict[str, int] = {}  # partitions of each channel's delivery topic
        rows_added = 0
        key_prefix = f"{tenant}\0"
        last_plan: object = None
        sends: tuple[tuple[Send, str], ...] | None = None
        for user, ruling, plan in runs:
            ref, p, where = plan
            if plan is not last_plan:  # a page's runs mostly share one plan
                sends = self._sends_only(ref, p)
                last_plan = plan
            run_id = _h((prefix + user).encode())
            if sends is None:
                self._run(outbox, event, user, ruling, ref, p, where, where.first, run_id, run_id)
                continue
            who: Ruling = ruling if ruling is not None else _Anyone(user)
            if len(sends) == 1:  # one channel step: no list of verdicts to walk
                step, suffix = sends[0]
                did = _h((run_id + suffix).encode())
                verdict = decide(occasion, who, step, now, did)
                if isinstance(verdict, Go):
                    channel = step.channel
                    if verdict.charges:
                        record(tenant, user, verdict.charges, now, did)
                    strict = p.strict_order
                    key = (key_prefix + user).encode()
                    n = counts.get(channel)
                    if n is None:
                        n = counts[channel] = outbox.partitions(deliver_topic(channel))
                    at = (channel, _partition(key) % n, strict)
                    rows = pages.get(at)
                    if rows is None:
                        rows = pages[at] = self._delivery_rows(
                            outbox, pe, key, channel, strict, now, count=0
                        )
                    rows.users.append(user)
                    rows.run_ids.append(run_id)
                    rows.delivery_ids.append(did)
                    rows.steps.append(step.index)
                    rows_added += 1
                    continue
                if pages:  # as below: the general way may add to the same pages
                    outbox.count += rows_added
                    rows_added = 0
                    pages.clear()
                self._run(outbox, event, user, ruling, ref, p, where, where.first, run_id, run_id)
                continue
            verdicts = []
            for step, suffix in sends:
                did = _h((run_id + suffix).encode())
                verdict = decide(occasion, who, step, now, did)
                if not isinstance(verdict, Go):
                    break
                verdicts.append((step, did, verdict))
            else:
                key = f"{tenant}\0{user}".encode()
                strict = p.strict_order
                for step, did, verdict in verdicts:
                    channel = step.channel
                    if verdict.charges:
                        record(tenant, user, verdict.charges, now, did)
                    n = counts.get(channel)
                    if n is None:
                        n = counts[channel] = outbox.partitions(deliver_topic(channel))
                    at = (channel, _partition(key) % n, strict)
                    rows = pages.get(at)
                    if rows is None:
                        rows = pages[at] = self._delivery_rows(
                            outbox, pe, key, channel, strict, now, count=0
                        )
                    rows.users.append(user)
                    rows.run_ids.append(run_id)
                    rows.delivery_ids.append(did)
                    rows.steps.append(step.index)
                    rows_added += 1
                continue
            if pages:  # the general way may add to the same pages: count what is added
                outbox.count += rows_added
                rows_added = 0
                pages.clear()
            self._run(outbox, event, user, ruling, ref, p, where, where.first, run_id, run_id)
        outbox.count += rows_added

    def _sends_only(self, ref: str, plan: Plan) -> tuple[tuple[Send, str], ...] | None:
        """The plan's steps if they are channel steps only, each enabled (cached by ref),
        each with the tail of its delivery id's input (``notify.ids.delivery_id``)."""
        cache = self._plain
        if ref in cache:
            return cache[ref]
        steps = plan.steps
        ok = all(isinstance(s, Send) and s.channel in self.channels for s in steps)
        found = (
            tuple((s, f"\0{s.channel}\0{s.index}") for s in steps if isinstance(s, Send))
            if ok and steps
            else None
        )
        if len(cache) > 4096:
            cache.clear()
        cache[ref] = found
        return found

    @staticmethod
    def _delivery_rows(
        outbox: Outbox,
        pe: ParkedEvent,
        key: bytes,
        channel: str,
        strict: bool,
        now: int,
        count: int = 1,
    ) -> DeliveryRows:
        """The open delivery page of ``pe`` on ``channel`` for the partition of the user
        key ``key`` (``count`` more rows counted)."""

        def make() -> DeliveryRows:
            return DeliveryRows(
                tenant=pe.tenant,
                event_id=pe.event_id,
                topic=pe.topic,
                channel=channel,
                priority=pe.priority,
                category=pe.category,
                data=pe.data,
                created_ms=now,
                strict_order=strict,
            )

        rows = outbox.group(
            deliver_topic(channel),
            key,
            ("d", pe.tenant, pe.event_id, channel, strict),
            make,
            rows=count,
        )
        assert isinstance(rows, DeliveryRows)
        return rows

    def resume(
        self,
        outbox: Outbox,
        row: TimerRow,
        ruling: Ruling | None,
        *,
        at: int | None = None,
        activities: list[ParkedEvent] | None = None,
        seed: str | None = None,
    ) -> bool:
        """Resume a fired timer's run at ``at`` (default: the row's ``resume_at``). Returns
        False when its plan is gone (the run ends, noted)."""
        found = self.plans.get(row.plan_ref)
        event = activities[0] if activities else row.event
        if found is None:
            self._audit(outbox, event, row.user, row.run_id, "cancelled", reason="plan_gone")
            return False
        p, where = found
        start = row.resume_at if at is None else at
        run_event = RunEvent.of(event, strict_order=p.strict_order)
        self._run(
            outbox,
            run_event,
            row.user,
            ruling,
            row.plan_ref,
            p,
            where,
            start,
            row.run_id,
            seed or row.run_id,
            activities=activities,
            batch_id=seed,
        )
        return True

    def fire(
        self,
        outbox: Outbox,
        rows: list[TimerRow],
        seen: Callable[[str, str, str], bool],
    ) -> list[tuple[TimerRow, Callable[[Txn], None] | None]]:
        """Resume fired timers. Returns each row with what must be forgotten once the
        outputs are durable (the row itself always; a closed batch's window too)."""
        users = sorted({(r.event.tenant, r.user) for r in rows})
        rulings: dict[tuple[str, str], Ruling] = {}
        for tenant in {t for t, _u in users}:
            got = self.directory.rulings(tenant, [u for t, u in users if t == tenant])
            for user, one in got.items():
                rulings[(tenant, user)] = one
        done: list[tuple[TimerRow, Callable[[Txn], None] | None]] = []
        for row in rows:
            ruling = rulings.get((row.event.tenant, row.user))
            forget: Callable[[Txn], None] | None = None
            if row.kind == "batch":
                assert row.batch_slot is not None
                found = self.digests.contents(row.batch_slot)
                if found is not None:
                    batch, members = found
                    if members:
                        self.resume(
                            outbox,
                            row,
                            ruling,
                            activities=[m.event for m in members],
                            seed=batch.batch_id,
                        )
                    slot = row.batch_slot

                    def forget(t: Txn, slot: str = slot, b: Any = batch, m: Any = members) -> None:
                        self.digests.close(t, slot, b, m)

            elif row.kind == "wait_seen":
                if seen(row.event.tenant, row.user, row.run_id):
                    self._audit(
                        outbox, row.event, row.user, row.run_id, "seen_in_time", reason="wait_seen"
                    )
                else:
                    self.resume(outbox, row, ruling)
            else:
                self.resume(outbox, row, ruling)
            done.append((row, forget))
        return done

    # ------------------------------------------------------------------ the run
    def _run(
        self,
        outbox: Outbox,
        event: RunEvent,
        user: str,
        ruling: Ruling | None,
        ref: str,
        plan: Plan,
        where: Layout,
        at: int,
        run_id: str,
        seed: str,
        *,
        activities: list[ParkedEvent] | None = None,
        batch_id: str | None = None,
    ) -> Progress:
        now = self.clock()
        pe = event.parked
        who: Ruling = ruling if ruling is not None else _Anyone(user)
        directory = self.directory
        tenant = pe.tenant

        def decide(step: Send) -> Verdict:
            if step.channel not in self.channels:
                return Skip("channel_disabled", f"channel {step.channel} is not enabled")
            tag = ids.delivery_id(seed, step.channel, step.index)
            return directory.decide(event.occasion, who, step, now, tag)

        def throttle(step: Throttle, key: str) -> Skip | None:
            name = f"throttle\0{pe.topic}\0{step.index}\0{key}"
            if directory.throttle(tenant, user, name, step.max, step.per_ms, now, run_id):
                return None
            return Skip("throttle", f"{step.path}: at most {step.max} per {step.per_ms} ms")

        scope = Scope(event.data, who.fields(), event.occasion.fields)
        progress = advance(
            plan, where, at, seed=seed, scope=scope, now_ms=now, decide=decide, throttle=throttle
        )
        acts = None if activities is None else [msgspec.Raw(a.data) for a in activities]
        for emit in progress.emits:
            if activities is None and batch_id is None:  # one event: its delivery page
                key = ids.user_key(tenant, user)
                self._delivery_rows(outbox, pe, key, emit.channel, plan.strict_order, now).add(
                    user, run_id, emit.delivery_id, emit.step
                )
                if emit.charges:
                    directory.record(tenant, user, emit.charges, now, emit.delivery_id)
                continue
            delivery = Delivery(
                delivery_id=emit.delivery_id,
                run_id=run_id,
                event_id=pe.event_id,
                tenant=tenant,
                user=user,
                channel=emit.channel,
                topic=pe.topic,
                step=emit.step,
                priority=pe.priority,
                category=pe.category,
                data=msgspec.Raw(pe.data),
                activities=acts,
                created_ms=now,
                strict_order=plan.strict_order,
                batch_id=batch_id,
            )
            outbox.add(
                deliver_topic(emit.channel), ids.user_key(tenant, user), _json_encode(delivery)
            )
            if emit.charges:
                directory.record(tenant, user, emit.charges, now, emit.delivery_id)
            members = activities if activities is not None else [pe]
            for member in members:
                self._audit(
                    outbox,
                    member,
                    user,
                    run_id,
                    "queued",
                    channel=emit.channel,
                    delivery_id=emit.delivery_id,
                )
        for note in progress.notes:
            self._audit(
                outbox,
                pe,
                user,
                run_id,
                note.status,
                channel=note.channel,
                delivery_id=note.delivery_id,
                reason=note.reason,
                detail=note.detail,
                until_ms=note.until_ms,
            )
        park = progress.park
        if park is not None:
            if park.kind == "batch":
                with self.timers.kv.transaction() as txn:
                    opened = self.digests.join(
                        txn, user=user, run_id=run_id, event=pe, park=park, plan_ref=ref, now_ms=now
                    )
                self._audit(
                    outbox,
                    pe,
                    user,
                    run_id,
                    "deferred",
                    reason="batch",
                    detail=f"{'opened' if opened else 'joined'} a batch window",
                    until_ms=park.until_ms if opened else None,
                )
            else:
                self._park_timer(
                    outbox,
                    pe,
                    user,
                    run_id,
                    ref,
                    kind=park.kind,
                    until=park.until_ms,
                    resume_at=park.resume_at,
                    step=park.step,
                    now=now,
                    note=park.kind in ("delay", "deliver_at"),
                    seed=seed if batch_id is not None else None,
                )
        return progress

    def _park_timer(
        self,
        outbox: Outbox,
        pe: ParkedEvent,
        user: str,
        run_id: str,
        ref: str,
        *,
        kind: str,
        until: int,
        resume_at: int,
        step: int,
        now: int,
        note: bool,
        seed: str | None = None,
    ) -> None:
        row = TimerRow(
            timer_id=ids.timer_id(seed or run_id, kind, step),
            kind=kind,
            due_ms=until,
            user=user,
            run_id=run_id,
            event=pe,
            plan_ref=ref,
            resume_at=resume_at,
            step=step,
            created_ms=now,
        )
        with self.timers.kv.transaction() as txn:
            self.timers.put(row, txn)
        if note:
            self._audit(outbox, pe, user, run_id, "deferred", reason=kind, until_ms=until)

    def _audit(
        self,
        outbox: Outbox,
        pe: ParkedEvent,
        user: str,
        run_id: str,
        status: str,
        *,
        channel: str | None = None,
        delivery_id: str | None = None,
        reason: str | None = None,
        detail: str | None = None,
        until_ms: int | None = None,
    ) -> None:
        emit_audit(
            outbox,
            AuditRecord(
                tenant=pe.tenant,
                event_id=pe.event_id,
                user=user,
                run_id=run_id,
                channel=channel,
                delivery_id=delivery_id,
                status=status,
                reason=reason,
                detail=detail,
                until_ms=until_ms,
                topic=pe.topic,
                at_ms=self.clock(),
            ),
        )


def emit_audit(outbox: Outbox, record: AuditRecord) -> None:
    outbox.add(AUDIT_TOPIC, f"{record.tenant}\0{record.event_id}".encode(), _audit_encode(record))
