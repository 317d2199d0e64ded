"""Quarantine: how damage in a partition's log is delimited, recorded and stepped over.

Damage is stored bytes that fail their checks (a checksum, a length, an offset that does not
follow) where the log must hold valid batches: below the last fsync (a flipped bit, a zeroed
block), or in the unflushed tail with a valid batch after it. It is never served, never
"repaired" by cutting the log, and never hides the acknowledged records around it. Only a
torn tail (damage with nothing valid after it, past the checkpoint) is cut, by recovery.

A :class:`QuarantinedRange` names the damaged bytes (segment, position, length) and the
offsets they held: ``first_offset`` (where the damage starts, the offset the log expected
there) up to ``end_offset`` (the base offset of the next valid batch). The damaged bytes
stay on disk for forensics. A read that reaches a range raises
:class:`~storage.errors.CorruptData`; reading from ``end_offset`` on works.

The list of a partition's ranges is kept in a small file, ``quarantine``, replaced
durably (tmp, fsync, rename, directory fsync) each time a range is added or dropped::

    u64 xxh3_64 of what follows | msgpack map {version: 1, ranges: [[segment, position,
    length, first_offset, end_offset, reason], ...]}

:func:`next_valid_batch` finds where damage ends: the first position after it that holds a
whole, valid batch whose offset can follow. It looks for the bytes every header carries at
12-15 (magic 1, attributes and reserved 0) with ``bytes.find`` before hashing anything, so a
zeroed block is skipped at memory speed, and it always makes progress.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

import msgspec
import xxhash

from storage import records
from storage.durable import fsync_dir, replace_file
from storage.errors import CorruptBatch, CorruptData

log = logging.getLogger("herald.storage")

FILE_NAME: Final = "quarantine"
_VERSION: Final = 1
_SEARCH_CHUNK: Final = 1024 * 1024

ReadFn = Callable[[int, int], bytes | bytearray | memoryview]


class QuarantinedRange(msgspec.Struct, frozen=True, array_like=True):
    """Damaged bytes ``[position, position + length)`` of the segment whose base offset is
    ``segment``, which held offsets ``[first_offset, end_offset)``. ``length`` may be 0: the
    offsets are missing altogether (a segment shorter than the checkpoint says, or a gap
    between segments). ``reason`` says what check failed, for the operator."""

    segment: int
    position: int
    length: int
    first_offset: int
    end_offset: int
    reason: str = ""

    @property
    def end_position(self) -> int:
        return self.position + self.length

    def error(self, partition: str) -> CorruptData:
        return CorruptData(
            partition,
            segment=self.segment,
            position=self.position,
            length=self.length,
            first_offset=self.first_offset,
            end_offset=self.end_offset,
        )


class _File(msgspec.Struct, frozen=True):
    version: int
    ranges: list[QuarantinedRange]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_File)


def read_quarantine(directory: Path) -> list[QuarantinedRange]:
    """The recorded ranges (sorted by first offset); none if the file is missing. A file
    that fails its checksum is logged and ignored: recovery finds the damage past the
    checkpoint again, and reads find the rest."""
    try:
        data = (directory / FILE_NAME).read_bytes()
    except FileNotFoundError:
        return []
    try:
        if len(data) < 8 or int.from_bytes(data[:8], "little") != xxhash.xxh3_64_intdigest(
            data[8:]
        ):
            raise ValueError("checksum mismatch")
        found = _decoder.decode(data[8:])
        if found.version != _VERSION:
            raise ValueError(f"unknown version {found.version}")
    except (ValueError, msgspec.DecodeError) as exc:
        log.error("event=quarantine_unreadable dir=%s error=%r", directory, exc)
        return []
    return sorted(found.ranges, key=lambda r: r.first_offset)


def write_quarantine(directory: Path, ranges: list[QuarantinedRange]) -> None:
    """Durably replace the list (removing the file when it is empty). Blocking."""
    if not ranges:
        path = directory / FILE_NAME
        if path.exists():
            path.unlink()
            fsync_dir(directory)
        return
    body = _encoder.encode(_File(_VERSION, list(ranges)))
    replace_file(directory, FILE_NAME, xxhash.xxh3_64_intdigest(body).to_bytes(8, "little") + body)


class Quarantine:
    """A partition's quarantined ranges, in memory and in its ``quarantine`` file.

    Mutated on the event loop (or, at start-up, by recovery); :meth:`save` may run in a
    worker thread: it writes whatever the list holds when it takes the lock, so the last
    save to finish always writes every range."""

    def __init__(self, directory: Path, ranges: list[QuarantinedRange]) -> None:
        self.directory = directory
        self._ranges = sorted(ranges, key=lambda r: r.first_offset)
        self._firsts = [r.first_offset for r in self._ranges]
        self._lock = threading.Lock()
        self.detected = 0  # ranges found since the partition opened (a metrics counter)

    @property
    def ranges(self) -> list[QuarantinedRange]:
        return list(self._ranges)

    def __len__(self) -> int:
        return len(self._ranges)

    def covering(self, offset: int) -> QuarantinedRange | None:
        """The range whose offsets include ``offset``, if any."""
        i = bisect.bisect_right(self._firsts, offset) - 1
        if i >= 0 and offset < self._ranges[i].end_offset:
            return self._ranges[i]
        return None

    def add(self, rng: QuarantinedRange) -> bool:
        """Add a newly found range; False if one already starts at that place."""
        for known in self._ranges:
            if known.segment == rng.segment and known.position == rng.position:
                return False
        i = bisect.bisect_right(self._firsts, rng.first_offset)
        self._ranges.insert(i, rng)
        self._firsts.insert(i, rng.first_offset)
        self.detected += 1
        return True

    def in_segment(self, segment: int) -> list[QuarantinedRange]:
        return [r for r in self._ranges if r.segment == segment]

    def drop_before(self, log_start_offset: int) -> bool:
        """Forget ranges wholly below the log start (retention deleted their segment)."""
        keep = [r for r in self._ranges if r.end_offset > log_start_offset]
        if len(keep) == len(self._ranges):
            return False
        self._ranges = keep
        self._firsts = [r.first_offset for r in keep]
        return True

    def save(self) -> None:
        """Write the list durably. Blocking; raises ``OSError``."""
        with self._lock:
            write_quarantine(self.directory, list(self._ranges))


def next_valid_batch(
    read: ReadFn, start: int, end: int, after_offset: int
) -> tuple[int, records.BatchHeader] | None:
    """The first position in ``(start, end)`` where a whole batch that passes every check
    (:func:`records.validate_batch`) and could follow damage that began at offset
    ``after_offset`` (its base offset is above it, by no more than the bytes between) ends
    by ``end``; None if there is none.

    ``read(position, length)`` returns up to ``length`` bytes at ``position`` (fewer at the
    end of the file). Reads ``end - start`` bytes at most once each, in 1 MiB chunks, plus
    the candidate batches; hashes only where a header's fixed bytes match."""
    mark, mark_at = records.HEADER_MARK, records.HEADER_MARK_AT
    chunk_start = start + 1
    while chunk_start < end:
        # overlap the next chunk by a header, so a header across the boundary is seen
        want = min(_SEARCH_CHUNK + records.HEADER_SIZE, end - chunk_start)
        chunk = bytes(read(chunk_start, want))
        if not chunk:
            return None
        i = chunk.find(mark, mark_at)
        while i >= 0:
            pos = chunk_start + i - mark_at
            found = _batch_at(read, chunk, i - mark_at, pos, end, after_offset, start)
            if found is not None:
                return pos, found
            i = chunk.find(mark, i + 1)
        if len(chunk) < want:
            return None
        chunk_start += max(1, len(chunk) - records.HEADER_SIZE)
    return None


def _batch_at(
    read: ReadFn,
    chunk: bytes,
    at: int,
    pos: int,
    end: int,
    after_offset: int,
    damage_start: int,
) -> records.BatchHeader | None:
    if at + records.HEADER_SIZE > len(chunk):
        return None  # the next chunk, which overlaps this one, sees it whole
    try:
        header = records.parse_header(chunk, at)
    except CorruptBatch:
        return None
    gap = header.base_offset - after_offset
    if gap <= 0 or gap > pos - damage_start or pos + header.batch_length > end:
        return None
    if at + header.batch_length <= len(chunk):
        batch: bytes | bytearray | memoryview = memoryview(chunk)[at : at + header.batch_length]
    else:
        batch = read(pos, header.batch_length)
    try:
        return records.validate_batch(batch)
    except CorruptBatch:
        return None
