"""The gateway's inbox on a real LMDB store, without a node: numbering, duplicates,
retraction, the merged backfill and its bounds, and numbers never reused after a crash."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from channels.inapp import InAppMessage
from gateway.inbox import SEQ_BLOCK, Inbox, StoredEvent
from storage.kv import KV


@pytest.fixture
def kv(tmp_path: Path) -> Iterator[KV]:
    store = KV(tmp_path / "state", map_size=64 << 20)
    try:
        yield store
    finally:
        store.close()


def msg(i: int, user: str = "alice", event: str | None = None, tenant: str = "t") -> InAppMessage:
    return InAppMessage(
        id=f"d{i}",
        tenant=tenant,
        user=user,
        event_id=event or f"e{i}",
        topic="orders",
        ts=1000 + i,
        payload=msgspec.Raw(json.dumps({"i": i}).encode()),
    )


def bcast(i: int, tenant: str = "t", topic: str = "news") -> StoredEvent:
    return StoredEvent(
        event_id=f"b{i}",
        tenant=tenant,
        topic=topic,
        payload=msgspec.Raw(b'{"p":1}'),
        received_ms=2000 + i,
        data=msgspec.Raw(json.dumps({"b": i}).encode()),
    )


def opened(kv: KV) -> Inbox:
    inbox = Inbox(kv)
    inbox.reserve(10)
    return inbox


def everything(topic: str, category: str | None) -> bool:
    return True


def test_messages_are_numbered_in_the_order_read_and_duplicates_dropped(kv: KV) -> None:
    inbox = opened(kv)
    got = inbox.add([msg(1), bcast(1), msg(2), msg(1), bcast(1)])
    assert [(g.user, g.seq) for g in got] == [("alice", 1), (None, 2), ("alice", 3)]
    assert json.loads(got[1].frame)["id"] == "b:b1"
    assert json.loads(got[1].frame)["payload"] == {"b": 1}  # the event's data, if it has one
    assert json.loads(got[0].frame)["cursor"] == "1"
    assert inbox.add([msg(2)]) == []
    assert inbox.head == 3


def test_backfill_merges_the_users_messages_and_the_tenants_broadcasts(kv: KV) -> None:
    inbox = opened(kv)
    inbox.add([msg(1), bcast(1), msg(2, user="bob"), msg(3), bcast(2, tenant="other"), bcast(3)])
    page = inbox.backfill("t", "alice", 0, 10, everything)
    assert [json.loads(f)["id"] for _s, f in page] == ["d1", "b:b1", "d3", "b:b3"]
    assert [s for s, _f in page] == [1, 2, 4, 6]
    after = inbox.backfill("t", "alice", 2, 10, everything)
    assert [s for s, _f in after] == [4, 6]
    assert [s for s, _f in inbox.backfill("t", "alice", 0, 3, everything)] == [1, 2, 4]
    # the edge filter decides each broadcast; messages sent to the user are theirs
    assert [s for s, _f in inbox.backfill("t", "alice", 0, 10, lambda t, c: False)] == [1, 4]


def test_the_floor_keeps_only_the_newest(kv: KV) -> None:
    inbox = opened(kv)
    inbox.add([msg(i) for i in range(1, 6)] + [bcast(1), bcast(2)])
    assert inbox.newest_floor("t", "alice", 10) == 0
    assert inbox.newest_floor("t", "alice", 3) == 4  # newest three: 5, 6, 7
    assert inbox.newest_floor("t", "nobody", 1) == 6  # only broadcasts


def test_retract_removes_every_copy_and_keeps_later_ones_out(kv: KV) -> None:
    inbox = opened(kv)
    inbox.add([msg(1, event="x"), msg(2, user="bob", event="x"), msg(3), bcast(9)])
    gone = inbox.retract("t", "x", now_ms=5)
    assert sorted((g.user, g.id) for g in gone) == [("alice", "d1"), ("bob", "d2")]
    assert [s for s, _f in inbox.backfill("t", "alice", 0, 10, everything)] == [3, 4]
    assert inbox.add([msg(7, event="x"), msg(1, event="x")]) == []  # a redo, a late copy
    assert inbox.lookup("t", "alice", "d1") is None
    (b,) = inbox.retract("t", "b9", now_ms=5)
    assert (b.user, b.id) == (None, "b:b9")
    assert inbox.backfill("t", "carol", 0, 10, everything) == []


def test_numbers_are_never_reused_after_a_crash(kv: KV) -> None:
    inbox = opened(kv)
    inbox.add([msg(1), msg(2)])
    # a crash: whatever was issued since, the next start numbers past the reserved block
    again = Inbox(kv)
    assert again.needs_reservation(1)
    again.reserve(1)
    (m,) = again.add([msg(3)])
    assert m.seq > SEQ_BLOCK


def test_seen_marks_and_lookups(kv: KV) -> None:
    inbox = opened(kv)
    inbox.add([msg(1), bcast(1)])
    assert inbox.lookup("t", "alice", "d1") == 1
    assert inbox.lookup("t", "alice", "b:b1") == 2
    assert inbox.lookup("t", "bob", "d1") is None
    assert inbox.event_of("t", "alice", 1) == "e1"
    assert inbox.last_seen("t", "alice") == 0
    inbox.mark_seen("t", "alice", 2)
    inbox.mark_seen("t", "alice", 1)  # never moves back
    assert inbox.last_seen("t", "alice") == 2


def test_retention_forgets_old_messages_and_tombstones(kv: KV) -> None:
    inbox = opened(kv)
    inbox.add([msg(1), msg(2), bcast(1)])
    inbox.retract("t", "gone", now_ms=1500)
    assert inbox.sweep(before_ms=1002) == 1
    assert [s for s, _f in inbox.backfill("t", "alice", 0, 10, everything)] == [2, 3]
    assert inbox.lookup("t", "alice", "d1") is None
    assert inbox.sweep(before_ms=10_000) == 3  # the rest and the tombstone
    assert inbox.add([msg(1)]) != []  # forgotten ids are new again
