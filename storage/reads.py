"""Reads of one partition: where a fetch starts, whole batches, and reads off the loop.

A fetch returns raw stored batches, at least one whole batch and at most ``max_bytes``
(capped at 64 MiB), never past the synced position (the high watermark). The bytes are read
once, with ``preadv`` into a ``bytearray`` that is cut in place to whole batches.

Where a read runs: a read that starts within the partition's page-cache window is served on
the calling thread (it is in memory; a hand-off would cost more than the copy). A read that
starts below the window, usually a consumer catching up, runs in a worker thread
(:meth:`Reader.read_async`) with its segment pinned (retention skips pinned segments,
``close`` waits for them), and asks a worker thread to read the next chunks ahead.
"""

from __future__ import annotations

import asyncio
import bisect
from typing import Final, NamedTuple

from storage import records
from storage.errors import OffsetOutOfRange
from storage.flush import Pipeline
from storage.segment import Segment

MAX_READ: Final = 64 * 1024 * 1024
READ_AHEAD_CHUNKS: Final = 4  # fetches' worth read ahead below the page-cache window


class Located(NamedTuple):
    """Where a read starts: the segment, the position of the batch holding the offset, the
    bytes to read, and the segment's readable end (synced bytes only)."""

    segment: Segment
    position: int
    length: int
    limit: int


class Reader:
    """The read side of a partition. ``segments`` and ``bases`` are the partition's own
    lists (shared; the partition rolls, retains and cuts them); ``pipeline`` says how far
    the log is synced."""

    def __init__(self, segments: list[Segment], bases: list[int], pipeline: Pipeline) -> None:
        self._segments = segments
        self._bases = bases
        self._pipeline = pipeline
        self._unpin_waiters: list[asyncio.Future[None]] = []

    def _segment_for(self, offset: int) -> int:
        return max(0, bisect.bisect_right(self._bases, offset) - 1)

    def locate(self, offset: int, max_bytes: int) -> Located | None:
        """Where a read of ``offset`` starts, or None at the high watermark. Raises
        :class:`OffsetOutOfRange`."""
        pipeline = self._pipeline
        hw = pipeline.flushed_offset
        start = self._segments[0].base_offset
        if offset < start or offset > hw:
            raise OffsetOutOfRange(offset, start, hw)
        if offset == hw:
            return None
        i = self._segment_for(offset)
        while i < len(self._segments):
            seg = self._segments[i]
            flushed = seg.base_offset == pipeline.flushed_segment
            limit = pipeline.flushed_position if flushed else seg.size
            pos = seg.find_position(offset, limit)
            if pos < limit:
                want = min(max(max_bytes, records.HEADER_SIZE), limit - pos, MAX_READ)
                return Located(seg, pos, want, limit)
            if flushed:
                break
            i += 1
        return None

    def read(self, offset: int, max_bytes: int) -> bytes | bytearray:
        """See :meth:`storage.partition.Partition.read`."""
        found = self.locate(offset, max_bytes)
        if found is None:
            return b""
        seg, pos, want, limit = found
        data = seg.read_into(pos, want)
        if pos < seg.cache_dropped:
            self._read_ahead(seg, pos + len(data), want)
        return self._whole_batches(seg, pos, data, limit)

    async def read_async(self, offset: int, max_bytes: int) -> bytes | bytearray:
        """See :meth:`storage.partition.Partition.read_async`."""
        found = self.locate(offset, max_bytes)
        if found is None:
            return b""
        seg, pos, want, limit = found
        if pos >= seg.cache_dropped:
            data = seg.read_into(pos, want)
        else:
            seg.pins += 1
            try:
                loop = asyncio.get_running_loop()
                data = await loop.run_in_executor(None, seg.read_into, pos, want)
            finally:
                seg.pins -= 1
                if not seg.pins and self._unpin_waiters:
                    waiters, self._unpin_waiters = self._unpin_waiters, []
                    for fut in waiters:
                        if not fut.done():
                            fut.set_result(None)
            self._read_ahead(seg, pos + len(data), want)
        return self._whole_batches(seg, pos, data, limit)

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

    @staticmethod
    def _whole_batches(seg: Segment, pos: int, data: bytearray, limit: int) -> bytes | bytearray:
        end = 0
        size = len(data)
        while end + records.HEADER_SIZE <= size:
            _base, length = records.peek_length(data, end)
            if end + length > size:
                break
            end += length
        if end == 0:
            # the first batch is larger than max_bytes: return it whole anyway
            _base, length = records.peek_length(seg.read(pos, records.HEADER_SIZE))
            return seg.read(pos, min(length, limit - pos))
        if end < size:
            del data[end:]  # shrinks in place: no copy of what is kept
        return data
