"""The power-loss filesystem daemon: serves the FUSE kernel protocol on a mount point over the
durability model of ``model.py``, and takes commands on a Unix socket.

    python -m tests.system.powercut.lazyfs MOUNTPOINT STORE_DIR CONTROL_SOCKET

One thread, one ``poll`` loop over the FUSE device and the control socket, so the model needs
no lock and a command (a power cut) never races a request. Control commands are one JSON
object per connection, answered with one JSON line (see ``control.py``):

- ``{"op": "power_cut"}``: unmount (lazily, after the test killed every process using the
  mount), drop everything not durable, mount again: the kernel's page cache of the old
  mount is gone with it. Answers what was lost.
- ``{"op": "fail_fsync", "glob": "log/*/*.log", "count": 1}``
- ``{"op": "set_free_bytes", "bytes": N}`` / ``{"op": "set_free_bytes", "bytes": null}``
- ``{"op": "sync_all"}``, ``{"op": "stats"}``, ``{"op": "ping"}``, ``{"op": "exit"}``

Exits (unmounting) on SIGTERM, on ``exit``, and when its parent dies (PR_SET_PDEATHSIG), so
a lost test run does not leave a mount behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from . import fuse_kernel as fk
from .model import ROOT_ID, FsError, Inode, Model

log = logging.getLogger("lazyfs")

EXIT_NO_FUSE = 77  # this machine refuses the mount: the caller skips, it is no bug here
TTL_S = 3600  # entry and attribute validity: nothing changes the tree behind the kernel


class Server:
    def __init__(self, mountpoint: str, store: Path, control_path: str) -> None:
        self.mountpoint = mountpoint
        self.model = Model(store)
        self.fd = -1
        self.handles: dict[int, int] = {}  # fh -> inode
        self.dir_listings: dict[int, list[tuple[str, int]]] = {}
        self.next_fh = 1
        self.ops: dict[str, int] = {}
        self.op_seconds: dict[str, float] = {}
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control_path)
        self.control.bind(control_path)
        self.control.listen(8)
        self.running = True
        self.started = time.monotonic()
        self.handlers: dict[int, Callable[[int, memoryview], bytes | None]] = {
            op: getattr(self, method) for op, method in self.HANDLERS.items()
        }

    # ------------------------------------------------------------------ mount
    def mount(self) -> None:
        self.fd = fk.mount(self.mountpoint)
        os.set_blocking(self.fd, False)
        self.handles.clear()
        self.dir_listings.clear()

    def unmount(self) -> None:
        fk.umount(self.mountpoint)
        if self.fd >= 0:
            os.close(self.fd)  # aborts the connection: a straggler gets ENOTCONN, not a hang
            self.fd = -1

    # ------------------------------------------------------------------ loop
    def serve(self) -> None:
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        fuse_fd = -1
        while self.running:
            if fuse_fd != self.fd:
                if fuse_fd >= 0:
                    with contextlib.suppress(KeyError):
                        poller.unregister(fuse_fd)
                fuse_fd = self.fd
                if fuse_fd >= 0:
                    poller.register(fuse_fd, select.POLLIN)
            for fd, _event in poller.poll(1000):
                if fd == fuse_fd and fd == self.fd:
                    self.drain_fuse()
                elif fd == self.control.fileno():
                    try:
                        self.accept_command()
                    except OSError as exc:  # a client that went away: serve on
                        log.warning("event=command_connection_failed error=%r", exc)

    def drain_fuse(self) -> None:
        """Answer every request waiting on the device, then go back to poll."""
        for _ in range(256):
            try:
                req = os.read(self.fd, fk.READ_BUFFER)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ENOENT):
                    continue  # interrupted, or a request aborted before we read it
                if exc.errno == errno.ENODEV:  # unmounted from outside
                    log.warning("event=fuse_device_gone")
                    os.close(self.fd)
                    self.fd = -1
                    return
                raise
            self.handle(memoryview(req))

    def reply(self, unique: int, payload: bytes = b"", error: int = 0) -> None:
        data = fk.OUT_HEADER.pack(fk.OUT_HEADER.size + len(payload), -error, unique) + payload
        try:
            os.write(self.fd, data)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the request was interrupted and is gone
                raise

    def handle(self, req: memoryview) -> None:
        _len, opcode, unique, nodeid, _uid, _gid, _pid, _extlen, _pad = fk.IN_HEADER.unpack_from(
            req
        )
        body = req[fk.IN_HEADER.size :]
        name = fk.OPNAMES.get(opcode, str(opcode))
        started = time.perf_counter()
        try:
            result = self.handlers.get(opcode, self.op_unsupported)(nodeid, body)
        except FsError as exc:
            self.reply(unique, error=exc.errno or errno.EIO)
        except OSError as exc:
            log.warning("event=backing_error op=%s node=%d error=%r", name, nodeid, exc)
            self.reply(unique, error=exc.errno or errno.EIO)
        except Exception:
            log.error("event=handler_crash op=%s node=%d\n%s", name, nodeid, traceback.format_exc())
            self.reply(unique, error=errno.EIO)
        else:
            if result is not None:  # FORGET, BATCH_FORGET and INTERRUPT get no answer
                self.reply(unique, result)
        self.ops[name] = self.ops.get(name, 0) + 1
        self.op_seconds[name] = self.op_seconds.get(name, 0.0) + time.perf_counter() - started

    # ------------------------------------------------------------------ requests
    def attr(self, node: Inode) -> bytes:
        nlink = 2 if node.is_dir else node.nlink
        return fk.pack_attr(node.id, node.size, node.st_mode, nlink, node.mtime_ns)

    def entry(self, node: Inode) -> bytes:
        node.nlookup += 1
        return fk.entry_out(node.id, self.attr(node), TTL_S)

    def open_handle(self, node: Inode, flags: int) -> bytes:
        """A file handle. An ``O_DIRECT`` open gets ``FOPEN_DIRECT_IO``: the kernel then
        bypasses its page cache for it and sends every read here, at the caller's offset
        and length (``op_read`` serves it from the device). Every open keeps the page
        cache (an O_DIRECT open does not drop what buffered readers see)."""
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = node.id
        node.opens += 1
        open_flags = fk.FOPEN_KEEP_CACHE
        if flags & os.O_DIRECT:
            open_flags |= fk.FOPEN_DIRECT_IO
        return fk.OPEN_OUT.pack(fh, open_flags, 0)

    # One method per request, found through HANDLERS; each returns the reply's body, or None
    # for the requests the kernel expects no answer to. Errors are raised as FsError.
    def op_init(self, _node: int, body: memoryview) -> bytes:
        major, minor, _readahead, _flags = fk.INIT_IN.unpack_from(body)
        if major != 7:
            raise FsError(errno.EPROTO, f"FUSE major {major}")
        return fk.INIT_OUT.pack(
            7,
            min(minor, fk.KERNEL_VERSION[1]),
            128 * 1024,  # max_readahead
            fk.FUSE_BIG_WRITES | fk.FUSE_MAX_PAGES,
            16,  # max_background
            12,  # congestion_threshold
            fk.MAX_WRITE,
            1,  # time_gran
            fk.MAX_PAGES,
            0,
            0,
        )

    def op_lookup(self, node: int, body: memoryview) -> bytes:
        return self.entry(self.model.lookup(node, fk.names(body, 1)[0]))

    def op_forget(self, node: int, body: memoryview) -> None:
        self.model.forget(node, fk.FORGET_IN.unpack_from(body)[0])

    def op_batch_forget(self, _node: int, body: memoryview) -> None:
        count, _ = fk.BATCH_FORGET_IN.unpack_from(body)
        for i in range(count):
            ino, n = fk.FORGET_ONE.unpack_from(body, fk.BATCH_FORGET_IN.size + 16 * i)
            self.model.forget(ino, n)

    def op_getattr(self, node: int, _body: memoryview) -> bytes:
        return fk.attr_out(self.attr(self.model.get(node)), TTL_S)

    def op_setattr(self, nodeid: int, body: memoryview) -> bytes:
        valid, _, _fh, size, _lo, _at, mtime, _ct, _atn, mtimen, _ctn, mode, *_ = (
            fk.SETATTR_IN.unpack_from(body)
        )
        node = self.model.get(nodeid)
        if valid & fk.FATTR_SIZE:
            self.model.truncate(nodeid, size)  # ftruncate is data: durable after fsync
        if valid & fk.FATTR_MODE:
            node.mode = mode & 0o7777
        if valid & fk.FATTR_MTIME_NOW:
            node.mtime_ns = time.time_ns()
        elif valid & fk.FATTR_MTIME:
            node.mtime_ns = mtime * 1_000_000_000 + mtimen
        return fk.attr_out(self.attr(node), TTL_S)

    def op_mknod(self, node: int, body: memoryview) -> bytes:
        mode, _rdev, _umask, _ = fk.MKNOD_IN.unpack_from(body)
        if (mode & 0o170000) != 0o100000:
            raise FsError(errno.EPERM, "only regular files")
        (name,) = fk.names(body[fk.MKNOD_IN.size :], 1)
        return self.entry(self.model.create(node, name, mode))

    def op_mkdir(self, node: int, body: memoryview) -> bytes:
        mode, _umask = fk.MKDIR_IN.unpack_from(body)
        (name,) = fk.names(body[fk.MKDIR_IN.size :], 1)
        return self.entry(self.model.mkdir(node, name, mode))

    def op_create(self, node: int, body: memoryview) -> bytes:
        flags, mode, _umask, _ = fk.CREATE_IN.unpack_from(body)
        (name,) = fk.names(body[fk.CREATE_IN.size :], 1)
        created = self.model.create(node, name, mode)
        return self.entry(created) + self.open_handle(created, flags)

    def op_unlink(self, node: int, body: memoryview) -> bytes:
        self.model.unlink(node, fk.names(body, 1)[0])
        return b""

    def op_rmdir(self, node: int, body: memoryview) -> bytes:
        self.model.rmdir(node, fk.names(body, 1)[0])
        return b""

    def op_rename(self, node: int, body: memoryview) -> bytes:
        (newdir,) = fk.RENAME_IN.unpack_from(body)
        old, new = fk.names(body[fk.RENAME_IN.size :], 2)
        self.model.rename(node, old, newdir, new, 0)
        return b""

    def op_rename2(self, node: int, body: memoryview) -> bytes:
        newdir, flags, _ = fk.RENAME2_IN.unpack_from(body)
        old, new = fk.names(body[fk.RENAME2_IN.size :], 2)
        self.model.rename(node, old, newdir, new, flags)
        return b""

    def op_link(self, node: int, body: memoryview) -> bytes:
        (old,) = fk.LINK_IN.unpack_from(body)
        (name,) = fk.names(body[fk.LINK_IN.size :], 1)
        return self.entry(self.model.link(old, node, name))

    def op_open(self, node: int, body: memoryview) -> bytes:
        flags, _ = fk.OPEN_IN.unpack_from(body)
        return self.open_handle(self.model.get(node), flags)

    def op_read(self, node: int, body: memoryview) -> bytes:
        _fh, offset, size, _read_flags, _owner, flags, _ = fk.READ_IN.unpack_from(body)
        # ``flags`` are the file's flags now: fcntl(F_SETFL) can set or clear O_DIRECT
        # after the open (the kernel then sends its reads here either way)
        if flags & os.O_DIRECT:
            return self.model.read_device(node, offset, size)
        return self.model.read(node, offset, size)

    def op_write(self, node: int, body: memoryview) -> bytes:
        _fh, offset, size, *_ = fk.WRITE_IN.unpack_from(body)
        data = body[fk.WRITE_IN.size : fk.WRITE_IN.size + size]
        return fk.WRITE_OUT.pack(self.model.write(node, offset, data), 0)

    def op_release(self, _node: int, body: memoryview) -> bytes:
        fh = fk.RELEASE_IN.unpack_from(body)[0]
        self.dir_listings.pop(fh, None)
        ino = self.handles.pop(fh, None)
        if ino is not None and ino in self.model.inodes:
            released = self.model.inodes[ino]
            released.opens = max(0, released.opens - 1)
            self.model.maybe_release(released)
        return b""

    def op_flush(self, _node: int, _body: memoryview) -> bytes:
        return b""  # close() makes nothing durable

    def op_fsync(self, node: int, _body: memoryview) -> bytes:
        self.model.fsync(node)  # fsync, fdatasync and a directory's fsync alike
        return b""

    def op_opendir(self, nodeid: int, _body: memoryview) -> bytes:
        node = self.model.dir(nodeid)
        fh = self.next_fh
        self.next_fh += 1
        parent = node.parent or ROOT_ID
        self.dir_listings[fh] = [(".", node.id), ("..", parent), *node.entries.items()]
        return fk.OPEN_OUT.pack(fh, 0, 0)

    def op_readdir(self, _node: int, body: memoryview) -> bytes:
        fh, offset, size, *_ = fk.READ_IN.unpack_from(body)
        listing = self.dir_listings.get(fh, [])
        out = bytearray()
        for i in range(offset, len(listing)):
            name, ino = listing[i]
            child = self.model.inodes.get(ino)
            dtype = fk.DT_DIR if child is None or child.is_dir else fk.DT_REG
            ent = fk.dirent(ino, i + 1, name.encode("utf-8", "surrogateescape"), dtype)
            if len(out) + len(ent) > size:
                break
            out += ent
        return bytes(out)

    def op_statfs(self, _node: int, _body: memoryview) -> bytes:
        m = self.model
        used_blocks = (m.used + 4095) // 4096
        if m.space_limit is None:
            total = max(1 << 26, used_blocks * 2)  # 256 GiB, or room to spare
        else:
            total = max(used_blocks, (m.space_limit + 4095) // 4096)
        free = total - used_blocks
        return fk.KSTATFS.pack(total, free, free, 1 << 20, 1 << 20, 4096, 255, 4096)

    def op_fallocate(self, node: int, body: memoryview) -> bytes:
        _fh, offset, length, mode, _ = fk.FALLOCATE_IN.unpack_from(body)
        if mode & ~fk.FALLOC_FL_KEEP_SIZE:
            raise FsError(errno.EOPNOTSUPP)
        self.model.allocate(node, offset, length, bool(mode & fk.FALLOC_FL_KEEP_SIZE))
        return b""

    def op_interrupt(self, _node: int, _body: memoryview) -> None:
        return None  # every request is answered at once anyway

    def op_destroy(self, _node: int, _body: memoryview) -> bytes:
        return b""

    def op_unsupported(self, _node: int, _body: memoryview) -> bytes:
        # xattrs, locks (the kernel keeps flock and fcntl locks locally), ioctl, poll,
        # lseek (SEEK_DATA/HOLE fall back), symlinks: ENOSYS, which the kernel remembers
        raise FsError(errno.ENOSYS)

    HANDLERS: ClassVar[dict[int, str]] = {
        fk.INIT: "op_init",
        fk.LOOKUP: "op_lookup",
        fk.FORGET: "op_forget",
        fk.BATCH_FORGET: "op_batch_forget",
        fk.GETATTR: "op_getattr",
        fk.SETATTR: "op_setattr",
        fk.MKNOD: "op_mknod",
        fk.MKDIR: "op_mkdir",
        fk.CREATE: "op_create",
        fk.UNLINK: "op_unlink",
        fk.RMDIR: "op_rmdir",
        fk.RENAME: "op_rename",
        fk.RENAME2: "op_rename2",
        fk.LINK: "op_link",
        fk.OPEN: "op_open",
        fk.OPENDIR: "op_opendir",
        fk.READ: "op_read",
        fk.READDIR: "op_readdir",
        fk.WRITE: "op_write",
        fk.RELEASE: "op_release",
        fk.RELEASEDIR: "op_release",
        fk.FLUSH: "op_flush",
        fk.FSYNC: "op_fsync",
        fk.FSYNCDIR: "op_fsync",
        fk.STATFS: "op_statfs",
        fk.FALLOCATE: "op_fallocate",
        fk.INTERRUPT: "op_interrupt",
        fk.DESTROY: "op_destroy",
    }

    # ------------------------------------------------------------------ control
    def accept_command(self) -> None:
        conn, _ = self.control.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            try:
                answer = self.command(json.loads(data))
            except Exception as exc:
                log.error("event=command_failed\n%s", traceback.format_exc())
                answer = {"ok": False, "error": repr(exc)}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def command(self, cmd: dict[str, object]) -> dict[str, object]:
        m = self.model
        op = cmd.get("op")
        if op == "ping":
            return {"ok": True, "mounted": self.fd >= 0}
        if op == "power_cut":
            started = time.perf_counter()
            self.unmount()
            report = m.power_cut()
            self.mount()
            log.info(
                "event=power_cut lost_files=%d lost_names=%d seconds=%.3f",
                len(report.lost_bytes),
                len(report.lost_names),
                time.perf_counter() - started,
            )
            return {"ok": True, "report": report.as_dict()}
        if op == "fail_fsync":
            glob, count = cmd["glob"], cmd.get("count", 1)
            assert isinstance(glob, str) and isinstance(count, int)
            m.fail_fsync(glob, count)
            return {"ok": True}
        if op == "set_free_bytes":
            free = cmd.get("bytes")
            assert free is None or isinstance(free, int)
            m.set_free_bytes(free)
            return {"ok": True, "used": m.used}
        if op == "sync_all":
            m.sync_all()
            return {"ok": True}
        if op == "stats":
            return {
                "ok": True,
                **m.stats,
                "used_bytes": m.used,
                "space_limit": m.space_limit,
                "dirty_bytes": m.dirty_bytes(),
                "failed_fsync_bytes": m.failed_fsync_bytes(),
                "inodes": len(m.inodes),
                "pending_fsync_faults": [list(f) for f in m.fsync_faults],
                "ops": self.ops,
                "op_seconds": {k: round(v, 6) for k, v in self.op_seconds.items()},
                "uptime_s": round(time.monotonic() - self.started, 3),
            }
        if op == "exit":
            self.running = False
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.unmount()
        self.control.close()
        self.model.close()


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def main(argv: list[str]) -> int:
    mountpoint, store, control_path = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _die_with_parent()
    server = Server(os.path.realpath(mountpoint), Path(store), control_path)

    def on_term(_sig: int, _frame: object) -> None:
        server.running = False

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        try:
            server.mount()
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES, errno.ENODEV, errno.ENOENT):
                log.error("event=mount_refused error=%r", exc)
                return EXIT_NO_FUSE
            raise
        log.info("event=mounted mountpoint=%s store=%s pid=%d", mountpoint, store, os.getpid())
        server.serve()
    finally:
        server.close()
        log.info("event=exited")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
