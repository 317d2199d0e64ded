"""Idempotent-producer state of one partition: pure, no I/O.

A producer that sets ``producer_id`` and ``base_sequence`` on its batches may retry a batch
whose acknowledgement it never saw; the partition must then answer with the offsets the batch
already has instead of appending it twice (Kafka's idempotent producer, in small).

Per producer the table keeps the last ``WINDOW`` batches' sequence ranges and base offsets,
so up to ``WINDOW`` in-flight batches can be retried in any order. A batch is:

- a **duplicate** if its sequence range equals one remembered: answered with its offsets;
- **in order** if its base sequence is one past the producer's last sequence, or if the
  producer is unknown here (first batch, or its state expired): appended;
- **out of order** otherwise: refused with :class:`OutOfOrderSequence`.

An append records its batches at once (so the next append of the same producer follows
them), before they are written. If their write fails (a full disk), the partition cuts the
log back and :meth:`ProducerTable.truncate` undoes exactly those records, newest first:
the producer's window and last sequence are what they were before, so its retry of the
same sequence is accepted (and a retry of a batch acknowledged before still answered as a
duplicate). Undo records are kept only for batches not yet written (:meth:`settle`).

Expiry (Kafka's ``producer.id.expiration.ms``): the table must not grow forever, so a
producer idle for longer than the broker's expiration is forgotten (:meth:`ProducerTable.
expire`). "Idle" is measured by the node's clock at append, never by the timestamps a
producer writes into its batches. Entries are kept in order of last use, so expiry takes
O(producers expired), not a scan of the table.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import msgspec

from storage.errors import CorruptBatch, OutOfOrderSequence

if TYPE_CHECKING:
    from storage.records import BatchHeader

WINDOW: Final = 5


class BatchMark(msgspec.Struct, array_like=True, frozen=True):
    base_sequence: int
    last_sequence: int
    base_offset: int


class ProducerEntry(msgspec.Struct, array_like=True):
    producer_id: int
    last_sequence: int
    last_timestamp: int
    batches: list[BatchMark]


class ProducerTable:
    """Sequence bookkeeping for the producers of one partition."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[int, int, deque[BatchMark]]] = {}
        # (base offset, producer id, (last sequence, timestamp) before, mark evicted): one
        # per batch recorded with undo=True and not yet settled, in offset order
        self._undo: deque[tuple[int, int, tuple[int, int] | None, BatchMark | None]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, producer_id: int, base_sequence: int, count: int) -> int | None:
        """Return the original base offset if this batch is a duplicate, None if it may be
        appended. Raises :class:`OutOfOrderSequence` for a gap or a stale sequence."""
        entry = self._entries.get(producer_id)
        if entry is None:
            return None
        last_sequence, _ts, marks = entry
        last = base_sequence + count - 1
        for mark in marks:
            if mark.base_sequence == base_sequence and mark.last_sequence == last:
                return mark.base_offset
        if base_sequence == last_sequence + 1:
            return None
        raise OutOfOrderSequence(
            f"producer {producer_id}: sequence {base_sequence} does not follow {last_sequence}"
        )

    def check_request(self, headers: Sequence[BatchHeader]) -> int | None:
        """Check the batches of one append request, in order, before any is recorded: a
        producer's batch must follow its previous one, in the table or earlier in the
        request. Returns the original base offset when the request is a single batch that
        duplicates a remembered one (answer it, append nothing); None when it may be
        appended. Raises :class:`OutOfOrderSequence`, or :class:`CorruptBatch` for a
        duplicate inside a multi-batch request (it cannot be answered in part)."""
        taken: dict[int, int] = {}  # producer id -> last sequence this request appends
        for h in headers:
            if h.producer_id < 0:
                continue
            last = taken.get(h.producer_id)
            if last is None:
                original = self.check(h.producer_id, h.base_sequence, h.record_count)
                if original is not None:
                    if len(headers) == 1:
                        return original
                    raise CorruptBatch("duplicate batch inside a multi-batch append")
            elif h.base_sequence <= last:
                raise CorruptBatch("duplicate batch inside a multi-batch append")
            elif h.base_sequence != last + 1:
                raise OutOfOrderSequence(
                    f"producer {h.producer_id}: sequence {h.base_sequence} does not follow {last}"
                )
            taken[h.producer_id] = h.base_sequence + h.record_count - 1
        return None

    def update(
        self,
        producer_id: int,
        base_sequence: int,
        count: int,
        base_offset: int,
        timestamp: int,
        *,
        undo: bool = False,
    ) -> None:
        """Record an appended batch (from an append or a recovery scan); ``timestamp`` is
        the node's clock (ms), the producer's last use. ``undo``: the batch is not written
        yet; keep what :meth:`truncate` needs to take it back."""
        entry = self._entries.pop(producer_id, None)  # re-inserted last: order of last use
        if undo:
            if entry is None:
                self._undo.append((base_offset, producer_id, None, None))
            else:
                evicted = entry[2][0] if len(entry[2]) == WINDOW else None
                self._undo.append((base_offset, producer_id, (entry[0], entry[1]), evicted))
        marks: deque[BatchMark] = entry[2] if entry is not None else deque(maxlen=WINDOW)
        last = base_sequence + count - 1
        marks.append(BatchMark(base_sequence, last, base_offset))
        self._entries[producer_id] = (last, timestamp, marks)

    def expire(self, older_than: int) -> int:
        """Forget producers idle since before ``older_than`` (ms). Returns how many. Walks
        from the least recently used and stops at the first one still in use."""
        entries = self._entries
        stale = []
        for pid, (_s, ts, _m) in entries.items():
            if ts >= older_than:
                break
            stale.append(pid)
        for pid in stale:
            del entries[pid]
        return len(stale)

    def settle(self, offset: int) -> None:
        """Batches below ``offset`` are written: the log is never cut back below it, so
        their undo records can go."""
        undo = self._undo
        while undo and undo[0][0] < offset:
            undo.popleft()

    def truncate(self, next_offset: int) -> None:
        """Forget batches at or past ``next_offset`` (the log was cut back). Batches
        recorded with ``undo`` are taken back exactly (the window as it was before them);
        others (recovery's cut of a torn tail) are dropped from the window."""
        undo = self._undo
        while undo and undo[-1][0] >= next_offset:
            _offset, pid, before, evicted = undo.pop()
            entry = self._entries.get(pid)
            if entry is None:
                continue
            if before is None:
                del self._entries[pid]  # the producer was new with that batch
                continue
            marks = entry[2]
            marks.pop()
            if evicted is not None:
                marks.appendleft(evicted)
            self._entries[pid] = (before[0], before[1], marks)
        for pid in list(self._entries):
            _last, ts, marks = self._entries[pid]
            kept = deque((m for m in marks if m.base_offset < next_offset), maxlen=WINDOW)
            if not kept:
                del self._entries[pid]
            else:
                self._entries[pid] = (kept[-1].last_sequence, ts, kept)

    def snapshot(self) -> list[ProducerEntry]:
        return [
            ProducerEntry(pid, last, ts, list(marks))
            for pid, (last, ts, marks) in self._entries.items()
        ]

    @classmethod
    def restore(cls, entries: list[ProducerEntry]) -> ProducerTable:
        table = cls()
        for e in entries:
            table._entries[e.producer_id] = (
                e.last_sequence,
                e.last_timestamp,
                deque(e.batches, maxlen=WINDOW),
            )
        return table
