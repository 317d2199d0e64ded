"""The LMDB state store (``storage/kv.py``): typed tables, durability, group-committed sync."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.errors import StorageError, StorageFull
from storage.kv import KV, ReadCache


class GroupOffset(msgspec.Struct, frozen=True):
    offset: int
    metadata: str = ""


class Contact(msgspec.Struct, frozen=True):
    name: str
    channels: list[str]


@pytest.fixture
def kv(tmp_path: Path) -> Iterator[KV]:
    store = KV(tmp_path / "state", map_size=16 << 20)
    yield store
    store.close()


def test_put_get_and_overwrite(kv: KV) -> None:
    offsets = kv.table("offsets", GroupOffset)
    assert offsets.get("g1/orders/0") is None
    offsets.put("g1/orders/0", GroupOffset(10))
    offsets.put(b"g1/orders/1", GroupOffset(3, "m"))
    assert offsets.get("g1/orders/0") == GroupOffset(10)
    assert offsets.get("g1/orders/1") == GroupOffset(3, "m")  # str and bytes keys agree
    offsets.put("g1/orders/0", GroupOffset(11))
    assert offsets.get(b"g1/orders/0") == GroupOffset(11)


def test_values_come_back_as_the_stored_type(kv: KV) -> None:
    contacts = kv.table("contacts", Contact)
    contacts.put("u1", Contact("Ada", ["email", "sms"]))
    got = contacts.get("u1")
    assert isinstance(got, Contact)
    assert got.channels == ["email", "sms"]


def test_reading_a_value_as_the_wrong_type_is_an_error(kv: KV) -> None:
    kv.table("t", Contact).put("k", Contact("Ada", []))
    with pytest.raises(msgspec.ValidationError):
        kv.table("t", GroupOffset).get("k")


def test_tables_are_separate(kv: KV) -> None:
    a = kv.table("a", GroupOffset)
    b = kv.table("b", GroupOffset)
    a.put("k", GroupOffset(1))
    b.put("k", GroupOffset(2))
    assert (a.get("k"), b.get("k")) == (GroupOffset(1), GroupOffset(2))
    a.delete_prefix("")
    assert a.get("k") is None
    assert b.get("k") == GroupOffset(2)


def test_scan_by_prefix_in_key_order(kv: KV) -> None:
    t = kv.table("offsets", GroupOffset)
    t.put_many(
        [
            ("g2/x/0", GroupOffset(5)),
            ("g1/b/1", GroupOffset(2)),
            ("g1/a/0", GroupOffset(1)),
            ("g1/b/0", GroupOffset(3)),
            ("g10/a/0", GroupOffset(9)),
            ("g0", GroupOffset(0)),
        ]
    )
    assert list(t.scan("g1/")) == [
        (b"g1/a/0", GroupOffset(1)),
        (b"g1/b/0", GroupOffset(3)),
        (b"g1/b/1", GroupOffset(2)),
    ]
    assert [k for k, _v in t.scan("g1")] == [b"g1/a/0", b"g1/b/0", b"g1/b/1", b"g10/a/0"]
    assert [k for k, _v in t.scan()] == [
        b"g0",
        b"g1/a/0",
        b"g1/b/0",
        b"g1/b/1",
        b"g10/a/0",
        b"g2/x/0",
    ]
    assert list(t.scan("g3")) == []
    assert list(t.scan("zzz")) == []


def test_scan_is_a_snapshot(kv: KV) -> None:
    t = kv.table("t", GroupOffset)
    t.put_many([(f"k{i}", GroupOffset(i)) for i in range(5)])
    seen = []
    for key, value in t.scan("k"):
        t.put(key + b"x", GroupOffset(100))  # writes during the scan do not show up in it
        seen.append(value.offset)
    assert seen == [0, 1, 2, 3, 4]


def test_delete(kv: KV) -> None:
    t = kv.table("t", GroupOffset)
    t.put("a", GroupOffset(1))
    assert t.delete("a") is True
    assert t.delete("a") is False
    assert t.get("a") is None


@pytest.mark.parametrize(
    ("prefix", "left"),
    [
        ("g1/", ["g0", "g1", "g10/a", "g2/a"]),
        ("g1", ["g0", "g2/a"]),
        ("g2/a", ["g0", "g1", "g1/a", "g1/b", "g10/a"]),  # the last key in the table
        ("g", []),
        ("", []),
        ("h", ["g0", "g1", "g1/a", "g1/b", "g10/a", "g2/a"]),
        ("a", ["g0", "g1", "g1/a", "g1/b", "g10/a", "g2/a"]),
    ],
)
def test_delete_prefix(kv: KV, prefix: str, left: list[str]) -> None:
    t = kv.table("t", GroupOffset)
    keys = ["g0", "g1", "g1/a", "g1/b", "g10/a", "g2/a"]
    t.put_many([(k, GroupOffset(i)) for i, k in enumerate(keys)])
    assert t.delete_prefix(prefix) == len(keys) - len(left)
    assert [k.decode() for k, _v in t.scan()] == left


def test_put_many_is_one_transaction(tmp_path: Path) -> None:
    store = KV(tmp_path / "state", map_size=1 << 20)
    try:
        t = store.table("t", Contact)
        t.put("keep", Contact("kept", []))
        big = [(f"k{i:06d}", Contact("x" * 2000, [])) for i in range(2000)]  # ~4 MB > map
        with pytest.raises(StorageFull):
            t.put_many(big)
        # all or nothing: none of the batch landed, the earlier write is intact
        assert t.get("k000000") is None
        assert [k for k, _v in t.scan()] == [b"keep"]
        t.put_many(big[:10])
        assert len(list(t.scan("k0"))) == 10
    finally:
        store.close()


def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    store = KV(tmp_path / "state")
    t = store.table("offsets", GroupOffset)
    t.put_many([(f"g/{i}", GroupOffset(i)) for i in range(100)])
    t.delete("g/7")
    store.close()
    again = KV(tmp_path / "state")
    try:
        t = again.table("offsets", GroupOffset)
        assert len(list(t.scan())) == 99
        assert t.get("g/7") is None
        assert t.get("g/42") == GroupOffset(42)
    finally:
        again.close()


async def test_concurrent_syncs_all_complete_and_share_fsyncs(
    kv: KV, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = kv.sync_now

    def counting() -> None:
        nonlocal calls
        calls += 1
        real()

    monkeypatch.setattr(kv, "sync_now", counting)
    t = kv.table("t", GroupOffset)

    async def write_then_sync(i: int) -> int:
        t.put(f"k{i}", GroupOffset(i))
        await kv.sync()
        return i

    async with asyncio.timeout(10):
        done = await asyncio.gather(*(write_then_sync(i) for i in range(20)))
    assert done == list(range(20))
    assert calls < 20  # callers that arrived together shared one fsync
    # a later caller with a write of its own gets a sync of its own (not the one that
    # already ran); with nothing written since the last sync, there is nothing to sync
    before = calls
    t.put("later", GroupOffset(99))
    await kv.sync()
    assert calls == before + 1
    await kv.sync()
    await kv.sync()
    assert calls == before + 1


async def test_an_idle_store_is_not_synced_again(kv: KV, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's periodic sync runs every second: with nothing committed since the last
    sync it costs no fsync (an idle node wrote nothing to its disk); a failed sync is not
    taken as done."""
    calls = 0
    fail = False
    real = kv.sync_now

    def counting() -> None:
        nonlocal calls
        calls += 1
        if fail:
            raise StorageError("the disk refused (test)")
        real()

    monkeypatch.setattr(kv, "sync_now", counting)
    t = kv.table("t", GroupOffset)
    t.put("a", GroupOffset(1))
    await kv.sync()
    assert calls == 1
    for _ in range(5):
        await kv.sync()
    assert calls == 1
    t.put("a", GroupOffset(1))  # a transaction, even one that changes nothing, is synced
    fail = True
    with pytest.raises(StorageError):
        await kv.sync()
    fail = False
    await kv.sync()  # the failed sync covered nothing: tried again
    assert calls == 3
    await kv.sync()
    assert calls == 3


async def test_the_state_store_sync_never_runs_on_the_event_loop(
    kv: KV, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an offset commit's acknowledgement waits for this sync: on the loop, every
    # connection of the node would wait for LMDB's fsync with it
    ran_on: list[int] = []
    real = kv.sync_now

    def recording() -> None:
        ran_on.append(threading.get_ident())
        real()

    monkeypatch.setattr(kv, "sync_now", recording)
    t = kv.table("t", GroupOffset)
    for i in range(3):
        t.put(f"k{i}", GroupOffset(i))
        async with asyncio.timeout(10):
            await kv.sync()
    t.put("k", GroupOffset(9))
    async with asyncio.timeout(10):
        await asyncio.gather(kv.sync(), kv.sync())
    assert len(ran_on) >= 4
    assert threading.get_ident() not in ran_on


async def test_a_sync_called_during_a_sync_gets_a_later_one(
    kv: KV, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered = threading.Event()
    release = threading.Event()
    events: list[str] = []
    real = kv.sync_now

    def slow() -> None:
        events.append("sync")
        entered.set()
        release.wait(10)
        real()

    monkeypatch.setattr(kv, "sync_now", slow)
    t = kv.table("t", GroupOffset)
    t.put("a", GroupOffset(1))
    first = asyncio.create_task(kv.sync())
    await asyncio.to_thread(entered.wait, 10)
    # this write may postdate the fsync in flight: its caller must not ride on that fsync
    t.put("b", GroupOffset(2))
    events.append("put b")
    second = asyncio.create_task(kv.sync())
    await asyncio.sleep(0)
    assert not second.done()
    release.set()
    async with asyncio.timeout(10):
        await asyncio.gather(first, second)
    assert events == ["sync", "put b", "sync"]


async def test_sync_failure_reaches_every_waiter_and_the_store_recovers(
    kv: KV, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        # sync_now maps LMDB's error to a StorageError (7347a73); this stands in for it
        raise StorageError("state store sync failed: mdb_env_sync: Input/output error")

    monkeypatch.setattr(kv, "sync_now", broken)
    results = await asyncio.gather(*(kv.sync() for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, StorageError) for r in results), results
    monkeypatch.undo()
    await kv.sync()


def test_unopenable_path_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "data.mdb").mkdir()  # a directory where the data file should be
    with pytest.raises(StorageError):
        KV(tmp_path / "state")


# ----------------------------------------------------------- transactions across tables
def test_a_transaction_writes_several_tables_at_once(kv: KV) -> None:
    a = kv.table("a", GroupOffset)
    b = kv.table("b", GroupOffset)
    with kv.transaction() as txn:
        a.put("k", GroupOffset(1), txn=txn)
        b.put("k", GroupOffset(2), txn=txn)
        assert a.get("k", txn=txn) == GroupOffset(1)  # visible inside the transaction
    assert (a.get("k"), b.get("k")) == (GroupOffset(1), GroupOffset(2))


def test_a_transaction_that_raises_leaves_nothing(kv: KV) -> None:
    a = kv.table("a", GroupOffset)
    b = kv.table("b", GroupOffset)
    a.put("old", GroupOffset(0))
    with pytest.raises(RuntimeError), kv.transaction() as txn:
        a.put("k", GroupOffset(1), txn=txn)
        a.delete("old", txn=txn)
        b.put("k", GroupOffset(2), txn=txn)
        raise RuntimeError("half way")
    assert (a.get("k"), b.get("k"), a.get("old")) == (None, None, GroupOffset(0))


def test_a_full_map_inside_a_transaction_is_storage_full(tmp_path: Path) -> None:
    store = KV(tmp_path / "state", map_size=1 << 20)
    try:
        t = store.table("t", Contact)
        with pytest.raises(StorageFull), store.transaction() as txn:
            for i in range(2000):
                t.put(f"k{i:06d}", Contact("x" * 2000, []), txn=txn)
        assert list(t.scan()) == []
    finally:
        store.close()


def test_a_snapshot_is_a_consistent_view_and_refuses_writes(kv: KV) -> None:
    a = kv.table("a", GroupOffset)
    a.put("k", GroupOffset(1))
    with kv.snapshot() as snap:
        a.put("k", GroupOffset(2))  # a write after the snapshot began
        assert a.get("k", txn=snap) == GroupOffset(1)
        with pytest.raises(StorageError):
            a.put("x", GroupOffset(3), txn=snap)
    assert a.get("k") == GroupOffset(2)


def test_scan_pages_with_after_and_limit(kv: KV) -> None:
    t = kv.table("t", GroupOffset)
    t.put_many([(f"p/{i:03d}", GroupOffset(i)) for i in range(10)] + [("q", GroupOffset(99))])
    page = list(t.scan("p/", limit=4))
    assert [v.offset for _k, v in page] == [0, 1, 2, 3]
    page = list(t.scan("p/", after=page[-1][0], limit=4))
    assert [v.offset for _k, v in page] == [4, 5, 6, 7]
    page = list(t.scan("p/", after=page[-1][0], limit=4))
    assert [v.offset for _k, v in page] == [8, 9]  # the prefix ends: "q" is not in it
    assert list(t.scan("p/", after="p/009")) == []
    # ``after`` need not exist; one before the prefix starts at the prefix
    assert [v.offset for _k, v in t.scan("p/", after="p/0045", limit=2)] == [5, 6]
    assert [v.offset for _k, v in t.scan("p/", after="a", limit=1)] == [0]
    assert list(t.scan("p/", limit=0)) == []


@settings(max_examples=60, deadline=None)
@given(
    keys=st.sets(st.binary(min_size=1, max_size=4), max_size=40),
    prefix=st.binary(max_size=2),
    limit=st.integers(min_value=1, max_value=7),
)
def test_paging_visits_every_key_of_the_prefix_once_in_order(
    tmp_path_factory: pytest.TempPathFactory, keys: set[bytes], prefix: bytes, limit: int
) -> None:
    store = KV(tmp_path_factory.mktemp("kv"), map_size=4 << 20)
    try:
        t = store.table("t", GroupOffset)
        t.put_many([(k, GroupOffset(i)) for i, k in enumerate(sorted(keys))])
        seen: list[bytes] = []
        after: bytes | None = None
        while True:
            page = t.scan_raw(prefix, after=after, limit=limit)
            seen.extend(k for k, _v in page)
            if len(page) < limit:
                break
            after = page[-1][0]
        assert seen == sorted(k for k in keys if k.startswith(prefix))
        assert t.keys(prefix) == seen
        last = t.last(prefix)
        assert (last[0] if last else None) == (seen[-1] if seen else None)
    finally:
        store.close()


def test_last_finds_the_greatest_key_of_a_prefix(kv: KV) -> None:
    t = kv.table("t", GroupOffset)
    assert t.last("a") is None
    t.put_many(
        [
            (b"a\x00", GroupOffset(0)),
            (b"a\x00\x00\x00\x01", GroupOffset(1)),
            (b"a\x00\xff\xff", GroupOffset(2)),
            (b"a\x01", GroupOffset(3)),
            (b"b", GroupOffset(4)),
        ]
    )
    assert t.last(b"a\x00") == (b"a\x00\xff\xff", GroupOffset(2))
    assert t.last(b"a\x00\xff") == (b"a\x00\xff\xff", GroupOffset(2))
    assert t.last("a") == (b"a\x01", GroupOffset(3))
    assert t.last("") == (b"b", GroupOffset(4))
    assert t.last("c") is None
    assert t.last("a\x00\x00\x00\x02") is None


def test_stats_count_entries_and_pages(kv: KV) -> None:
    t = kv.table("t", GroupOffset)
    assert t.stats().entries == 0
    t.put_many([(f"k{i:05d}", GroupOffset(i)) for i in range(5000)])
    st = t.stats()
    assert st.entries == 5000 and st.depth >= 2
    assert st.bytes == st.pages * 4096 and 5000 * 10 < st.bytes < 5000 * 100


def test_writes_report_how_the_table_grew(kv: KV) -> None:
    t = kv.table("sized", GroupOffset)
    first = t.put_many([("a", GroupOffset(1)), ("bb", GroupOffset(2, "meta"))])
    assert first.rows == 2
    assert first.bytes == sum(size for _k, size in t.sizes())
    again = t.put_many([("a", GroupOffset(1, "longer"))])  # replaced: only the growth
    assert again.rows == 0 and again.bytes == len(b"longer")
    assert t.raw_size("a") is not None and t.raw_size("zz") is None
    gone = t.remove_many(["a", "bb", "missing"])
    assert gone.rows == -2 and gone.bytes == -(first.bytes + again.bytes)
    assert list(t.sizes()) == []


# ------------------------------------------------------------------ change counters
def test_a_table_counts_the_write_transactions_that_touched_it_once_they_end(kv: KV) -> None:
    offsets = kv.table("offsets", GroupOffset)
    contacts = kv.table("contacts", Contact)
    assert offsets.changes == contacts.changes == 0
    offsets.put("a", GroupOffset(1))
    assert (offsets.changes, contacts.changes) == (1, 0)
    with kv.transaction() as txn:
        offsets.put("b", GroupOffset(2), txn=txn)
        offsets.put("c", GroupOffset(3), txn=txn)
        contacts.put("x", Contact("x", []), txn=txn)
        # not before the transaction ends: a reader that saw the old count and then read
        # a row must not take a row from before this commit for a current one
        assert (offsets.changes, contacts.changes) == (1, 0)
    assert (offsets.changes, contacts.changes) == (2, 1)
    offsets.delete("a")
    offsets.delete_prefix("b")
    assert offsets.changes == 4


def test_every_table_object_of_a_name_shares_its_count(kv: KV) -> None:
    first = kv.table("offsets", GroupOffset)
    second = kv.table("offsets", GroupOffset)
    second.put("a", GroupOffset(1))
    assert first.changes == second.changes == 1


def test_an_aborted_transaction_still_moves_the_count(kv: KV) -> None:
    """Harmless (a cache reads again) and simpler than knowing what was kept."""
    offsets = kv.table("offsets", GroupOffset)
    with pytest.raises(RuntimeError), kv.transaction() as txn:
        offsets.put("a", GroupOffset(1), txn=txn)
        raise RuntimeError("abort")
    assert offsets.get("a") is None
    assert offsets.changes == 1


def test_reads_do_not_move_the_count(kv: KV) -> None:
    offsets = kv.table("offsets", GroupOffset)
    offsets.put("a", GroupOffset(1))
    with kv.snapshot() as snap:
        offsets.get("a", txn=snap)
    offsets.get("a")
    list(offsets.scan())
    assert offsets.changes == 1


def test_a_read_cache_reads_again_only_after_a_write_to_its_table(kv: KV) -> None:
    offsets = kv.table("offsets", GroupOffset)
    other = kv.table("contacts", Contact)
    cache: ReadCache[str, GroupOffset | None] = ReadCache(offsets)
    reads = []

    def read(key: str) -> GroupOffset | None:
        reads.append(key)
        return offsets.get(key)

    assert cache.get("a", lambda: read("a")) is None
    assert cache.get("a", lambda: read("a")) is None  # kept: absent
    other.put("x", Contact("x", []))  # another table: still kept
    assert cache.get("a", lambda: read("a")) is None
    assert reads == ["a"]
    kv.table("offsets", GroupOffset).put("a", GroupOffset(7))  # any Table of the name
    assert cache.get("a", lambda: read("a")) == GroupOffset(7)
    assert cache.get("a", lambda: read("a")) == GroupOffset(7)
    assert reads == ["a", "a"]
    # a value ``keep`` refuses is read every time
    assert cache.get("b", lambda: read("b"), lambda v: v is not None) is None
    assert cache.get("b", lambda: read("b"), lambda v: v is not None) is None
    assert reads == ["a", "a", "b", "b"]
