"""A NATS server for the benchmark with JetStream on and file storage in its own directory.

Durability as configured here, stated because it differs from the others: nats-server 2.9
acknowledges a JetStream publish once the message is written to the OS, and fsyncs the file
store on a timer (NATS documents a two-minute default ``sync_interval``; 2.9 has no such
option, it refuses the key). An OS crash can lose acknowledged messages; a killed server
process cannot."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

from bench.peers.process import HOST, PeerUnavailable, ServerProcess, find_binary, free_port


def version() -> str | None:
    exe = find_binary("nats-server")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    text = (out.stdout or out.stderr).strip()
    m = re.search(r"v(\d+\.\d+\.\d+\S*)", text)
    return m.group(1) if m else text


def _info(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1) as s:
        line = s.recv(4096)
    return line.startswith(b"INFO ") and b'"jetstream":true' in line


class NatsServer:
    name = "NATS"

    def __init__(self, base: Path) -> None:
        self.dir = base / "nats"
        self.port = free_port()
        self.process: ServerProcess | None = None
        self.settings = "JetStream, file storage, 1 replica, no sync_interval option in 2.9"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def start(self) -> None:
        exe = find_binary("nats-server")
        if exe is None:
            raise PeerUnavailable("nats-server is not installed (run bash bench/peers/setup)")
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [
            exe,
            "-js",
            "-sd", str(self.dir / "jetstream"),
            "-a", HOST,
            "-p", str(self.port),
            "-n", "herald-bench",
            "-l", str(self.dir / "nats.log"),
        ]  # fmt: skip
        self.process = ServerProcess("nats-server", argv, log_path=self.dir / "stdout.log")
        self.process.start(lambda: _info(self.port))

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
