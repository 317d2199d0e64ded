"""The node's small mutable state in one LMDB environment (``<data>/state``): consumer-group
offsets, producer-id reservations, the event-id index; the subscription registry, contacts
and timers later.

No other module imports ``lmdb``. Values are ``msgspec`` structs encoded as msgpack through a
typed :class:`Table`, so a reader gets the type it stored or a clear error.

Durability: the environment is opened without a sync per transaction (LMDB's ``NOSYNC``:
integrity is kept; a power loss may undo the last transactions, a killed process loses
nothing). Callers that must not lose a write await :meth:`KV.sync`, which group-commits: all
writes made before the call are synced by one ``fsync`` in a worker thread, shared by every
caller that arrived meanwhile. Write transactions are short and never span an ``await``.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Generic, TypeVar

import lmdb
import msgspec

from storage.errors import StorageError, StorageFull
from storage.segment import fsync_dir

T = TypeVar("T")


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
        self._sync_task: asyncio.Task[None] | None = None
        self._requested = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.path = path

    def table(self, name: str, value_type: type[T]) -> Table[T]:
        """The table ``name`` holding values of ``value_type`` (created on first use)."""
        db = self._env.open_db(name.encode())
        return Table(self, db, value_type)

    def write(self) -> lmdb.Transaction:
        return self._env.begin(write=True)

    def read(self) -> lmdb.Transaction:
        return self._env.begin(write=False)

    def sync_now(self) -> None:
        """Blocking fsync of the environment."""
        self._env.sync(True)

    async def sync(self) -> None:
        """Make every write made before this call durable. Concurrent callers share one
        fsync (group commit). Raises :class:`StorageError` if the sync fails."""
        loop = asyncio.get_running_loop()
        self._requested += 1
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((self._requested, fut))
        if self._sync_task is None:
            self._sync_task = loop.create_task(self._sync_loop(), name="kv-sync")
        await fut

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiters:
                upto = self._requested
                error: StorageError | None = None
                try:
                    await loop.run_in_executor(None, self.sync_now)
                except lmdb.Error as exc:
                    error = StorageError(f"state store sync failed: {exc}")
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
        finally:
            self._sync_task = None

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()


class Table(Generic[T]):
    """A typed key -> struct table. Keys are ``bytes`` or ``str`` (UTF-8)."""

    def __init__(self, kv: KV, db: lmdb._Database, value_type: type[T]) -> None:
        self._kv = kv
        self._db = db
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(value_type)

    @staticmethod
    def _key(key: bytes | str) -> bytes:
        return key.encode() if isinstance(key, str) else key

    def get(self, key: bytes | str) -> T | None:
        with self._kv.read() as txn:
            raw = txn.get(self._key(key), db=self._db)
        return None if raw is None else self._dec.decode(raw)

    def put(self, key: bytes | str, value: T) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: list[tuple[bytes | str, T]]) -> None:
        """Write many entries in one transaction. Raises :class:`StorageFull` when the map
        or the disk is full, :class:`StorageError` for other write failures."""
        try:
            with self._kv.write() as txn:
                for key, value in items:
                    txn.put(self._key(key), self._enc.encode(value), db=self._db)
        except lmdb.Error as exc:
            raise write_failed(exc) from exc

    def delete(self, key: bytes | str) -> bool:
        try:
            with self._kv.write() as txn:
                return bool(txn.delete(self._key(key), db=self._db))
        except lmdb.Error as exc:
            raise write_failed(exc) from exc

    def delete_prefix(self, prefix: bytes | str) -> int:
        p = self._key(prefix)
        n = 0
        try:
            with self._kv.write() as txn:
                cur = txn.cursor(db=self._db)
                if cur.set_range(p):
                    while bytes(cur.key()).startswith(p):
                        if not cur.delete():
                            break
                        n += 1
                        if not cur.key():
                            break
        except lmdb.Error as exc:
            raise write_failed(exc) from exc
        return n

    def delete_many(self, keys: list[bytes | str]) -> int:
        """Delete ``keys`` in one transaction; returns how many existed."""
        n = 0
        try:
            with self._kv.write() as txn:
                for key in keys:
                    n += bool(txn.delete(self._key(key), db=self._db))
        except lmdb.Error as exc:
            raise write_failed(exc) from exc
        return n

    def scan(
        self, prefix: bytes | str = b"", *, limit: int | None = None
    ) -> Iterator[tuple[bytes, T]]:
        """Entries whose key starts with ``prefix``, in key order (a snapshot of at most
        ``limit`` entries, all of them if None). The read transaction ends before the first
        entry is yielded, so callers may write while iterating."""
        p = self._key(prefix)
        with self._kv.read() as txn:
            cur = txn.cursor(db=self._db)
            items: list[tuple[bytes, bytes]] = []
            if cur.set_range(p):
                for k, v in cur:
                    if not bytes(k).startswith(p) or (limit is not None and len(items) >= limit):
                        break
                    items.append((bytes(k), bytes(v)))
        for k, v in items:
            yield k, self._dec.decode(v)
