"""Durable replacement of small files (checkpoints, the quarantine list, topic metadata).

A new version is written to ``<name>.tmp``, fdatasynced and closed, renamed over ``<name>``,
and the directory fsynced: a crash leaves the old file or the new one, never a torn one, and
never loses the file itself (the rename is durable only once its directory is synced).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """fsync a directory, making the creation, rename or removal of its entries durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(directory: Path, name: str, data: bytes) -> None:
    """Atomically and durably replace ``directory/name`` with ``data``. Blocking (two
    fsyncs): run it off the event loop. Raises ``OSError`` (e.g. ENOSPC); the old file, if
    any, is then still in place and the temporary file removed."""
    tmp = directory / (name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:  # a short write on a nearly full disk is finished, or raises
            view = view[os.write(fd, view) :]
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):  # give its blocks back (a full disk)
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, directory / name)
    fsync_dir(directory)
