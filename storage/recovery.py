"""Recovery: what opening a partition does to the files it finds, and the report of it.

The rule: bytes the recovery checkpoint covers were synced before the checkpoint was
written, so they are trusted; what follows it (about one checkpoint interval of appends,
or one segment, whichever is smaller) is verified batch by batch. Start-up time therefore
depends on the checkpoint interval, not on the size of the log.

:func:`recover` is blocking (it reads, truncates and syncs files): at start-up call it
before serving, or from a thread. It returns the segments and the idempotent-producer table
the partition starts from, and a :class:`RecoveryReport` saying exactly what it did.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple

import msgspec

from storage.checkpoint import read_checkpoint
from storage.errors import CorruptBatch
from storage.producers import ProducerTable
from storage.segment import Segment, fsync_dir, list_segments, remove_segment_files

log = logging.getLogger("herald.storage")


class RecoveryReport(msgspec.Struct, frozen=True):
    """What opening a partition found. ``truncated_bytes`` > 0 means a torn or corrupt tail
    was cut; ``scanned_bytes`` is what recovery read (bounded by the checkpoint interval, not
    by the log size)."""

    partition: str
    checkpoint_found: bool
    scanned_bytes: int
    truncated_bytes: int
    removed_segments: list[int]
    next_offset: int
    seconds: float


class Recovered(NamedTuple):
    """What a partition opens with: its segments (oldest first, the last one active), its
    idempotent-producer table, and the report."""

    segments: list[Segment]
    producers: ProducerTable
    report: RecoveryReport


def recover(directory: Path, *, index_interval_bytes: int, name: str) -> Recovered:
    """Recover the partition in ``directory`` (created if missing).

    Trusts the bytes before the checkpoint and scans only what follows: every batch past it
    is verified (both checksums, contiguous offsets); the first batch that fails, and
    everything after it, is cut and reported. Every segment whose tail was read is synced
    before this returns, so what it kept is on disk. Blocking."""
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = read_checkpoint(directory)
    bases = list_segments(directory)
    segments: list[Segment] = []
    scanned = truncated = 0
    removed: list[int] = []
    producers = ProducerTable.restore(checkpoint.producers) if checkpoint else ProducerTable()
    if checkpoint is not None and checkpoint.segment_base not in bases:
        checkpoint = None  # the checkpoint names a segment that is gone: trust nothing
        producers = ProducerTable()
    cut = False
    rescanned: list[Segment] = []  # segments whose tail recovery read: sync before trusting
    for base in bases:
        expected = segments[-1].next_offset if segments else None
        if cut or (expected is not None and base != expected):
            # past a cut, or a gap or overlap between segments: nothing here can be
            # trusted (nor parsed: it may be torn too)
            removed.append(base)
            remove_segment_files(directory, base)
            cut = True
            continue
        if checkpoint is not None and base < checkpoint.segment_base:
            trusted: int | None = None
        elif checkpoint is not None and base == checkpoint.segment_base:
            trusted = checkpoint.position
        else:
            trusted = 0
        try:
            seg = Segment.open(
                directory, base, index_interval_bytes=index_interval_bytes, trusted_size=trusted
            )
        except CorruptBatch:
            seg = Segment.open(
                directory, base, index_interval_bytes=index_interval_bytes, trusted_size=0
            )
            trusted = 0
        if trusted is not None:
            rescanned.append(seg)
            start = seg.size
            kept, lost = seg.recover_tail()
            scanned += kept + lost
            truncated += lost
            if kept:
                _replay_producers(seg, start, producers)
            if lost:
                cut = True
        segments.append(seg)
    if not segments:
        start_offset = checkpoint.next_offset if checkpoint else 0
        segments.append(
            Segment.create(directory, start_offset, index_interval_bytes=index_interval_bytes)
        )
        fsync_dir(directory)
    if truncated or removed:
        producers.truncate(segments[-1].next_offset)
    report = RecoveryReport(
        partition=name,
        checkpoint_found=checkpoint is not None,
        scanned_bytes=scanned,
        truncated_bytes=truncated,
        removed_segments=removed,
        next_offset=segments[-1].next_offset,
        seconds=time.perf_counter() - started,
    )
    if truncated or removed:
        log.warning(
            "event=recovery_truncated partition=%s truncated_bytes=%d removed_segments=%s "
            "next_offset=%d",
            name,
            truncated,
            removed,
            report.next_offset,
        )
    # what survived recovery is on disk as far as we can tell; make it so
    for seg in rescanned:
        if not seg.closed:
            seg.sync()
    return Recovered(segments, producers, report)


def _replay_producers(seg: Segment, start: int, producers: ProducerTable) -> None:
    for _pos, header in seg._walk(start, seg.size, verify=False):
        if header.producer_id >= 0:
            producers.update(
                header.producer_id,
                header.base_sequence,
                header.record_count,
                header.base_offset,
                header.max_timestamp,
            )
