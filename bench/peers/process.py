"""One server child process: free ports, start, wait until it serves, stop.

A server is started in its own session (so a Ctrl-C in the terminal reaches the runner only,
and the runner stops servers in order) with ``PR_SET_PDEATHSIG`` set, so a runner killed with
SIGKILL does not leave servers behind. :meth:`ServerProcess.stop` sends SIGTERM, waits, then
SIGKILLs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
# apt installs nats-server in /usr/sbin, which is not on a normal user's PATH
_EXTRA_PATH = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class PeerUnavailable(Exception):
    """A server could not be found or started; the message says why."""


def say(msg: str) -> None:
    """One progress line on stderr, timestamped (the benchmark's only output while running)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def find_binary(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_EXTRA_PATH)
    return shutil.which(name, path=path)


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the usual small race with other processes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ServerProcess:
    """``argv`` run with stdout and stderr to ``log_path``. Use as a context manager or call
    :meth:`start` and :meth:`stop`; stopping twice is harmless."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready: Callable[[], bool], timeout: float = 20.0) -> None:
        """Start and poll ``ready`` until it returns True. Raises :class:`PeerUnavailable`
        (after stopping the process) if it exits or is not ready within ``timeout``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.proc = None
                raise PeerUnavailable(
                    f"{self.name} exited with status {rc} while starting; "
                    f"its log ({self.log_path}) ends with:\n{tail(self.log_path)}"
                )
            with contextlib.suppress(OSError):
                if ready():
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise PeerUnavailable(
                    f"{self.name} did not become ready within {timeout:.0f} s; "
                    f"its log ({self.log_path}) ends with:\n{tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
