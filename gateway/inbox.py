"""The gateway's inbox: every in-app message and broadcast a client may still be sent, in one
order, in LMDB. What makes backfill and the live stream meet without a gap or a duplicate.

**One sequence.** The reader (``gateway/reader.py``) consumes ``__inapp`` and ``__broadcast``
and gives each new message the next number of one node-wide sequence: an in-app message is
stored under its user, a broadcast under its tenant, both keyed by that number. A message's
``cursor`` is its number, the same for every recipient (so one encoded broadcast frame serves
them all). A client that reconnects with cursor ``c`` is sent its user's messages and its
tenant's broadcasts numbered above ``c``, merged in number order, then the live stream; a
session sends a message only if its number is above the last one it sent
(``gateway/sessions.py``), so whatever order backfill pages and live pushes reach it in, it
sends each message once and in order.

**Numbers are never reused.** The reader pushes a message before the state store is synced
(a sync per message would cost latency), so after a power cut the last numbers issued may be
lost with their rows. Numbers are reserved in synced blocks (:data:`SEQ_BLOCK`); a node
starts numbering after the last reserved block, so a message indexed again after a power cut
gets a number above every number a client may hold: it is sent again (the same ``id``; at
least once) rather than skipped. A clean stop or a kill -9 loses nothing (LMDB keeps its
pages in the page cache), and then nothing is sent twice.

**Duplicates and retractions.** A delivery redone after a crash is appended to ``__inapp``
again; the reader drops a message whose ``(tenant, user, id)`` is known, and a broadcast
whose event is known. A retraction deletes the event's messages and broadcast and leaves a
tombstone, so a copy still on its way (a delivery in retry, a redo) is dropped when it
arrives: a device that reconnects later never gets it back.

Tables (keys are ``\\0``-joined; numbers are 20-digit decimal so keys sort by number):

- ``gw_items``: ``u tenant user seq`` -> :class:`Item` (in-app), ``b tenant seq`` ->
  :class:`Item` (broadcast, with topic and category for the edge filter);
- ``gw_index``: ``d tenant user id`` -> seq (dedupe, marks; a broadcast's user is empty),
  ``e tenant event_id kind user seq`` -> seq (retraction);
- ``gw_tombs``: ``t tenant event_id`` -> when it was retracted (tombstones);
- ``gw_state``: ``seq`` (the reserved block's end), ``seen tenant user`` -> the highest
  number the user marked seen (where a connect without a cursor starts).

Every method is synchronous (LMDB, short transactions) and called on the event loop, so a
reader's index-and-push and a session's backfill page are each atomic with respect to the
other.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import msgspec

from channels.inapp import InAppMessage
from gateway import frames
from storage.kv import KV, Txn

SEQ_BLOCK: Final = 100_000
BROADCAST_PREFIX: Final = "b:"  # a broadcast's id on the wire: "b:" + event id


class Item(msgspec.Struct, array_like=True, frozen=True):
    """A stored message: its wire id, event, the encoded ``notification`` frame, when it was
    made (for retention) and, for a broadcast, what the edge filter needs."""

    id: str
    event_id: str
    frame: bytes
    ts: int
    topic: str = ""
    category: str | None = None


class Seq(msgspec.Struct, array_like=True):
    value: int


class Stamp(msgspec.Struct, array_like=True):
    at_ms: int


@dataclass(frozen=True, slots=True)
class Indexed:
    """A message the reader stored: push ``frame`` to ``user``'s sessions (``user`` None: a
    broadcast, to the tenant's sessions that the edge filter lets through)."""

    tenant: str
    user: str | None
    seq: int
    frame: bytes
    topic: str
    category: str | None
    event_id: str = ""


@dataclass(frozen=True, slots=True)
class Retracted:
    tenant: str
    user: str | None  # None: a broadcast (every session of the tenant)
    id: str


def _n(seq: int) -> str:
    return f"{seq:020d}"


class StoredEvent(msgspec.Struct, kw_only=True):
    """What the gateway reads of a broadcast event (``broker.events.StoredEvent``)."""

    event_id: str
    tenant: str
    topic: str
    payload: msgspec.Raw
    received_ms: int
    category: str | None = None
    data: msgspec.Raw | None = None


class Inbox:
    """The inbox tables and their rules (see the module docstring)."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self.items = kv.table("gw_items", Item)
        self.index = kv.table("gw_index", Seq)
        self.tombs = kv.table("gw_tombs", Stamp)
        self.state = kv.table("gw_state", Seq)
        row = self.state.get("seq")
        # start after the last reserved block: numbers issued before a crash are never reused
        self._next = row.value if row is not None else 1
        self._reserved = self._next
        self._sweep_after: bytes | None = None

    # ---------------------------------------------------------------- numbering
    @property
    def head(self) -> int:
        """The last number issued (0: none yet)."""
        return self._next - 1

    def needs_reservation(self, count: int) -> bool:
        return self._next + count > self._reserved

    def reserve(self, count: int) -> None:
        """Reserve numbers for at least ``count`` more messages. The caller syncs the state
        store before it pushes any message numbered in the new block."""
        self._reserved = self._next + max(count, SEQ_BLOCK)
        self.state.put("seq", Seq(self._reserved))

    # ------------------------------------------------------------------- writes
    def add(
        self,
        messages: Iterable[InAppMessage | StoredEvent],
    ) -> list[Indexed]:
        """Store new messages (in-app messages and broadcast events, in the order read) in
        one transaction, numbering each; returns the ones to push. Drops duplicates and
        messages of retracted events. The caller has reserved enough numbers."""
        out: list[Indexed] = []
        with self.kv.transaction() as txn:
            for m in messages:
                if isinstance(m, InAppMessage):
                    got = self._add_inapp(txn, m)
                else:
                    got = self._add_broadcast(txn, m)
                if got is not None:
                    out.append(got)
        return out

    def _take(self) -> int:
        seq = self._next
        if seq >= self._reserved:
            raise RuntimeError("inbox numbers not reserved")  # a reader bug, never data
        self._next += 1
        return seq

    def _add_inapp(self, txn: Txn, m: InAppMessage) -> Indexed | None:
        t, u = m.tenant, m.user
        dkey = f"d\0{t}\0{u}\0{m.id}"
        if self.index.get(dkey, txn=txn) is not None:
            return None
        if self.tombs.get(f"t\0{t}\0{m.event_id}", txn=txn) is not None:
            return None
        seq = self._take()
        frame = frames.notification(
            m.id, m.event_id, m.topic, bytes(m.payload), m.ts, frames.format_cursor(seq)
        )
        self.items.put(f"u\0{t}\0{u}\0{_n(seq)}", Item(m.id, m.event_id, frame, m.ts), txn=txn)
        self.index.put(dkey, Seq(seq), txn=txn)
        self.index.put(f"e\0{t}\0{m.event_id}\0u\0{u}\0{_n(seq)}", Seq(seq), txn=txn)
        return Indexed(t, u, seq, frame, m.topic, m.category, m.event_id)

    def _add_broadcast(self, txn: Txn, ev: StoredEvent) -> Indexed | None:
        t = ev.tenant
        dkey = f"d\0{t}\0\0{BROADCAST_PREFIX}{ev.event_id}"
        if self.index.get(dkey, txn=txn) is not None:
            return None
        if self.tombs.get(f"t\0{t}\0{ev.event_id}", txn=txn) is not None:
            return None
        seq = self._take()
        payload = bytes(ev.data) if ev.data is not None else bytes(ev.payload)
        wire_id = BROADCAST_PREFIX + ev.event_id
        frame = frames.notification(
            wire_id, ev.event_id, ev.topic, payload, ev.received_ms, frames.format_cursor(seq)
        )
        item = Item(wire_id, ev.event_id, frame, ev.received_ms, ev.topic, ev.category)
        self.items.put(f"b\0{t}\0{_n(seq)}", item, txn=txn)
        self.index.put(dkey, Seq(seq), txn=txn)
        self.index.put(f"e\0{t}\0{ev.event_id}\0b\0\0{_n(seq)}", Seq(seq), txn=txn)
        return Indexed(t, None, seq, frame, ev.topic, ev.category, ev.event_id)

    def retract(self, tenant: str, event_id: str, now_ms: int) -> list[Retracted]:
        """Remove every message of the event (in-app, of every user, and its broadcast) and
        leave a tombstone so later copies are dropped. Returns what went, for the
        ``retract`` frames. The caller syncs before it answers."""
        gone: list[Retracted] = []
        with self.kv.transaction() as txn:
            self.tombs.put(f"t\0{tenant}\0{event_id}", Stamp(now_ms), txn=txn)
            prefix = f"e\0{tenant}\0{event_id}\0"
            for key, seq in self.index.scan(prefix, txn=txn):
                kind, user, _seq = key.decode()[len(prefix) :].split("\0")
                if kind == "u":
                    item_key = f"u\0{tenant}\0{user}\0{_n(seq.value)}"
                else:
                    item_key = f"b\0{tenant}\0{_n(seq.value)}"
                item = self.items.get(item_key, txn=txn)
                self.index.delete(key, txn=txn)
                if item is None:
                    continue
                self.items.delete(item_key, txn=txn)
                self.index.delete(f"d\0{tenant}\0{user}\0{item.id}", txn=txn)
                gone.append(Retracted(tenant, user if kind == "u" else None, item.id))
        return gone

    # -------------------------------------------------------------------- reads
    def backfill(
        self,
        tenant: str,
        user: str,
        after: int,
        limit: int,
        allows: Callable[[str, str | None], bool],
    ) -> list[tuple[int, bytes]]:
        """Up to ``limit`` messages of the user and broadcasts of the tenant numbered above
        ``after``, in number order, as (number, frame); a broadcast only if ``allows(topic,
        category)`` (the user's preferences at the edge). One page: the caller pages on from
        the last number until a page comes back short."""
        start = _n(after)
        with self.kv.snapshot() as txn:
            mine = self.items.scan(
                f"u\0{tenant}\0{user}\0",
                after=f"u\0{tenant}\0{user}\0{start}",
                limit=limit,
                txn=txn,
            )
            theirs = self.items.scan(
                f"b\0{tenant}\0", after=f"b\0{tenant}\0{start}", limit=limit, txn=txn
            )
            merged = heapq.merge(
                ((int(k[-20:]), it) for k, it in mine),
                ((int(k[-20:]), it) for k, it in theirs),
                key=lambda pair: pair[0],
            )
            out: list[tuple[int, bytes]] = []
            for seq, it in merged:
                if len(out) >= limit:
                    break
                if it.topic and not allows(it.topic, it.category):
                    continue
                out.append((seq, it.frame))
            return out

    def newest_floor(self, tenant: str, user: str, keep: int) -> int:
        """The number below the newest ``keep`` messages and broadcasts of the user (0 if
        there are fewer): where a backfill that would send more than ``keep`` starts."""
        floors: list[int] = []
        with self.kv.snapshot() as txn:
            for prefix in (f"u\0{tenant}\0{user}\0", f"b\0{tenant}\0"):
                keys = self.items.last_keys(prefix, keep + 1, txn=txn)
                floors.extend(int(k[-20:]) for k in keys)
        if len(floors) <= keep:
            return 0
        floors.sort()
        return floors[-keep - 1]

    def lookup(self, tenant: str, user: str, wire_id: str) -> int | None:
        """The number of the user's message (or tenant broadcast) ``wire_id``, None if the
        inbox does not have it."""
        if wire_id.startswith(BROADCAST_PREFIX):
            row = self.index.get(f"d\0{tenant}\0\0{wire_id}")
        else:
            row = self.index.get(f"d\0{tenant}\0{user}\0{wire_id}")
        return row.value if row is not None else None

    def event_of(self, tenant: str, user: str, seq: int) -> str | None:
        item = self.items.get(f"u\0{tenant}\0{user}\0{_n(seq)}")
        return item.event_id if item is not None else None

    def last_seen(self, tenant: str, user: str) -> int:
        row = self.state.get(f"seen\0{tenant}\0{user}")
        return row.value if row is not None else 0

    def mark_seen(self, tenant: str, user: str, seq: int) -> None:
        """The user saw up to ``seq``: a connect without a cursor starts after it."""
        key = f"seen\0{tenant}\0{user}"
        with self.kv.transaction() as txn:
            row = self.state.get(key, txn=txn)
            if row is None or row.value < seq:
                self.state.put(key, Seq(seq), txn=txn)

    # ---------------------------------------------------------------- retention
    def sweep(self, before_ms: int, limit: int = 2000) -> int:
        """Forget messages made before ``before_ms`` (with their index rows) and tombstones
        older than that, reading at most ``limit`` rows per call from where the last call
        stopped. Returns how many rows went."""
        rows = self.items.scan(b"", after=self._sweep_after, limit=limit)
        batch = list(rows)
        self._sweep_after = batch[-1][0] if len(batch) == limit else None
        old = [(k, it) for k, it in batch if it.ts < before_ms]
        tombs = [k for k, s in self.tombs.scan(b"", limit=limit) if s.at_ms < before_ms]
        if not old and not tombs:
            return 0
        with self.kv.transaction() as txn:
            for key, it in old:
                parts = key.decode().split("\0")
                self.items.delete(key, txn=txn)
                if parts[0] == "u":
                    _k, t, u, n = parts
                    self.index.delete(f"d\0{t}\0{u}\0{it.id}", txn=txn)
                    self.index.delete(f"e\0{t}\0{it.event_id}\0u\0{u}\0{n}", txn=txn)
                else:
                    _k, t, n = parts
                    self.index.delete(f"d\0{t}\0\0{it.id}", txn=txn)
                    self.index.delete(f"e\0{t}\0{it.event_id}\0b\0\0{n}", txn=txn)
            self.tombs.delete_many(list(tombs), txn=txn)
        return len(old) + len(tombs)
