"""Event-id idempotency: which ``event_id`` each tenant already published, and where it went.

An event published with an ``event_id`` seen inside the window (24 h by default) is answered
with the original partition and offset instead of being stored twice (``broker/events.py``
decides; this module keeps the index). Three LMDB tables: one keyed by ``tenant \\0
event_id`` for the look-up, one keyed by ``received_ms \\0 tenant \\0 event_id`` so
:meth:`EventIds.sweep` can drop expired ids in key order without scanning the whole store,
and the marks: per ``__events`` partition, the offset below which every id is indexed.

The rows of a tenant's ids count toward its state-store quota (``broker/quotas.py``):
:meth:`EventIds.load` accounts what is stored at start-up, and every write and sweep
updates the count.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from broker.quotas import Quotas
from storage.kv import KV, ROW_OVERHEAD


def row_estimate(tenant: str) -> int:
    """The bytes one indexed id of ``tenant`` takes at most, in both tables: keys of
    ``tenant \0 id`` and ``time \0 tenant \0 id`` (a 36-character UUID; at most 64), a
    placement of at most 28 bytes and an empty value."""
    t = len(tenant.encode())
    return (t + 1 + 64 + 28 + ROW_OVERHEAD) + (16 + 1 + t + 1 + 64 + 1 + ROW_OVERHEAD)


class SeenEvent(msgspec.Struct, array_like=True):
    partition: int
    offset: int
    received_ms: int


class _Nothing(msgspec.Struct, array_like=True):
    pass


class _Mark(msgspec.Struct, array_like=True):
    offset: int


class EventIds:
    def __init__(self, kv: KV, window_ms: int, quotas: Quotas | None = None) -> None:
        self.window_ms = window_ms
        self.quotas = quotas
        self._kv = kv
        self._by_id = kv.table("event_ids", SeenEvent)
        self._by_time = kv.table("event_ids_by_time", _Nothing)
        self._marks = kv.table("event_ids_marks", _Mark)

    def load(self) -> int:
        """Account the stored ids to their tenants (at start-up; a worker thread: it reads
        both tables). Returns how many ids."""
        if self.quotas is None:
            return 0
        count = 0
        by_tenant: dict[bytes, int] = {}  # tenant -> bytes: decoded once each
        for key, size in self._by_id.sizes():
            tenant = key[: key.index(b"\x00")] if b"\x00" in key else key
            by_tenant[tenant] = by_tenant.get(tenant, 0) + size
            count += 1
        for key, size in self._by_time.sizes():
            parts = key.split(b"\x00", 2)
            if len(parts) == 3:
                by_tenant[parts[1]] = by_tenant.get(parts[1], 0) + size
        for tenant, size in by_tenant.items():
            self.quotas.of(tenant.decode(errors="replace")).state_store_bytes += size
        return count

    def _account(self, tenant: str, nbytes: int) -> None:
        if self.quotas is not None:
            self.quotas.of(tenant).state_store_bytes += nbytes

    def marks(self) -> dict[int, int]:
        """Per partition, the offset below which every event's id is indexed."""
        return {int(k): m.offset for k, m in self._marks.scan(b"")}

    def put_marks(self, marks: dict[int, int]) -> None:
        self._marks.put_many([(f"{p:010d}", _Mark(off)) for p, off in marks.items()])

    @staticmethod
    def _key(tenant: str, event_id: str) -> str:
        return f"{tenant}\x00{event_id}"

    def get(self, tenant: str, event_id: str, now_ms: int) -> SeenEvent | None:
        """The original placement of ``event_id`` if it was seen within the window."""
        seen = self._by_id.get(self._key(tenant, event_id))
        if seen is not None and now_ms - seen.received_ms < self.window_ms:
            return seen
        return None

    def put_many(self, rows: list[tuple[str, str, SeenEvent]]) -> None:
        """Remember ``(tenant, event_id, placement)`` rows, of any tenants, in one
        transaction (both tables: the rows of every publish made durable by one flush
        round cost one LMDB commit). Raises :class:`~storage.errors.StorageFull` when the
        state store is full (then none of them is written)."""
        grew: list[tuple[str, int]] = []
        with self._kv.transaction() as txn:
            for tenant, mine in _by_tenant(rows):
                a = self._by_id.put_many([(self._key(t, e), seen) for t, e, seen in mine], txn=txn)
                b = self._by_time.put_many(
                    [(f"{seen.received_ms:016d}\x00{t}\x00{e}", _Nothing()) for t, e, seen in mine],
                    txn=txn,
                )
                grew.append((tenant, a.bytes + b.bytes))
        for tenant, nbytes in grew:  # accounted once committed
            self._account(tenant, nbytes)

    def sweep(self, now_ms: int, limit: int = 10_000) -> int:
        """Forget up to ``limit`` ids older than the window, oldest first. Returns how many.
        Cheap enough for the loop at ``limit`` per call (two short write transactions)."""
        cutoff = f"{now_ms - self.window_ms:016d}"
        doomed: list[bytes] = []
        for key, _v in self._by_time.scan(b"", limit=limit):
            if key.decode()[:16] >= cutoff:
                break
            doomed.append(key)
        if not doomed:
            return 0
        by_id: dict[str, list[bytes | str]] = {}
        by_time: dict[str, list[bytes | str]] = {}
        for key in doomed:
            ms, tenant, event_id = key.decode().split("\x00")
            by_time.setdefault(tenant, []).append(key)
            seen = self._by_id.get(self._key(tenant, event_id))
            # a later publish of the same id (after expiry) has a newer time: keep it
            if seen is not None and seen.received_ms == int(ms):
                by_id.setdefault(tenant, []).append(self._key(tenant, event_id).encode())
        for tenant, keys in by_id.items():
            self._account(tenant, self._by_id.remove_many(keys).bytes)
        for tenant, keys in by_time.items():
            self._account(tenant, self._by_time.remove_many(keys).bytes)
        return len(doomed)


def _by_tenant(
    rows: list[tuple[str, str, SeenEvent]],
) -> Iterable[tuple[str, list[tuple[str, str, SeenEvent]]]]:
    if all(r[0] == rows[0][0] for r in rows):
        return [(rows[0][0], rows)] if rows else []
    groups: dict[str, list[tuple[str, str, SeenEvent]]] = {}
    for row in rows:
        groups.setdefault(row[0], []).append(row)
    return groups.items()
