"""The durability model behind the power-loss filesystem: what a power cut keeps.

A conservative POSIX disk, one inode at a time:

- a file's data (writes, truncations, size) is durable only once an ``fsync``/``fdatasync``
  of that file succeeds; what it covered is then durable, nothing written later is;
- a directory's entries (create, unlink, rename, mkdir, rmdir, link) are durable only once an
  ``fsync`` of that directory succeeds; it makes the directory's whole entry table durable
  as it stands. The fsync of a file does not make its name durable, and the fsync of a
  directory does not make its files' data durable;
- a power cut keeps exactly the durable state: every file reachable from the root through
  durable entries, each with its durable data. Nothing else survives: no unsynced write, no
  part of one (no torn or reordered pages), no unsynced name.

Faults: an injected fsync failure answers ``EIO`` and drops what that fsync covered from the
set of changes still to be made durable (as Linux does after a failed writeback: the pages
are marked clean), so a later successful fsync does not save them either; buffered reads
go on returning them until the power cut (the page cache), while ``O_DIRECT`` reads
(:meth:`Model.read_device`) return what the device holds there: the durable bytes, or zeros
past the durable size. A space limit (``set_free_bytes``) makes writes past it
fail with ``ENOSPC`` (a short write first when part fits).

Storage: every inode's current ("volatile", the page cache) bytes live in a flat backing
file ``vol/<id>`` and its durable bytes in ``dur/<id>``; directories live in memory. An
fsync copies only the ranges written since the previous one, so its cost follows what was
written, not the file's size. This module does no FUSE: ``lazyfs.py`` maps kernel requests
onto it, and the self-tests drive it directly too.
"""

from __future__ import annotations

import bisect
import errno
import fnmatch
import os
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

ROOT_ID = 1
OPEN_FILES_PER_TABLE = 256  # backing fds kept open, for current and for durable bytes each


class FsError(OSError):
    def __init__(self, code: int, what: str = "") -> None:
        super().__init__(code, os.strerror(code) + (f": {what}" if what else ""))


def _copy(src: int, dst: int, start: int, end: int) -> None:
    """Copy bytes ``[start, end)`` of ``src`` to the same positions of ``dst`` (in the
    kernel; a range past the end of ``src`` copies nothing, leaving a hole)."""
    pos = start
    while pos < end:
        n = os.copy_file_range(src, dst, end - pos, pos, pos)
        if n == 0:
            break
        pos += n


class Ranges:
    """A set of disjoint half-open byte ranges ``[start, end)``, kept sorted and merged."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        # the ranges that touch [start, end) are merged into it
        i = bisect.bisect_left(self.ends, start)
        j = bisect.bisect_right(self.starts, end)
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        """Take ``[start, end)`` out of the set (a range straddling an edge is cut)."""
        if end <= start:
            return
        i = bisect.bisect_right(self.ends, start)  # the first range ending after start
        j = bisect.bisect_left(self.starts, end)  # the first range starting at end or later
        if i >= j:
            return
        starts, ends = [], []
        if self.starts[i] < start:
            starts.append(self.starts[i])
            ends.append(start)
        if self.ends[j - 1] > end:
            starts.append(end)
            ends.append(self.ends[j - 1])
        self.starts[i:j] = starts
        self.ends[i:j] = ends

    def overlapping(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of the set inside ``[start, end)``, in order."""
        if end <= start:
            return []
        i = bisect.bisect_right(self.ends, start)
        j = bisect.bisect_left(self.starts, end)
        return [
            (max(s, start), min(e, end))
            for s, e in zip(self.starts[i:j], self.ends[i:j], strict=True)
        ]

    def clear(self) -> None:
        self.starts.clear()
        self.ends.clear()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(zip(self.starts, self.ends, strict=True))

    def total(self) -> int:
        return sum(e - s for s, e in self)

    def __bool__(self) -> bool:
        return bool(self.starts)


@dataclass
class Inode:
    id: int
    is_dir: bool
    mode: int
    mtime_ns: int = field(default_factory=time.time_ns)
    # volatile (what processes see)
    entries: dict[str, int] = field(default_factory=dict)  # directories
    size: int = 0  # files
    nlink: int = 0
    parent: int = 0  # one volatile link, for paths and glob matching
    name: str = ""
    nlookup: int = 0  # references the kernel holds (LOOKUP/CREATE replies minus FORGETs)
    opens: int = 0
    released: bool = False  # no name, no reference: its volatile bytes are gone
    # durable (what a power cut keeps)
    durable_entries: dict[str, int] = field(default_factory=dict)
    durable_size: int = 0
    dirty: Ranges = field(default_factory=Ranges)  # written since the last durable point
    # the device (what an O_DIRECT read sees): ranges a failed fsync covered never reached
    # it, and hold the durable bytes (zeros past the durable size) until written again
    lost: Ranges = field(default_factory=Ranges)
    # zeros left by a write past the end: on their way to the device like any write, but
    # never "lost" by a failed fsync (no data page of them was ever dirty: they read as zeros
    # from the device too); the next successful fsync makes them durable
    holes: Ranges = field(default_factory=Ranges)

    @property
    def st_mode(self) -> int:
        return (stat.S_IFDIR if self.is_dir else stat.S_IFREG) | self.mode


@dataclass
class CutReport:
    """What a power cut took back, for the test's failure messages."""

    # path -> bytes dropped: unsynced, or covered by a failed fsync
    lost_bytes: dict[str, int] = field(default_factory=dict)
    lost_names: list[str] = field(default_factory=list)  # names that were not durable
    restored_names: list[str] = field(default_factory=list)  # removals that were not durable
    files: int = 0
    dirs: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "lost_bytes": self.lost_bytes,
            "lost_names": self.lost_names,
            "restored_names": self.restored_names,
            "files": self.files,
            "dirs": self.dirs,
        }


class Model:
    """The filesystem's state: inodes, their volatile and durable contents, and faults."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.vol_dir = store / "vol"
        self.dur_dir = store / "dur"
        for d in (self.vol_dir, self.dur_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.inodes: dict[int, Inode] = {}
        self.next_id = ROOT_ID + 1
        root = Inode(ROOT_ID, True, 0o755, nlink=1)
        self.inodes[ROOT_ID] = root
        self._vol_fds: OrderedDict[int, int] = OrderedDict()
        self._dur_fds: OrderedDict[int, int] = OrderedDict()
        # faults
        self.fsync_faults: list[list[object]] = []  # [glob, remaining count]
        self.space_limit: int | None = None  # bytes of file data the disk holds in all
        self.used = 0
        self.stats: dict[str, int] = {
            "fsyncs": 0,
            "fsync_failures": 0,
            "dir_fsyncs": 0,
            "synced_bytes": 0,
            "written_bytes": 0,
            "enospc": 0,
            "power_cuts": 0,
            "direct_reads": 0,
        }

    # ------------------------------------------------------------------ lookup
    def get(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise FsError(errno.ESTALE, f"inode {ino}") from None

    def dir(self, ino: int) -> Inode:
        node = self.get(ino)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return node

    def lookup(self, parent: int, name: str) -> Inode:
        child = self.dir(parent).entries.get(name)
        if child is None:
            raise FsError(errno.ENOENT, name)
        return self.inodes[child]

    def path(self, node: Inode) -> str:
        """The volatile path of ``node`` relative to the root ("" for the root)."""
        parts: list[str] = []
        seen = 0
        while node.id != ROOT_ID and node.parent and seen < 256:
            parts.append(node.name)
            node = self.inodes[node.parent]
            seen += 1
        return "/".join(reversed(parts))

    # ------------------------------------------------------------------ backing files
    def _fd(self, table: OrderedDict[int, int], directory: Path, ino: int) -> int:
        """An open fd on a backing file, from a bounded cache (least recently used closed
        first): a node with thousands of files must not run the daemon out of fds."""
        fd = table.get(ino)
        if fd is None:
            while len(table) >= OPEN_FILES_PER_TABLE:
                os.close(table.popitem(last=False)[1])
            fd = os.open(directory / str(ino), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            table[ino] = fd
        else:
            table.move_to_end(ino)
        return fd

    def vol_fd(self, ino: int) -> int:
        return self._fd(self._vol_fds, self.vol_dir, ino)

    def dur_fd(self, ino: int) -> int:
        return self._fd(self._dur_fds, self.dur_dir, ino)

    def _drop_backing(self, ino: int, *, durable: bool) -> None:
        tables = [(self._vol_fds, self.vol_dir)]
        if durable:
            tables.append((self._dur_fds, self.dur_dir))
        for table, directory in tables:
            fd = table.pop(ino, None)
            if fd is not None:
                os.close(fd)
            try:
                os.unlink(directory / str(ino))
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ namespace
    def _new(self, parent: Inode, name: str, *, is_dir: bool, mode: int) -> Inode:
        if name in parent.entries:
            raise FsError(errno.EEXIST, name)
        node = Inode(self.next_id, is_dir, mode & 0o7777)
        self.next_id += 1
        self.inodes[node.id] = node
        self._link(parent, name, node)
        parent.mtime_ns = time.time_ns()
        return node

    def _link(self, parent: Inode, name: str, node: Inode) -> None:
        parent.entries[name] = node.id
        node.nlink += 1
        node.parent, node.name = parent.id, name

    def _unlink_entry(self, parent: Inode, name: str) -> Inode:
        node = self.inodes[parent.entries.pop(name)]
        node.nlink -= 1
        if node.parent == parent.id and node.name == name:
            # keep a path for glob matching while another name is left
            other = (
                next(
                    (
                        (d.id, n)
                        for d in self.inodes.values()
                        if d.is_dir
                        for n, i in d.entries.items()
                        if i == node.id
                    ),
                    None,
                )
                if node.nlink > 0
                else None
            )
            node.parent, node.name = other if other else (0, node.name)
        parent.mtime_ns = time.time_ns()
        self.maybe_release(node)
        return node

    def create(self, parent: int, name: str, mode: int) -> Inode:
        node = self._new(self.dir(parent), name, is_dir=False, mode=mode)
        os.ftruncate(self.vol_fd(node.id), 0)
        return node

    def mkdir(self, parent: int, name: str, mode: int) -> Inode:
        return self._new(self.dir(parent), name, is_dir=True, mode=mode)

    def link(self, ino: int, parent: int, name: str) -> Inode:
        node, p = self.get(ino), self.dir(parent)
        if node.is_dir:
            raise FsError(errno.EPERM)
        if name in p.entries:
            raise FsError(errno.EEXIST, name)
        p.entries[name] = node.id
        node.nlink += 1
        return node

    def unlink(self, parent: int, name: str) -> None:
        node = self.lookup(parent, name)
        if node.is_dir:
            raise FsError(errno.EISDIR, name)
        self._unlink_entry(self.inodes[parent], name)

    def rmdir(self, parent: int, name: str) -> None:
        node = self.lookup(parent, name)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR, name)
        if node.entries:
            raise FsError(errno.ENOTEMPTY, name)
        self._unlink_entry(self.inodes[parent], name)

    def rename(self, parent: int, name: str, new_parent: int, new_name: str, flags: int) -> None:
        if flags & ~1:  # RENAME_NOREPLACE only; no RENAME_EXCHANGE or WHITEOUT
            raise FsError(errno.EINVAL)
        src_dir, dst_dir = self.dir(parent), self.dir(new_parent)
        node = self.lookup(parent, name)
        if parent == new_parent and name == new_name:
            return
        # moving a directory under itself is refused by the kernel before it reaches us
        target_id = dst_dir.entries.get(new_name)
        if target_id is not None:
            if flags & 1:
                raise FsError(errno.EEXIST, new_name)
            target = self.inodes[target_id]
            if target.is_dir and not node.is_dir:
                raise FsError(errno.EISDIR, new_name)
            if node.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR, new_name)
            if target.is_dir and target.entries:
                raise FsError(errno.ENOTEMPTY, new_name)
            self._unlink_entry(dst_dir, new_name)
        del src_dir.entries[name]
        node.nlink -= 1
        self._link(dst_dir, new_name, node)
        src_dir.mtime_ns = dst_dir.mtime_ns = time.time_ns()

    def forget(self, ino: int, n: int) -> None:
        node = self.inodes.get(ino)
        if node is not None and ino != ROOT_ID:
            node.nlookup = max(0, node.nlookup - n)
            self.maybe_release(node)

    def maybe_release(self, node: Inode) -> None:
        """Free the volatile bytes of a file that has no name and is not open (as the blocks
        of an unlinked, closed file are). The kernel may still ask for its attributes until
        it forgets the inode. Its durable bytes stay until the power cut decides whether a
        durable name still points at it."""
        if node.nlink > 0 or node.opens > 0 or node.released:
            return
        node.released = True
        node.dirty.clear()
        node.lost.clear()
        node.holes.clear()
        if not node.is_dir:
            self.used -= node.size
            self._drop_backing(node.id, durable=False)

    # ------------------------------------------------------------------ file data
    def read(self, ino: int, offset: int, size: int) -> bytes:
        """A buffered read: the page cache, which holds every write, including what a
        failed fsync covered, until the power cut."""
        node = self.get(ino)
        if offset >= node.size:
            return b""
        return os.pread(self.vol_fd(ino), min(size, node.size - offset), offset)

    def read_device(self, ino: int, offset: int, size: int) -> bytes:
        """An ``O_DIRECT`` read: what the device holds. That is every write, fsynced or not
        (Linux writes dirty pages back before a direct read), except the ranges a failed
        fsync covered: they never reached the device, which still has the durable bytes
        there (zeros past the durable size). Any offset and length."""
        node = self.get(ino)
        self.stats["direct_reads"] += 1
        data = self.read(ino, offset, size)
        lost = node.lost.overlapping(offset, offset + len(data))
        if not lost:
            return data
        out = bytearray(data)
        for start, end in lost:
            durable = b""
            if start < node.durable_size:
                durable = os.pread(self.dur_fd(ino), min(end, node.durable_size) - start, start)
            out[start - offset : end - offset] = durable.ljust(end - start, b"\0")
        return bytes(out)

    def _room(self, grow: int) -> int:
        if self.space_limit is None:
            return grow
        return max(0, min(grow, self.space_limit - self.used))

    def write(self, ino: int, offset: int, data: memoryview | bytes) -> int:
        node = self.get(ino)
        n = len(data)
        grow = max(0, offset + n - node.size)
        room = self._room(grow)
        if room < grow:
            n -= grow - room  # the part that fits, as a filling disk gives a short write
            if n <= 0:
                self.stats["enospc"] += 1
                raise FsError(errno.ENOSPC, self.path(node))
            data = data[:n]
        written = os.pwrite(self.vol_fd(ino), data, offset)
        if offset > node.size:
            # a write past the end leaves a hole that reads as zeros: those bytes change too
            # (the durable copy may still hold older bytes there, e.g. after a truncate whose
            # fsync failed); the part of it not already changed since the last fsync is a hole
            fresh = Ranges()
            fresh.add(node.size, offset)
            for start, end in node.dirty:
                fresh.remove(start, end)
            for start, end in fresh:
                node.holes.add(start, end)
            node.dirty.add(node.size, offset)
            node.lost.remove(node.size, offset)
        node.holes.remove(offset, offset + written)
        node.dirty.add(offset, offset + written)
        node.lost.remove(offset, offset + written)  # new bytes, on their way to the device
        end = offset + written
        if end > node.size:
            self.used += end - node.size
            node.size = end
        node.mtime_ns = time.time_ns()
        self.stats["written_bytes"] += written
        return written

    def truncate(self, ino: int, size: int) -> None:
        node = self.get(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if size > node.size and self._room(size - node.size) < size - node.size:
            self.stats["enospc"] += 1
            raise FsError(errno.ENOSPC, self.path(node))
        os.ftruncate(self.vol_fd(ino), size)
        # the bytes between the two sizes change (cut, or zeros when it grows back); what the
        # durable copy still has past the new size is cut by the next fsync (it carries the
        # size)
        node.dirty.add(min(size, node.size), max(size, node.size))
        node.lost.remove(min(size, node.size), max(size, node.size))  # gone, or new zeros
        node.holes.remove(min(size, node.size), max(size, node.size, node.durable_size))
        self.used += size - node.size
        node.size = size
        node.mtime_ns = time.time_ns()

    def allocate(self, ino: int, offset: int, length: int, keep_size: bool) -> None:
        """fallocate: mode 0 grows the file (as ftruncate would, holes read as zeros)."""
        node = self.get(ino)
        if not keep_size and offset + length > node.size:
            self.truncate(ino, offset + length)

    # ------------------------------------------------------------------ durability
    def _fault(self, node: Inode) -> bool:
        path = self.path(node)
        for fault in self.fsync_faults:
            pattern, remaining = fault
            assert isinstance(pattern, str) and isinstance(remaining, int)
            if remaining > 0 and fnmatch.fnmatchcase(path, pattern):
                fault[1] = remaining - 1
                self.fsync_faults = [f for f in self.fsync_faults if f[1] != 0]
                return True
        return False

    def fsync(self, ino: int) -> None:
        """fsync or fdatasync of a file or directory (the model does not tell them apart:
        fdatasync also carries the size, which is all the metadata it models)."""
        node = self.get(ino)
        failed = self._fault(node)
        if node.is_dir:
            self.stats["dir_fsyncs"] += 1
            if failed:
                self.stats["fsync_failures"] += 1
                raise FsError(errno.EIO, f"injected fsync failure on {self.path(node)}/")
            node.durable_entries = dict(node.entries)
            return
        self.stats["fsyncs"] += 1
        if failed:
            # fsyncgate: what this fsync covered is dropped from the changes still to be
            # written; the page cache (vol) keeps showing it until the power cut, the
            # device (direct reads) never had it
            for start, end in node.dirty:
                node.lost.add(start, min(end, node.size))
            node.dirty.clear()
            for start, end in node.holes:  # zeros of a hole reach the device anyway
                node.lost.remove(start, end)
                node.dirty.add(start, min(end, node.size))
            self.stats["fsync_failures"] += 1
            raise FsError(errno.EIO, f"injected fsync failure on {self.path(node)}")
        if not node.dirty and node.durable_size == node.size:
            return
        src, dst = self.vol_fd(ino), self.dur_fd(ino)
        for start, end in node.dirty:
            end = min(end, node.size)
            _copy(src, dst, start, end)
            self.stats["synced_bytes"] += max(0, end - start)
        os.ftruncate(dst, node.size)
        node.durable_size = node.size
        node.dirty.clear()
        node.holes.clear()

    def sync_all(self) -> None:
        """Make everything durable, as ``sync`` and a few quiet seconds would on a real
        machine: used by a test to give a workload a durable starting point."""
        for node in list(self.inodes.values()):
            if node.released:
                continue
            if node.is_dir:
                node.durable_entries = dict(node.entries)
            else:
                self.fsync(node.id)

    def fail_fsync(self, pattern: str, count: int = 1) -> None:
        """The next ``count`` fsyncs of a path matching ``pattern`` (a glob relative to the
        mount root, ``*`` crossing ``/``; a directory's path has no trailing slash) fail."""
        self.fsync_faults.append([pattern, count])

    def set_free_bytes(self, free: int | None) -> None:
        """``free`` more bytes of file data fit from now on (None: no limit)."""
        self.space_limit = None if free is None else self.used + free

    def dirty_bytes(self) -> int:
        return sum(n.dirty.total() for n in self.inodes.values() if not n.is_dir)

    def failed_fsync_bytes(self) -> int:
        """Bytes the page cache holds and the device does not (a failed fsync covered them)."""
        return sum(n.lost.total() for n in self.inodes.values() if not n.is_dir)

    # ------------------------------------------------------------------ power cut
    def power_cut(self) -> CutReport:
        """Forget everything not durable: the volatile state becomes the durable one.
        Every reference the kernel held is gone (the caller has unmounted)."""
        report = CutReport()
        self.stats["power_cuts"] += 1
        for node in self.inodes.values():
            if node.is_dir and not node.released:
                base = self.path(node)
                for name in node.entries.keys() - node.durable_entries.keys():
                    report.lost_names.append(f"{base}/{name}".lstrip("/"))
                for name in node.durable_entries.keys() - node.entries.keys():
                    report.restored_names.append(f"{base}/{name}".lstrip("/"))
            elif not node.is_dir and not node.released and (node.dirty or node.lost):
                gone = Ranges()  # unsynced, and what failed fsyncs covered
                for start, end in (*node.dirty, *node.lost):
                    gone.add(start, end)
                report.lost_bytes[self.path(node) or f"#{node.id}"] = gone.total()
        # walk the durable tree from the root
        keep: dict[int, Inode] = {}
        links: dict[int, int] = {}
        order = [ROOT_ID]
        keep[ROOT_ID] = self.inodes[ROOT_ID]
        while order:
            d = self.inodes[order.pop()]
            for name, child_id in d.durable_entries.items():
                child = self.inodes[child_id]
                links[child_id] = links.get(child_id, 0) + 1
                if child_id in keep:
                    continue  # a second durable name (a hard link)
                keep[child_id] = child
                child.parent, child.name = d.id, name
                if child.is_dir:
                    order.append(child_id)
        for ino in list(self.inodes):
            if ino not in keep:
                self._drop_backing(ino, durable=True)
                del self.inodes[ino]
        self.used = 0
        for node in keep.values():
            node.nlookup = node.opens = 0
            node.released = False
            node.nlink = 1 if node.id == ROOT_ID else links.get(node.id, 0)
            node.dirty.clear()
            node.lost.clear()
            node.holes.clear()
            if node.is_dir:
                node.entries = dict(node.durable_entries)
                report.dirs += 1
                continue
            report.files += 1
            vol_fd = self._vol_fds.pop(node.id, None)
            if vol_fd is not None:
                os.close(vol_fd)
            vol = self.vol_dir / str(node.id)
            dur = self.dur_dir / str(node.id)
            tmp = self.vol_dir / f"{node.id}.tmp"
            with open(tmp, "wb") as out:
                if dur.exists() and node.durable_size:
                    with open(dur, "rb") as src:
                        _copy(src.fileno(), out.fileno(), 0, node.durable_size)
                out.truncate(node.durable_size)
            os.replace(tmp, vol)
            node.size = node.durable_size
            self.used += node.size
        # the durable copies of the survivors stay as they are: still durable
        return report

    def close(self) -> None:
        for table in (self._vol_fds, self._dur_fds):
            for fd in table.values():
                os.close(fd)
            table.clear()
