"""The node's log of topics (``storage/log.py``): create, list, reopen, delete."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from storage import records
from storage.errors import StorageError
from storage.log import META_FILE, Log, TopicExists, UnknownTopic
from storage.partition import PartitionConfig


def _batch(value: bytes) -> bytes:
    return records.encode_batch([(0, None, value)], first_timestamp=1_700_000_000_000)


async def _reopen(data: Path) -> Log:
    log = Log(data)
    log.open()
    return log


async def test_create_topic_opens_its_partitions(tmp_path: Path) -> None:
    log = Log(tmp_path)
    try:
        cfg = PartitionConfig(segment_bytes=4096, retention_ms=None)
        meta = log.create_topic("orders", 3, cfg)
        assert (meta.name, meta.partitions, meta.config, meta.internal) == ("orders", 3, cfg, False)
        assert set(log.topics) == {"orders"}
        assert sorted(log.partitions) == [("orders", 0), ("orders", 1), ("orders", 2)]
        assert sorted(p.name for p in (tmp_path / "log" / "orders").iterdir()) == [
            "0",
            "1",
            "2",
            META_FILE,
        ]
        result = await log.partition("orders", 2).append([_batch(b"hello")])
        assert result.base_offset == 0
        assert log.partition("orders", 2).config == cfg
    finally:
        await log.close()


async def test_create_refuses_duplicates_and_empty_topics(tmp_path: Path) -> None:
    log = Log(tmp_path)
    try:
        log.create_topic("a", 1, PartitionConfig())
        with pytest.raises(TopicExists):
            log.create_topic("a", 2, PartitionConfig())
        with pytest.raises(StorageError):
            log.create_topic("b", 0, PartitionConfig())
        assert set(log.topics) == {"a"}
    finally:
        await log.close()


async def test_unknown_topic_or_partition(tmp_path: Path) -> None:
    log = Log(tmp_path)
    try:
        log.create_topic("a", 2, PartitionConfig())
        with pytest.raises(UnknownTopic, match="unknown topic"):
            log.partition("nope", 0)
        with pytest.raises(UnknownTopic, match="no partition 2"):
            log.partition("a", 2)
        with pytest.raises(UnknownTopic):
            await log.delete_topic("nope")
    finally:
        await log.close()


async def test_reopen_finds_topics_configs_and_records(tmp_path: Path) -> None:
    log = Log(tmp_path)
    cfg = PartitionConfig(segment_bytes=8192, retention_bytes=1 << 20)
    log.create_topic("orders", 2, cfg)
    log.create_topic("__groups", 1, PartitionConfig(), internal=True)
    await log.partition("orders", 1).append([_batch(b"a"), _batch(b"b")])
    await log.close()

    again = await _reopen(tmp_path)
    try:
        assert set(again.topics) == {"orders", "__groups"}
        assert again.topics["orders"].config == cfg
        assert again.topics["__groups"].internal
        assert len(again.recovery) == 3
        assert all(r.truncated_bytes == 0 for r in again.recovery)
        p1 = again.partition("orders", 1)
        assert p1.high_watermark == 2
        assert [h.base_offset for _pos, h in records.iter_batches(p1.read(0, 1 << 20))] == [0, 1]
        assert again.partition("orders", 0).high_watermark == 0
        assert (await p1.append([_batch(b"c")])).base_offset == 2
    finally:
        await again.close()


async def test_delete_topic_removes_it_now_and_after_reopen(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.create_topic("a", 2, PartitionConfig())
    log.create_topic("b", 1, PartitionConfig())
    await log.partition("a", 0).append([_batch(b"x")])
    await log.delete_topic("a")
    assert set(log.topics) == {"b"}
    assert ("a", 0) not in log.partitions
    assert sorted(os.listdir(tmp_path / "log")) == ["b"]
    # the name can be used again, starting empty
    log.create_topic("a", 1, PartitionConfig())
    assert log.partition("a", 0).high_watermark == 0
    await log.close()
    again = await _reopen(tmp_path)
    try:
        assert set(again.topics) == {"a", "b"}
        assert again.topics["a"].partitions == 1
        assert again.partition("a", 0).high_watermark == 0
    finally:
        await again.close()


async def test_interrupted_delete_is_finished_on_open(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.create_topic("gone", 2, PartitionConfig())
    log.create_topic("kept", 1, PartitionConfig())
    await log.close()
    # a crash after the rename, before (or during) the removal of the files
    root = tmp_path / "log"
    os.rename(root / "gone", root / "gone.1700000000000000000.deleted")
    (root / "gone.1700000000000000000.deleted" / "0" / "recovery-checkpoint").unlink()

    again = await _reopen(tmp_path)
    try:
        assert set(again.topics) == {"kept"}
        assert sorted(os.listdir(root)) == ["kept"]
        assert [r.partition for r in again.recovery] == ["kept-0"]
    finally:
        await again.close()


async def test_a_topic_whose_create_was_interrupted_is_not_listed_and_can_be_created(
    tmp_path: Path,
) -> None:
    log = Log(tmp_path)
    log.create_topic("half", 2, PartitionConfig())
    await log.close()
    # a crash before the meta file was written: the topic never existed
    (tmp_path / "log" / "half" / META_FILE).unlink()

    again = await _reopen(tmp_path)
    try:
        assert again.topics == {}
        assert again.partitions == {}
        again.create_topic("half", 1, PartitionConfig())
        assert (await again.partition("half", 0).append([_batch(b"x")])).base_offset == 0
    finally:
        await again.close()
    third = await _reopen(tmp_path)
    try:
        assert third.topics["half"].partitions == 1
    finally:
        await third.close()


async def test_retention_runs_over_every_partition(tmp_path: Path) -> None:
    log = Log(tmp_path)
    try:
        cfg = PartitionConfig(retention_ms=1000)
        log.create_topic("t", 2, cfg)
        for p in range(2):
            part = log.partition("t", p)
            await part.append([_batch(b"old")])
            part.roll()
            await part.flush()
        assert log.apply_retention() == 2
        assert [log.partition("t", p).log_start_offset for p in range(2)] == [1, 1]
    finally:
        await log.close()


async def test_creating_a_topic_while_its_deletion_runs_is_refused_then_works(
    tmp_path: Path,
) -> None:
    from storage.log import TopicBeingDeleted

    log = Log(tmp_path)
    log.open()
    log.create_topic("t", 2, PartitionConfig())
    deletion = asyncio.ensure_future(log.delete_topic("t"))
    await asyncio.sleep(0)  # the deletion is closing the partitions
    with pytest.raises(TopicBeingDeleted):
        log.create_topic("t", 1, PartitionConfig())
    await deletion
    assert log.create_topic("t", 1, PartitionConfig()).partitions == 1
    await log.close()
