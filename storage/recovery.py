"""Recovery: what opening a partition does to the files it finds, and the report of it.

The rules (as Kafka and PostgreSQL with checksums keep them):

- **Below the checkpoint, bytes are trusted.** The checkpoint names the last position known
  to be fsynced (every byte before it was synced, and the sync succeeded, before it was
  written). Those bytes are not verified: only the headers after each segment's last index
  entry are walked, so start-up time does not grow with the log. Damage met on that walk is
  corruption: it is quarantined (:mod:`storage.quarantine`), never cut.
- **Past the checkpoint, every batch is verified**, read **from the device**, not from the
  page cache (:class:`DeviceReader`): after an fsync that failed, the kernel may keep pages
  it never wrote, and a restart must not serve them as committed.
- **Only a torn tail is cut**: damage after which nothing valid follows, up to the end of
  the log. Damage followed by a valid batch (in that segment or a later one) is corruption:
  its bytes are quarantined, the batches around it are kept, later segments are never
  deleted. Offsets missing between segments, or below the checkpoint, are quarantined as a
  range of no bytes.
- **Fill right after the last valid batch, to the end of the file, is the end of the
  log**: space preallocated ahead of the appends (:meth:`Segment.preallocate`, a
  pseudo-random pattern tiled by file position, :func:`~storage.segment.fill_bytes`) that
  no batch reached. It is cut without a warning (``preallocated_bytes``): in the last
  segment, and in a segment before it where every offset up to the next segment's base is
  accounted for (a crash came between its roll and its seal, which cuts the fill). Anything
  else is judged as before: bytes that are not fill after the last valid batch (a torn
  write, a zeroed block: zeros are never fill) are a torn tail if nothing valid follows
  in the log, else corruption; damage below the checkpoint is corruption, found by the
  walk of the trusted prefix, whatever follows it. The fill changes only what is
  reported, never what is kept: a segment's end past its last valid batch was cut before
  the fill existed, and still is.

:func:`recover` is blocking (it reads, truncates and syncs files): at start-up call it
before serving, or from a thread. It returns the segments and the idempotent-producer table
the partition starts from, its quarantine, and a :class:`RecoveryReport` saying what it
scanned, truncated, removed and quarantined. Recovery needs no free space: it writes only
the quarantine list (a failure to is logged, and the damage is found again).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, NamedTuple

import msgspec

from storage import records
from storage.checkpoint import Checkpoint, read_checkpoint
from storage.durable import fsync_dir
from storage.errors import CorruptBatch
from storage.producers import ProducerTable
from storage.quarantine import (
    Quarantine,
    QuarantinedRange,
    next_valid_batch,
    read_quarantine,
)
from storage.segment import Segment, fill_start, list_segments, remove_segment_files

log = logging.getLogger("herald.storage")

FsyncFn = Callable[[int], None]
_ALIGN: Final = 4096  # O_DIRECT: buffer, offset and length aligned to the logical block
_WINDOW: Final = 4 * 1024 * 1024


class RecoveryReport(msgspec.Struct, frozen=True):
    """What opening a partition found and did.

    ``scanned_bytes``: bytes verified past the checkpoint (read from the device; bounded
    by the checkpoint interval, not by the log size). ``truncated_bytes``: a torn tail cut
    (damage with nothing valid after it). ``removed_segments``: segments deleted because
    they held nothing valid past such a cut, or overlapped the log. ``quarantined``: damaged
    ranges found by this recovery (corruption, kept on disk, never served);
    ``quarantined_total``: every range the partition now knows. ``tail_read``: how the
    tail was read: ``"direct"`` (O_DIRECT), ``"fadvise"`` (page cache dropped, then read:
    where O_DIRECT is refused), or ``""`` (nothing past the checkpoint).
    ``preallocated_bytes``: fill found at the end of a segment's file, after its last valid
    batch or after a torn tail (space preallocated ahead of appends that never came), cut;
    not counted in ``truncated_bytes``, which counts the torn tail itself (from the first
    byte that is not a valid batch to where that fill begins)."""

    partition: str
    checkpoint_found: bool
    scanned_bytes: int
    truncated_bytes: int
    removed_segments: list[int]
    next_offset: int
    seconds: float
    quarantined: list[QuarantinedRange] = []
    quarantined_total: int = 0
    tail_read: str = ""
    preallocated_bytes: int = 0


class Recovered(NamedTuple):
    """What a partition opens with: its segments (oldest first, the last one active), its
    idempotent-producer table, its quarantine, and the report."""

    segments: list[Segment]
    producers: ProducerTable
    quarantine: Quarantine
    report: RecoveryReport


# --------------------------------------------------------------------- reading the tail
class DeviceReader:
    """Reads a segment file's bytes as the device holds them, bypassing the page cache.

    Why: after an ``fdatasync`` that failed (EIO, ENOSPC), Linux marks the pages it could
    not write clean and may keep them in the page cache; a plain read then returns data that
    is not on disk, and recovery would keep (and acknowledge to readers) records whose sync
    failed. So the segment is fdatasynced first (pages a killed process left dirty reach the
    device: they are real writes), then read with ``O_DIRECT`` into an aligned buffer. Where
    the filesystem refuses ``O_DIRECT`` (some FUSE filesystems, older tmpfs), its cached
    pages of the range are dropped (``POSIX_FADV_DONTNEED``, which drops clean pages) and
    the range is read normally, which then comes from the filesystem below. Either way the
    range's cached pages are dropped again when the reader closes, so later reads of the
    partition come from the device too.

    :meth:`read` returns a view into a reused buffer: valid until the next call."""

    def __init__(self, seg: Segment, start: int, *, fsync: FsyncFn) -> None:
        self._seg = seg
        self._start = start - start % _ALIGN
        self._direct_fd = -1
        self._buf: mmap.mmap | None = None
        self._win_start = 0
        self._win_len = 0
        try:
            fsync(seg.fd)
        except OSError as exc:
            # what the device holds is still what counts; the caller syncs again at the end
            log.error(
                "event=recovery_sync_failed segment=%s error=%r: reading the device as it is",
                seg.log_path,
                exc,
            )
        try:
            self._direct_fd = os.open(seg.log_path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            self.mode = "direct"
        except (OSError, AttributeError):  # EINVAL: O_DIRECT refused here
            self._fall_back()

    def _fall_back(self) -> None:
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        self.mode = "fadvise"
        self._win_len = 0
        self._drop_cache()

    def _drop_cache(self) -> None:
        try:
            os.posix_fadvise(self._seg.fd, self._start, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:  # advice; a filesystem may not take it
            log.warning("event=fadvise_failed segment=%s error=%r", self._seg.log_path, exc)

    def read(self, position: int, length: int) -> bytes | memoryview:
        """Up to ``length`` bytes at ``position`` (fewer at the end of the file)."""
        if self.mode == "direct":
            end = position + length
            if self._win_start <= position and end <= self._win_start + self._win_len:
                at = position - self._win_start
                assert self._buf is not None
                return memoryview(self._buf)[at : at + length]
            try:
                return self._read_direct(position, length)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._fall_back()  # the filesystem took the open, not the read
        return os.pread(self._seg.fd, length, position)

    def _read_direct(self, position: int, length: int) -> memoryview:
        aligned = position - position % _ALIGN
        size = max(_WINDOW, position + length - aligned)
        size += -size % _ALIGN
        if self._buf is None or len(self._buf) < size:
            self._buf = mmap.mmap(-1, size)  # anonymous mappings are page-aligned
        n = os.preadv(self._direct_fd, [memoryview(self._buf)[:size]], aligned)
        self._win_start, self._win_len = aligned, n
        at = position - aligned
        return memoryview(self._buf)[at : min(at + length, n)]

    def close(self) -> None:
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        self._drop_cache()


# ----------------------------------------------------------------------------- scanning
class _Scan:
    """The outcome of one segment's walk: ``open_damage`` is damage at the end of the
    walk with nothing valid after it in this file (``(position, offset expected there,
    why)``); ``good`` whether the segment holds anything valid; ``fill_from``: with open
    damage, where the preallocation fill that runs to the end of the file begins (no batch
    was written there; the end of the file when there is none)."""

    __slots__ = ("fill_from", "good", "open_damage", "seg")

    def __init__(self, seg: Segment) -> None:
        self.seg = seg
        self.good = False
        self.open_damage: tuple[int, int, str] | None = None
        self.fill_from = -1


def _quarantine(
    seg: Segment, quarantine: Quarantine, pos: int, length: int, first: int, end: int, why: str
) -> QuarantinedRange:
    rng = QuarantinedRange(seg.base_offset, pos, length, first, end, why)
    seg.note_damage(rng)
    quarantine.add(rng)
    return rng


def _walk_trusted(
    seg: Segment, trusted: int, end_offset: int | None, quarantine: Quarantine, name: str
) -> list[QuarantinedRange]:
    """Walk the headers of the trusted prefix ``[last index entry, trusted)``. Damage on
    the way is corruption: it is delimited by the next valid batch before ``trusted`` (or,
    with none, runs to ``trusted``, whose offset is ``end_offset`` when known) and
    quarantined. Raises :class:`CorruptBatch` if the prefix does not end on a batch
    boundary (the caller then verifies the segment whole)."""
    found: list[QuarantinedRange] = []

    def read(position: int, length: int) -> bytes:
        return os.pread(seg.fd, length, position)

    while seg.size < trusted:
        # the walk starts at the last index entry: if it fails at once, blame the index (a
        # hint, never fsynced while active) before the log, and walk from the start
        start = seg.size if seg.size and seg.size == seg.last_indexed_position else -1
        for pos, entry in seg._entries(seg.size, trusted):
            if isinstance(entry, records.BatchHeader):
                if entry.base_offset != seg.next_offset:
                    break
                seg.note_batch(pos, entry)
            else:
                seg.note_damage(entry)
        if seg.size >= trusted:
            break
        pos, first = seg.size, seg.next_offset
        if pos == start:
            seg.reset_index()
            continue
        try:
            header = records.parse_header(os.pread(seg.fd, records.HEADER_SIZE, pos))
        except CorruptBatch as exc:
            why = f"below the checkpoint: {exc}"
        else:
            if header.base_offset == first:
                raise CorruptBatch(  # a sound batch that does not end by ``trusted``
                    f"{seg.log_path.name}: trusted prefix of {trusted} bytes ends mid-batch"
                )
            why = f"below the checkpoint: base offset {header.base_offset}, {first} expected"
        nxt = next_valid_batch(read, pos, trusted, first)
        if nxt is not None:
            end_pos, end = nxt[0], nxt[1].base_offset
        else:
            end_pos, end = trusted, first if end_offset is None else end_offset
        rng = _quarantine(seg, quarantine, pos, end_pos - pos, first, end, why)
        found.append(rng)
        _log_damage(name, rng, "recovery")
    return found


def _scan_tail(
    seg: Segment,
    reader: DeviceReader,
    file_size: int,
    quarantine: Quarantine,
    producers: ProducerTable,
    scan: _Scan,
    name: str,
) -> list[QuarantinedRange]:
    """Verify every batch from ``seg.size`` to the end of the file, read from the device.
    Damage followed by a valid batch in the file is quarantined; damage with nothing valid
    after it is left open in ``scan.open_damage`` (torn, unless a later segment holds data).
    """
    found: list[QuarantinedRange] = []
    pos, expected = seg.size, seg.next_offset
    while pos < file_size:
        header, why = _check(reader, pos, expected, file_size)
        if header is not None:
            seg.note_batch(pos, header)
            scan.good = True
            if header.producer_id >= 0:
                producers.update(
                    header.producer_id,
                    header.base_sequence,
                    header.record_count,
                    header.base_offset,
                    # last use: recovery's time, not the batch's own (the producer chose it)
                    time.time_ns() // 1_000_000,
                )
            pos, expected = pos + header.batch_length, header.next_offset
            continue
        nxt = next_valid_batch(reader.read, pos, file_size, expected)
        if nxt is None:
            scan.open_damage = (pos, expected, why)
            scan.fill_from = _fill_from(reader, pos, file_size)
            return found
        rng = _quarantine(seg, quarantine, pos, nxt[0] - pos, expected, nxt[1].base_offset, why)
        found.append(rng)
        _log_damage(name, rng, "recovery")
        pos, expected = seg.size, seg.next_offset
    return found


def _fill_from(reader: DeviceReader, start: int, end: int) -> int:
    """Where the run of preallocation fill that ends ``[start, end)`` begins (``end`` when
    the range does not end with fill; read from the device, in windows)."""
    pos, found = start, start
    while pos < end:
        chunk = reader.read(pos, min(_WINDOW, end - pos))
        if not chunk:
            break  # the file ends early: nothing there
        at = fill_start(chunk, pos)
        if at:  # this window does not start with fill to its end: the run starts later
            found = pos + at
        pos += len(chunk)
    return found


def _check(
    reader: DeviceReader, pos: int, expected: int, file_size: int
) -> tuple[records.BatchHeader | None, str]:
    """``(header, "")`` if a whole, valid batch at offset ``expected`` is at ``pos``, else
    ``(None, why not)``."""
    try:
        header = records.parse_header(reader.read(pos, records.HEADER_SIZE))
    except CorruptBatch as exc:
        return None, str(exc)
    if header.base_offset != expected:
        return None, f"base offset {header.base_offset} where {expected} was expected"
    if pos + header.batch_length > file_size:
        return None, f"batch of {header.batch_length} bytes runs past the end of the file"
    try:
        records.validate_batch(reader.read(pos, header.batch_length))
    except CorruptBatch as exc:
        return None, str(exc)
    return header, ""


def _log_damage(name: str, rng: QuarantinedRange, found_by: str) -> None:
    log.error(
        "event=corrupt_data partition=%s found_by=%s segment=%d position=%d length=%d "
        "first_offset=%d end_offset=%d reason=%r",
        name,
        found_by,
        rng.segment,
        rng.position,
        rng.length,
        rng.first_offset,
        rng.end_offset,
        rng.reason,
    )


# ----------------------------------------------------------------------------- recover
def recover(
    directory: Path,
    *,
    index_interval_bytes: int,
    name: str,
    fsync: FsyncFn = os.fdatasync,
) -> Recovered:
    """Recover the partition in ``directory`` (created if missing), as the module
    docstring says. Every segment whose tail was read is synced before this returns, so
    what it kept is on disk. Blocking. On a failure (out of descriptors, a full disk) every
    segment it opened is closed before the error propagates: nothing leaks."""
    opened: list[Segment] = []
    try:
        return _recover(directory, index_interval_bytes, name, fsync, opened)
    except BaseException:
        for seg in opened:
            seg.abandon()
        raise


def _recover(
    directory: Path,
    index_interval_bytes: int,
    name: str,
    fsync: FsyncFn,
    opened: list[Segment],
) -> Recovered:
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint: Checkpoint | None = read_checkpoint(directory)
    bases = list_segments(directory)
    producers = ProducerTable.restore(checkpoint.producers) if checkpoint else ProducerTable()
    if checkpoint is not None and checkpoint.segment_base not in bases:
        checkpoint = None  # the checkpoint names a segment that is gone: trust nothing
        producers = ProducerTable()
    known = [r for r in read_quarantine(directory) if r.segment in bases]
    quarantine = Quarantine(directory, [])
    scans: list[_Scan] = []
    removed: list[int] = []
    found: list[QuarantinedRange] = []
    scanned = truncated = preallocated = 0
    tail_read = ""
    cut: list[Segment] = []
    for i, base in enumerate(bases):
        if scans and base < scans[-1].seg.next_offset:
            # overlaps what the log already holds (a segment a cut-back deleted came
            # back): it is not part of this log, nor is anything after it
            log.error(
                "event=recovery_overlap partition=%s segment=%d log_end_offset=%d",
                name,
                base,
                scans[-1].seg.next_offset,
            )
            for later in bases[i:]:
                remove_segment_files(directory, later)
                removed.append(later)
            break
        seg = Segment.open_files(directory, base, index_interval_bytes=index_interval_bytes)
        opened.append(seg)
        scan = _Scan(seg)
        scans.append(scan)
        file_size = seg.file_size()
        if checkpoint is not None and base < checkpoint.segment_base:
            trusted, end_offset = file_size, bases[i + 1]  # whole: synced and sealed
            scan.good = True
        elif checkpoint is not None and base == checkpoint.segment_base:
            trusted, end_offset = min(checkpoint.position, file_size), checkpoint.next_offset
            scan.good = True
        else:
            trusted, end_offset = 0, None
        mine = [r for r in known if r.segment == base and r.end_position <= trusted]
        try:
            seg.load_index(trusted)
            for rng in mine:
                quarantine.add(rng)
                if rng.position <= seg.size < rng.end_position or (
                    rng.length == 0 and rng.position == seg.size
                ):
                    seg.note_damage(rng)
                else:
                    seg.add_damage(rng)
            found += _walk_trusted(seg, trusted, end_offset, quarantine, name)
        except CorruptBatch:
            # the checkpoint does not fall on a batch boundary: verify the segment whole
            seg.close()
            seg = Segment.open_files(directory, base, index_interval_bytes=index_interval_bytes)
            opened.append(seg)
            scan.seg = seg
            trusted = 0
        if (
            checkpoint is not None
            and base == checkpoint.segment_base
            and file_size < checkpoint.position
            and seg.size == file_size
            and seg.next_offset < checkpoint.next_offset
        ):
            # the file is shorter than the checkpoint says: synced records are missing
            rng = _quarantine(
                seg,
                quarantine,
                seg.size,
                0,
                seg.next_offset,
                checkpoint.next_offset,
                "missing below checkpoint",
            )
            found.append(rng)
            _log_damage(name, rng, "recovery")
        if seg.size < file_size:
            reader = DeviceReader(seg, seg.size, fsync=fsync)
            tail_read = tail_read or reader.mode
            start = seg.size
            try:
                found += _scan_tail(seg, reader, file_size, quarantine, producers, scan, name)
            finally:
                reader.close()
            scanned += file_size - start
    # which segment holds the last valid batch: damage after it is a torn tail
    last_good = max((i for i, s in enumerate(scans) if s.good), default=-1)
    for i, scan in enumerate(scans):
        seg = scan.seg
        if i > last_good:
            seg.close()
            remove_segment_files(directory, seg.base_offset)
            removed.append(seg.base_offset)
            continue
        if scan.open_damage is not None:
            pos, first, why = scan.open_damage
            nxt_base = scans[i + 1].seg.base_offset if i < last_good else None
            fill_from, file_end = scan.fill_from, seg.file_size()
            if fill_from == pos and (i == last_good or first == nxt_base):
                # fill from the last valid batch to the end of the file: preallocated space
                # no append reached (in an earlier segment, with no offset missing before
                # the next one: a crash came between its roll and its seal)
                preallocated += file_end - pos
                seg.cut_tail()
                cut.append(seg)
            elif i == last_good:  # nothing valid after it in the log: a torn tail
                truncated += fill_from - pos  # what was torn; the fill after it is counted
                preallocated += file_end - fill_from  # as fill
                seg.cut_tail()
                cut.append(seg)
            else:
                nxt = scans[i + 1].seg.base_offset
                rng = _quarantine(seg, quarantine, pos, seg.file_size() - pos, first, nxt, why)
                found.append(rng)
                _log_damage(name, rng, "recovery")
        if i < last_good:
            nxt = scans[i + 1].seg.base_offset
            if seg.next_offset < nxt:  # offsets missing between two segments
                rng = _quarantine(
                    seg, quarantine, seg.size, 0, seg.next_offset, nxt, "missing between segments"
                )
                found.append(rng)
                _log_damage(name, rng, "recovery")
    segments = [s.seg for s in scans[: last_good + 1]]
    if removed:
        fsync_dir(directory)
    if not segments:
        start_offset = checkpoint.next_offset if checkpoint else 0
        created = Segment.create(directory, start_offset, index_interval_bytes=index_interval_bytes)
        opened.append(created)
        segments.append(created)
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
        quarantined=found,
        quarantined_total=len(quarantine),
        tail_read=tail_read,
        preallocated_bytes=preallocated,
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
    # the tails were synced before they were read; a cut changed a file's size since
    for seg in cut:
        seg.sync()
    if found or len(known) != len(quarantine):
        try:
            quarantine.save()
        except OSError as exc:  # e.g. a full disk: the damage is found again next time
            log.error("event=quarantine_write_failed partition=%s error=%r", name, exc)
    quarantine.detected = len(found)
    return Recovered(segments, producers, quarantine, report)
