"""Batch windows (digests) with durable membership.

A ``batch`` step collects one recipient's events per (topic, step, key value). The first run
to reach it opens a window (a ``batch`` timer at ``now + window``); later runs join it as
members and end there. When the window's timer fires, the opener's run resumes once with every
member's event as ``activities`` (the first ``max`` kept; the count stays whole), under the
batch's own id (``notify.ids.batch_id``), so a redo sends the same delivery ids.

Tables:

- ``notify_batches``: slot ``tenant\\0user\\0topic\\0step\\0key`` -> :class:`OpenBatch`;
- ``notify_batch_members``: ``batch_id\\0seq`` -> :class:`BatchMember` (join order);
- ``notify_batch_runs``: ``run_id\\0step`` -> the member's key (joining twice, as a redone
  fan-out does, is a no-op); members are also in the cancellation index.

A cancelled member leaves its window and nothing else changes: the others stay, the window
closes when it was due, and the message carries the remaining members. A window whose every
member was cancelled closes with nothing to send. (Novu's tracker shows the other outcomes:
a cancel that drops the whole digest, or one that leaves the cancelled event in it.)
"""

from __future__ import annotations

import msgspec

from notify import ids
from notify.model import BatchMember, CancelRef, OpenBatch, ParkedEvent, TimerRow
from notify.runs import Park
from notify.timers import TimerStore, cancel_prefix
from storage.kv import KV, Txn


class MemberKey(msgspec.Struct, array_like=True):
    key: bytes


def slot_of(tenant: str, user: str, topic: str, step: int, key: str) -> str:
    return f"{tenant}\0{user}\0{topic}\0{step}\0{key}"


class Digests:
    def __init__(self, kv: KV, timers: TimerStore) -> None:
        self.kv = kv
        self.timers = timers
        self.open = kv.table("notify_batches", OpenBatch)
        self.members = kv.table("notify_batch_members", BatchMember)
        self.runs = kv.table("notify_batch_runs", MemberKey)

    def join(
        self,
        txn: Txn,
        *,
        user: str,
        run_id: str,
        event: ParkedEvent,
        park: Park,
        plan_ref: str,
        now_ms: int,
    ) -> bool:
        """Add the run to its window, opening it if there is none. Returns True if this
        run opened the window (its run resumes at close), False if it joined (or had
        joined: a repeat changes nothing)."""
        run_key = f"{run_id}\0{park.step}"
        if self.runs.get(run_key, txn=txn) is not None:
            return False
        slot = slot_of(event.tenant, user, event.topic, park.step, park.batch_key)
        batch = self.open.get(slot, txn=txn)
        opened = batch is None
        if batch is None:
            bid = ids.batch_id(event.tenant, user, event.topic, park.step, park.batch_key, run_id)
            batch = OpenBatch(
                batch_id=bid,
                timer_id=ids.timer_id(bid, "batch", park.step),
                closes_ms=park.until_ms,
                max_items=park.max_items,
            )
            self.timers.put(
                TimerRow(
                    timer_id=batch.timer_id,
                    kind="batch",
                    due_ms=park.until_ms,
                    user=user,
                    run_id=run_id,
                    event=event,
                    plan_ref=plan_ref,
                    resume_at=park.resume_at,
                    step=park.step,
                    batch_slot=slot,
                    created_ms=now_ms,
                ),
                txn,
            )
        member_key = b""
        if batch.kept < batch.max_items:
            member_key = f"{batch.batch_id}\0{batch.next_seq:012d}".encode()
            self.members.put(member_key, BatchMember(run_id=run_id, event=event), txn=txn)
            batch.kept += 1
            batch.next_seq += 1
        batch.count += 1
        self.open.put(slot, batch, txn=txn)
        self.runs.put(run_key, MemberKey(member_key), txn=txn)
        if event.cancellation_key is not None:
            self.timers.cancels.put(
                cancel_prefix(event.tenant, event.cancellation_key, user) + run_key.encode(),
                CancelRef(
                    kind="member",
                    ref=member_key,
                    run_id=run_id,
                    event_id=event.event_id,
                    slot=slot,
                ),
                txn=txn,
            )
        return opened

    def leave(self, txn: Txn, ref_key: bytes, ref: CancelRef) -> bool:
        """Withdraw one member (a cancellation). The window stays for the others; one left
        empty is closed (its timer deleted). Returns True if the member was still in."""
        assert ref.slot is not None
        run_key = ref_key.rsplit(b"\0", 2)
        self.timers.cancels.delete(ref_key, txn=txn)
        batch = self.open.get(ref.slot, txn=txn)
        if batch is None:
            return False
        step = run_key[-1].decode()
        self.runs.delete(f"{ref.run_id}\0{step}", txn=txn)
        if ref.ref:
            if not self.members.delete(ref.ref, txn=txn):
                return False
            batch.kept -= 1
        batch.count -= 1
        if batch.count <= 0:
            self.open.delete(ref.slot, txn=txn)
            timer = self.timers.get(batch.timer_id, txn=txn)
            if timer is not None:
                self.timers.remove(timer, txn)
        else:
            self.open.put(ref.slot, batch, txn=txn)
        return True

    def contents(self, slot: str) -> tuple[OpenBatch, list[BatchMember]] | None:
        """The window at ``slot`` and its kept members in join order (None: closed)."""
        batch = self.open.get(slot)
        if batch is None:
            return None
        members = [m for _k, m in self.members.scan(f"{batch.batch_id}\0".encode())]
        return batch, members

    def close(self, txn: Txn, slot: str, batch: OpenBatch, members: list[BatchMember]) -> None:
        """Forget a closed window: its row, members and their index entries."""
        self.open.delete(slot, txn=txn)
        self.members.delete_prefix(f"{batch.batch_id}\0".encode(), txn=txn)
        step = slot.split("\0")[3]
        for m in members:
            self.runs.delete(f"{m.run_id}\0{step}", txn=txn)
            ck = m.event.cancellation_key
            if ck is not None:
                self.timers.cancels.delete(
                    cancel_prefix(m.event.tenant, ck, slot.split("\0")[1])
                    + f"{m.run_id}\0{step}".encode(),
                    txn=txn,
                )
