"""Start, command and stop the power-loss filesystem daemon (``lazyfs.py``) from a test.

    with PowerLossFS.start(tmp_path) as fs:
        ... run something on fs.mountpoint, kill it ...
        report = fs.power_cut()

No pytest in here: usable from a script or a REPL to reproduce a failure by hand. Also a
small CLI on a running daemon: ``python -m tests.system.powercut.control SOCKET stats``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import fuse_kernel

EXIT_NO_FUSE = 77  # lazyfs.py's exit code when the kernel refuses the mount
REPO = Path(__file__).resolve().parents[3]
START_TIMEOUT_S = 10.0


class FuseUnavailable(Exception):
    """This machine cannot mount a FUSE filesystem (no /dev/fuse, not root, no fuse
    module): the reason says which."""


def fuse_unavailable_reason() -> str | None:
    """None when a FUSE mount can work here, else why not. Creates ``/dev/fuse`` (char
    10:229) when the kernel has FUSE and we are root but the node is missing, as in a
    minimal container."""
    if not sys.platform.startswith("linux"):
        return f"FUSE power-loss tests need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "FUSE power-loss tests mount /dev/fuse themselves and need root"
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1] == "fuse" for line in f if line.strip()):
                return "the kernel has no fuse filesystem (modprobe fuse)"
    except OSError as exc:
        return f"cannot read /proc/filesystems: {exc}"
    if not os.path.exists("/dev/fuse"):
        try:
            os.mknod("/dev/fuse", stat.S_IFCHR | 0o666, os.makedev(10, 229))
        except OSError as exc:
            return f"no /dev/fuse and it cannot be created ({exc})"
    return None


class PowerLossFS:
    """A running daemon: ``mountpoint`` is the filesystem under test, ``store`` its backing
    files, ``log_path`` the daemon's log."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.mountpoint = base / "mnt"
        self.store = base / "store"
        self.control_path = str(base / "lazyfs.sock")
        self.log_path = base / "lazyfs.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cuts: list[dict[str, Any]] = []

    @classmethod
    def start(cls, base: Path) -> PowerLossFS:
        reason = fuse_unavailable_reason()
        if reason is not None:
            raise FuseUnavailable(reason)
        fs = cls(base)
        fs.mountpoint.mkdir(parents=True, exist_ok=True)
        fs.store.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        with open(fs.log_path, "ab") as log:
            fs.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.system.powercut.lazyfs",
                    str(fs.mountpoint),
                    str(fs.store),
                    fs.control_path,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            code = fs.proc.poll()
            if code is not None:
                fs.close()
                if code == EXIT_NO_FUSE:
                    raise FuseUnavailable(f"the kernel refused the FUSE mount:\n{fs.log_tail()}")
                raise RuntimeError(f"lazyfs exited with {code} at start:\n{fs.log_tail()}")
            with contextlib.suppress(OSError):
                if fs.call("ping").get("mounted") and fuse_kernel.is_mounted(str(fs.mountpoint)):
                    return fs
            if time.monotonic() > deadline:
                fs.close()
                raise RuntimeError(f"lazyfs not mounted after {START_TIMEOUT_S}s")
            time.sleep(0.02)

    def __enter__(self) -> PowerLossFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ commands
    def call(self, op: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.control_path)
            s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        answer: dict[str, Any] = json.loads(data)
        if not answer.get("ok"):
            raise RuntimeError(f"lazyfs {op}: {answer.get('error')}\n{self.log_tail()}")
        return answer

    def power_cut(self) -> dict[str, Any]:
        """Drop everything not durable and remount. Every process using the mount must be
        dead first (SIGKILL it and wait): the power went out for them too. Returns what was
        lost (``lost_bytes`` by path, ``lost_names``, ``restored_names``)."""
        report: dict[str, Any] = self.call("power_cut")["report"]
        self.cuts.append(report)
        return report

    def fail_next_fsync(self, glob: str, count: int = 1) -> None:
        """The next ``count`` fsync/fdatasync calls on a path matching ``glob`` (relative to
        the mount, ``*`` matches across ``/``) fail with EIO, and what they covered never
        reaches the disk."""
        self.call("fail_fsync", glob=glob, count=count)

    def set_free_bytes(self, n: int) -> None:
        """From now on the disk holds ``n`` more bytes of file data; writes past that get
        ENOSPC (a short write first when part fits)."""
        self.call("set_free_bytes", bytes=n)

    def unlimited(self) -> None:
        """Lift the space limit (as if files were removed elsewhere on the disk)."""
        self.call("set_free_bytes", bytes=None)

    def sync_all(self) -> None:
        """Make everything durable now (``sync`` plus a quiet while on a real disk)."""
        self.call("sync_all")

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    # ------------------------------------------------------------------ teardown
    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        """Stop the daemon and make sure nothing stays mounted, whatever state it is in."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.call("exit", timeout=5)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # the daemon unmounts on its way out; if it died instead, detach here
        with contextlib.suppress(OSError):
            fuse_kernel.umount(str(self.mountpoint))


def main(argv: list[str]) -> int:
    """``python -m tests.system.powercut.control SOCKET OP [JSON-ARGS]``"""
    sock, op, *rest = argv
    fs = PowerLossFS(Path(sock).parent)
    fs.control_path = sock
    args = json.loads(rest[0]) if rest else {}
    print(json.dumps(fs.call(op, **args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
