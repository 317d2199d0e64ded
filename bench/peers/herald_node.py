"""The Herald node under test: ``python -m herald.cli serve`` with the embedded default
config, a fresh data directory and free ports on 127.0.0.1 (no API keys, so the node serves
loopback only and every connection is the operator)."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.peers.process import HOST, ServerProcess, free_port, port_open

REPO = Path(__file__).resolve().parents[2]


class HeraldNode:
    name = "Herald"

    def __init__(self, base: Path) -> None:
        self.dir = base / "herald"
        self.data_dir = self.dir / "data"
        self.tcp_port = free_port()
        self.http_port = free_port()
        self.ws_port = free_port()
        self.process: ServerProcess | None = None
        self.settings = "default config: acks=all waits for fdatasync; 1 node"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "herald.cli", "serve",
            "--data-dir", str(self.data_dir),
            "--host", HOST,
            "--tcp-port", str(self.tcp_port),
            "--http-port", str(self.http_port),
            "--ws-port", str(self.ws_port),
        ]  # fmt: skip
        self.process = ServerProcess(
            "herald serve", argv, log_path=self.dir / "herald.log", cwd=REPO
        )
        self.process.start(lambda: port_open(self.tcp_port) and port_open(self.http_port))

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
