"""Event-id idempotency store: look-up inside the window, sweep after it."""

from pathlib import Path

from broker.idempotency import EventIds, SeenEvent
from storage.kv import KV

WINDOW = 1000


def test_seen_event_is_found_inside_the_window_only(tmp_path: Path) -> None:
    kv = KV(tmp_path / "state")
    ids = EventIds(kv, WINDOW)
    ids.put_many([("acme", "e1", SeenEvent(2, 40, 10_000))])
    assert ids.get("acme", "e1", 10_500) == SeenEvent(2, 40, 10_000)
    assert ids.get("other", "e1", 10_500) is None  # ids are per tenant
    assert ids.get("acme", "e1", 11_000) is None  # past the window
    kv.close()


def test_sweep_forgets_expired_ids_oldest_first_and_keeps_fresh_ones(tmp_path: Path) -> None:
    kv = KV(tmp_path / "state")
    ids = EventIds(kv, WINDOW)
    ids.put_many([("t", f"old{i}", SeenEvent(0, i, 1_000 + i)) for i in range(50)])
    ids.put_many([("t", "fresh", SeenEvent(0, 99, 5_000))])
    assert ids.sweep(5_500, limit=20) == 20
    assert ids.sweep(5_500, limit=1000) == 30
    assert ids.sweep(5_500) == 0
    assert ids.get("t", "fresh", 5_500) == SeenEvent(0, 99, 5_000)
    kv.close()
    reopened = KV(tmp_path / "state")
    assert EventIds(reopened, WINDOW).get("t", "old3", 1_010) is None
    reopened.close()


def test_an_id_published_again_after_expiry_survives_the_sweep_of_its_old_entry(
    tmp_path: Path,
) -> None:
    kv = KV(tmp_path / "state")
    ids = EventIds(kv, WINDOW)
    ids.put_many([("t", "e", SeenEvent(0, 1, 1_000))])
    ids.put_many([("t", "e", SeenEvent(1, 7, 3_000))])
    ids.sweep(3_500)
    assert ids.get("t", "e", 3_500) == SeenEvent(1, 7, 3_000)
    kv.close()


def test_generated_event_ids_are_distinct_version_4_uuids() -> None:
    import uuid

    from broker.events import EventIdGenerator

    gen = EventIdGenerator()
    ids = [gen.next() for _ in range(3 * EventIdGenerator._BATCH)]
    assert len(set(ids)) == len(ids)
    for text in ids[:: EventIdGenerator._BATCH // 4]:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert str(parsed) == text


def test_every_generated_event_id_has_the_rfc_4122_variant_and_random_variant_bits() -> None:
    import uuid

    from broker.events import EventIdGenerator

    gen = EventIdGenerator()
    ids = [gen.next() for _ in range(2 * EventIdGenerator._BATCH + 7)]
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
    assert {text[19] for text in ids} == set("89ab")  # the variant's two low bits stay random
