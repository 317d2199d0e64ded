"""Pages (``notify/pages.py``) and the outbox's groups (``notify/stage.py``): a page stands
for exactly the single records it replaces, is told apart from them by its first byte, and
a single delivery added after a page of the same partition is appended after it."""

from __future__ import annotations

import msgspec

from notify import ids, pages
from notify.model import AuditRecord, Delivery
from notify.pages import AuditRows, DeliveryRows, expand, is_page
from notify.stage import Outbox


def rows(n: int, event: str = "e1") -> DeliveryRows:
    d = DeliveryRows(
        tenant="t",
        event_id=event,
        topic="news",
        channel="null",
        priority="low",
        category="promo",
        data=b'{"a":1}',
        created_ms=5,
        strict_order=False,
    )
    for i in range(n):
        run = ids.run_id("t", event, f"u{i}")
        d.add(f"u{i}", run, ids.delivery_id(run, "null", 0), 0)
    return d


def test_a_page_expands_to_the_deliveries_it_stands_for_and_splits_when_large() -> None:
    sealed = rows(pages.MAX_PAGE_ROWS + 1).seal()
    assert len(sealed) == 2 and all(is_page(v) for v in sealed)
    got = [d for v in sealed for d in expand(pages.decode_delivery_page(v))]
    assert len(got) == pages.MAX_PAGE_ROWS + 1
    run = ids.run_id("t", "e1", "u7")
    assert got[7] == Delivery(
        delivery_id=ids.delivery_id(run, "null", 0),
        run_id=run,
        event_id="e1",
        tenant="t",
        user="u7",
        channel="null",
        topic="news",
        step=0,
        priority="low",
        category="promo",
        data=msgspec.Raw(b'{"a":1}'),
        created_ms=5,
    )
    # the single forms are not pages
    assert not is_page(msgspec.json.encode(got[0]))
    single = AuditRecord(tenant="t", event_id="e", user="u", run_id="r", status="x", at_ms=1)
    assert not is_page(msgspec.msgpack.encode(single)) and not is_page(b"")


def test_a_single_delivery_after_a_page_of_its_partition_is_appended_after_it() -> None:
    outbox = Outbox(lambda topic: 1, 1 << 20)
    key = b"t\0u0"
    page = outbox.group("__deliver.null", key, "p", lambda: rows(0))
    assert isinstance(page, DeliveryRows)
    page.add("u0", "r0", "d0", 0)
    audit = outbox.group(
        "__audit",
        b"t\0e1",
        "a",
        lambda: AuditRows(
            tenant="t",
            event_id="e1",
            topic="news",
            channel="null",
            status="queued",
            reason=None,
            detail=None,
            attempt=None,
            at_ms=5,
        ),
    )
    assert isinstance(audit, AuditRows)
    audit.add("u0", "r0", "d0")
    outbox.add("__deliver.null", key, b'{"single":1}')
    outbox.add("__audit", b"t\0e1", b"\x80")  # a single audit record does not seal a page
    assert len(outbox) == 4  # outputs: two rows in pages, two single records
    taken = outbox.take()
    values = {tp: v for tp, (_k, v) in taken._rows.items()}
    first, second = values[("__deliver.null", 0)]
    assert is_page(first) and pages.decode_delivery_page(first).users == ["u0"]
    assert second == b'{"single":1}'
    assert values[("__audit", 0)][0] == b"\x80" and is_page(values[("__audit", 0)][1])


def test_groups_taken_out_of_the_outbox_leave_its_count_and_order_as_if_never_added() -> None:
    """What the fan-out hands over (its in-app pages) leaves the outbox: no longer counted,
    no longer holding back a single record of its partition, the other topics untouched."""
    outbox = Outbox(lambda topic: 2, 1 << 20)
    inapp = outbox.group("__deliver.inapp", b"t\0u0", "p", lambda: rows(0), rows=2)
    assert isinstance(inapp, DeliveryRows)
    inapp.add("u0", "r0", "d0", 0)
    inapp.add("u1", "r1", "d1", 0)
    other = outbox.group("__deliver.null", b"t\0u0", "p", lambda: rows(0))
    assert isinstance(other, DeliveryRows)
    other.add("u0", "r0", "d2", 0)
    assert outbox.groups_of("__deliver.inapp") == [inapp]
    assert not outbox.has_records("__deliver.inapp")
    assert len(outbox) == 3
    assert outbox.take_groups("__deliver.inapp") == [inapp]
    assert len(outbox) == 1 and outbox.groups_of("__deliver.inapp") == []
    # a single record on the handed-over page's partition no longer seals a page there
    outbox.add("__deliver.inapp", b"t\0u0", b'{"single":1}')
    assert outbox.has_records("__deliver.inapp")
    taken = outbox.take()
    values = {tp: v for tp, (_k, v) in taken._rows.items()}
    inapp_values = [v for (t, _p), vs in values.items() if t == "__deliver.inapp" for v in vs]
    assert inapp_values == [b'{"single":1}']
    (null_page,) = [v for (t, _p), vs in values.items() if t == "__deliver.null" for v in vs]
    assert pages.decode_delivery_page(null_page).delivery_ids == ["d2"]
