"""What the engine holds on one user, found for an export and erased for a GDPR erasure
(``GET /users/{id}/export``, ``DELETE /users/{id}``; the registry's rows are
``Registry.export_user`` / ``erase_user``).

The engine's rows of a user, by table (``docs/NOTIFY.md``):

- the feed: ``notify_notes`` / ``notify_feed`` under ``tenant\\0user\\0``, ``notify_unread``;
- delivery statuses: ``notify_status`` keys ``tenant\\0event\\0user\\0channel`` (no per-user
  index: the tenant's rows are scanned, a page at a time), and the status pages
  ``notify_status_pages`` (one row per page of a fan-out, many users each) that name the user:
  the user is taken out of the page, the rest of the page stays;
- parked runs: ``notify_timers_due`` (no per-user index: every timer is scanned, decoding only
  its tenant and user) and their cancellation entries;
- batch windows: ``notify_batches`` under ``tenant\\0user\\0`` with their members, timers and
  cancellation entries;
- dead letters: ``notify_dlq`` under ``tenant\\0channel\\0`` (scanned per channel).

:func:`find` reads them in one read-only snapshot and is meant for a worker thread (the scans
are the bulk of the cost, see the module's costs below); :func:`erase` deletes what was found in
one write transaction on the loop, re-reading each timer so that a run parked again meanwhile
goes too. Not reached (and said so in docs/API.md): the records of the log's topics
(``__events``, ``__deliver.*``, ``__dlq.*``, ``__audit``, retry tiers), which are append-only
and expire with their retention, and deliveries in flight (being sent, held behind a retry,
or audit records not yet indexed), which can record a status for the user after the erasure.

Costs: the scans read every status row of the tenant and every parked timer of the node, in
the worker thread (1.2 s for 200,000 of each on the shared 2-core machine, under load: about
3 s per million rows); the loop only runs the deletes. A per-user index would make this
cheap at the price of one more row per status on the audit indexer's hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import msgspec

from notify.audit import AuditIndex
from notify.digests import Digests
from notify.dlq import DeadLetters
from notify.model import (
    BatchMember,
    DeadLetter,
    Notification,
    OpenBatch,
    StatusPage,
    StatusRow,
    TimerRow,
)
from notify.timers import TimerStore
from storage.kv import KV

PAGE: Final = 10_000


class _WhoEvent(msgspec.Struct):
    tenant: str


class _TimerWho(msgspec.Struct):
    """The part of a :class:`TimerRow` a scan decodes (the rest is skipped)."""

    timer_id: str
    kind: str
    user: str
    event: _WhoEvent


class _PageWho(msgspec.Struct, array_like=True):
    """The part of a :class:`StatusPage` row a scan decodes: its users."""

    status: str
    reason: str | None
    detail: str | None
    attempt: int | None
    updated_ms: int
    topic: str | None
    users: list[str]


class _LetterWho(msgspec.Struct):
    delivery: _DeliveryWho


class _DeliveryWho(msgspec.Struct):
    user: str


_timer_who = msgspec.msgpack.Decoder(_TimerWho).decode
_page_who = msgspec.msgpack.Decoder(_PageWho).decode
_page = msgspec.msgpack.Decoder(StatusPage).decode
_letter_who = msgspec.json.Decoder(_LetterWho).decode
_letter = msgspec.json.Decoder(DeadLetter).decode


@dataclass
class Held:
    """The engine's rows of one user, as found (keys to erase, values to export)."""

    notes: list[tuple[bytes, Notification]] = field(default_factory=list)
    statuses: list[tuple[bytes, StatusRow]] = field(default_factory=list)
    # status pages naming the user: key -> the user's status as the page says it (the key
    # ``tenant\0event\0channel\0status\0first delivery id``, see ``notify.audit``)
    paged: list[tuple[bytes, StatusRow]] = field(default_factory=list)
    timers: list[TimerRow] = field(default_factory=list)
    batches: list[tuple[str, OpenBatch, list[BatchMember]]] = field(default_factory=list)
    dead: list[tuple[bytes, DeadLetter]] = field(default_factory=list)
    feed_keys: int = 0

    def empty(self) -> bool:
        return not (
            self.notes or self.statuses or self.paged or self.timers or self.batches or self.dead
        )


@dataclass(frozen=True, slots=True)
class EngineTables:
    kv: KV
    index: AuditIndex
    timers: TimerStore
    digests: Digests
    dead: DeadLetters
    channels: tuple[str, ...]


def find(t: EngineTables, tenant: str, user: str) -> Held:
    """Every engine row held on ``user`` of ``tenant``. Blocking (scans): run it in a
    thread. Ids are checked by the caller."""
    held = Held()
    upre = f"{tenant}\0{user}\0".encode()
    held.notes = list(t.index.notes.scan(upre))
    held.feed_keys = len(t.index.feed_rows.keys(upre))
    tpre = f"{tenant}\0".encode()
    want = user.encode()
    after: bytes | None = None
    while True:
        page = t.index.statuses.scan_raw(tpre, after=after, limit=PAGE)
        for key, raw in page:
            parts = key.split(b"\0")
            if len(parts) == 4 and parts[2] == want:
                held.statuses.append((key, msgspec.msgpack.decode(raw, type=StatusRow)))
        if len(page) < PAGE:
            break
        after = page[-1][0]
    after = None
    while True:
        page = t.index.status_pages.scan_raw(tpre, after=after, limit=PAGE)
        for key, raw in page:
            if user in _page_who(raw).users:
                sp = _page(raw)
                did = sp.delivery_ids[sp.users.index(user)]
                as_row = StatusRow(
                    status=sp.status,
                    delivery_id=did,
                    reason=sp.reason,
                    detail=sp.detail,
                    updated_ms=sp.updated_ms,
                    topic=sp.topic,
                )
                held.paged.append((key, as_row))
        if len(page) < PAGE:
            break
        after = page[-1][0]
    after = None
    while True:
        page = t.timers.due.scan_raw(b"", after=after, limit=PAGE)
        for key, raw in page:
            who = _timer_who(raw)
            if who.user == user and who.event.tenant == tenant and who.kind != "batch":
                row = t.timers.due.get(key)
                if row is not None:
                    held.timers.append(row)
        if len(page) < PAGE:
            break
        after = page[-1][0]
    for slot_key, batch in t.digests.open.scan(upre):
        members = [m for _k, m in t.digests.members.scan(f"{batch.batch_id}\0".encode())]
        held.batches.append((slot_key.decode(), batch, members))
    for channel in t.channels:
        cpre = f"{tenant}\0{channel}\0".encode()
        after = None
        while True:
            rows = t.dead.index.scan(cpre, after=after, limit=PAGE)
            n = 0
            for key, dead in rows:
                n += 1
                after = key
                if _letter_who(dead.letter).delivery.user == user:
                    held.dead.append((key, _letter(dead.letter)))
            if n < PAGE:
                break
    return held


def erase(t: EngineTables, tenant: str, user: str, held: Held) -> int:
    """Delete what :func:`find` found, in one transaction (the caller syncs). Returns how
    many rows went."""
    upre = f"{tenant}\0{user}\0".encode()
    n = 0
    with t.kv.transaction() as txn:
        n += t.index.notes.delete_prefix(upre, txn=txn)
        n += t.index.feed_rows.delete_prefix(upre, txn=txn)
        n += t.index.unread.delete(f"{tenant}\0{user}", txn=txn)
        n += t.index.statuses.delete_many([k for k, _v in held.statuses], txn=txn)
        for key, _row in held.paged:
            sp = t.index.status_pages.get(key, txn=txn)
            if sp is None or user not in sp.users:
                continue
            keep = [i for i, u in enumerate(sp.users) if u != user]
            if keep:
                sp.users = [sp.users[i] for i in keep]
                sp.delivery_ids = [sp.delivery_ids[i] for i in keep]
                t.index.status_pages.put(key, sp, txn=txn)
            else:
                t.index.status_pages.delete(key, txn=txn)
            n += 1
        for row in held.timers:
            current = t.timers.get(row.timer_id, txn=txn)
            if current is not None:
                t.timers.remove(current, txn)
                n += 1
        for slot, _batch, _members in held.batches:
            found = t.digests.open.get(slot, txn=txn)
            if found is None:
                continue
            members = [
                m for _k, m in t.digests.members.scan(f"{found.batch_id}\0".encode(), txn=txn)
            ]
            t.digests.close(txn, slot, found, members)
            timer = t.timers.get(found.timer_id, txn=txn)
            if timer is not None:
                t.timers.remove(timer, txn)
            n += 1 + len(members)
        n += t.dead.index.delete_many([k for k, _v in held.dead], txn=txn)
    return n
