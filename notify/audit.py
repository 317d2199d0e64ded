"""The audit trail and what is built from it.

Every transition of every (event, user, channel) is an :class:`~notify.model.AuditRecord` in
``__audit`` (keyed by ``tenant\\0event_id``, so one event's records are in order on one
partition), or a page of them (``notify.pages``), except the ``queued`` transition of
deliveries the fan-out wrote as a page: the delivery page in ``__deliver.<channel>`` is that
record. The indexer, group ``notify.audit``, folds them into LMDB:

- ``notify_status``: ``tenant\\0event_id\\0user\\0channel`` -> :class:`StatusRow`: the delivery
  status (one, ordered: a later stage never goes back to an earlier one, except a DLQ replay,
  which queues again), the reason and detail of the deciding rule, cap, window or provider
  answer, and every attempt. What ``GET /events/{id}`` answers (:meth:`AuditIndex.status`).
- ``notify_notes``: ``tenant\\0user\\0run_id`` -> :class:`Notification` (the notification of
  one event for one user, with its engagement set: seen, read, clicked, archived);
  ``notify_feed``: ``tenant\\0user\\0<inverted created time>\\0run_id`` -> run id, the user's
  feed newest first; ``notify_unread``: ``tenant\\0user`` -> how many are not read.

Engagement marks (:meth:`AuditIndex.mark`) are written to LMDB at once (and synced) and also
appended as audit records: ``wait_seen`` reads the mark at its deadline, so it must not wait
for the indexer. Folding is idempotent (a redone batch changes nothing), so the indexer
commits after its writes like every other stage (``notify.stage``: durable in order).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec

from broker.client import ConsumerRecord
from broker.local import LocalClient
from notify import ids
from notify.model import (
    Attempt,
    AuditPage,
    AuditRecord,
    DeliveryPage,
    Notification,
    StatusPage,
    StatusRow,
)
from notify.pages import decode_audit_page, decode_delivery_page, is_page
from notify.stage import Stage
from storage.kv import KV, Txn

log = logging.getLogger("herald.notify.audit")

AUDIT_TOPIC: Final = "__audit"
GROUP: Final = "notify.audit"
ENGAGEMENTS: Final = ("seen", "read", "clicked", "archived")
# delivery statuses by stage: a record of a lower rank never overwrites a higher one
RANK: Final = {
    "queued": 0,
    "deferred": 0,
    "undelivered": 1,
    "sent": 2,
    "delivered": 3,
    "bounced": 3,  # a provider's receipt after it took the message: the carrier did not
    "dead_lettered": 3,
    "suppressed": 3,
    "cancelled": 3,
    "shed": 3,
}
_FAR: Final = 1 << 62
_str_encode = msgspec.msgpack.Encoder().encode  # a FeedRef is [run_id]: b"\x91" + this


# statuses that are attempts ("sent": the provider took it, a receipt to come)
_COUNTED: Final = ("sent", "delivered", "undelivered", "dead_lettered")


class _PageAge(msgspec.Struct, array_like=True):
    """The head of a :class:`StatusPage` row: what the sweep reads of it."""

    status: str
    reason: str | None
    detail: str | None
    attempt: int | None
    updated_ms: int


class Unread(msgspec.Struct, array_like=True):
    count: int


class FeedRef(msgspec.Struct, array_like=True):
    run_id: str


class AuditIndex:
    """The LMDB index behind event status and user feeds (reads are safe anywhere)."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self.statuses = kv.table("notify_status", StatusRow)
        # one row per audit page: tenant\0event_id\0channel\0status\0first delivery id
        self.status_pages = kv.table("notify_status_pages", StatusPage)
        self.notes = kv.table("notify_notes", Notification)
        self.feed_rows = kv.table("notify_feed", FeedRef)
        self.unread = kv.table("notify_unread", Unread)
        # (channel, status) -> transitions folded by this process (``*``: a run-level one or
        # an engagement), for herald_notify_transitions_total; a batch redone after a
        # restart counts again there, as the new process folds it
        self.transitions: dict[tuple[str, str], int] = {}

    # --------------------------------------------------------------------- folding
    def fold_many(self, records: list[AuditRecord | AuditPage]) -> None:
        """Fold a batch of records and pages in one transaction, each row read and written
        once per batch (a delivery's queued and delivered records usually share one).
        Synchronous: no engagement mark can slip between its reads and writes.

        A page (``notify.pages``) is kept as one status row (``notify_status_pages``, merged
        with the per-user rows when read: :meth:`status`); a ``queued`` page also makes
        each of its users' notification, feed entry and unread count, as records would."""
        singles = [r for r in records if isinstance(r, AuditRecord)]
        pages = [r for r in records if isinstance(r, AuditPage)]
        with self.kv.transaction() as txn:
            batch = _Batch(self, txn)
            if singles:
                batch.prefetch(singles)
            if pages:
                batch.prefetch_pages(pages)
            for rec in records:
                if isinstance(rec, AuditPage):
                    self._fold_page(batch, rec)
                else:
                    self._fold(batch, rec)
            batch.write()
        counts = self.transitions
        for rec in records:
            key = (rec.channel or "*", rec.status)
            counts[key] = counts.get(key, 0) + (len(rec.users) if isinstance(rec, AuditPage) else 1)

    def _fold_page(self, b: _Batch, page: AuditPage) -> None:
        if not page.users or RANK.get(page.status) is None:
            return
        key = (
            f"{page.tenant}\0{page.event_id}\0{page.channel}\0{page.status}\0{page.delivery_ids[0]}"
        )
        b.pages.append(
            (
                key,
                StatusPage(
                    status=page.status,
                    reason=page.reason,
                    detail=page.detail,
                    attempt=page.attempt,
                    updated_ms=page.at_ms,
                    topic=page.topic,
                    users=page.users,
                    delivery_ids=page.delivery_ids,
                ),
            )
        )
        if page.status != "queued":
            return
        # the notification, feed entry and unread count of each user not yet holding one
        # (prefetch_pages read which exist): whole-page list operations, values encoded
        # once per page; notifications kept raw (b.page_notes answers lookups by key)
        tenant = page.tenant
        note = Notification(event_id=page.event_id, topic=page.topic or "", created_ms=page.at_ms)
        raw_note = b.index.notes.encode(note)
        inverted = f"\0{_FAR - page.at_ms:019d}\0"
        users, run_ids = page.users, page.run_ids
        ukeys = [f"{tenant}\0{u}" for u in users]
        nkeys = [f"{k}\0{r}" for k, r in zip(ukeys, run_ids, strict=True)]
        made, loaded = b.page_notes, b._loaded_n
        if (
            len(set(nkeys)) == len(nkeys)
            and made.keys().isdisjoint(nkeys)
            and loaded.keys().isdisjoint(nkeys)
            and b.notes.keys().isdisjoint(nkeys)
        ):
            pass
        else:  # a redone batch, or the page of a second channel of the same runs
            fresh: list[int] = []
            seen: set[str] = set()
            for i, k in enumerate(nkeys):
                if k in seen or k in made or k in loaded or b.note(k) is not None:
                    continue
                seen.add(k)
                fresh.append(i)
            if not fresh:
                return
            ukeys = [ukeys[i] for i in fresh]
            nkeys = [nkeys[i] for i in fresh]
            run_ids = [run_ids[i] for i in fresh]
        made.update(dict.fromkeys(nkeys, note))
        b.notes_raw.extend([(k.encode(), raw_note) for k in nkeys])
        enc = _str_encode
        b.feed_raw.extend(
            [
                ((k + inverted + r).encode(), b"\x91" + enc(r))
                for k, r in zip(ukeys, run_ids, strict=True)
            ]
        )
        unread, base = b.unread, b._unread_base
        for k in ukeys:
            n = unread.get(k)
            unread[k] = (base.get(k, 0) if n is None else n) + 1

    def _fold(self, b: _Batch, rec: AuditRecord) -> None:
        if rec.channel is None:
            if rec.status in ENGAGEMENTS:
                self._engage(b, rec.tenant, rec.user, rec.run_id, rec.status, rec.at_ms)
            else:  # a run-level transition (cancelled, a throttle, a delay): channel "*"
                self._status(b, rec, "*")
            return
        self._status(b, rec, rec.channel)
        if rec.status == "queued":
            self._note(b, rec)

    def _status(self, b: _Batch, rec: AuditRecord, channel: str) -> None:
        rank = RANK.get(rec.status)
        if rank is None:
            return
        key = f"{rec.tenant}\0{rec.event_id}\0{rec.user}\0{channel}"
        row = b.status(key)
        attempts = row.attempts if row is not None else []
        counted = rec.status in _COUNTED
        if rec.attempt is not None and counted and not any(a.at_ms == rec.at_ms for a in attempts):
            attempts = [
                *attempts,
                Attempt(
                    at_ms=rec.at_ms,
                    outcome=rec.status,
                    detail=(rec.reason or "") + (f": {rec.detail}" if rec.detail else ""),
                ),
            ]
        replay = rec.status == "queued" and rec.reason == "replay"
        # a bounce (a receipt after the provider took the message) is later than the
        # delivery it takes back, whichever of the two is folded first
        bounced = row is not None and row.status == "bounced" and rec.at_ms < row.updated_ms
        if row is not None and not replay and (RANK.get(row.status, 0) > rank or bounced):
            if len(attempts) != len(row.attempts):
                row.attempts = attempts
                b.statuses[key] = row
            return
        b.statuses[key] = StatusRow(
            status=rec.status,
            delivery_id=rec.delivery_id or (row.delivery_id if row else None),
            reason=rec.reason,
            detail=rec.detail,
            until_ms=rec.until_ms,
            attempts=attempts,
            updated_ms=rec.at_ms,
            topic=rec.topic,
        )

    def _note(self, b: _Batch, rec: AuditRecord) -> None:
        key = f"{rec.tenant}\0{rec.user}\0{rec.run_id}"
        if b.note(key) is not None:
            return
        b.notes[key] = Notification(
            event_id=rec.event_id, topic=rec.topic or "", created_ms=rec.at_ms
        )
        b.feed.append((_feed_key(rec.tenant, rec.user, rec.at_ms, rec.run_id), FeedRef(rec.run_id)))
        ukey = f"{rec.tenant}\0{rec.user}"
        b.unread[ukey] = b.unread_count(ukey) + 1

    def _engage(
        self, b: _Batch, tenant: str, user: str, run_id: str, what: str, at_ms: int
    ) -> bool:
        key = f"{tenant}\0{user}\0{run_id}"
        note = b.note(key)
        if note is None:
            return False
        if what in note.engagement:
            return True
        b.notes[key] = Notification(
            event_id=note.event_id,
            topic=note.topic,
            created_ms=note.created_ms,
            engagement=[*note.engagement, what],
            engaged_ms={**note.engaged_ms, what: at_ms},
        )
        if what == "read":
            ukey = f"{tenant}\0{user}"
            n = b.unread_count(ukey)
            if n > 0:
                b.unread[ukey] = n - 1
        return True

    # ----------------------------------------------------------------------- reads
    def seen(self, tenant: str, user: str, run_id: str) -> bool:
        note = self.notes.get(f"{tenant}\0{user}\0{run_id}")
        return note is not None and "seen" in note.engagement

    def status(self, tenant: str, event_id: str) -> list[dict[str, Any]]:
        """Per recipient and channel: the delivery status and why, every attempt, and the
        recipient's engagement with the notification. Empty for an unknown event (or one
        of another tenant)."""
        out: list[dict[str, Any]] = []
        engaged: dict[str, list[str]] = {}
        for key, row in self.statuses.scan(f"{tenant}\0{event_id}\0".encode()):
            _t, _e, user, channel = key.decode().split("\0")
            if user not in engaged:
                note = self.notes.get(f"{tenant}\0{user}\0{ids.run_id(tenant, event_id, user)}")
                engaged[user] = list(note.engagement) if note else []
            item: dict[str, Any] = {"user": user, "channel": channel}
            item.update(msgspec.to_builtins(row))
            item["engagement"] = engaged[user]
            out.append(item)
        out = self._merge_pages(tenant, event_id, out, engaged)
        # a run-level deferral (a delay, deliver_at) is over once the run reached a channel
        reached = {i["user"] for i in out if i["channel"] != "*"}
        return [
            i
            for i in out
            if not (i["channel"] == "*" and i["status"] == "deferred" and i["user"] in reached)
        ]

    def _merge_pages(
        self,
        tenant: str,
        event_id: str,
        rows: list[dict[str, Any]],
        engaged: dict[str, list[str]],
    ) -> list[dict[str, Any]]:
        """The per-user rows with what the event's status pages say: per (user, channel),
        the page status of the highest rank (the latest of equal rank) wins over a
        per-user row of a lower rank, or of an equal rank and older."""
        best: dict[tuple[str, str], tuple[int, int, StatusPage, str]] = {}
        for key, page in self.status_pages.scan(f"{tenant}\0{event_id}\0".encode()):
            channel = key.split(b"\0")[2].decode()
            rank = RANK[page.status]
            for user, did in zip(page.users, page.delivery_ids, strict=True):
                seen = best.get((user, channel))
                if seen is None or (rank, page.updated_ms) > seen[:2]:
                    best[(user, channel)] = (rank, page.updated_ms, page, did)
        if not best:
            return rows
        by_key = {(i["user"], i["channel"]): i for i in rows}
        for (user, channel), (rank, at, page, did) in best.items():
            item = by_key.get((user, channel))
            if item is not None and (RANK.get(item["status"], 0), item["updated_ms"]) >= (
                rank,
                at,
            ):
                continue
            attempts = list(item.get("attempts", ())) if item is not None else []
            if page.attempt is not None and page.status in _COUNTED:
                attempts.append(
                    msgspec.to_builtins(
                        Attempt(
                            at_ms=at,
                            outcome=page.status,
                            detail=(page.reason or "")
                            + (f": {page.detail}" if page.detail else ""),
                        )
                    )
                )
            if user not in engaged:
                note = self.notes.get(f"{tenant}\0{user}\0{ids.run_id(tenant, event_id, user)}")
                engaged[user] = list(note.engagement) if note else []
            merged: dict[str, Any] = {"user": user, "channel": channel}
            merged.update(
                msgspec.to_builtins(
                    StatusRow(
                        status=page.status,
                        delivery_id=did,
                        reason=page.reason,
                        detail=page.detail,
                        attempts=[],
                        updated_ms=at,
                        topic=page.topic,
                    )
                )
            )
            if attempts:  # as a per-user row says it: no key when there is none
                merged["attempts"] = attempts
            merged["engagement"] = engaged[user]
            by_key[(user, channel)] = merged
        return [by_key[k] for k in sorted(by_key)]

    def feed(
        self, tenant: str, user: str, *, before: str | None = None, limit: int = 50
    ) -> dict[str, Any]:
        """The user's notifications, newest first, from the cursor ``before`` (the
        ``cursor`` of the last item of the previous page), with the unread count."""
        prefix = f"{tenant}\0{user}\0".encode()
        after = prefix + before.encode() if before else None
        items = []
        for key, ref in self.feed_rows.scan(prefix, after=after, limit=min(limit, 500)):
            note = self.notes.get(f"{tenant}\0{user}\0{ref.run_id}")
            if note is None:
                continue
            items.append(
                {
                    "id": ref.run_id,
                    "cursor": key[len(prefix) :].decode(),
                    "event_id": note.event_id,
                    "topic": note.topic,
                    "created_ms": note.created_ms,
                    "seen": "seen" in note.engagement,
                    "read": "read" in note.engagement,
                    "archived": "archived" in note.engagement,
                    "engagement": list(note.engagement),
                }
            )
        n = self.unread.get(f"{tenant}\0{user}")
        return {"items": items, "unread": n.count if n else 0}

    def sweep(self, before_ms: int, cursors: dict[str, bytes | None], limit: int = 2000) -> int:
        """Delete status rows last changed before ``before_ms`` and notifications created
        before it (feed entry and unread count with them), reading at most ``limit`` rows of
        each table from ``cursors`` (updated in place; None: from the start). Returns how
        many rows went."""
        gone = 0
        pages = self.status_pages.scan_raw(b"", after=cursors.get("pages"), limit=limit)
        cursors["pages"] = pages[-1][0] if pages else None
        decode = msgspec.msgpack.Decoder(_PageAge).decode
        old_p: list[bytes | str] = [k for k, v in pages if decode(v).updated_ms < before_ms]
        if old_p:
            gone += self.status_pages.delete_many(old_p)
        rows = list(self.statuses.scan(b"", after=cursors["status"], limit=limit))
        cursors["status"] = rows[-1][0] if rows else None
        old_s: list[bytes | str] = [k for k, v in rows if v.updated_ms < before_ms]
        notes = list(self.notes.scan(b"", after=cursors["notes"], limit=limit))
        cursors["notes"] = notes[-1][0] if notes else None
        old_n = [(k, v) for k, v in notes if v.created_ms < before_ms]
        if not old_s and not old_n:
            return 0
        with self.kv.transaction() as txn:
            if old_s:
                gone += self.statuses.delete_many(old_s, txn=txn)
            for key, note in old_n:
                tenant, user, run_id = key.decode().split("\0")
                self.notes.delete(key, txn=txn)
                self.feed_rows.delete(_feed_key(tenant, user, note.created_ms, run_id), txn=txn)
                if "read" not in note.engagement:
                    ukey = f"{tenant}\0{user}"
                    n = self.unread.get(ukey, txn=txn)
                    if n is not None and n.count > 1:
                        self.unread.put(ukey, Unread(n.count - 1), txn=txn)
                    elif n is not None:
                        self.unread.delete(ukey, txn=txn)
                gone += 1
        return gone

    def mark(self, tenant: str, user: str, notification_id: str, what: str, at_ms: int) -> bool:
        """Record an engagement (seen, read, clicked, archived) now. Returns False for an
        unknown notification. The caller syncs and appends the audit record."""
        if what not in ENGAGEMENTS:
            raise ValueError(f"engagement must be one of {', '.join(ENGAGEMENTS)}")
        with self.kv.transaction() as txn:
            b = _Batch(self, txn)
            if what == "read":
                self._engage(b, tenant, user, notification_id, "seen", at_ms)
            found = self._engage(b, tenant, user, notification_id, what, at_ms)
            b.write()
            return found


class _Batch:
    """Rows of one fold, read once and written once at the end."""

    def __init__(self, index: AuditIndex, txn: Txn) -> None:
        self.index = index
        self.txn = txn
        self.statuses: dict[str, StatusRow] = {}
        self.notes: dict[str, Notification] = {}
        self.unread: dict[str, int] = {}
        self.feed: list[tuple[bytes | str, FeedRef]] = []
        self.feed_raw: list[tuple[bytes, bytes]] = []  # encoded FeedRefs, from pages
        self.notes_raw: list[tuple[bytes, bytes]] = []  # encoded notifications, from pages
        self.page_notes: dict[str, Notification] = {}  # what notes_raw holds, by key
        self.pages: list[tuple[bytes | str, StatusPage]] = []
        self._missing: set[str] = set()
        self._unread_base: dict[str, int] = {}
        self._loaded_s: dict[str, StatusRow] = {}
        self._loaded_n: dict[str, Notification] = {}

    def prefetch(self, records: list[AuditRecord]) -> None:
        """Read every row the batch will touch, one read per table."""
        skeys: list[bytes | str] = []
        nkeys: list[bytes | str] = []
        ukeys: list[bytes | str] = []
        for r in records:
            channel = r.channel if r.channel is not None else "*"
            skeys.append(f"{r.tenant}\0{r.event_id}\0{r.user}\0{channel}")
            nkeys.append(f"{r.tenant}\0{r.user}\0{r.run_id}")
            ukeys.append(f"{r.tenant}\0{r.user}")
        ix, txn = self.index, self.txn
        for keys, table, into in (
            (skeys, ix.statuses, self._loaded_s),
            (nkeys, ix.notes, self._loaded_n),
        ):
            wanted = list(dict.fromkeys(keys))
            for key, row in zip(wanted, table.get_many(wanted, txn=txn), strict=True):
                assert isinstance(key, str)
                if row is None:
                    self._missing.add(key)
                else:
                    into[key] = row  # type: ignore[assignment]
        wanted = list(dict.fromkeys(ukeys))
        for key, urow in zip(wanted, ix.unread.get_many(wanted, txn=txn), strict=True):
            assert isinstance(key, str)
            self._unread_base[key] = urow.count if urow is not None else 0

    def prefetch_pages(self, pages: list[AuditPage]) -> None:
        """Read the notifications and unread counts the ``queued`` pages touch, each table
        by one C call (LMDB's ``getmulti``), decoding only what exists: which
        notifications exist (only a redone batch finds any) and the users' unread counts."""
        nkeys: list[bytes] = []
        ukeys: list[bytes] = []
        for pg in pages:
            if pg.status != "queued":
                continue
            t = pg.tenant
            ukeys.extend([f"{t}\0{u}".encode() for u in pg.users])
            nkeys.extend(
                [f"{t}\0{u}\0{r}".encode() for u, r in zip(pg.users, pg.run_ids, strict=True)]
            )
        if not nkeys:
            return
        ix, txn = self.index, self.txn
        dec_n = msgspec.msgpack.Decoder(Notification).decode
        for k, raw in ix.notes.found_raw(nkeys, txn=txn).items():
            self._loaded_n[k.decode()] = dec_n(raw)
        dec_u = msgspec.msgpack.Decoder(Unread).decode
        base = self._unread_base
        for k, raw in ix.unread.found_raw(ukeys, txn=txn).items():
            key = k.decode()
            if key not in base:
                base[key] = dec_u(raw).count

    def status(self, key: str) -> StatusRow | None:
        row = self.statuses.get(key) or self._loaded_s.get(key)
        if row is None and key not in self._missing:
            row = self.index.statuses.get(key, txn=self.txn)
            if row is None:
                self._missing.add(key)
        return row

    def note(self, key: str) -> Notification | None:
        note = self.notes.get(key) or self.page_notes.get(key) or self._loaded_n.get(key)
        if note is None and key not in self._missing:
            note = self.index.notes.get(key, txn=self.txn)
            if note is None:
                self._missing.add(key)
        return note

    def unread_count(self, key: str) -> int:
        n = self.unread.get(key)
        if n is None:
            n = self._unread_base.get(key)
        if n is None:
            row = self.index.unread.get(key, txn=self.txn)
            n = row.count if row is not None else 0
        return n

    def write(self) -> None:
        ix, txn = self.index, self.txn
        if self.statuses:
            ix.statuses.put_many(list(self.statuses.items()), txn=txn)
        # rows in key order: a page of one __deliver partition holds users from all over
        # the key range, and LMDB walks from the last key to a near one cheaper
        if self.notes_raw:  # first: a single record's change to one of them wins
            self.notes_raw.sort()
            ix.notes.put_raw_many(self.notes_raw, txn=txn)
        if self.notes:
            ix.notes.put_many(list(self.notes.items()), txn=txn)
        if self.pages:
            ix.status_pages.put_many(self.pages, txn=txn)
        if self.feed:
            ix.feed_rows.put_many(self.feed, txn=txn)
        if self.feed_raw:
            self.feed_raw.sort()
            ix.feed_rows.put_raw_many(self.feed_raw, txn=txn)
        if self.unread:
            counts: dict[int, bytes] = {}
            enc_u = ix.unread.encode
            rows = []
            for k, n in self.unread.items():
                raw_n = counts.get(n)
                if raw_n is None:
                    raw_n = counts[n] = enc_u(Unread(n))
                rows.append((k.encode(), raw_n))
            rows.sort()
            ix.unread.put_raw_many(rows, txn=txn)


def _feed_key(tenant: str, user: str, created_ms: int, run_id: str) -> bytes:
    return f"{tenant}\0{user}\0{feed_cursor(created_ms, run_id)}".encode()


def feed_cursor(created_ms: int, run_id: str) -> str:
    """The feed cursor of a notification (what :meth:`AuditIndex.feed` takes as
    ``before``): inverted creation time, so the newest sorts first."""
    return f"{_FAR - created_ms:019d}\0{run_id}"


class AuditIndexer(Stage):
    """Folds ``__audit`` into the index (group ``notify.audit``), and the ``queued``
    transition of every delivery page of ``__deliver.<channel>`` (``deliver_topics``): the
    fan-out appends a page of deliveries and nothing else for them, so the page is the
    record of their being queued (the same fields, durable in the same append a ``queued``
    audit page was, before the fan-out's commit; :func:`queued_page`). Single deliveries
    (retries, replays, digests) keep their own ``queued`` audit record where they have one,
    and are not read here. The page and the worker's ``delivered`` may be folded in either
    order: statuses go by rank, and only ``queued`` makes the notification.

    Nobody waits on it but status and feed readers, so it lingers ``linger_s`` (50 ms) after
    a batch of fewer than ``TRICKLE`` transitions: when events trickle in, one batch per
    linger rather than one per event (the index lags by that much more; ``wait_seen`` reads
    marks written at once, not through the indexer). A burst (pages of many users) is folded
    at once.

    A batch is folded in slices of whole events (up to ``SLICE_ROWS_SOFT`` transitions of
    small events, or one event's up to ``SLICE_ROWS``), one transaction each, with a loop
    turn between them, so that no request waits behind a whole batch (a batch can hold
    several fan-outs, or a second's worth of small events). A slice of ``TRICKLE``
    transitions or more (it holds a fan-out's pages: slices of small events end at
    ``SLICE_ROWS_SOFT``) also gives way to deliveries: while ``deliveries_waiting()`` says
    the fan-out or a delivery worker has work in hand or records to fetch, it waits (the
    folding of a 10,000-user fan-out was over half the loop's time while its deliveries
    were still being made). A slice of small events (~5 ms of folding) is folded at once:
    under a steady load the workers always have work in hand, and deferring small events
    only gathered them into one catch-up a second that held the loop for ~100 ms (ingest ->
    webhook p99 at 1,000 events/s 102-111 ms with it, 40-75 ms without). The wait is
    bounded: once the index has been behind for ``max_lag_ms`` (since it last held
    everything in its topics), it folds without giving way until it has caught up: under a
    load the node keeps up with, it lags by about ``max_lag_ms`` plus the time to fold what
    came meanwhile; past that load it shares the loop with the deliveries as if it never
    gave way (and lags, as they do). :meth:`lag_s` says how far behind it is
    (``herald_notify_audit_lag_seconds``). Deferring changes only when the index shows a
    transition, never what it shows: ``__audit`` and the delivery pages hold every
    transition (appended with acks=all before the batch that made it commits) and the
    indexer's offsets commit after its folds."""

    linger_s = 0.05
    TRICKLE: Final = 500
    # transitions folded per LMDB transaction before the loop gets a turn (:func:`fold_slices`).
    # A slice holds whole events: the queued pages of one event come one per partition of
    # __deliver (each a random eighth of its users), and a slice smaller than the event's
    # audience writes the same LMDB pages (notes, feed, unread of neighbouring users) once
    # per slice: at 1,000 a 10,000-user fan-out cost ~40% more CPU per delivery. Small
    # events end a slice at SLICE_ROWS_SOFT (~5 ms of work): folded 10,000 at a time, the
    # second of single-user events a node at 1,000 events/s had deferred held its loop for
    # 30-90 ms once a second, the webhook latency's p99.
    SLICE_ROWS: Final = 10_000
    SLICE_ROWS_SOFT: Final = 200
    # how often a deferred batch looks again whether the deliveries are done
    defer_poll_s: Final = 0.002

    def __init__(
        self,
        client: LocalClient,
        kv: KV,
        index: AuditIndex,
        *,
        max_batch_bytes: int,
        retention_ms: int,
        clock: Callable[[], int],
        deliver_topics: Sequence[str] = (),
        stopping: Callable[[], bool] = lambda: False,
        deliveries_waiting: Callable[[], bool] = lambda: False,
        max_lag_ms: int = 1000,
        log_end: Callable[[str, int], int] | None = None,
    ) -> None:
        super().__init__(
            client,
            kv,
            group=GROUP,
            topics=[AUDIT_TOPIC, *deliver_topics],
            batch=5000,
            max_batch_bytes=max_batch_bytes,
            stopping=stopping,
        )
        self.name = "notify-audit"
        self.index = index
        self.retention_ms = retention_ms
        self.clock = clock
        self.deliveries_waiting = deliveries_waiting
        self.max_lag_s = max_lag_ms / 1000
        self.log_end = log_end
        self._decode = msgspec.msgpack.Decoder(AuditRecord).decode
        self._after: dict[str, bytes | None] = {"status": None, "notes": None}
        self.folded = 0
        self.forgotten = 0
        self.deferred_s = 0.0  # time batches waited for the deliveries, all told
        self._last = 0  # transitions in the last batch
        # when the index was last seen to hold every transition of its topics (monotonic), and
        # whether nothing has been fetched since: any transition not folded yet was appended
        # after ``_current_at``
        self._current_at = time.monotonic()
        self._current = True
        self._catching_up = False  # behind for max_lag_ms: fold without giving way

    def lag_s(self) -> float:
        """How far behind the index may be: 0 while it holds every transition appended so
        far, else the time since it was last seen to (an upper bound on the age of the
        oldest transition not folded yet)."""
        if self._current and self._behind() == 0:
            self._current_at = time.monotonic()
            return 0.0
        return time.monotonic() - self._current_at

    async def idle(self) -> None:
        """Forget what is older than ``audit-retention-ms`` (statuses by their last change,
        notifications by their creation, with their feed entries), a slice at a time."""
        self._caught_up()
        self.forgotten += self.index.sweep(self.clock() - self.retention_ms, self._after)

    async def handle(self, recs: list[ConsumerRecord]) -> None:
        self._current = False  # behind since _current_at, at most
        records: list[AuditRecord | AuditPage] = []
        for rec in recs:
            try:
                if rec.topic != AUDIT_TOPIC:  # __deliver.<channel>: a page is queued
                    if is_page(rec.value):
                        records.append(queued_page(decode_delivery_page(rec.value)))
                elif is_page(rec.value):
                    records.append(decode_audit_page(rec.value))
                else:
                    records.append(self._decode(rec.value))
            except msgspec.DecodeError:
                log.error(
                    "event=audit_bad_record partition=%d offset=%d", rec.partition, rec.offset
                )
        # folded a slice at a time, the loop free between slices: a batch of pages is tens
        # of thousands of transitions (tens of ms to fold), which nothing else on the loop
        # (requests, the deliveries the index gives way to) should wait behind
        self._last = 0
        slices = fold_slices(records, self.SLICE_ROWS_SOFT, self.SLICE_ROWS)
        # a slice holding a fan-out's transitions gives way to the deliveries first; a
        # slice of small events is folded at once (see the class's docstring)
        for i, (part, rows) in enumerate(slices):
            if rows >= self.TRICKLE:
                await self._give_way()
            self.index.fold_many(part)
            self._last += rows  # transitions folded: a page counts its rows
            self.folded += rows
            if i < len(slices) - 1:
                await asyncio.sleep(0)
        if self._behind() == 0:
            self._caught_up()

    async def _give_way(self) -> None:
        """Wait while deliveries are being made, unless the index has been behind for
        ``max_lag_ms`` (then it catches up first) or the stage is stopping."""
        if self._catching_up or self.max_lag_s <= 0:
            return
        waited = time.monotonic()
        while self.deliveries_waiting() and not (self._stop or self.stopping_node()):
            if time.monotonic() - self._current_at >= self.max_lag_s:
                self._catching_up = True
                log.info("event=audit_catching_up lag_s=%.3f", self.lag_s())
                break
            await asyncio.sleep(self.defer_poll_s)
        self.deferred_s += time.monotonic() - waited

    def _behind(self) -> int:
        """Records of its topics past this member's positions (1 without ``log_end``:
        then only an empty fetch says the index is current)."""
        consumer, log_end = self.consumer, self.log_end
        if consumer is None or log_end is None:
            return 1
        behind = 0
        for t, p in consumer.assignment:
            pos = consumer.positions.get((t, p))
            if pos is not None:
                behind += max(0, log_end(t, p) - pos)
        return behind

    def _caught_up(self) -> None:
        self._current = True
        self._current_at = time.monotonic()
        self._catching_up = False

    def trickle(self, recs: list[ConsumerRecord]) -> bool:
        return self._last < self.TRICKLE


def fold_slices(
    records: Sequence[AuditRecord | AuditPage], soft_rows: int, max_rows: int
) -> list[tuple[list[AuditRecord | AuditPage], int]]:
    """``records`` grouped by event (stably: one event's records keep their order; the index
    does not depend on the order between events) and cut into slices, each with its count of
    transitions (a page counts its users): a slice ends at the first event boundary at or past
    ``soft_rows`` transitions, or anywhere at ``max_rows``. So one event's pages (one per
    partition of ``__deliver``, apart in a fetch) fold together, and a batch of many small
    events is folded a few ms at a time."""
    by_event: dict[tuple[str, str], list[AuditRecord | AuditPage]] = {}
    for r in records:
        by_event.setdefault((r.tenant, r.event_id), []).append(r)
    slices: list[tuple[list[AuditRecord | AuditPage], int]] = []
    part: list[AuditRecord | AuditPage] = []
    rows = 0
    for group in by_event.values():
        if rows >= soft_rows:
            slices.append((part, rows))
            part, rows = [], 0
        for r in group:
            part.append(r)
            rows += len(r.users) if isinstance(r, AuditPage) else 1
            if rows >= max_rows:
                slices.append((part, rows))
                part, rows = [], 0
    if part:
        slices.append((part, rows))
    return slices


def queued_page(page: DeliveryPage) -> AuditPage:
    """The ``queued`` transition of a page of deliveries: the audit page the fan-out used to
    append beside it (one per event and channel then, one per partition now: the index
    keeps a status page per first delivery id and merges them when read)."""
    return AuditPage(
        tenant=page.tenant,
        event_id=page.event_id,
        topic=page.topic,
        channel=page.channel,
        status="queued",
        reason=None,
        detail=None,
        attempt=None,
        at_ms=page.created_ms,
        users=page.users,
        run_ids=page.run_ids,
        delivery_ids=page.delivery_ids,
    )
