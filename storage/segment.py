"""One log segment: ``<base offset, 20 digits>.log`` holding record batches back to back, and
``.index``, a sparse offset -> file position map.

A segment does no locking and no fsync policy of its own: the partition decides when to
write, sync, roll and delete. All I/O is positional (``pwrite``/``pread``), so readers never
move the writer's file position.

Damage: ``damaged`` holds this segment's quarantined ranges (see :mod:`storage.quarantine`).
Every walk over the file steps over them whole, and stops, never spins, at a header that
fails its checks: every step advances by a checksummed length of more than 64 bytes.

Preallocation: the partition may make the active segment's file longer than its batches
(:meth:`Segment.preallocate`: a fill pattern written ahead), so that an append overwrites
bytes the file already has instead of growing it: on ext4 an ``fdatasync`` after a write
that changes the file's size commits the journal each time. ``size`` (the end of the
batches, the *logical* end) is then below the file's size, and the bytes between hold the
fill (:func:`fill_bytes`). A sealed segment and a closed one are cut back to ``size``
(:meth:`trim`); recovery reads fill right after the last valid batch as the end of the log
(:mod:`storage.recovery`).

The index is a hint, never the truth. Entries are 16 bytes: relative offset (u32), file
position (u32) and the largest timestamp seen up to and including that batch (i64). An index
may be short (a crash lost its tail): lookups then scan a little further. An index that
disagrees with the log (an entry pointing at a position that does not hold the batch it
names) is detected on use and rebuilt from the log.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import os
import struct
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final

from storage import records
from storage.durable import fsync_dir as fsync_dir
from storage.errors import CorruptBatch, StorageError, StorageFull

if TYPE_CHECKING:
    from storage.quarantine import QuarantinedRange

LOG_SUFFIX: Final = ".log"
INDEX_SUFFIX: Final = ".index"
_PAGE = 4096
_MAX_FOLIO: Final = 2 * 1024 * 1024  # the largest page-cache folio (a PMD) on x86-64
_ENTRY = struct.Struct("<IIq")
_SCAN_CHUNK: Final = 64 * 1024
_NO_TIMESTAMP: Final = -(2**63)


# Preallocated space is filled with this 4 KiB pattern, tiled by file position (the byte at
# position p is _fill_source()[p % 4096]): pseudo-random, so no run of it is mistaken for zeros (a
# zeroed block is damage, never "space nobody wrote") or for a batch, and recognisable at
# any position, since the last batch ends anywhere in a block.
_TILE_SIZE: Final = 4096
_FILL_SPAN: Final = 1 << 20
# a fill is written only while the file system has at least this many times its reach
# (``preallocate_bytes``) free
_FILL_FREE_FACTOR: Final = 64
# the most fill one write adds (storage.flush.Pipeline._growth): the reach is built up and
# kept in steps this small, so that no round's fdatasync carries a large write
FILL_STEP: Final = 64 * 1024


@functools.cache
def _fill_source() -> bytes:
    tile = b"".join(
        hashlib.blake2b(b"herald preallocated %d" % i, digest_size=64).digest()
        for i in range(_TILE_SIZE // 64)
    )
    return tile * (_FILL_SPAN // _TILE_SIZE + 1)


def fill_bytes(position: int, length: int) -> bytes:
    """The fill as it lies at ``[position, position + length)`` of a segment file."""
    source = _fill_source()
    parts = []
    while length > 0:
        at = position % _TILE_SIZE
        n = min(length, _FILL_SPAN)
        parts.append(source[at : at + n])
        position += n
        length -= n
    return b"".join(parts)


def fill_start(data: bytes | bytearray | memoryview, position: int = 0) -> int:
    """Where a trailing run of fill begins in ``data`` (the bytes of a segment file from
    ``position`` on), relative to ``data``: ``len(data)`` when it does not end with fill.
    For tools and tests that read segment files whole."""
    end = len(data)
    while end > 0:
        start = max(0, end - _TILE_SIZE)
        block = bytes(data[start:end])
        want = fill_bytes(position + start, end - start)
        if block != want:
            i = len(block)
            while block[i - 1] == want[i - 1]:
                i -= 1
            return start + i
        end = start
    return 0


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
        self._damaged: dict[int, QuarantinedRange] = {}  # position -> quarantined range
        # preallocation: the end of the fill the loop planned (Pipeline), and the end of
        # the fill actually written (by the write stage's thread)
        self.prealloc_end = 0
        self.filled_end = 0
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
        seg = cls.open_files(directory, base_offset, index_interval_bytes=index_interval_bytes)
        file_size = seg.file_size()
        size = file_size if trusted_size is None else min(trusted_size, file_size)
        try:
            seg.load_index(size)
            seg._advance_over_trusted(size)
            seg.flush_index()
        except BaseException:
            seg.close()  # a caller may retry the open; do not leak two fds per attempt
            raise
        return seg

    @classmethod
    def open_files(cls, directory: Path, base_offset: int, *, index_interval_bytes: int) -> Segment:
        """Open an existing segment's files with nothing accounted yet (size 0): recovery
        then loads the index (:meth:`load_index`) and accounts what it walks and verifies
        (:meth:`note_batch`, :meth:`note_damage`)."""
        name = segment_name(base_offset)
        fd = os.open(directory / (name + LOG_SUFFIX), os.O_RDWR | os.O_CLOEXEC)
        try:
            index_fd = os.open(
                directory / (name + INDEX_SUFFIX), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
        except BaseException:
            os.close(fd)
            raise
        return cls(
            directory,
            base_offset,
            index_interval_bytes=index_interval_bytes,
            fd=fd,
            index_fd=index_fd,
        )

    def file_size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if not self.closed:
            self.flush_index()
            self.closed = True
            os.close(self._fd)
            os.close(self._index_fd)

    def abandon(self) -> None:
        """Close the files without writing anything (an open that failed: nothing of it is
        kept, and a close that wrote could fail the same way and leak the descriptors)."""
        if not self.closed:
            self.closed = True
            for fd in (self._fd, self._index_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def delete(self) -> None:
        self.close()
        for path in (self.log_path, self.index_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    # ----------------------------------------------------------------------------- index
    def load_index(self, size: int) -> None:
        """Load the index entries that point below ``size`` (the trusted bytes), in order,
        stopping at the first that does not strictly increase; cut the file there. Then
        position the segment at the last entry (size and next offset), from where a walk
        continues."""
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
            with contextlib.suppress(OSError):  # a hint: a longer index only costs a scan
                os.ftruncate(self._index_fd, kept)
        self._last_indexed_position = prev_pos
        if self._idx_positions:
            self.size = self._idx_positions[-1]
            self.next_offset = self._idx_offsets[-1]
            self.max_timestamp = self._idx_timestamps[-1]
            self.first_timestamp = self._first_batch_timestamp()

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

    @property
    def last_indexed_position(self) -> int:
        return self._last_indexed_position

    def reset_index(self) -> None:
        """Forget every index entry (in memory and in the file) and account nothing: a walk
        then starts from the first byte."""
        self._index_pending = []
        del self._idx_offsets[:]
        del self._idx_positions[:]
        del self._idx_timestamps[:]
        with contextlib.suppress(OSError):
            os.ftruncate(self._index_fd, 0)
        self._last_indexed_position = -1
        self.size, self.next_offset, self.max_timestamp = 0, self.base_offset, _NO_TIMESTAMP
        self.first_timestamp = None

    def rebuild_index(self) -> None:
        """Drop the index and rebuild it from the log's headers (stepping over quarantined
        ranges). The segment's size and next offset do not change: if the walk stops early
        at damage nobody has delimited yet, the index just ends there (a hint may be
        short); the read that reaches the damage delimits it."""
        size, next_offset = self.size, self.next_offset
        max_ts, first_ts = self.max_timestamp, self.first_timestamp
        self.reset_index()
        for pos, entry in self._entries(0, size):
            if isinstance(entry, records.BatchHeader):
                self.note_batch(pos, entry)
            else:
                self.note_damage(entry)
        self.size, self.next_offset = size, next_offset
        self.max_timestamp, self.first_timestamp = max_ts, first_ts

    def _advance_over_trusted(self, size: int) -> None:
        """Walk the headers of the trusted prefix ``[indexed position, size)`` to learn
        ``next_offset`` and ``max_timestamp``, adding index entries on the way. Raises
        :class:`CorruptBatch` if the walk does not end exactly at ``size``."""
        if not self._idx_positions:
            self.size, self.next_offset = 0, self.base_offset
        for hpos, entry in self._entries(self.size, size):
            if isinstance(entry, records.BatchHeader):
                self.note_batch(hpos, entry)
            else:
                self.note_damage(entry)
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

    def note_batch(self, position: int, header: records.BatchHeader) -> None:
        """Account for a batch at ``position`` (appended or found by a scan): the segment
        now ends after it."""
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

    def note_damage(self, rng: QuarantinedRange) -> None:
        """Account for a quarantined range that ends the segment so far (recovery found it
        where the next batch was expected): the segment now ends after it, at its end
        offset, and every walk steps over it."""
        self.add_damage(rng)
        self.size = rng.end_position
        self.next_offset = rng.end_offset

    def add_damage(self, rng: QuarantinedRange) -> None:
        """Step over ``rng`` from now on (a read found it inside the segment)."""
        self._damaged[rng.position] = rng

    @property
    def has_damage(self) -> bool:
        return bool(self._damaged)

    @property
    def damaged(self) -> list[QuarantinedRange]:
        return sorted(self._damaged.values(), key=lambda r: r.position)

    # ------------------------------------------------------------------------- scanning
    def _entries(
        self, start: int, end: int
    ) -> Iterator[tuple[int, records.BatchHeader | QuarantinedRange]]:
        """The batches (header checked) and quarantined ranges in ``[start, end)``, in
        order. Stops at the first header that fails its checks or whose batch does not end
        by ``end`` (the caller decides what that is). Each step advances: by a quarantined
        range, or by a checksummed batch length of more than 64 bytes."""
        pos = start
        zero_done = -1  # a range of no bytes was yielded here: the batch after it is next
        while pos < end:
            rng = self._damaged.get(pos)
            if rng is not None and zero_done != pos:
                yield pos, rng
                if rng.length:
                    pos = rng.end_position
                    continue
                zero_done = pos
            head = os.pread(self._fd, records.HEADER_SIZE, pos)
            try:
                header = records.parse_header(head)
            except CorruptBatch:
                return
            if pos + header.batch_length > end:
                return
            yield pos, header
            pos += header.batch_length
        rng = self._damaged.get(pos)
        if pos == end and rng is not None and rng.length == 0 and zero_done != pos:
            yield pos, rng  # offsets missing at the end of the walk

    def _walk(self, start: int, end: int, *, verify: bool) -> list[tuple[int, records.BatchHeader]]:
        """Headers of the whole batches in ``[start, end)``, stepping over quarantined
        ranges and stopping at the first batch that is incomplete or fails its checks."""
        found: list[tuple[int, records.BatchHeader]] = []
        for pos, entry in self._entries(start, end):
            if not isinstance(entry, records.BatchHeader):
                continue
            if verify:
                try:
                    records.validate_batch(os.pread(self._fd, entry.batch_length, pos))
                except CorruptBatch:
                    break
            found.append((pos, entry))
        return found

    def cut_tail(self) -> None:
        """Cut the file (and its index) to ``size``: recovery accounted the batches it kept
        and cuts a torn tail (or preallocated zeros) after them."""
        os.ftruncate(self._fd, self.size)
        self.prealloc_end = self.filled_end = self.size
        self._truncate_index(self.size)

    def truncate_to(self, size: int) -> None:
        """Cut the log to ``size`` bytes (which must be a batch boundary) and the index with
        it. Used by recovery and, later, by followers truncating a divergent tail."""
        os.ftruncate(self._fd, size)
        self.prealloc_end = self.filled_end = size
        self._truncate_index(size)
        self.max_timestamp, self.first_timestamp = _NO_TIMESTAMP, None
        if self._idx_positions:
            self.size, self.next_offset = self._idx_positions[-1], self._idx_offsets[-1]
            self.max_timestamp = self._idx_timestamps[-1]
            self.first_timestamp = self._first_batch_timestamp()
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
        self.reserve([header for _head, _body, header in items])
        self.flush_index()

    def reserve(self, headers: list[records.BatchHeader]) -> int:
        """Account stamped batches (their ``headers``, as stored) at the end of the segment
        *without writing them* (the partition's write stage writes them with
        :meth:`write_at`). Returns the position of the first. The index may then name
        positions not yet in the file; loading an index drops such entries."""
        pos = self.size
        for header in headers:
            self.note_batch(self.size, header)
        return pos

    def write_at(self, position: int, iov: list[bytes | memoryview]) -> None:
        """Write ``iov`` at ``position`` completely (IOV_MAX slices, short writes resumed).
        Blocking; raises ``OSError``. For the sync thread."""
        if len(iov) <= 1024:  # one slice, not copied: most rounds (a lone append's two)
            self._write_slice(position, iov)
            return
        for i in range(0, len(iov), 1024):
            position += self._write_slice(position, iov[i : i + 1024])

    def _write_slice(self, position: int, iov: list[bytes | memoryview]) -> int:
        """One ``pwritev`` of at most IOV_MAX buffers, its short write resumed. Returns the
        bytes written (all of them)."""
        n = os.pwritev(self._fd, iov, position)
        total = sum(map(len, iov))
        if n < total:
            rest = b"".join(bytes(c) for c in iov)[n:]
            while rest:
                m = os.pwrite(self._fd, rest, position + n)
                n += m
                rest = rest[m:]
        return total

    def sync(self) -> None:
        """fdatasync the log file. Blocks: call it from a worker thread."""
        os.fdatasync(self._fd)

    def preallocate(self, start: int, end: int, reach: int = 0) -> None:
        """Write the fill (:func:`fill_bytes`) over ``[start, end)``, past every batch
        accounted so far, so that the appends to come overwrite bytes the file already has
        instead of growing it. Durable with the next ``fdatasync`` of the file, like any
        write. Only the write stage calls it, after its runs: batches accounted later are
        written by later write jobs, over the fill, never under it. Advice: skipped while
        the file system has less than :data:`_FILL_FREE_FACTOR` times the fill's ``reach``
        (``preallocate_bytes``; at least ``end - start``) free (the
        last free space is for data: the state store, other partitions), and a failure (a
        full disk) is ignored; the appends then grow the file themselves. Blocking."""
        if self.closed or end <= start:
            return
        try:
            st = os.fstatvfs(self._fd)
            if st.f_bavail * st.f_frsize < _FILL_FREE_FACTOR * max(end - start, reach):
                return  # a nearly full disk: its last bytes are for data, not for a hint
            self.write_at(start, [fill_bytes(start, end - start)])
        except OSError:
            return
        self.filled_end = max(self.filled_end, end)

    def trim(self) -> bool:
        """Cut the file to ``size`` if it is longer (space preallocated past the last
        batch); returns whether it was. For a segment no append reaches any more: sealed,
        or being closed. The caller syncs the file afterwards. Blocking; raises
        ``OSError``."""
        self.prealloc_end = self.filled_end = self.size
        if os.fstat(self._fd).st_size <= self.size:
            return False
        os.ftruncate(self._fd, self.size)
        return True

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
        # from a little before the last range: the kernel drops only folios wholly inside
        # the range, and a large folio (one large write makes them, up to 2 MiB) that
        # straddled the last range's end would otherwise never be wholly inside one
        start = max(0, self._cache_dropped - _MAX_FOLIO)
        with contextlib.suppress(OSError):  # advice only
            length = 0 if whole else upto - start  # 0: to the end of the file
            os.posix_fadvise(self._fd, start, length, os.POSIX_FADV_DONTNEED)
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
        last = self._last_batch() if self._idx_positions and self.size > 0 else None
        if last is not None:
            last_pos, last_header = last
            if last_pos > self._last_indexed_position:
                # on disk only: this runs in the sync thread while the loop may be reading the
                # in-memory index, which the final entry would not change for lookups anyway
                entry = _ENTRY.pack(
                    last_header.base_offset - self.base_offset, last_pos, self.max_timestamp
                )
                os.pwrite(self._index_fd, entry, len(self._idx_offsets) * _ENTRY.size)
        os.fsync(self._index_fd)

    def _last_batch(self) -> tuple[int, records.BatchHeader] | None:
        start = self._idx_positions[-1]
        found = self._walk(start, self.size, verify=False)
        return found[-1] if found else None

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
        ``limit`` if there is none before ``limit``). See :meth:`find_batch`."""
        return self.find_batch(offset, limit)[0]

    def find_batch(self, offset: int, limit: int | None = None) -> tuple[int, int]:
        """``(position, base offset)`` of the batch holding ``offset``, or of the first
        batch after it; ``(limit, offset there)`` if there is none before ``limit``.

        Walks the headers from the nearest index entry (or quarantined range) before
        ``offset``, checking each (header checksum, offsets that follow) and stepping over
        quarantined ranges. A header that fails its checks ends the walk there: the result
        is that position and the offset expected at it, so the reader finds the damage and
        delimits it. An index entry that names the wrong batch is rebuilt from the log
        once."""
        end = self.size if limit is None else limit
        for attempt in range(2):
            i = bisect.bisect_right(self._idx_offsets, offset) - 1
            pos = self._idx_positions[i] if i >= 0 else 0
            expect = self._idx_offsets[i] if i >= 0 else self.base_offset
            from_index = i >= 0
            for rng in self._damaged.values():
                after = rng.end_position
                if rng.end_offset <= offset and (
                    after > pos or (after == pos and rng.end_offset > expect)
                ):
                    pos, expect, from_index = after, rng.end_offset, False
            trust = attempt > 0 or not from_index
            found = self._walk_to(offset, pos, expect, end, trust_start=trust)
            if found is not None:
                return found
            self.rebuild_index()  # the entry disagrees with the log: never trust it again
        return self._walk_to(offset, 0, self.base_offset, end, trust_start=True) or (0, 0)

    def _walk_to(
        self, offset: int, pos: int, expect: int, end: int, *, trust_start: bool
    ) -> tuple[int, int] | None:
        """See :meth:`find_batch`; None if the first header does not carry ``expect`` (the
        index entry is wrong) and ``trust_start`` is false."""
        first = not trust_start
        zero_done = -1
        while pos < end:
            rng = self._damaged.get(pos)
            if rng is not None and zero_done != pos:
                if rng.end_offset > offset:
                    return pos, expect  # the offset is in it: the reader raises
                first = False
                expect = rng.end_offset
                if rng.length:
                    pos = rng.end_position
                    continue
                zero_done = pos  # no bytes: the batch after it starts right here
            chunk = os.pread(self._fd, min(_SCAN_CHUNK, end - pos), pos)
            cpos = 0
            while cpos + records.HEADER_SIZE <= len(chunk):
                if cpos and (pos + cpos) in self._damaged:
                    break  # the outer loop steps over it
                try:
                    header = records.parse_header(chunk, cpos)
                except CorruptBatch:
                    return None if first else (pos + cpos, expect)
                if header.base_offset != expect:
                    return None if first else (pos + cpos, expect)
                first = False
                if header.next_offset > offset:
                    return pos + cpos, expect
                expect = header.next_offset
                cpos += header.batch_length
            if cpos == 0:
                # fewer than a header's bytes before ``end``, or the read came back short:
                # nothing whole here
                return (None if first else (pos, expect)) if pos < end else (end, expect)
            pos += cpos
        return end, expect

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
