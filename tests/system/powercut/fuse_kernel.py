"""The Linux FUSE kernel protocol, as much of it as the power-loss filesystem serves, and the
mount/umount calls, with nothing but the standard library.

Why not a binding: mfusepy/fusepy need Debian's libfuse (and ``fusermount`` unless root),
pyfuse3 needs libfuse3-dev and a compiler to build; all of them put libfuse's path-based or
threaded model between the kernel and a model that is about inodes. As root, a daemon can
open ``/dev/fuse``, ``mount(2)`` it itself and speak the protocol: fixed little structs
defined in ``<linux/fuse.h>`` (protocol 7.31 here, which every kernel since 5.4 speaks).

Requests are read whole from ``/dev/fuse`` (one ``read`` = one request) and answered with one
``write`` of an out-header and the reply.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

# -- opcodes ---------------------------------------------------------------------------------
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
READLINK, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK = 5, 6, 8, 9, 10, 11, 12, 13
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW = 27, 28, 29, 30, 31, 32, 33
ACCESS, CREATE, INTERRUPT, BMAP, DESTROY, IOCTL, POLL = 34, 35, 36, 37, 38, 39, 40
BATCH_FORGET, FALLOCATE, READDIRPLUS, RENAME2, LSEEK = 42, 43, 44, 45, 46

OPNAMES = {v: k for k, v in dict(globals()).items() if k.isupper() and isinstance(v, int)}

ROOT_ID = 1
KERNEL_VERSION = (7, 31)

# -- init flags we ask for -------------------------------------------------------------------
FUSE_BIG_WRITES = 1 << 5
FUSE_MAX_PAGES = 1 << 22
MAX_PAGES = 256  # writes of up to 1 MiB per request
MAX_WRITE = MAX_PAGES * 4096
READ_BUFFER = MAX_WRITE + 64 * 1024  # a request: header, write_in and up to MAX_WRITE bytes

# open_out.open_flags (<linux/fuse.h>)
FOPEN_DIRECT_IO = 1 << 0  # this open bypasses the kernel's page cache: every read and write
# on it reaches us as a request, at the caller's offset and length (no alignment needed)
FOPEN_KEEP_CACHE = 1 << 1  # the kernel keeps its page cache across opens: we are the only
# writer, so it stays right, and LMDB's mmap reads mostly never reach us

# setattr valid bits
FATTR_MODE, FATTR_SIZE, FATTR_MTIME, FATTR_MTIME_NOW = 1 << 0, 1 << 3, 1 << 5, 1 << 8

# -- structs ---------------------------------------------------------------------------------
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 unused[7]
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")  # flags (the open(2) flags, O_DIRECT among them) open_flags
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
OPEN_OUT = struct.Struct("<QII")
RELEASE_IN = struct.Struct("<QIIQ")
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")
WRITE_OUT = struct.Struct("<II")
FSYNC_IN = struct.Struct("<QII")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
FALLOCATE_IN = struct.Struct("<QQQII")
KSTATFS = struct.Struct("<QQQQQIII28x")  # blocks bfree bavail files ffree bsize namelen frsize
DIRENT_HEAD = struct.Struct("<QQII")  # ino off namelen type

DT_DIR, DT_REG = 4, 8
FALLOC_FL_KEEP_SIZE = 1


def entry_out(nodeid: int, attr: bytes, valid_s: int) -> bytes:
    return ENTRY_OUT_HEAD.pack(nodeid, 0, valid_s, valid_s, 0, 0) + attr


def attr_out(attr: bytes, valid_s: int) -> bytes:
    return ATTR_OUT_HEAD.pack(valid_s, 0, 0) + attr


def pack_attr(ino: int, size: int, mode: int, nlink: int, mtime_ns: int) -> bytes:
    sec, nsec = divmod(mtime_ns, 1_000_000_000)
    blocks = (size + 511) // 512
    return ATTR.pack(ino, size, blocks, sec, sec, sec, nsec, nsec, nsec, mode, nlink, 0, 0, 0,
                     4096, 0)  # fmt: skip


def dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    entry = DIRENT_HEAD.pack(ino, off, len(name), dtype) + name
    return entry + b"\0" * (-len(entry) % 8)


def names(body: memoryview, count: int) -> list[str]:
    """``count`` NUL-terminated names at the start of ``body``."""
    parts = bytes(body).split(b"\0")
    return [p.decode("utf-8", "surrogateescape") for p in parts[:count]]


# -- mount -----------------------------------------------------------------------------------
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(mountpoint: str, *, subtype: str = "lazyfs") -> int:
    """Open ``/dev/fuse`` and mount it on ``mountpoint``; returns the device fd to serve.
    Needs root (CAP_SYS_ADMIN). Raises OSError with the kernel's reason."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
    rc = _libc.mount(
        subtype.encode(),
        mountpoint.encode(),
        f"fuse.{subtype}".encode(),
        MS_NOSUID | MS_NODEV,
        opts.encode(),
    )
    if rc != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mount {mountpoint}: {os.strerror(err)}")
    return fd


def umount(mountpoint: str) -> None:
    """Lazy unmount (``umount -l``): detach now; the kernel drops its caches of the mount
    once nothing uses it. Not mounted is not an error."""
    if _libc.umount2(mountpoint.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT
            raise OSError(err, f"umount {mountpoint}: {os.strerror(err)}")


def is_mounted(mountpoint: str) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[1].replace("\\040", " ") == target:
                return True
    return False
