"""A real ``herald serve`` process for tests: free loopback ports, a data directory, and the
signals a test needs to stop it (SIGTERM drain, SIGKILL crash) and start it again on the
same data directory.

Imported by ``tests/integration/conftest.py`` and by the system tests; no pytest in here so
both can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0


def _port_slice() -> range:
    """The ports this test process hands out: below the kernel's ephemeral range (32768 up,
    where outgoing connections and port-0 binds come from) and a slice of its own per
    pytest-xdist worker. A port is chosen, then bound by a node moments later: chosen by the
    kernel, the same free port could go to two test processes in that gap (seen: one node's
    health check answered by the other's TCP listener)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    index = int(worker) if worker.isdigit() else 0
    size = (_PORTS_TO - _PORTS_FROM) // count
    return range(_PORTS_FROM + index * size, _PORTS_FROM + (index + 1) * size)


_PORTS_FROM, _PORTS_TO = 15000, 32000
_SLICE = _port_slice()
# one turn per process: this module is imported under up to three names (integration.,
# tests.integration., and herald_process from tests/system), each its own copy
_turn: Any = sys.modules.setdefault("_herald_test_ports", types.ModuleType("_herald_test_ports"))
if not hasattr(_turn, "next"):
    _turn.next = random.randrange(len(_SLICE))  # a rerun does not start on the last ports


def free_port() -> int:
    """A port nothing listens on right now, from this test process's own slice, in turn (a
    port handed out is not handed out again before the whole slice has been)."""
    for _ in range(len(_SLICE)):
        port: int = _SLICE[_turn.next % len(_SLICE)]
        _turn.next += 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_SLICE}")


def herald_command() -> list[str]:
    """The ``herald`` console script of this interpreter's environment, as users run it."""
    script = Path(sys.executable).with_name("herald")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "herald.cli"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


class HeraldProcess:
    """One node. Ports are chosen once and kept across restarts, so clients reconnect to the
    same address. The server's output goes to ``log_path`` (never a pipe, which could fill up
    and stall the server)."""

    def __init__(
        self,
        data_dir: Path,
        work_dir: Path,
        *,
        config: str | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.host = HOST
        # a node serving TLS: its health is checked over HTTPS, trusting this CA
        self.ca_file = ca_file
        self.data_dir = data_dir
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.tcp_port = free_port()
        self.http_port = free_port()
        self.ws_port = free_port()
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = work_dir / "herald.toml"
            self.config_path.write_text(config)
        self.log_path = work_dir / "herald.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # ------------------------------------------------------------------ addresses
    @property
    def http_url(self) -> str:
        scheme = "https" if self.ca_file is not None else "http"
        return f"{scheme}://{self.host}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        cmd = [
            *herald_command(),
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--host",
            self.host,
            "--tcp-port",
            str(self.tcp_port),
            "--http-port",
            str(self.http_port),
            "--ws-port",
            str(self.ws_port),
        ]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------- lifecycle
    def spawn(self) -> subprocess.Popen[bytes]:
        """Start a ``herald serve`` on this node's data directory and ports without waiting
        for it (a second one on a running node's directory must fail on its own)."""
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env(),
                cwd=self.work_dir,
            )
        self.starts += 1
        return proc

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        assert not self.running, "node already running"
        self.proc = self.spawn()
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"herald serve exited with {code} at start:\n{self.log_tail()}")
            if self.healthy():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"herald serve not healthy after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def healthy(self) -> bool:
        context = (
            ssl.create_default_context(cafile=str(self.ca_file))
            if self.ca_file is not None
            else None
        )
        try:
            with urllib.request.urlopen(
                f"{self.http_url}/healthz", timeout=2, context=context
            ) as resp:
                body: dict[str, object] = json.loads(resp.read())
                return resp.status == 200 and body.get("status") == "ok"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
            return False

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful drain) and wait for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> int:
        """SIGKILL (a crash) and wait for the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

    def restart(self, *, crash: bool = False) -> None:
        """Stop (SIGKILL if ``crash`` else SIGTERM) and start again on the same data
        directory and ports."""
        if self.running:
            if crash:
                self.kill()
            else:
                code = self.stop()
                assert code == 0, f"herald serve exited with {code}:\n{self.log_tail()}"
        self.start()

    def close(self) -> None:
        """Teardown: never leave a server behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class Nodes:
    """Starts nodes under one base directory and kills every one of them on close."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.nodes: list[HeraldProcess] = []

    def __call__(
        self, *, config: str | None = None, start: bool = True, ca_file: Path | None = None
    ) -> HeraldProcess:
        n = len(self.nodes)
        node = HeraldProcess(
            self.base / f"node{n}" / "data", self.base / f"node{n}", config=config, ca_file=ca_file
        )
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def close(self) -> None:
        for node in self.nodes:
            node.close()
