"""Event-id idempotency: which ``event_id`` each tenant already published, and where it went.

An event published with an ``event_id`` seen inside the window (24 h by default) is answered
with the original partition and offset instead of being stored twice (``broker/events.py``
decides; this module keeps the index). Three LMDB tables: one keyed by ``tenant \\0
event_id`` for the look-up, one keyed by ``received_ms \\0 tenant \\0 event_id`` so
:meth:`EventIds.sweep` can drop expired ids in key order without scanning the whole store,
and the marks: per ``__events`` partition, the offset below which every id is indexed.
"""

from __future__ import annotations

import msgspec

from storage.kv import KV


class SeenEvent(msgspec.Struct, array_like=True):
    partition: int
    offset: int
    received_ms: int


class _Nothing(msgspec.Struct, array_like=True):
    pass


class _Mark(msgspec.Struct, array_like=True):
    offset: int


class EventIds:
    def __init__(self, kv: KV, window_ms: int) -> None:
        self.window_ms = window_ms
        self._by_id = kv.table("event_ids", SeenEvent)
        self._by_time = kv.table("event_ids_by_time", _Nothing)
        self._marks = kv.table("event_ids_marks", _Mark)

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
        """Remember ``(tenant, event_id, placement)`` rows, each table in one transaction."""
        self._by_id.put_many([(self._key(t, e), seen) for t, e, seen in rows])
        self._by_time.put_many(
            [(f"{seen.received_ms:016d}\x00{t}\x00{e}", _Nothing()) for t, e, seen in rows]
        )

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
        by_id: list[bytes | str] = []
        for key in doomed:
            ms, tenant, event_id = key.decode().split("\x00")
            seen = self._by_id.get(self._key(tenant, event_id))
            # a later publish of the same id (after expiry) has a newer time: keep it
            if seen is not None and seen.received_ms == int(ms):
                by_id.append(self._key(tenant, event_id).encode())
        self._by_id.delete_many(by_id)
        self._by_time.delete_many(list(doomed))
        return len(doomed)
