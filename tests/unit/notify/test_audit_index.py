"""The audit index (``notify/audit.py``): statuses only move forward (a replay queues again),
attempts accumulate, the feed is newest first with an unread count, marks are idempotent,
and the retention sweep forgets old rows with their feed entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from notify import ids
from notify.audit import AuditIndex, fold_slices, queued_page
from notify.model import AuditPage, AuditRecord, DeliveryPage
from storage.kv import KV


def rec(status: str, at: int, *, user: str = "u1", event: str = "e1", **kw: Any) -> AuditRecord:
    return AuditRecord(
        tenant="t",
        event_id=event,
        user=user,
        run_id=ids.run_id("t", event, user),
        channel=kw.pop("channel", "webhook"),
        status=status,
        at_ms=at,
        topic="news",
        **kw,
    )


def test_statuses_move_forward_and_a_replay_queues_again(tmp_path: Path) -> None:
    kv = KV(tmp_path / "kv")
    ix = AuditIndex(kv)
    ix.fold_many([rec("queued", 1), rec("undelivered", 2, attempt=1, reason="http_503")])
    ix.fold_many([rec("delivered", 3, attempt=2), rec("queued", 4)])  # a late, older record
    (row,) = ix.status("t", "e1")
    assert row["status"] == "delivered"
    assert [a["outcome"] for a in row["attempts"]] == ["undelivered", "delivered"]
    ix.fold_many([rec("dead_lettered", 5, attempt=3), rec("queued", 6, reason="replay")])
    assert ix.status("t", "e1")[0]["status"] == "queued"
    assert ix.status("other-tenant", "e1") == []
    kv.close()


def test_the_feed_is_newest_first_with_unread_counts_and_idempotent_marks(tmp_path: Path) -> None:
    kv = KV(tmp_path / "kv")
    ix = AuditIndex(kv)
    ix.fold_many([rec("queued", t, event=f"e{t}") for t in (10, 20, 30)])
    ix.fold_many([rec("queued", 10, event="e10")])  # a redone batch: nothing new
    feed = ix.feed("t", "u1")
    assert [i["event_id"] for i in feed["items"]] == ["e30", "e20", "e10"]
    assert feed["unread"] == 3
    first = feed["items"][0]["id"]
    assert ix.mark("t", "u1", first, "read", 40) and ix.mark("t", "u1", first, "read", 41)
    feed = ix.feed("t", "u1")
    assert feed["unread"] == 2 and feed["items"][0]["seen"] and feed["items"][0]["read"]
    page = ix.feed("t", "u1", before=feed["items"][0]["cursor"], limit=1)
    assert [i["event_id"] for i in page["items"]] == ["e20"]
    assert not ix.mark("t", "u1", "no-such-notification", "seen", 42)
    kv.close()


def test_the_retention_sweep_forgets_old_rows_and_their_feed_entries(tmp_path: Path) -> None:
    kv = KV(tmp_path / "kv")
    ix = AuditIndex(kv)
    ix.fold_many([rec("queued", t, event=f"e{t}") for t in (10, 20, 30)])
    cursors: dict[str, bytes | None] = {"status": None, "notes": None}
    gone = ix.sweep(25, cursors)
    assert gone == 4  # two statuses, two notifications
    feed = ix.feed("t", "u1")
    assert [i["event_id"] for i in feed["items"]] == ["e30"] and feed["unread"] == 1
    assert ix.status("t", "e10") == [] and len(ix.status("t", "e30")) == 1
    kv.close()


def page(status: str, at: int, users: list[str], *, event: str = "e1", **kw: Any) -> AuditPage:
    run_ids = [ids.run_id("t", event, u) for u in users]
    return AuditPage(
        tenant="t",
        event_id=event,
        topic="news",
        channel=kw.pop("channel", "webhook"),
        status=status,
        reason=kw.pop("reason", None),
        detail=kw.pop("detail", None),
        attempt=kw.pop("attempt", None),
        at_ms=at,
        users=users,
        run_ids=run_ids,
        delivery_ids=[ids.delivery_id(r, "webhook", 0) for r in run_ids],
    )


def test_pages_fold_as_the_records_they_stand_for(tmp_path: Path) -> None:
    kv = KV(tmp_path / "kv")
    ix = AuditIndex(kv)
    users = ["u1", "u2", "u3"]
    ix.fold_many([page("queued", 10, users)])
    ix.fold_many([page("queued", 10, users)])  # a redone batch: nothing new
    ix.fold_many([page("delivered", 20, ["u1", "u2"], attempt=1, detail="204")])
    # u3's delivery went the single way: a retry, then dead
    ix.fold_many(
        [
            rec("undelivered", 15, user="u3", attempt=1, reason="http_503"),
            rec("dead_lettered", 30, user="u3", attempt=2, reason="http_410"),
        ]
    )
    rows = {r["user"]: r for r in ix.status("t", "e1")}
    assert [rows[u]["status"] for u in users] == ["delivered", "delivered", "dead_lettered"]
    assert rows["u1"]["attempts"] == [{"at_ms": 20, "outcome": "delivered", "detail": ": 204"}]
    assert rows["u1"]["delivery_id"] == ids.delivery_id(ids.run_id("t", "e1", "u1"), "webhook", 0)
    assert [a["outcome"] for a in rows["u3"]["attempts"]] == ["undelivered", "dead_lettered"]
    for user in users:  # one notification each, unread, in the feed
        feed = ix.feed("t", user)
        assert [i["event_id"] for i in feed["items"]] == ["e1"] and feed["unread"] == 1
    assert ix.mark("t", "u1", ids.run_id("t", "e1", "u1"), "read", 40)
    assert ix.feed("t", "u1")["unread"] == 0
    assert rows["u1"]["engagement"] == [] and "read" in ix.status("t", "e1")[0]["engagement"]
    # a later single record of a higher rank wins over a page's status, a lower one does not
    ix.fold_many([rec("suppressed", 50, user="u2", reason="legal_opt_out")])
    ix.fold_many([rec("queued", 60, user="u1")])
    rows = {r["user"]: r for r in ix.status("t", "e1")}
    assert rows["u1"]["status"] == "delivered" and rows["u2"]["status"] == "suppressed"
    # the retention sweep forgets page rows by their last change
    cursors: dict[str, bytes | None] = {"status": None, "notes": None}
    ix.sweep(25, cursors)
    assert {r["user"]: r["status"] for r in ix.status("t", "e1")} == {
        "u1": "queued",
        "u2": "suppressed",
        "u3": "dead_lettered",
    }
    kv.close()


def test_a_delivery_page_is_its_deliveries_queued_transition_in_either_order(
    tmp_path: Path,
) -> None:
    """The fan-out appends a page of deliveries per partition and no ``queued`` audit page:
    the indexer folds each delivery page as one (``queued_page``). The worker's ``delivered``
    page may be folded first (another topic): the status stays delivered and the page still
    makes each user's notification, feed entry and unread count, once."""
    kv = KV(tmp_path / "kv")
    ix = AuditIndex(kv)

    def deliveries(users: list[str]) -> DeliveryPage:
        run_ids = [ids.run_id("t", "e1", u) for u in users]
        return DeliveryPage(
            tenant="t",
            event_id="e1",
            topic="news",
            channel="webhook",
            priority="normal",
            category=None,
            data=b"{}",
            created_ms=10,
            strict_order=False,
            users=users,
            run_ids=run_ids,
            delivery_ids=[ids.delivery_id(r, "webhook", 0) for r in run_ids],
            steps=[0] * len(users),
        )

    ix.fold_many([page("delivered", 20, ["u1"], attempt=1)])  # before its queued page
    ix.fold_many([queued_page(deliveries(["u1", "u3"])), queued_page(deliveries(["u2"]))])
    ix.fold_many([queued_page(deliveries(["u2"]))])  # a redone batch: nothing new
    rows = {r["user"]: r for r in ix.status("t", "e1")}
    assert {u: r["status"] for u, r in rows.items()} == {
        "u1": "delivered",
        "u2": "queued",
        "u3": "queued",
    }
    assert rows["u2"]["delivery_id"] == ids.delivery_id(ids.run_id("t", "e1", "u2"), "webhook", 0)
    for user in ("u1", "u2", "u3"):
        feed = ix.feed("t", user)
        assert [i["event_id"] for i in feed["items"]] == ["e1"] and feed["unread"] == 1
    kv.close()


def fanout_page(event: str, users: int, at: int = 1) -> AuditPage:
    return page("queued", at, [f"u{i}" for i in range(users)], event=event)


def test_fold_slices_keep_events_whole_and_small_events_in_small_slices() -> None:
    # one fan-out's pages come one per partition, apart in a fetch: they fold in one slice
    fetched: list[AuditRecord | AuditPage] = [
        fanout_page("big", 300),
        rec("delivered", 2, event="a"),
        fanout_page("big", 300),
    ]
    fetched += [fanout_page("big", 300), rec("delivered", 3, event="b")]
    slices = fold_slices(fetched, soft_rows=200, max_rows=10_000)
    assert [(len(part), rows) for part, rows in slices] == [(3, 900), (2, 2)]
    assert [r.event_id for r in slices[0][0]] == ["big"] * 3
    assert [r.event_id for r in slices[1][0]] == ["a", "b"]
    # a second of single-user events: slices of soft_rows, each event's records in order
    many = [rec(s, t, event=f"e{i}") for i in range(500) for s, t in (("queued", 1),)]
    many += [rec("delivered", 2, event=f"e{i}") for i in range(500)]
    slices = fold_slices(many, soft_rows=200, max_rows=10_000)
    assert [rows for _, rows in slices] == [200, 200, 200, 200, 200]
    for part, _ in slices:
        statuses: dict[str, list[str]] = {}
        for r in part:
            statuses.setdefault(r.event_id, []).append(r.status)
        assert all(s == ["queued", "delivered"] for s in statuses.values())
    assert sum(len(p) for p, _ in slices) == len(many)
    # one event larger than max_rows is cut inside it
    huge = [fanout_page("h", 4000) for _ in range(5)]
    assert [rows for _, rows in fold_slices(huge, 200, 10_000)] == [12_000, 8_000]


def test_folding_in_slices_gives_the_index_folding_it_whole_gives(tmp_path: Path) -> None:
    fetched: list[AuditRecord | AuditPage] = []
    for i in range(300):
        fetched += [rec("queued", 1, event=f"e{i}", user=f"u{i % 7}")]
    fetched += [fanout_page("big", 50, at=5), fanout_page("big", 50, at=5)]
    for i in range(300):
        fetched += [rec("delivered", 2, event=f"e{i}", user=f"u{i % 7}", attempt=1)]
    whole = AuditIndex(KV(tmp_path / "whole"))
    whole.fold_many(fetched)
    sliced = AuditIndex(KV(tmp_path / "sliced"))
    for part, _ in fold_slices(fetched, soft_rows=64, max_rows=10_000):
        sliced.fold_many(part)
    for i in [*range(0, 300, 37), 299]:
        assert sliced.status("t", f"e{i}") == whole.status("t", f"e{i}")
    assert sliced.status("t", "big") == whole.status("t", "big")
    for u in ("u0", "u3", "u6"):
        assert sliced.feed("t", u, limit=100) == whole.feed("t", u, limit=100)


def test_a_bounce_takes_a_delivery_back_whichever_is_folded_first(tmp_path: Path) -> None:
    """A provider's receipt (``bounced``) comes after the ``delivered`` of the send it is
    about; the two may be folded in either order (a page or a single record), and the bounce
    stands either way, with the delivered attempt kept."""
    kv = KV(tmp_path / "kv")
    ix = AuditIndex(kv)
    bounce = {"reason": "carrier_filtered", "detail": "twilio failed 30007", "channel": "sms"}
    # in order: delivered, then the bounce
    ix.fold_many([rec("queued", 1, channel="sms"), rec("delivered", 2, attempt=1, channel="sms")])
    ix.fold_many([rec("bounced", 9, **bounce)])
    (row,) = ix.status("t", "e1")
    assert (row["status"], row["reason"]) == ("bounced", "carrier_filtered")
    assert [a["outcome"] for a in row["attempts"]] == ["delivered"]
    # out of order: the bounce first, then the delivered single record, then as a page
    ix.fold_many([rec("bounced", 9, event="e2", **bounce)])
    ix.fold_many([rec("delivered", 2, event="e2", attempt=1, channel="sms")])
    ix.fold_many([rec("bounced", 9, event="e3", **bounce)])
    p = page("delivered", 2, ["u1"], event="e3", attempt=1)
    ix.fold_many([msgspec.structs.replace(p, channel="sms")])
    for event in ("e2", "e3"):
        (row,) = ix.status("t", event)
        assert row["status"] == "bounced", event
    # a later bounce of equal rank replaces an earlier one (a second receipt)
    ix.fold_many([rec("bounced", 12, reason="recipient_unsubscribed", channel="sms")])
    assert ix.status("t", "e1")[0]["reason"] == "recipient_unsubscribed"
    kv.close()
