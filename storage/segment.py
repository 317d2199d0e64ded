"""One log segment: ``<base offset, 20 digits>.log`` holding record batches back to back, and
``.index``, a sparse offset -> file position map.

A segment does no locking and no fsync policy of its own: the partition decides when to
write, sync, roll and delete. All I/O is positional (``pwrite``/``pread``), so readers never
move the writer's file position.

The index is a hint, never the truth. Entries are 16 bytes: relative offset (u32), file
position (u32) and the largest timestamp seen up to and including that batch (i64). An index
may be short (a crash lost its tail): lookups then scan a little further. An index that
disagrees with the log (an entry pointing at a position that does not hold the batch it
names) is detected on use and rebuilt from the log.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import struct
from array import array
from pathlib import Path
from typing import Final

from storage import records
from storage.durable import fsync_dir as fsync_dir
from storage.errors import CorruptBatch, IncompleteBatch, StorageError, StorageFull

LOG_SUFFIX: Final = ".log"
INDEX_SUFFIX: Final = ".index"
_PAGE = 4096
_ENTRY = struct.Struct("<IIq")
_SCAN_CHUNK: Final = 64 * 1024
_NO_TIMESTAMP: Final = -(2**63)


def segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}"


def _raise_write_error(exc: OSError) -> None:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StorageFull(f"disk full: {exc.strerror}") from exc
    raise StorageError(f"write failed: {exc}") from exc


class Segment:
    """An open segment. ``size`` is the byte length of its valid batches; ``next_offset`` the
    offset the next appended batch will get."""

    def __init__(
        self,
        directory: Path,
        base_offset: int,
        *,
        index_interval_bytes: int,
        fd: int,
        index_fd: int,
    ) -> None:
        """An empty segment over open files; :meth:`create` and :meth:`open` build it."""
        self.directory = directory
        self.base_offset = base_offset
        self.index_interval_bytes = index_interval_bytes
        self._fd = fd
        self._index_fd = index_fd
        self.size = 0
        self.next_offset = base_offset
        self.max_timestamp = _NO_TIMESTAMP
        # producer timestamp of the first batch (informational; rolls count from creation)
        self.first_timestamp: int | None = None
        self._idx_offsets = array("q")
        self._idx_positions = array("q")
        self._idx_timestamps = array("q")
        self._last_indexed_position = -1
        self._cache_dropped = 0  # pages below this were advised out of the page cache
        self.read_ahead_to = 0  # a read-ahead of the dropped range was asked up to here
        self.pins = 0  # reads running in worker threads: the file must stay open
        # index entries not yet in the file, and the entry number of the first of them: the
        # sync thread writes them (flush_index) so the loop makes no syscall per batch
        self._index_pending: list[bytes] = []
        self._index_pending_at = 0
        self.closed = False

    # ----------------------------------------------------------------- paths / lifecycle
    @property
    def log_path(self) -> Path:
        return self.directory / (segment_name(self.base_offset) + LOG_SUFFIX)

    @property
    def index_path(self) -> Path:
        return self.directory / (segment_name(self.base_offset) + INDEX_SUFFIX)

    @property
    def fd(self) -> int:
        return self._fd

    @classmethod
    def create(cls, directory: Path, base_offset: int, *, index_interval_bytes: int) -> Segment:
        """Create empty ``.log`` and ``.index`` files. The caller fsyncs the directory before
        acknowledging anything written here (see ``Partition``)."""
        name = segment_name(base_offset)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(directory / (name + LOG_SUFFIX), flags, 0o644)
        except OSError as exc:
            _raise_write_error(exc)
        try:
            index_fd = os.open(directory / (name + INDEX_SUFFIX), flags, 0o644)
        except OSError as exc:
            # take the .log back, or every later roll would fail on it with EEXIST
            os.close(fd)
            try:
                os.unlink(directory / (name + LOG_SUFFIX))
            except OSError:
                pass
            _raise_write_error(exc)
        return cls(
            directory,
            base_offset,
            index_interval_bytes=index_interval_bytes,
            fd=fd,
            index_fd=index_fd,
        )

    @classmethod
    def open(
        cls,
        directory: Path,
        base_offset: int,
        *,
        index_interval_bytes: int,
        trusted_size: int | None = None,
    ) -> Segment:
        """Open an existing segment.

        ``trusted_size``: the number of leading bytes known to hold valid, synced batches
        (from a recovery checkpoint, or the whole file for a segment closed cleanly). The
        index is loaded and cut at that size; the segment's ``size``, ``next_offset`` and
        ``max_timestamp`` reflect only the trusted prefix. Recovery then calls
        :meth:`recover_tail` to scan and keep what follows.
        """
        name = segment_name(base_offset)
        fd = os.open(directory / (name + LOG_SUFFIX), os.O_RDWR | os.O_CLOEXEC)
        index_path = directory / (name + INDEX_SUFFIX)
        index_fd = os.open(index_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        file_size = os.fstat(fd).st_size
        size = file_size if trusted_size is None else min(trusted_size, file_size)
        seg = cls(
            directory,
            base_offset,
            index_interval_bytes=index_interval_bytes,
            fd=fd,
            index_fd=index_fd,
        )
        try:
            seg._load_index(size)
            seg._advance_over_trusted(size)
            seg.flush_index()
        except BaseException:
            seg.close()  # recovery retries the open; do not leak two fds per attempt
            raise
        return seg

    def close(self) -> None:
        if not self.closed:
            self.flush_index()
            self.closed = True
            os.close(self._fd)
            os.close(self._index_fd)

    def delete(self) -> None:
        self.close()
        for path in (self.log_path, self.index_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    # ----------------------------------------------------------------------------- index
    def _load_index(self, size: int) -> None:
        raw = os.pread(self._index_fd, os.fstat(self._index_fd).st_size, 0)
        usable = len(raw) - len(raw) % _ENTRY.size
        prev_pos = -1
        prev_off = -1
        for rel, pos, ts in _ENTRY.iter_unpack(raw[:usable]):
            if pos >= size or pos <= prev_pos or rel <= prev_off:
                break
            self._idx_offsets.append(self.base_offset + rel)
            self._idx_positions.append(pos)
            self._idx_timestamps.append(ts)
            prev_pos, prev_off = pos, rel
        kept = len(self._idx_offsets) * _ENTRY.size
        if kept != len(raw):
            os.ftruncate(self._index_fd, kept)
        self._last_indexed_position = prev_pos

    def _add_index_entry(self, offset: int, position: int, max_ts: int) -> None:
        self._idx_offsets.append(offset)
        self._idx_positions.append(position)
        self._idx_timestamps.append(max_ts)
        self._last_indexed_position = position
        if not self._index_pending:
            self._index_pending_at = len(self._idx_offsets) - 1
        self._index_pending.append(_ENTRY.pack(offset - self.base_offset, position, max_ts))

    def flush_index(self) -> None:
        """Write the index entries added since the last flush (one ``pwrite``). Safe to call
        from the sync thread while the loop adds entries: an entry added during the swap
        lands in one list or the other, and each list knows its file position."""
        pending, at = self._index_pending, self._index_pending_at
        if not pending:
            return
        self._index_pending = []
        try:
            os.pwrite(self._index_fd, b"".join(pending), at * _ENTRY.size)
        except OSError:
            # the index is a hint: a missing entry costs a longer scan, and the next load
            # drops whatever did not reach the file
            pass

    def _truncate_index(self, size: int) -> None:
        self.flush_index()
        keep = bisect.bisect_left(self._idx_positions, size)
        del self._idx_offsets[keep:]
        del self._idx_positions[keep:]
        del self._idx_timestamps[keep:]
        os.ftruncate(self._index_fd, keep * _ENTRY.size)
        self._last_indexed_position = self._idx_positions[-1] if keep else -1

    def rebuild_index(self) -> None:
        """Drop the index and rebuild it by scanning the segment's valid bytes."""
        size = self.size
        self._index_pending = []
        del self._idx_offsets[:]
        del self._idx_positions[:]
        del self._idx_timestamps[:]
        os.ftruncate(self._index_fd, 0)
        self._last_indexed_position = -1
        self.size, self.next_offset, self.max_timestamp = 0, self.base_offset, _NO_TIMESTAMP
        self.first_timestamp = None
        self._advance_over_trusted(size)

    def _advance_over_trusted(self, size: int) -> None:
        """Walk the headers of the trusted prefix ``[indexed position, size)`` to learn
        ``next_offset`` and ``max_timestamp``, adding index entries on the way."""
        if self._idx_positions:
            pos = self._idx_positions[-1]
            self.max_timestamp = self._idx_timestamps[-1]
            self.first_timestamp = self._first_batch_timestamp()
        else:
            pos = 0
        self.size = pos
        self.next_offset = self._idx_offsets[-1] if self._idx_offsets else self.base_offset
        for hpos, header in self._walk(pos, size, verify=False):
            self._note_batch(hpos, header)
        if self.size != size:
            raise CorruptBatch(
                f"{self.log_path.name}: trusted prefix of {size} bytes "
                f"ends mid-batch at {self.size}"
            )

    def _first_batch_timestamp(self) -> int | None:
        head = os.pread(self._fd, records.HEADER_SIZE, 0)
        try:
            return records.parse_header(head).first_timestamp
        except CorruptBatch:
            return None

    def _note_batch(self, position: int, header: records.BatchHeader) -> None:
        """Account for a batch at ``position`` (appended or found by a scan)."""
        if header.max_timestamp > self.max_timestamp:
            self.max_timestamp = header.max_timestamp
        if self.first_timestamp is None:
            self.first_timestamp = header.first_timestamp
        if (
            self._last_indexed_position < 0
            or position - self._last_indexed_position >= self.index_interval_bytes
        ) and position > self._last_indexed_position:
            self._add_index_entry(header.base_offset, position, self.max_timestamp)
        self.size = position + header.batch_length
        self.next_offset = header.next_offset

    # ------------------------------------------------------------------------- scanning
    def _walk(self, start: int, end: int, *, verify: bool) -> list[tuple[int, records.BatchHeader]]:
        """Headers of the whole batches in ``[start, end)``, stopping at the first batch that
        is incomplete or fails its checks (the caller decides whether that is a torn tail)."""
        found: list[tuple[int, records.BatchHeader]] = []
        pos = start
        check = records.validate_batch if verify else records.parse_header
        while pos < end:
            head = os.pread(self._fd, records.HEADER_SIZE, pos)
            try:
                header = records.parse_header(head)
            except CorruptBatch:
                break
            if pos + header.batch_length > end:
                break
            if verify:
                buf = os.pread(self._fd, header.batch_length, pos)
                try:
                    check(buf)
                except CorruptBatch:
                    break
            found.append((pos, header))
            pos += header.batch_length
        return found

    def recover_tail(self) -> tuple[int, int]:
        """Scan from ``size`` to the end of the file, verifying every batch (both checksums)
        and keeping the valid run of batches whose offsets continue the segment. Truncate the
        file after the last good batch.

        Returns ``(bytes kept, bytes cut)``.
        """
        file_size = os.fstat(self._fd).st_size
        start = self.size
        kept = 0
        for pos, header in self._walk(start, file_size, verify=True):
            if header.base_offset != self.next_offset:
                break
            self._note_batch(pos, header)
            kept += header.batch_length
        cut = file_size - self.size
        if cut:
            self.truncate_to(self.size)
        return kept, cut

    def truncate_to(self, size: int) -> None:
        """Cut the log to ``size`` bytes (which must be a batch boundary) and the index with
        it. Used by recovery and, later, by followers truncating a divergent tail."""
        os.ftruncate(self._fd, size)
        self._truncate_index(size)
        self.max_timestamp, self.first_timestamp = _NO_TIMESTAMP, None
        self._advance_over_trusted(size)

    # --------------------------------------------------------------------------- append
    def append(self, head: bytes, body: memoryview | bytes, header: records.BatchHeader) -> int:
        """Write one stamped batch (``head`` is its 64-byte header, ``body`` the rest) at the
        end of the segment. Returns the batch's position. On a write error the file is cut back
        to its previous size and :class:`StorageFull` or :class:`StorageError` is raised."""
        pos = self.size
        self.append_many([(head, body, header)])
        return pos

    def append_many(
        self, items: list[tuple[bytes, memoryview | bytes, records.BatchHeader]]
    ) -> None:
        """Write several stamped batches now, on the calling thread (tools and tests; the
        partition queues with :meth:`reserve` and writes from its sync thread instead). All
        or nothing: on error the file is cut back and nothing is accounted."""
        pos = self.size
        iov: list[bytes | memoryview] = []
        for head, body, _header in items:
            iov.append(head)
            iov.append(body)
        try:
            self.write_at(pos, iov)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, pos)
            except OSError:
                pass
            _raise_write_error(exc)
        self.reserve(items)
        self.flush_index()

    def reserve(self, items: list[tuple[bytes, memoryview | bytes, records.BatchHeader]]) -> int:
        """Account stamped batches at the end of the segment *without writing them* (the
        partition's sync thread writes them with :meth:`write_at` before it syncs). Returns
        the position of the first. The index may then name positions not yet in the file;
        loading an index drops such entries."""
        pos = self.size
        for _head, _body, header in items:
            self._note_batch(self.size, header)
        return pos

    def write_at(self, position: int, iov: list[bytes | memoryview]) -> None:
        """Write ``iov`` at ``position`` completely (IOV_MAX slices, short writes resumed).
        Blocking; raises ``OSError``. For the sync thread."""
        written = 0
        for i in range(0, len(iov), 1024):
            chunk = iov[i : i + 1024]
            n = os.pwritev(self._fd, chunk, position + written)
            chunk_len = sum(len(c) for c in chunk)
            if n < chunk_len:
                rest = b"".join(bytes(c) for c in chunk)[n:]
                while rest:
                    m = os.pwrite(self._fd, rest, position + written + n)
                    n += m
                    rest = rest[m:]
            written += n

    def sync(self) -> None:
        """fdatasync the log file. Blocks: call it from a worker thread."""
        os.fdatasync(self._fd)

    @property
    def cache_dropped(self) -> int:
        """Bytes at the start of the file already advised out of the page cache."""
        return self._cache_dropped

    def drop_cache(self, upto: int) -> None:
        """Advise the kernel to drop this file's cached pages below ``upto``: whole pages,
        or everything when ``upto`` is the segment's size (a sealed segment's last, partial
        page too). Each range once; for synced data only (dirty pages are not dropped).
        Blocking: the sync thread calls it."""
        whole = upto >= self.size
        if not whole:
            upto -= upto % _PAGE
        if upto <= self._cache_dropped:
            return
        with contextlib.suppress(OSError):  # advice only
            length = 0 if whole else upto - self._cache_dropped  # 0: to the end of the file
            os.posix_fadvise(self._fd, self._cache_dropped, length, os.POSIX_FADV_DONTNEED)
        self._cache_dropped = upto

    def prefetch(self, position: int, length: int) -> None:
        """Ask the kernel to start reading ``length`` bytes at ``position`` into the page
        cache (``POSIX_FADV_WILLNEED``; advice only, errors ignored: the segment may have
        been closed meanwhile). Blocking: for a worker thread."""
        if not self.closed:
            with contextlib.suppress(OSError, ValueError):
                os.posix_fadvise(self._fd, position, length, os.POSIX_FADV_WILLNEED)

    def seal(self) -> None:
        """Called when the segment stops being active: make sure the last batch has an index
        entry (so the segment's max timestamp is exact) and sync the index."""
        self.flush_index()
        if self._idx_positions and self.size > 0:
            last_pos, last_header = self._last_batch()
            if last_pos > self._last_indexed_position:
                # on disk only: this runs in the sync thread while the loop may be reading the
                # in-memory index, which the final entry would not change for lookups anyway
                entry = _ENTRY.pack(
                    last_header.base_offset - self.base_offset, last_pos, self.max_timestamp
                )
                os.pwrite(self._index_fd, entry, len(self._idx_offsets) * _ENTRY.size)
        os.fsync(self._index_fd)

    def _last_batch(self) -> tuple[int, records.BatchHeader]:
        start = self._idx_positions[-1]
        found = self._walk(start, self.size, verify=False)
        return found[-1]

    # ----------------------------------------------------------------------------- read
    def read(self, position: int, length: int) -> bytes:
        return os.pread(self._fd, length, position)

    def read_into(self, position: int, length: int) -> bytearray:
        """Read up to ``length`` bytes at ``position`` into a new ``bytearray`` (which the
        caller may shorten in place)."""
        buf = bytearray(length)
        n = os.preadv(self._fd, [buf], position)
        if n < length:
            del buf[n:]
        return buf

    def find_position(self, offset: int, limit: int | None = None) -> int:
        """Position of the batch holding ``offset`` (or of the first batch after it, or
        ``limit`` if there is none before ``limit``)."""
        end = self.size if limit is None else limit
        i = bisect.bisect_right(self._idx_offsets, offset) - 1
        pos = self._idx_positions[i] if i >= 0 else 0
        expect = self._idx_offsets[i] if i >= 0 else self.base_offset
        first = True
        while pos < end:
            chunk = os.pread(self._fd, min(_SCAN_CHUNK, end - pos), pos)
            cpos = 0
            while cpos + records.HEADER_SIZE <= len(chunk):
                base, length = records.peek_length(chunk, cpos)
                if first:
                    first = False
                    if base != expect:
                        # the index disagrees with the log: never trust it again
                        self.rebuild_index()
                        return self.find_position(offset, limit)
                count = int.from_bytes(chunk[cpos + 20 : cpos + 24], "little")
                if base + count > offset:
                    return pos + cpos
                cpos += length
            if cpos == 0:
                raise IncompleteBatch(f"{self.log_path.name}: no whole header at {pos}")
            pos += cpos
        return end

    def find_offset_by_timestamp(self, timestamp: int) -> int | None:
        """Offset of the first batch whose ``max_timestamp >= timestamp``, or None."""
        if self.size == 0 or self.max_timestamp < timestamp:
            return None
        i = bisect.bisect_left(self._idx_timestamps, timestamp)
        start = self._idx_positions[i - 1] if i > 0 else 0
        for _pos, header in self._walk(start, self.size, verify=False):
            if header.max_timestamp >= timestamp:
                return header.base_offset
        return None

    def __repr__(self) -> str:
        return f"Segment({self.log_path.name}, size={self.size}, next_offset={self.next_offset})"


def remove_segment_files(directory: Path, base_offset: int) -> None:
    """Delete a segment's files without opening it (recovery drops untrusted segments)."""
    for suffix in (LOG_SUFFIX, INDEX_SUFFIX):
        try:
            (directory / (segment_name(base_offset) + suffix)).unlink()
        except FileNotFoundError:
            pass


def list_segments(directory: Path) -> list[int]:
    """Base offsets of the segments in ``directory``, ascending. Stray temporary files are
    ignored."""
    bases = []
    for entry in os.scandir(directory):
        name = entry.name
        if name.endswith(LOG_SUFFIX) and len(name) == 20 + len(LOG_SUFFIX) and name[:20].isdigit():
            bases.append(int(name[:20]))
    bases.sort()
    return bases
