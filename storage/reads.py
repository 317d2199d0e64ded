"""Reads of one partition: where a fetch starts, whole batches, and reads off the loop.

A fetch returns raw stored batches, at least one whole batch and at most ``max_bytes``
(capped at 64 MiB), never past the synced position (the high watermark). The bytes are read
once, with ``preadv`` into a ``bytearray`` that is cut in place to whole batches.

Every batch a read returns is verified first (header and body checksums, offsets that
follow: :func:`storage.records.verify_batches`), so damaged bytes are never served. A read
that meets damage returns the good batches before it; a read that starts at damage
delimits it (up to the next valid batch), quarantines it (:mod:`storage.quarantine`: kept
in memory and in the partition's ``quarantine`` file, logged at error level) and raises
:class:`~storage.errors.CorruptData` naming the offsets, as does every later read of an
offset in the range; a read from the range's end offset on works.

Where a read runs: a read that starts within the partition's page-cache window is served on
the calling thread (it is in memory; a hand-off would cost more than the copy). A read that
starts below the window, usually a consumer catching up, runs in a worker thread
(:meth:`Reader.read_async`) with its segment pinned (retention skips pinned segments,
``close`` waits for them), and asks a worker thread to read the next chunks ahead.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
from typing import Final, NamedTuple

from storage import records
from storage.errors import OffsetOutOfRange, StorageError
from storage.flush import Pipeline
from storage.quarantine import Quarantine, QuarantinedRange, next_valid_batch
from storage.segment import Segment

log = logging.getLogger("herald.storage")

MAX_READ: Final = 64 * 1024 * 1024
READ_AHEAD_CHUNKS: Final = 4  # fetches' worth read ahead below the page-cache window
# a read delimits one damaged range per attempt and every attempt's range is new, so this is
# never reached unless something is badly wrong; it bounds the loop all the same
_MAX_DAMAGE_STEPS: Final = 64


class Located(NamedTuple):
    """Where a read starts: the segment, the position of the batch holding the offset, the
    bytes to read, the readable end (synced bytes, and not past the next quarantined
    range), and the base offset the batch at ``position`` must carry."""

    segment: Segment
    position: int
    length: int
    limit: int
    expected: int


class Damage(NamedTuple):
    """A read found bytes that fail their checks at ``position`` of ``segment``, where a
    batch at offset ``expected`` should be; ``segment_end`` is how far the segment is
    readable and ``end_offset`` the offset there (where the damage ends at the latest)."""

    segment: Segment
    position: int
    expected: int
    reason: str
    segment_end: int
    end_offset: int


class Reader:
    """The read side of a partition. ``segments`` and ``bases`` are the partition's own
    lists (shared; the partition rolls, retains and cuts them); ``pipeline`` says how far
    the log is synced."""

    def __init__(
        self,
        segments: list[Segment],
        bases: list[int],
        pipeline: Pipeline,
        quarantine: Quarantine,
        *,
        name: str,
    ) -> None:
        self._segments = segments
        self._bases = bases
        self._pipeline = pipeline
        self._quarantine = quarantine
        self._name = name
        self._unpin_waiters: list[asyncio.Future[None]] = []
        # where the last read ended: (next offset, segment, position of the batch holding
        # it). A consumer tailing the log asks for exactly that offset next, and starts
        # there without walking the batch headers from the nearest index entry.
        self._tail: tuple[int, Segment, int] | None = None

    def _segment_for(self, offset: int) -> int:
        return max(0, bisect.bisect_right(self._bases, offset) - 1)

    def locate(self, offset: int, max_bytes: int) -> Located | None:
        """Where a read of ``offset`` starts, or None at the high watermark. Raises
        :class:`OffsetOutOfRange`, or :class:`CorruptData` if ``offset`` is quarantined."""
        pipeline = self._pipeline
        hw = pipeline.flushed_offset
        start = self._segments[0].base_offset
        if offset < start or offset > hw:
            raise OffsetOutOfRange(offset, start, hw)
        if offset == hw:
            return None
        damaged = self._quarantine.covering(offset)
        if damaged is not None:
            raise damaged.error(self._name)
        i = self._segment_for(offset)
        tail = self._tail
        if tail is not None and tail[0] == offset:
            seg, pos = tail[1], tail[2]
            if self._segments[i] is seg and not seg.has_damage:
                flushed = seg.base_offset == pipeline.flushed_segment
                limit = pipeline.flushed_position if flushed else seg.size
                if pos < limit:  # the batch is checked as any other when it is read
                    want = min(max(max_bytes, records.HEADER_SIZE), limit - pos, MAX_READ)
                    return Located(seg, pos, want, limit, offset)
        while i < len(self._segments):
            seg = self._segments[i]
            flushed = seg.base_offset == pipeline.flushed_segment
            limit = pipeline.flushed_position if flushed else seg.size
            pos, expected = seg.find_batch(offset, limit)
            if pos < limit:
                if seg.has_damage:  # never read into the next quarantined range
                    for rng in seg.damaged:
                        if rng.position > pos:
                            limit = min(limit, rng.position)
                            break
                want = min(max(max_bytes, records.HEADER_SIZE), limit - pos, MAX_READ)
                return Located(seg, pos, want, limit, expected)
            if flushed:
                break
            i += 1
        return None

    def _readable_end(self, seg: Segment) -> tuple[int, int]:
        """How far ``seg`` is readable now, and the offset there."""
        pipeline = self._pipeline
        if seg.base_offset == pipeline.flushed_segment:
            return pipeline.flushed_position, pipeline.flushed_offset
        return seg.size, seg.next_offset

    def read(self, offset: int, max_bytes: int) -> bytes | bytearray:
        """See :meth:`storage.partition.Partition.read`."""
        for _ in range(_MAX_DAMAGE_STEPS):
            found = self.locate(offset, max_bytes)
            if found is None:
                return b""
            seg, pos, want = found.segment, found.position, found.length
            data = seg.read_into(pos, want)
            if pos < seg.cache_dropped:
                self._read_ahead(seg, pos + len(data), want)
            checked = self._checked(found, data)
            if not isinstance(checked, Damage):
                return checked
            rng = self._delimit(checked)
            if self._record(rng):
                self._save()
        raise StorageError(f"partition {self._name}: read of offset {offset} keeps meeting damage")

    async def read_async(self, offset: int, max_bytes: int) -> bytes | bytearray:
        """See :meth:`storage.partition.Partition.read_async`."""
        loop = asyncio.get_running_loop()
        for _ in range(_MAX_DAMAGE_STEPS):
            found = self.locate(offset, max_bytes)
            if found is None:
                return b""
            seg, pos, want = found.segment, found.position, found.length
            if pos >= seg.cache_dropped:
                data = seg.read_into(pos, want)
            else:
                with self._pinned(seg):
                    data = await loop.run_in_executor(None, seg.read_into, pos, want)
                self._read_ahead(seg, pos + len(data), want)
            checked = self._checked(found, data)
            if not isinstance(checked, Damage):
                return checked
            with self._pinned(seg):  # delimiting may read far: not on the loop
                rng = await loop.run_in_executor(None, self._delimit, checked)
            if self._record(rng):
                await loop.run_in_executor(None, self._save)
        raise StorageError(f"partition {self._name}: read of offset {offset} keeps meeting damage")

    def _pinned(self, seg: Segment) -> _Pin:
        return _Pin(self, seg)

    def _unpinned(self, seg: Segment) -> None:
        if not seg.pins and self._unpin_waiters:
            waiters, self._unpin_waiters = self._unpin_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _checked(self, found: Located, data: bytearray) -> bytes | bytearray | Damage:
        """The whole, verified batches at the start of ``data`` (cut in place), or the
        damage the read starts at."""
        seg, pos, limit, expected = found.segment, found.position, found.limit, found.expected
        end, next_offset, problem = records.verify_batches(data, expected)
        if end == 0 and problem is None:
            # the first batch is longer than the read (or the read came back short)
            if len(data) >= records.HEADER_SIZE:
                _base, length = records.peek_length(data)
                if pos + length <= limit:
                    data = seg.read_into(pos, length)  # return it whole anyway
                    end, next_offset, problem = records.verify_batches(data, expected)
                else:
                    problem = f"a batch of {length} bytes runs past the readable end {limit}"
            if end == 0:
                problem = problem or f"{len(data)} bytes where a whole batch should be"
        if end == 0:
            assert problem is not None
            segment_end, end_offset = self._readable_end(seg)
            return Damage(seg, pos, expected, problem, segment_end, end_offset)
        if end < len(data):
            del data[end:]  # shrinks in place: no copy of what is kept
        self._tail = (next_offset, seg, pos + end)
        return data

    @staticmethod
    def _delimit(damage: Damage) -> QuarantinedRange:
        """Where the damage ends: at the next valid batch whose offset can follow, or at
        the readable end of the segment. Blocking (it may read the rest of the segment)."""
        seg, pos = damage.segment, damage.position

        def read(position: int, length: int) -> bytes:
            return os.pread(seg.fd, length, position)

        nxt = next_valid_batch(read, pos, damage.segment_end, damage.expected)
        if nxt is None:
            end_pos, end_offset = damage.segment_end, damage.end_offset
        else:
            end_pos, end_offset = nxt[0], nxt[1].base_offset
        return QuarantinedRange(
            seg.base_offset, pos, end_pos - pos, damage.expected, end_offset, damage.reason
        )

    def _record(self, rng: QuarantinedRange) -> bool:
        """Loop: remember a range a read delimited (False if it was known already)."""
        seg = next((s for s in self._segments if s.base_offset == rng.segment), None)
        if seg is not None:
            seg.add_damage(rng)
        if not self._quarantine.add(rng):
            return False
        log.error(
            "event=corrupt_data partition=%s found_by=read segment=%d position=%d length=%d "
            "first_offset=%d end_offset=%d reason=%r",
            self._name,
            rng.segment,
            rng.position,
            rng.length,
            rng.first_offset,
            rng.end_offset,
            rng.reason,
        )
        return True

    def _save(self) -> None:
        """Write the quarantine list. Blocking. A failure (a full disk) is logged: the
        range is kept in memory, and found again after a restart."""
        try:
            self._quarantine.save()
        except OSError as exc:
            log.error("event=quarantine_write_failed partition=%s error=%r", self._name, exc)

    async def wait_unpinned(self) -> None:
        """Until no read runs in a worker thread (their files must stay open)."""
        while any(seg.pins for seg in self._segments):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._unpin_waiters.append(fut)
            await fut

    @staticmethod
    def _read_ahead(seg: Segment, end: int, chunk: int) -> None:
        """A read below the page-cache window (a consumer catching up) was served from disk,
        on the loop. Ask the kernel, from a worker thread, to start reading the next few
        chunks of that dropped range (``POSIX_FADV_WILLNEED``), so the consumer's next
        fetches find them in memory instead of blocking the loop on the disk again."""
        stop = min(end + READ_AHEAD_CHUNKS * chunk, seg.cache_dropped)
        start = max(end, seg.read_ahead_to)
        if stop - start < chunk:  # what the next fetch needs is already on its way
            return
        seg.read_ahead_to = stop
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a tool reading without a loop: nothing to overlap with
            return
        loop.run_in_executor(None, seg.prefetch, start, stop - start)


class _Pin:
    """Keeps a segment's file open while a worker thread reads it (retention skips pinned
    segments; ``close`` waits for them)."""

    __slots__ = ("_reader", "_seg")

    def __init__(self, reader: Reader, seg: Segment) -> None:
        self._reader, self._seg = reader, seg

    def __enter__(self) -> None:
        self._seg.pins += 1

    def __exit__(self, *_exc: object) -> None:
        self._seg.pins -= 1
        self._reader._unpinned(self._seg)
