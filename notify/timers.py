"""Durable timers: parked runs (delays, quiet-hours deferrals, ``deliver_at``, ``wait_seen``
deadlines) and batch windows, in LMDB.

Tables (one LMDB environment, so several change in one transaction):

- ``notify_timers_due``: ``due_ms`` (8 bytes, big endian) + timer id -> :class:`TimerRow`.
  Key order is due order: the next timer is the first key, found with one seek however many
  are parked, so start-up does not read the timers at all (a million parked cost nothing).
- ``notify_timers_id``: timer id -> its due time (re-parking a timer with a new due time
  replaces its row; deleting by id).
- ``notify_cancel``: ``tenant\\0cancellation key\\0user\\0`` + ref -> :class:`CancelRef`, the
  parked timers and batch memberships a ``cancel(key, users?)`` reaches.

Firing (:class:`TimerLoop`): take the due rows (at most ``batch``), resume each run (its
outputs go to the outbox; new timers it parks are written at once), append the outputs with
``acks=all``, then delete the fired rows in one transaction. A crash between the append and
the delete fires the rows again: the continuation computes the same ids, so the effect is once
(the workers' dedupe set and receivers deduplicating on ``webhook-id`` drop the repeat). A
timer is never lost: its row goes only after its outputs are durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec

from notify.model import CancelRef, TimerRow
from storage.kv import KV, Txn

log = logging.getLogger("herald.notify.timers")


class TimerAt(msgspec.Struct, array_like=True):
    due_ms: int


def due_key(due_ms: int, timer_id: str) -> bytes:
    return max(due_ms, 0).to_bytes(8, "big") + timer_id.encode()


def cancel_prefix(tenant: str, key: str, user: str | None = None) -> bytes:
    p = f"{tenant}\0{key}\0"
    if user is not None:
        p += f"{user}\0"
    return p.encode()


class TimerStore:
    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self.due = kv.table("notify_timers_due", TimerRow)
        self.by_id = kv.table("notify_timers_id", TimerAt)
        self.cancels = kv.table("notify_cancel", CancelRef)
        self.on_change: Callable[[int], None] = lambda due_ms: None

    def put(self, row: TimerRow, txn: Txn) -> None:
        """Park ``row`` (replacing a timer of the same id), with its cancellation entry."""
        old = self.by_id.get(row.timer_id, txn=txn)
        if old is not None and old.due_ms != row.due_ms:
            self.due.delete(due_key(old.due_ms, row.timer_id), txn=txn)
        self.due.put(due_key(row.due_ms, row.timer_id), row, txn=txn)
        self.by_id.put(row.timer_id, TimerAt(row.due_ms), txn=txn)
        ck = row.event.cancellation_key
        if ck is not None and row.kind != "batch":
            self.cancels.put(
                cancel_prefix(row.event.tenant, ck, row.user) + row.timer_id.encode(),
                CancelRef(
                    kind="timer",
                    ref=row.timer_id.encode(),
                    run_id=row.run_id,
                    event_id=row.event.event_id,
                ),
                txn=txn,
            )
        self.on_change(row.due_ms)

    def get(self, timer_id: str, txn: Txn | None = None) -> TimerRow | None:
        at = self.by_id.get(timer_id, txn=txn)
        if at is None:
            return None
        return self.due.get(due_key(at.due_ms, timer_id), txn=txn)

    def remove(self, row: TimerRow, txn: Txn) -> None:
        """Delete a timer (fired or cancelled) and its cancellation entry. Removing a timer
        that is already gone (fired again after a crash) is harmless."""
        self.due.delete(due_key(row.due_ms, row.timer_id), txn=txn)
        at = self.by_id.get(row.timer_id, txn=txn)
        if at is not None and at.due_ms != row.due_ms:
            return  # parked again meanwhile (a deferral deferred again): that one stays
        if at is not None:
            self.by_id.delete(row.timer_id, txn=txn)
        ck = row.event.cancellation_key
        if ck is not None and row.kind != "batch":
            self.cancels.delete(
                cancel_prefix(row.event.tenant, ck, row.user) + row.timer_id.encode(), txn=txn
            )

    def due_rows(self, now_ms: int, limit: int) -> list[TimerRow]:
        """The timers due at ``now_ms``, earliest first, at most ``limit``."""
        out = []
        end = (now_ms + 1).to_bytes(8, "big")
        for key, row in self.due.scan(b"", limit=limit):
            if key >= end:
                break
            out.append(row)
        return out

    def next_due(self) -> int | None:
        """When the earliest timer is due (one seek), None with no timer parked."""
        first = self.due.scan_raw(b"", limit=1)
        if not first:
            return None
        return int.from_bytes(first[0][0][:8], "big")

    def cancel_refs(self, tenant: str, key: str, user: str | None) -> list[tuple[bytes, CancelRef]]:
        return list(self.cancels.scan(cancel_prefix(tenant, key, user)))


Fire = Callable[[list[TimerRow]], Awaitable[None]]


class TimerLoop:
    """Fires due timers: ``fire(rows)`` resumes them and makes their outputs durable and
    their rows gone. Sleeps until the next due time, woken early when a nearer timer is
    parked. ``clock`` is wall-clock Unix ms (injected: tests move time)."""

    def __init__(
        self,
        store: TimerStore,
        fire: Fire,
        clock: Callable[[], int],
        *,
        batch: int,
        max_sleep_s: float = 0.5,
    ) -> None:
        self.store = store
        self.fire = fire
        self.clock = clock
        self.batch = batch
        self.max_sleep_s = max_sleep_s
        self._wake = asyncio.Event()
        self._next: int | None = None
        self._stop = False
        self._task: asyncio.Task[None] | None = None
        self.fired = 0
        store.on_change = self._parked

    def _parked(self, due_ms: int) -> None:
        if self._next is None or due_ms < self._next:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="notify-timers")

    async def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5.0)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    def poke(self) -> None:
        """Look again now (a test moved the clock)."""
        self._wake.set()

    async def _run(self) -> None:
        while not self._stop:
            now = self.clock()
            rows = self.store.due_rows(now, self.batch)
            if rows:
                try:
                    await self.fire(rows)
                    self.fired += len(rows)
                except Exception as exc:
                    if self._stop:
                        return
                    log.warning("event=timers_fire_failed count=%d error=%r", len(rows), exc)
                    await asyncio.sleep(1.0)
                continue
            self._next = self.store.next_due()
            wait = self.max_sleep_s
            if self._next is not None:
                wait = min(wait, max(0.0, (self._next - now) / 1000))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
