"""The node's log: every topic's partitions under ``<data>/log/<topic>/<partition>/``.

A topic directory holds ``topic.meta`` (partition count and storage settings, written
atomically) and one directory per partition. Deleting a topic renames its directory out of
the way first (one atomic step), then removes the files, so a crash mid-delete never leaves
a half-topic that looks alive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path

import msgspec

from storage.errors import StorageError, TopicBeingDeleted, TopicExists, UnknownTopic
from storage.io_threads import IoThreads
from storage.partition import Partition, PartitionConfig, RecoveryReport
from storage.segment import fsync_dir

log = logging.getLogger("herald.storage")

META_FILE = "topic.meta"
_DELETED_SUFFIX = ".deleted"


class TopicMeta(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    partitions: int
    config: PartitionConfig
    created_ms: int
    internal: bool = False
    # who the topic belongs to (the broker's tenant), kept with the topic itself so that a
    # topic and its owner become durable in one step (None: topics made before owners were
    # kept here; the broker falls back to its own record)
    owner: str | None = None


_meta_enc = msgspec.msgpack.Encoder()
_meta_dec = msgspec.msgpack.Decoder(TopicMeta)


def _write_meta(directory: Path, meta: TopicMeta) -> None:
    tmp = directory / (META_FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_meta_enc.encode(meta))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / META_FILE)
    fsync_dir(directory)


def _delete_in_place(path: Path) -> None:
    """Delete a topic directory without a rename: the meta file first (durably: from then
    on the topic does not exist), then the rest, which frees the space."""
    try:
        (path / META_FILE).unlink()
    except FileNotFoundError:
        pass
    fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)
    fsync_dir(path.parent)


class Log:
    """All partitions of one node. Topic names are validated by the broker, not here."""

    def __init__(
        self,
        data_dir: Path,
        *,
        io_threads: int = 8,
        inline_sync_max_ms: float = 0,
        sync_engine: str = "aio",
    ) -> None:
        self.root = data_dir / "log"
        # the threads every partition's write and sync jobs run on (storage/io_threads.py)
        # (and, with inline_sync_max_ms > 0, a lone append's on the loop when they are idle)
        # (and, with sync_engine "aio", plain fdatasyncs go to the kernel's AIO instead)
        self.io = IoThreads(
            io_threads,
            name="herald-io",
            inline_max_ms=inline_sync_max_ms,
            sync_engine=sync_engine,
        )
        self.root.mkdir(parents=True, exist_ok=True)
        # a new directory's name is durable only once its parent is fsynced: without this a
        # power cut soon after a fresh node's first start could take the whole log with it
        fsync_dir(self.root)
        fsync_dir(data_dir)
        self.topics: dict[str, TopicMeta] = {}
        self.partitions: dict[tuple[str, int], Partition] = {}
        self.recovery: list[RecoveryReport] = []
        self._deleting: set[str] = set()

    def open(self) -> list[RecoveryReport]:
        """Open and recover every topic found on disk; finish interrupted deletions."""
        reports: list[RecoveryReport] = []
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            path = Path(entry.path)
            if entry.name.endswith(_DELETED_SUFFIX):
                shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                meta = _meta_dec.decode((path / META_FILE).read_bytes())
            except FileNotFoundError:
                # a create that crashed before its meta file: the topic never existed and
                # its partitions never acknowledged a write; do not keep its files around
                log.warning("event=half_made_topic_removed dir=%s", entry.name)
                shutil.rmtree(path, ignore_errors=True)
                continue
            except msgspec.DecodeError as exc:
                log.error("event=topic_unreadable dir=%s error=%r", entry.name, exc)
                continue
            self.topics[meta.name] = meta
            for p in range(meta.partitions):
                part, report = Partition.open(
                    path / str(p), meta.config, name=f"{meta.name}-{p}", io=self.io
                )
                self.partitions[(meta.name, p)] = part
                reports.append(report)
        self.recovery = reports
        return reports

    def create_topic(
        self,
        name: str,
        partitions: int,
        config: PartitionConfig,
        *,
        internal: bool = False,
        owner: str | None = None,
    ) -> TopicMeta:
        """Create a topic now (blocking: one checkpoint and a few fsyncs per partition).
        The broker creates tenants' topics with :meth:`check_create`, :meth:`prepare_topic`
        in a worker thread and :meth:`add_topic`, so the loop does not wait."""
        self.check_create(name, partitions)
        meta, parts = self.prepare_topic(name, partitions, config, internal=internal, owner=owner)
        self.add_topic(meta, parts)
        return meta

    def check_create(self, name: str, partitions: int) -> None:
        """Raise if ``name`` cannot be created now (exists, still being deleted)."""
        if name in self.topics:
            raise TopicExists(f"topic {name!r} already exists")
        if name in self._deleting:
            raise TopicBeingDeleted(f"topic {name!r} is being deleted; retry shortly")
        if partitions < 1:
            raise StorageError("a topic needs at least one partition")

    def prepare_topic(
        self,
        name: str,
        partitions: int,
        config: PartitionConfig,
        *,
        internal: bool = False,
        owner: str | None = None,
    ) -> tuple[TopicMeta, list[Partition]]:
        """Make the topic's directory, partitions and meta file, and return them open,
        not yet part of the log (:meth:`add_topic` does that, on the loop). Blocking and
        touching none of the log's shared state, so it may run in a worker thread. All or
        nothing: on any failure (or interruption) every file opened is closed and the
        directory removed before the error propagates, so no half-made topic or open file
        descriptor is left."""
        path = self.root / name
        opened: list[Partition] = []
        made = False
        try:
            if path.is_dir() and not (path / META_FILE).exists():
                # left by a create that crashed before its meta file: the topic never existed
                # and its partitions never acknowledged a write
                shutil.rmtree(path)
            path.mkdir(parents=True, exist_ok=False)
            made = True
            meta = TopicMeta(
                name=name,
                partitions=partitions,
                config=config,
                created_ms=time.time_ns() // 1_000_000,
                internal=internal,
                owner=owner,
            )
            for p in range(partitions):
                part, _ = Partition.open(path / str(p), config, name=f"{name}-{p}", io=self.io)
                opened.append(part)
            _write_meta(path, meta)  # the topic exists once its meta file does
            fsync_dir(self.root)
        except BaseException:
            for part in opened:
                for seg in part.segments:
                    seg.close()
            if made:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return meta, opened

    def add_topic(self, meta: TopicMeta, partitions: list[Partition]) -> None:
        """Make a prepared topic part of the log (on the loop)."""
        for p, part in enumerate(partitions):
            self.partitions[(meta.name, p)] = part
        self.topics[meta.name] = meta

    def set_owner(self, name: str, owner: str) -> None:
        """Record ``owner`` in the topic's meta file (atomically; topics made before owners
        were kept there)."""
        meta = msgspec.structs.replace(self.topics[name], owner=owner)
        _write_meta(self.root / name, meta)
        self.topics[name] = meta

    async def delete_topic(self, name: str) -> None:
        """Close the topic's partitions and remove its files. Works on a full disk (that is
        when an operator deletes a topic to free space): closing writes no more than a
        checkpoint, whose failure is logged; if the filesystem refuses even the rename
        that moves the topic aside, the topic is deleted in place, ``topic.meta`` first, so
        that it never comes back after a restart (a directory without one is not a topic).
        Raises :class:`UnknownTopic`."""
        meta = self.topics.pop(name, None)
        if meta is None:
            raise UnknownTopic(f"unknown topic {name!r}")
        # until the files are renamed away the name is taken: a create meanwhile (say, a
        # produce auto-creating it) would find the old directory
        self._deleting.add(name)
        loop = asyncio.get_running_loop()
        try:
            for p in range(meta.partitions):
                part = self.partitions.pop((name, p), None)
                if part is not None:
                    await part.close()
            path = self.root / name
            gone = self.root / f"{name}.{time.time_ns()}{_DELETED_SUFFIX}"
            try:
                os.rename(path, gone)
                fsync_dir(self.root)
            except OSError as exc:
                log.warning(
                    "event=topic_delete_in_place topic=%s error=%r: the rename was refused",
                    name,
                    exc,
                )
                await loop.run_in_executor(None, _delete_in_place, path)
                return
        finally:
            self._deleting.discard(name)
        await loop.run_in_executor(None, shutil.rmtree, gone, True)

    def partition(self, topic: str, index: int) -> Partition:
        try:
            return self.partitions[(topic, index)]
        except KeyError:
            if topic not in self.topics:
                raise UnknownTopic(f"unknown topic {topic!r}") from None
            raise UnknownTopic(f"topic {topic!r} has no partition {index}") from None

    def apply_retention(self) -> int:
        deleted = 0
        for part in list(self.partitions.values()):
            deleted += len(part.apply_retention())
        return deleted

    async def run_retention(self, interval_s: float) -> None:
        """Check retention every ``interval_s`` seconds until cancelled; the files go in a
        worker thread (:meth:`Partition.apply_retention_off_loop`)."""
        while True:
            await asyncio.sleep(interval_s)
            for part in list(self.partitions.values()):
                try:
                    await part.apply_retention_off_loop()
                except OSError as exc:  # e.g. the topic was deleted meanwhile; next round
                    log.error("event=retention_failed partition=%s error=%r", part.name, exc)

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.partitions.values()))
        self.partitions.clear()
        self.io.close()
