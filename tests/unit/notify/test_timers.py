"""Durable timers and batch windows in LMDB (``notify/timers.py``, ``notify/digests.py``):
due order, replacing a timer by id, the cancellation index, a batch member leaving its window
without touching the others, and a window closed when its last member leaves."""

from __future__ import annotations

from pathlib import Path

from notify.digests import Digests
from notify.model import ParkedEvent, TimerRow
from notify.runs import Park
from notify.timers import TimerStore
from storage.kv import KV


def event(eid: str, key: str | None = None) -> ParkedEvent:
    return ParkedEvent(
        tenant="t", event_id=eid, topic="news", received_ms=0, cancellation_key=key, data=b"{}"
    )


def row(tid: str, due: int, key: str | None = None, user: str = "u1") -> TimerRow:
    return TimerRow(
        timer_id=tid,
        kind="delay",
        due_ms=due,
        user=user,
        run_id=f"run-{tid}",
        event=event(f"e-{tid}", key),
        plan_ref="d:webhook",
        resume_at=1,
        step=0,
        created_ms=0,
    )


def test_timers_come_out_in_due_order_and_only_when_due(tmp_path: Path) -> None:
    kv = KV(tmp_path / "kv")
    store = TimerStore(kv)
    with kv.transaction() as txn:
        for tid, due in (("c", 300), ("a", 100), ("b", 200)):
            store.put(row(tid, due), txn)
    assert store.next_due() == 100
    assert [r.timer_id for r in store.due_rows(250, 10)] == ["a", "b"]
    assert [r.timer_id for r in store.due_rows(1000, 2)] == ["a", "b"]
    with kv.transaction() as txn:
        store.put(row("a", 500), txn)  # re-parked: replaced, not doubled
    assert [r.timer_id for r in store.due_rows(1000, 10)] == ["b", "c", "a"]
    with kv.transaction() as txn:
        for r in store.due_rows(1000, 10):
            store.remove(r, txn)
    assert store.next_due() is None
    kv.close()


def test_the_cancellation_index_finds_a_keys_timers_per_user(tmp_path: Path) -> None:
    kv = KV(tmp_path / "kv")
    store = TimerStore(kv)
    with kv.transaction() as txn:
        store.put(row("a", 100, "k", "u1"), txn)
        store.put(row("b", 100, "k", "u2"), txn)
        store.put(row("c", 100, "other", "u1"), txn)
    assert len(store.cancel_refs("t", "k", None)) == 2
    (only,) = store.cancel_refs("t", "k", "u2")
    assert only[1].ref == b"b"
    with kv.transaction() as txn:
        store.remove(row("a", 100, "k", "u1"), txn)
    assert [r.ref for _k, r in store.cancel_refs("t", "k", None)] == [b"b"]
    # a fired timer that its own run parked again (same id, later): still cancellable
    with kv.transaction() as txn:
        store.put(row("b", 900, "k", "u2"), txn)
        store.remove(row("b", 100, "k", "u2"), txn)
    assert [r.ref for _k, r in store.cancel_refs("t", "k", None)] == [b"b"]
    assert [r.due_ms for r in store.due_rows(1000, 10) if r.timer_id == "b"] == [900]
    kv.close()


def test_a_cancelled_member_leaves_the_window_and_the_others_stay(tmp_path: Path) -> None:
    kv = KV(tmp_path / "kv")
    store = TimerStore(kv)
    digests = Digests(kv, store)
    park = Park("batch", 1000, 1, 0, batch_key="", window_ms=1000, max_items=10)
    with kv.transaction() as txn:
        opened = [
            digests.join(
                txn,
                user="u1",
                run_id=f"r{i}",
                event=event(f"e{i}", f"k{i}"),
                park=park,
                plan_ref="d:webhook",
                now_ms=0,
            )
            for i in range(3)
        ]
        again = digests.join(
            txn,
            user="u1",
            run_id="r1",
            event=event("e1", "k1"),
            park=park,
            plan_ref="d:webhook",
            now_ms=0,
        )
    assert opened == [True, False, False] and again is False
    (window,) = store.due_rows(1000, 10)
    assert window.kind == "batch" and window.batch_slot is not None
    ((ref_key, ref),) = store.cancel_refs("t", "k0", None)  # the member that opened it
    with kv.transaction() as txn:
        assert digests.leave(txn, ref_key, ref)
    found = digests.contents(window.batch_slot)
    assert found is not None
    batch, members = found
    assert [m.event.event_id for m in members] == ["e1", "e2"] and batch.count == 2
    for k in ("k1", "k2"):
        ((ref_key, ref),) = store.cancel_refs("t", k, None)
        with kv.transaction() as txn:
            assert digests.leave(txn, ref_key, ref)
    assert digests.contents(window.batch_slot) is None
    assert store.next_due() is None  # an empty window's timer goes with it
    kv.close()
