"""Corruption is not a torn tail: damage to stored batches, on real files.

Bytes are flipped and 4 KiB blocks zeroed in sealed and active segments, in headers and
bodies, below and above the recovery checkpoint. Whatever the damage: nothing else is lost
(every other acknowledged record reads back byte for byte), nothing damaged is served, the
error names the offsets, only a torn tail (past the checkpoint, nothing valid after it) is
ever cut, and no read spins."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import records, segment
from storage.checkpoint import FILE_NAME as CHECKPOINT_FILE
from storage.checkpoint import read_checkpoint
from storage.errors import CorruptData
from storage.partition import Partition, PartitionConfig
from storage.quarantine import FILE_NAME as QUARANTINE_FILE
from storage.quarantine import read_quarantine
from tests.unit.storage.test_partition import (
    Clock,
    assert_values_match_offsets,
    batch,
    crash_image,
    open_partition,
    read_around,
    values_for,
)

CONFIG = PartitionConfig(segment_bytes=4096, index_interval_bytes=512)
BATCHES = 60
PER_BATCH = 3
BLOCK = 4096


@dataclass(frozen=True)
class Stored:
    """One batch as it lies on disk."""

    segment: int
    position: int
    length: int
    base_offset: int
    count: int

    @property
    def offsets(self) -> range:
        return range(self.base_offset, self.base_offset + self.count)


def layout(directory: Path) -> list[Stored]:
    out = []
    for base in segment.list_segments(directory):
        data = (directory / f"{base:020d}.log").read_bytes()
        data = data[: segment.fill_start(data)]  # an active segment's preallocated fill
        for pos, h in records.iter_batches(data, verify=True):
            out.append(Stored(base, pos, h.batch_length, h.base_offset, h.record_count))
    return out


async def build(directory: Path, checkpoint: str) -> list[Stored]:
    """A partition of ~6 segments of 4 KiB whose every record says its offset.

    ``checkpoint``: ``"clean"`` (closed: the checkpoint covers everything), ``"crash"``
    (killed: the checkpoint lags, the active segment's end is past it) or ``"none"`` (no
    checkpoint: every byte is past it)."""
    part = open_partition(directory / "live", config=CONFIG, clock=Clock())
    for i in range(BATCHES):
        first = part.log_end_offset
        await part.append([batch(values_for(first, PER_BATCH, size=90 + i % 7))])
    if checkpoint == "clean":
        await part.close()
        shutil.copytree(directory / "live", directory / "p")
    else:
        crash_image(directory / "live", directory / "p")  # what kill -9 leaves
        await part.close()
        if checkpoint == "none":
            (directory / "p" / CHECKPOINT_FILE).unlink()
    return layout(directory / "p")


def trusted_end(directory: Path) -> tuple[int, int]:
    """(segment, position) below which the checkpoint vouches for the bytes."""
    ck = read_checkpoint(directory)
    return (ck.segment_base, ck.position) if ck else (-1, 0)


def damage(directory: Path, seg: int, start: int, kind: str) -> tuple[int, int]:
    """Flip the byte at ``start`` or zero the 4 KiB block from ``start``; returns the
    damaged byte range."""
    path = directory / f"{seg:020d}.log"
    data = bytearray(path.read_bytes())
    if kind == "flip":
        data[start] ^= 0x5A
        end = start + 1
    else:
        end = min(start + BLOCK, len(data))
        data[start:end] = bytes(end - start)
    path.write_bytes(bytes(data))
    return start, end


def damaged_batches(stored: list[Stored], seg: int, start: int, end: int) -> list[Stored]:
    return [
        b for b in stored if b.segment == seg and b.position < end and start < b.position + b.length
    ]


async def check_outcome(
    directory: Path, stored: list[Stored], hit: list[Stored], trusted: tuple[int, int]
) -> None:
    """Open the damaged partition and check the rules of this module. ``trusted``: the
    checkpoint's (segment, position), as :func:`trusted_end` read it before the open."""
    total = stored[-1].base_offset + stored[-1].count
    lost = {o for b in hit for o in b.offsets}

    def below(b: Stored) -> bool:
        return b.segment < trusted[0] or (
            b.segment == trusted[0] and b.position + b.length <= trusted[1]
        )

    above = [b for b in hit if not below(b)]
    # a torn tail: damage past the checkpoint with nothing intact after it in the log
    torn = bool(above) and all(b in hit for b in stored[stored.index(above[0]) :])
    cut = {o for b in above for o in b.offsets} if torn else set()
    part, report = Partition.open(directory, CONFIG)
    try:
        found, errors = await asyncio.wait_for(asyncio.to_thread(read_around, part), 20)
        # nothing else is lost, byte for byte; nothing damaged is served
        assert sorted(found) == sorted(set(range(total)) - lost)
        assert_values_match_offsets(found)
        assert not lost & set(found)
        # the errors name exactly the damaged offsets that were not cut
        named = {o for e in errors for o in range(e.first_offset, e.end_offset)}
        assert named == lost - cut
        if torn:  # cut, or (a whole last segment damaged) removed
            assert report.truncated_bytes > 0 or report.removed_segments == [above[0].segment]
            assert part.log_end_offset == part.high_watermark == above[0].base_offset
        else:
            assert report.truncated_bytes == 0, report
            assert report.removed_segments == []
            assert part.log_end_offset == part.high_watermark == total
        if named:
            assert part.quarantined and part.corruptions_detected >= 1
            assert read_quarantine(directory) == part.quarantined
        for e in errors:  # the operator's way past the damage
            assert part.next_readable_offset(e.first_offset) == e.end_offset
            if e.end_offset < part.high_watermark:
                assert part.read(e.end_offset, 1 << 20)
        # the log goes on: the next append gets the next offset, never a reused one
        end = part.log_end_offset
        assert (await part.append([batch(values_for(end, 1))])).base_offset == end
    finally:
        await part.close()


# ----------------------------------------------------------------- the damage matrix
@pytest.mark.parametrize("checkpoint", ["clean", "crash", "none"])
@pytest.mark.parametrize("where", ["sealed", "active"])
@pytest.mark.parametrize("what", ["header", "body", "block"])
async def test_damage_is_quarantined_and_nothing_else_is_lost(
    tmp_path: Path, checkpoint: str, where: str, what: str
) -> None:
    stored = await build(tmp_path, checkpoint)
    directory = tmp_path / "p"
    segs = sorted({b.segment for b in stored})
    seg = segs[1] if where == "sealed" else segs[-1]
    mine = [b for b in stored if b.segment == seg]
    victim = mine[1]  # never the last batch of the log: damage there may be a torn tail
    if what == "header":
        start, kind = victim.position + 9, "flip"  # batch_length's second byte
    elif what == "body":
        start, kind = victim.position + victim.length // 2, "flip"
    else:
        start, kind = victim.position, "block"
    lo, hi = damage(directory, seg, start, kind)
    hit = damaged_batches(stored, seg, lo, hi)
    await check_outcome(directory, stored, hit, trusted_end(directory))


@pytest.mark.parametrize("checkpoint", ["crash", "none"])
async def test_damage_at_the_end_of_the_log_past_the_checkpoint_is_a_torn_tail(
    tmp_path: Path, checkpoint: str
) -> None:
    stored = await build(tmp_path, checkpoint)
    directory = tmp_path / "p"
    last = stored[-1]
    damage(directory, last.segment, last.position + 70, "flip")
    part, report = Partition.open(directory, CONFIG)
    try:
        assert report.truncated_bytes == last.length
        assert report.quarantined == [] and part.quarantined == []
        assert part.log_end_offset == last.base_offset
        found, errors = read_around(part)
        assert errors == [] and sorted(found) == list(range(last.base_offset))
    finally:
        await part.close()


async def test_damage_at_the_end_of_the_log_below_the_checkpoint_is_not_cut(
    tmp_path: Path,
) -> None:
    stored = await build(tmp_path, "clean")
    directory = tmp_path / "p"
    last = stored[-1]
    damage(directory, last.segment, last.position + 5, "flip")  # its base offset
    part, report = Partition.open(directory, CONFIG)
    try:
        assert report.truncated_bytes == 0
        assert part.log_end_offset == last.base_offset + last.count
        found, errors = read_around(part)
        assert [(e.first_offset, e.end_offset) for e in errors] == [
            (last.base_offset, last.base_offset + last.count)
        ]
        assert sorted(found) == list(range(last.base_offset))
    finally:
        await part.close()


# -------------------------------------------------------------- found by a read, live
@pytest.mark.timeout(20)
@pytest.mark.parametrize("where", ["sealed", "active"])
@pytest.mark.parametrize("read", ["sync", "async"])
async def test_damage_found_by_a_read_is_quarantined_durably_and_survives_a_restart(
    tmp_path: Path, where: str, read: str, caplog: pytest.LogCaptureFixture
) -> None:
    part = open_partition(tmp_path / "p", config=CONFIG, clock=Clock())
    try:
        for _ in range(BATCHES):
            first = part.log_end_offset
            await part.append([batch(values_for(first, PER_BATCH, size=100))])
        segs = part.segments
        seg = segs[1] if where == "sealed" else segs[-1]
        stored = [b for b in layout(tmp_path / "p") if b.segment == seg.base_offset]
        victim = stored[1]
        # a zeroed block in the page cache of the open file: what the reads see
        fd = os.open(seg.log_path, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(BLOCK // 8), victim.position)
        finally:
            os.close(fd)
        hit = damaged_batches(stored, seg.base_offset, victim.position, victim.position + 512)
        lost = {o for b in hit for o in b.offsets}
        assert part.quarantined == []
        with caplog.at_level(logging.ERROR, logger="herald.storage"):
            if read == "async":
                with pytest.raises(CorruptData) as info:
                    await part.read_async(victim.base_offset, 1 << 20)
            else:
                with pytest.raises(CorruptData) as info:
                    part.read(victim.base_offset, 1 << 20)
        err = info.value
        assert (err.first_offset, err.end_offset) == (min(lost), max(lost) + 1)
        assert err.code == "corrupt_data" and not err.retriable
        assert str(min(lost)) in str(err) and str(max(lost)) in str(err)
        assert f"first_offset={min(lost)}" in caplog.text and "event=corrupt_data" in caplog.text
        assert part.corruptions_detected == 1
        (rng,) = part.quarantined
        assert read_quarantine(tmp_path / "p") == [rng]
        # a read that starts before the damage gets the good batches before it, then stops
        data = part.read(stored[0].base_offset, 1 << 20)
        served = [h.base_offset for _p, h in records.iter_batches(data, verify=True)]
        assert served == [stored[0].base_offset]
        found, errors = read_around(part)
        assert [(e.first_offset, e.end_offset) for e in errors] == [(min(lost), max(lost) + 1)]
        assert sorted(found) == sorted(set(range(BATCHES * PER_BATCH)) - lost)
        assert_values_match_offsets(found)
    finally:
        await part.close()
    # the checkpoint covers the damage, so recovery does not look at it: the quarantine
    # file keeps it known
    again, report = Partition.open(tmp_path / "p", CONFIG)
    try:
        assert report.quarantined_total == 1
        with pytest.raises(CorruptData):
            again.read(min(lost), 100)
        assert again.read(max(lost) + 1, 100)
    finally:
        await again.close()


@pytest.mark.timeout(10)
async def test_a_fetch_across_a_zeroed_block_never_spins(tmp_path: Path) -> None:
    part = open_partition(tmp_path / "p", config=PartitionConfig(index_interval_bytes=1 << 20))
    try:
        for _ in range(40):  # one segment, one index entry: walks cross the block
            first = part.log_end_offset
            await part.append([batch(values_for(first, 2, size=300))])
        (seg,) = part.segments
        fd = os.open(seg.log_path, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(BLOCK), BLOCK)
        finally:
            os.close(fd)
        # from the start (served up to the block), into it, and past it
        assert part.read(0, 1 << 20)
        for offset in range(0, part.high_watermark, 7):
            try:
                data = await part.read_async(offset, 1 << 20)
            except CorruptData as exc:
                assert exc.first_offset <= offset < exc.end_offset
                continue
            assert list(records.iter_batches(data, verify=True))
        (rng,) = part.quarantined
        assert rng.length >= BLOCK
    finally:
        await part.close()


async def test_offsets_missing_below_the_checkpoint_are_quarantined_not_reused(
    tmp_path: Path,
) -> None:
    stored = await build(tmp_path, "clean")
    directory = tmp_path / "p"
    last = stored[-1]
    path = directory / f"{last.segment:020d}.log"
    os.truncate(path, last.position)  # the file lost its synced end
    part, report = Partition.open(directory, CONFIG)
    try:
        (rng,) = report.quarantined
        assert (rng.length, rng.first_offset, rng.end_offset) == (
            0,
            last.base_offset,
            last.base_offset + last.count,
        )
        assert part.log_end_offset == last.base_offset + last.count  # not handed out again
        found, errors = read_around(part)
        assert sorted(found) == list(range(last.base_offset))
        assert len(errors) == 1
        end = part.log_end_offset
        assert (await part.append([batch(values_for(end, 2))])).base_offset == end
        found, _errors = read_around(part)
        assert {end, end + 1} <= set(found)
    finally:
        await part.close()


async def test_retention_forgets_the_ranges_of_the_segments_it_deletes(tmp_path: Path) -> None:
    stored = await build(tmp_path, "clean")
    directory = tmp_path / "p"
    first = stored[1]
    damage(directory, first.segment, first.position + 70, "flip")
    cfg = PartitionConfig(segment_bytes=4096, index_interval_bytes=512, retention_bytes=1)
    part, _report = Partition.open(directory, cfg)
    try:
        with pytest.raises(CorruptData):
            part.read(first.base_offset, 100)
        assert (directory / QUARANTINE_FILE).exists()
        assert part.apply_retention()
        assert part.quarantined == []
        assert not (directory / QUARANTINE_FILE).exists()
    finally:
        await part.close()


# ------------------------------------------------------------------ property: any damage
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    checkpoint=st.sampled_from(["clean", "crash", "none"]),
    kind=st.sampled_from(["flip", "block"]),
    where=st.floats(min_value=0, max_value=0.999),
)
async def test_any_single_damage_loses_only_the_damaged_batches(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: str, kind: str, where: float
) -> None:
    tmp = tmp_path_factory.mktemp("damage")
    stored = await build(tmp, checkpoint)
    directory = tmp / "p"
    total_bytes = sum(b.length for b in stored)
    at = int(where * total_bytes)
    for b in stored:  # the byte ``at`` of the log, counted over its segments in order
        if at < b.length:
            seg, start = b.segment, b.position + at
            break
        at -= b.length
    lo, hi = damage(directory, seg, start, kind)
    hit = damaged_batches(stored, seg, lo, hi)
    await check_outcome(directory, stored, hit, trusted_end(directory))
