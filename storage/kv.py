"""The node's small mutable state in one LMDB environment (``<data>/state``): consumer-group
offsets, producer-id reservations, the event-id index, the notification registry
(``notify/registry.py``); timers later.

No other module imports ``lmdb``. Values are ``msgspec`` structs encoded as msgpack through a
typed :class:`Table`, so a reader gets the type it stored or a clear error.

Each table method runs in a transaction of its own unless it is given one: rows of several
tables that must change together (a subscription and its entry in the topic's index) are
written in one :meth:`KV.transaction`, and a reader that wants one consistent view of several
tables (or many cheap gets without a transaction each) reads them in one :meth:`KV.snapshot`.

Durability: the environment is opened without a sync per transaction (LMDB's ``NOSYNC``:
integrity is kept; a power loss may undo the last transactions, a killed process loses
nothing). Callers that must not lose a write await :meth:`KV.sync`, which group-commits: all
writes made before the call are synced by one ``fsync`` in a worker thread, shared by every
caller that arrived meanwhile (on the store's own I/O thread, :mod:`storage.io_threads`).
Write transactions are short and never span an ``await``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Generic, NamedTuple, TypeVar

import lmdb
import msgspec

from storage.errors import StorageError, StorageFull
from storage.flush import SLOW_SYNC_MS
from storage.io_threads import IoThreads
from storage.segment import fsync_dir

log = logging.getLogger("herald.storage")

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# What a row costs beyond its key and value bytes, for accounting: LMDB's leaf-node header
# (8 bytes) and its slot in the page (2), rounded up for alignment and page fill.
ROW_OVERHEAD: Final = 16


def row_bytes(key: bytes | memoryview, value: bytes | memoryview) -> int:
    """The bytes a row is counted for: key, value and :data:`ROW_OVERHEAD`."""
    return len(key) + len(value) + ROW_OVERHEAD


class Usage(NamedTuple):
    """How a write changed a table: rows and bytes (:func:`row_bytes`) added, negative when
    removed."""

    rows: int
    bytes: int


def write_failed(exc: lmdb.Error) -> StorageError:
    """The storage error for a failed LMDB write: a full map or disk is :class:`StorageFull`
    (retriable once space returns), anything else a plain :class:`StorageError`."""
    if isinstance(exc, lmdb.MapFullError):
        return StorageFull(f"state store is full (raise storage.kv-map-size): {exc}")
    text = str(exc)
    if "No space left" in text or f"errno {errno.ENOSPC}" in text or "EDQUOT" in text:
        return StorageFull(f"no space left for the state store: {exc}")
    return StorageError(f"state store write failed: {exc}")


class KV:
    """One LMDB environment with named tables."""

    def __init__(self, path: Path, *, map_size: int = 1 << 30, max_tables: int = 64) -> None:
        path.mkdir(parents=True, exist_ok=True)
        try:
            self._env = lmdb.open(
                str(path),
                map_size=map_size,
                max_dbs=max_tables,
                sync=False,
                metasync=False,
                readahead=False,
                lock=True,
            )
        except lmdb.Error as exc:
            raise StorageError(f"cannot open state store at {path}: {exc}") from exc
        # LMDB never fsyncs a directory: make the names of data.mdb and of ``path`` itself
        # durable, or a power cut soon after the first start could lose the whole store
        fsync_dir(path)
        fsync_dir(path.parent)
        # syncs run on a thread of the store's own, reported back without a task
        # (storage/io_threads.py): a commit's sync is on the path of its acknowledgement
        self._io = IoThreads(1, name="herald-kv")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._syncing = False
        self._requested = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        # fsyncs of the store completed, and their time (metrics: herald_state_store_*); one
        # of SLOW_SYNC_MS or more is logged (event=state_store_sync_slow), as a log's is
        self.syncs = 0
        self.sync_seconds = 0.0
        # the last write transaction a completed sync covered, and the one the sync
        # running now covers: with nothing committed since, a sync has nothing to do (an
        # idle node's periodic sync was an fdatasync a second, and commits of unchanged
        # offsets more)
        self._synced_txn = -1
        self._syncing_txn = -1
        # per table name, how many write transactions touching it have ended (see
        # Table.changes): one cell shared by every Table object of that name
        self._changes: dict[str, list[int]] = {}
        self.path = path

    def table(self, name: str, value_type: type[T]) -> Table[T]:
        """The table ``name`` holding values of ``value_type`` (created on first use)."""
        db = self._env.open_db(name.encode())
        return Table(self, db, value_type, self._changes.setdefault(name, [0]))

    def write(self) -> lmdb.Transaction:
        return self._env.begin(write=True)

    def read(self) -> lmdb.Transaction:
        return self._env.begin(write=False)

    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        """One write transaction over any tables: pass the yielded :class:`Txn` to table
        methods. Committed when the block ends, aborted if it raises (nothing of it lands).
        Raises :class:`StorageFull` when the map or the disk is full, :class:`StorageError`
        for other write failures. Never hold it across an ``await``: LMDB has one writer."""
        t = None
        try:
            with self._env.begin(write=True) as txn:
                t = Txn(txn, write=True)
                yield t
        except lmdb.Error as exc:
            raise write_failed(exc) from exc
        finally:  # committed or aborted, never before: see Table.changes
            if t is not None:
                for cell in t.touched:
                    cell[0] += 1

    @contextmanager
    def snapshot(self) -> Iterator[Txn]:
        """One read-only transaction: a consistent view of every table as of its start.
        Cheap (no lock, no copy); a long-lived one keeps old pages from being reused, so
        keep it to one batch of reads."""
        with self._env.begin(write=False) as txn:
            yield Txn(txn, write=False)

    def sync_now(self) -> None:
        """Blocking fsync of the environment. Raises :class:`StorageError` if it fails."""
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            raise StorageError(f"state store sync failed: {exc}") from exc

    async def sync(self) -> None:
        """Make every write made before this call durable. Concurrent callers share one
        fsync (group commit). Raises :class:`StorageError` if the sync fails."""
        if not self._syncing and self._last_txn() == self._synced_txn:
            return  # nothing written since the last sync: already durable
        loop = self._loop
        if loop is None:  # kept: asyncio.get_running_loop() costs a getpid() system call
            loop = self._loop = asyncio.get_running_loop()
        self._requested += 1
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((self._requested, fut))
        if not self._syncing:
            self._start_sync()
        await fut

    @property
    def syncing(self) -> bool:
        """Whether an fsync of the store is running (for :attr:`IoThreads.busy_elsewhere`)."""
        return self._syncing

    def _start_sync(self) -> None:
        """Loop: one fsync for every write made so far, on the store's own I/O thread."""
        self._syncing = True
        self._syncing_txn = self._last_txn()  # committed before the fsync starts: covered
        self._io.submit(self._sync_job, self._requested)

    def _last_txn(self) -> int:
        """The id of the last committed write transaction."""
        return int(self._env.info()["last_txnid"])

    def _sync_job(self, upto: int) -> None:
        """I/O thread: fsync, then report to the loop."""
        error: StorageError | None = None
        started = time.perf_counter()
        try:
            self.sync_now()
        except StorageError as exc:
            error = exc
        except BaseException as exc:  # a bug; the waiters must still hear of it
            error = StorageError(f"state store sync crashed: {exc!r}")
        self._io.report(self._synced, upto, error, time.perf_counter() - started)

    def _synced(self, upto: int, error: StorageError | None, seconds: float) -> None:
        """Loop: answer the callers the sync covered; start the next one if others wait."""
        self._syncing = False
        if error is None:
            self._synced_txn = self._syncing_txn
            self.syncs += 1
            self.sync_seconds += seconds
            if seconds * 1000 >= SLOW_SYNC_MS:
                log.warning("event=state_store_sync_slow ms=%.1f", seconds * 1000)
        keep = []
        for ticket, fut in self._waiters:
            if ticket > upto:
                keep.append((ticket, fut))
            elif not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)
        self._waiters = keep
        if keep:
            self._start_sync()

    def close(self) -> None:
        """Sync and close. Closes even when the sync fails, then raises
        :class:`StorageError` (what was written since the last successful sync may be lost
        to a power cut). A sync in flight finishes first."""
        self._io.close()
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            self._env.close()
            raise StorageError(f"state store sync failed at close: {exc}") from exc
        self._env.close()


class ReadCache(Generic[K, V]):
    """Values read from one table, kept while its change count (:attr:`Table.changes`)
    holds: for rows read far more often than written (the notification fan-out's per-event
    reads). The count is taken before the read, so a value is never kept under a count
    newer than itself. At most ``limit`` keys (emptied when full)."""

    def __init__(self, table: Table[Any], limit: int = 4096) -> None:
        self._changes = table.change_cell
        self._kept: dict[K, tuple[int, V]] = {}
        self._limit = limit

    def get(self, key: K, read: Callable[[], V], keep: Callable[[V], bool] | None = None) -> V:
        """The value of ``key``: kept, or ``read()`` (kept if ``keep`` allows it)."""
        changes = self._changes[0]
        hit = self._kept.get(key)
        if hit is not None and hit[0] == changes:
            return hit[1]
        value = read()
        if keep is None or keep(value):
            if len(self._kept) >= self._limit:
                self._kept.clear()
            self._kept[key] = (changes, value)
        return value


class TableStats(NamedTuple):
    """What :meth:`Table.stats` answers: ``bytes`` is ``pages`` x the page size."""

    entries: int
    pages: int
    bytes: int
    depth: int


class Txn:
    """A transaction handed to :class:`Table` methods (``txn=``) by :meth:`KV.transaction`
    (read-write) or :meth:`KV.snapshot` (read-only)."""

    __slots__ = ("_txn", "touched", "write")

    def __init__(self, txn: lmdb.Transaction, *, write: bool) -> None:
        self._txn = txn
        self.write = write
        self.touched: list[list[int]] = []  # the change counters of the tables written


class Table(Generic[T]):
    """A typed key -> struct table. Keys are ``bytes`` or ``str`` (UTF-8). Every method takes
    an optional ``txn`` (see :class:`Txn`); without one it runs in a transaction of its own."""

    def __init__(
        self, kv: KV, db: lmdb._Database, value_type: type[T], changes: list[int] | None = None
    ) -> None:
        self._kv = kv
        self._db = db
        self._changes = [0] if changes is None else changes
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(value_type)

    @staticmethod
    def _key(key: bytes | str) -> bytes:
        return key.encode() if isinstance(key, str) else key

    @contextmanager
    def _reading(self, txn: Txn | None) -> Iterator[lmdb.Transaction]:
        if txn is not None:
            yield txn._txn
        else:
            with self._kv.read() as own:
                yield own

    @property
    def changes(self) -> int:
        """How many write transactions that wrote to this table have ended (committed or
        aborted), through any :class:`Table` of its name in this process: it moves only
        after a transaction ends, so a value read after reading :attr:`changes` is current
        for as long as :attr:`changes` stays the same: :class:`ReadCache` keeps rows by it.
        Every write goes through a :class:`Table`; a writer that went around it would have
        to bump this itself."""
        return self._changes[0]

    @property
    def change_cell(self) -> list[int]:
        """The shared cell :attr:`changes` reads (for :class:`ReadCache`)."""
        return self._changes

    @contextmanager
    def _writing(self, txn: Txn | None) -> Iterator[lmdb.Transaction]:
        if txn is not None:
            if not txn.write:
                raise StorageError("a write through a read-only snapshot")
            cell = self._changes
            if not any(c is cell for c in txn.touched):
                txn.touched.append(cell)  # counted when the transaction ends
            yield txn._txn  # the owner of the transaction maps its errors
            return
        try:
            with self._kv.write() as own:
                yield own
        except lmdb.Error as exc:
            raise write_failed(exc) from exc
        finally:
            self._changes[0] += 1

    def stats(self) -> TableStats:
        """Entries and pages of this table (LMDB's own counts: cheap, no scan)."""
        with self._kv.read() as txn:
            st = txn.stat(self._db)
        pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return TableStats(st["entries"], pages, pages * st["psize"], st["depth"])

    def encode(self, value: T) -> bytes:
        """The stored bytes of ``value`` (what :meth:`put` writes)."""
        return self._enc.encode(value)

    def get(self, key: bytes | str, *, txn: Txn | None = None) -> T | None:
        """The value of ``key``, None if absent. Inside a :class:`Txn` this is one LMDB
        lookup and one decode (no context manager: it is the per-recipient hot path)."""
        k = key.encode() if isinstance(key, str) else key
        if txn is not None:
            raw = txn._txn.get(k, db=self._db)
            return None if raw is None else self._dec.decode(raw)
        with self._kv.read() as t:
            raw = t.get(k, db=self._db)
            return None if raw is None else self._dec.decode(raw)

    def get_many(self, keys: list[bytes | str], *, txn: Txn | None = None) -> list[T | None]:
        """The values of ``keys`` (None where absent), read in one transaction: a batch's
        reads without a transaction (or a context manager) per key."""
        dec = self._dec.decode
        db = self._db
        out: list[T | None] = []
        with self._reading(txn) as t:
            get = t.get
            for key in keys:
                raw = get(key.encode() if isinstance(key, str) else key, db=db)
                out.append(None if raw is None else dec(raw))
        return out

    def found_raw(self, keys: list[bytes], *, txn: Txn | None = None) -> dict[bytes, bytes]:
        """The stored bytes of those of ``keys`` that exist, read in one transaction by one
        C call (LMDB's cursor ``getmulti``): a batch's membership test, no decode."""
        with self._reading(txn) as t:
            return {bytes(k): bytes(v) for k, v in t.cursor(db=self._db).getmulti(keys)}

    def get_raw(self, key: bytes | str, *, txn: Txn | None = None) -> bytes | None:
        """The stored bytes of ``key`` without decoding them (a copy)."""
        with self._reading(txn) as t:
            raw = t.get(self._key(key), db=self._db)
            return None if raw is None else bytes(raw)

    def put(self, key: bytes | str, value: T, *, txn: Txn | None = None) -> None:
        self.put_many([(key, value)], txn=txn)

    def put_many(self, items: list[tuple[bytes | str, T]], *, txn: Txn | None = None) -> Usage:
        """Write many entries in one transaction (``txn``'s if given). Returns how the table
        grew (a replaced row counts only its change in size). Raises :class:`StorageFull`
        when the map or the disk is full, :class:`StorageError` for other write failures."""
        rows = size = 0
        with self._writing(txn) as t:
            for key, value in items:
                k = self._key(key)
                v = self._enc.encode(value)
                old = t.replace(k, v, db=self._db)
                if old is None:
                    rows += 1
                    size += row_bytes(k, v)
                else:
                    size += len(v) - len(old)
        return Usage(rows, size)

    def put_raw_many(self, items: list[tuple[bytes, bytes]], *, txn: Txn | None = None) -> None:
        """Write already encoded entries (``encode``'s bytes) in one transaction by one C
        call (LMDB's cursor ``putmulti``): many rows sharing one encoded value cost no
        encode each. Raises as :meth:`put_many`."""
        with self._writing(txn) as t:
            t.cursor(db=self._db).putmulti(items)

    def delete(self, key: bytes | str, *, txn: Txn | None = None) -> bool:
        with self._writing(txn) as t:
            return bool(t.delete(self._key(key), db=self._db))

    def delete_prefix(self, prefix: bytes | str, *, txn: Txn | None = None) -> int:
        """Delete every entry whose key starts with ``prefix``; returns how many."""
        p = self._key(prefix)
        n = 0
        with self._writing(txn) as t:
            cur = t.cursor(db=self._db)
            if cur.set_range(p):
                while bytes(cur.key()).startswith(p):
                    if not cur.delete():
                        break
                    n += 1
                    if not cur.key():
                        break
        return n

    def delete_many(self, keys: list[bytes | str], *, txn: Txn | None = None) -> int:
        """Delete ``keys`` in one transaction; returns how many existed."""
        n = 0
        with self._writing(txn) as t:
            for key in keys:
                n += bool(t.delete(self._key(key), db=self._db))
        return n

    def remove_many(self, keys: list[bytes | str], *, txn: Txn | None = None) -> Usage:
        """Delete ``keys`` in one transaction, like :meth:`delete_many`, and return how the
        table shrank (negative rows and bytes; keys that did not exist count nothing)."""
        rows = size = 0
        with self._writing(txn) as t:
            for key in keys:
                k = self._key(key)
                old = t.pop(k, db=self._db)
                if old is not None:
                    rows -= 1
                    size -= row_bytes(k, old)
        return Usage(rows, size)

    def raw_size(self, key: bytes | str, *, txn: Txn | None = None) -> int | None:
        """The stored value's length in bytes, or None if ``key`` is absent."""
        with self._reading(txn) as t:
            raw = t.get(self._key(key), db=self._db)
            return None if raw is None else len(raw)

    def scan_sized(self, prefix: bytes | str = b"") -> Iterator[tuple[bytes, T, int]]:
        """``(key, value, row bytes)`` of every entry whose key starts with ``prefix``, in
        one read transaction (for accounting at start-up: run it in a worker thread, and do
        not await while iterating)."""
        p = self._key(prefix)
        with self._kv.read() as txn:
            cur = txn.cursor(db=self._db)
            if not cur.set_range(p):
                return
            for k, v in cur:
                key, value = bytes(k), bytes(v)
                if not key.startswith(p):
                    return
                yield key, self._dec.decode(value), row_bytes(key, value)

    def sizes(self, prefix: bytes | str = b"") -> Iterator[tuple[bytes, int]]:
        """``(key, row bytes)`` of every entry whose key starts with ``prefix``, without
        decoding values (for accounting at start-up). One read transaction: run it in a
        worker thread for a large table, and do not await while iterating."""
        p = self._key(prefix)
        with self._kv.read() as txn:
            cur = txn.cursor(db=self._db)
            if not cur.set_range(p):
                return
            for k, v in cur:
                key = bytes(k)
                if not key.startswith(p):
                    return
                yield key, len(key) + len(v) + ROW_OVERHEAD

    def scan_raw(
        self,
        prefix: bytes | str = b"",
        *,
        after: bytes | str | None = None,
        limit: int | None = None,
        txn: Txn | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` (key, stored bytes) pairs whose key starts with ``prefix``, in key
        order, starting just after the key ``after`` if given (it need not exist), else at
        the first key of the prefix. Reads only what it returns: paging a large prefix with
        ``after`` costs one cursor seek per page, never a walk from the start."""
        p = self._key(prefix)
        start = p if after is None else self._key(after)
        items: list[tuple[bytes, bytes]] = []
        if limit is not None and limit <= 0:
            return items
        with self._reading(txn) as t:
            cur = t.cursor(db=self._db)
            if not cur.set_range(max(start, p)):
                return items
            for k, v in cur:
                key = bytes(k)
                if not key.startswith(p):
                    break
                if after is not None and key == start:
                    continue
                items.append((key, bytes(v)))
                if limit is not None and len(items) >= limit:
                    break
        return items

    def scan(
        self,
        prefix: bytes | str = b"",
        *,
        after: bytes | str | None = None,
        limit: int | None = None,
        txn: Txn | None = None,
    ) -> Iterator[tuple[bytes, T]]:
        """Entries whose key starts with ``prefix``, in key order (a snapshot of at most
        ``limit`` entries, all of them if None), just after ``after`` if given (see
        :meth:`scan_raw`). The read transaction ends before the first entry is yielded
        (unless it is ``txn``), so callers may write while iterating."""
        items = self.scan_raw(prefix, after=after, limit=limit, txn=txn)
        for k, v in items:
            yield k, self._dec.decode(v)

    def keys(self, prefix: bytes | str = b"", *, txn: Txn | None = None) -> list[bytes]:
        """Every key that starts with ``prefix``, in key order (values are not read)."""
        p = self._key(prefix)
        out: list[bytes] = []
        with self._reading(txn) as t:
            cur = t.cursor(db=self._db)
            if cur.set_range(p):
                for k in cur.iternext(keys=True, values=False):
                    key = bytes(k)
                    if not key.startswith(p):
                        break
                    out.append(key)
        return out

    def last_keys(self, prefix: bytes | str, count: int, *, txn: Txn | None = None) -> list[bytes]:
        """The ``count`` greatest keys that start with ``prefix``, greatest first: one seek
        and ``count`` steps back, whatever the number of entries under the prefix."""
        p = self._key(prefix)
        out: list[bytes] = []
        if count <= 0:
            return out
        with self._reading(txn) as t:
            cur = t.cursor(db=self._db)
            succ = _successor(p)
            found = cur.prev() if succ is not None and cur.set_range(succ) else cur.last()
            while found:
                key = bytes(cur.key())
                if not key.startswith(p):
                    break
                out.append(key)
                if len(out) >= count:
                    break
                found = cur.prev()
        return out

    def last(self, prefix: bytes | str, *, txn: Txn | None = None) -> tuple[bytes, T] | None:
        """The entry with the greatest key that starts with ``prefix`` (None if none): one
        seek, whatever the number of entries under the prefix."""
        p = self._key(prefix)
        with self._reading(txn) as t:
            cur = t.cursor(db=self._db)
            # the first key past every key that starts with p, then one step back
            succ = _successor(p)
            found = cur.prev() if succ is not None and cur.set_range(succ) else cur.last()
            if not found:
                return None
            key = bytes(cur.key())
            if not key.startswith(p):
                return None
            return key, self._dec.decode(cur.value())


def _successor(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key that starts with ``prefix``; None when there
    is none (an empty prefix or one of only 0xff bytes: every key starts with it or is
    smaller)."""
    p = prefix.rstrip(b"\xff")
    if not p:
        return None
    return p[:-1] + bytes([p[-1] + 1])
