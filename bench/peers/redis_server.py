"""A Redis server for the benchmark: Redis Streams with the AOF on. Two are started, one per
``appendfsync`` setting:

- ``everysec`` (Redis's recommended durable setting): the AOF is written on every command
  and fsynced once a second by a background thread, so an OS crash can lose up to ~1 s of
  acknowledged writes. Shown as "Redis".
- ``always``: the event loop writes the AOF and fsyncs it before it answers the commands of
  that loop turn (commands arriving in one turn share the fsync). The like-for-like peer of
  Herald's ``acks=all``, which answers after fdatasync. Shown as "Redis-always".

RDB snapshots are off so a background save cannot land inside a measurement."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

from bench.peers.process import HOST, PeerUnavailable, ServerProcess, find_binary, free_port


def version() -> str | None:
    """``redis-server --version``'s version number, or None if it is not installed."""
    exe = find_binary("redis-server")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"v=(\S+)", out)
    return m.group(1) if m else out.strip()


def _ping(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


def _config_get(port: int, key: str) -> str:
    """One ``CONFIG GET`` over a raw socket (no client library needed to check setup)."""
    with socket.create_connection((HOST, port), timeout=2) as s:
        s.sendall(f"CONFIG GET {key}\r\n".encode())
        data = b""
        while data.count(b"\r\n") < 5:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    parts = data.split(b"\r\n")
    return parts[4].decode() if len(parts) > 4 else "?"


class RedisServer:
    def __init__(self, base: Path, appendfsync: str = "everysec") -> None:
        self.appendfsync = appendfsync
        self.name = "Redis" if appendfsync == "everysec" else f"Redis-{appendfsync}"
        self.dir = base / ("redis" if appendfsync == "everysec" else f"redis-{appendfsync}")
        self.port = free_port()
        self.process: ServerProcess | None = None
        self.settings = ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        exe = find_binary("redis-server")
        if exe is None:
            raise PeerUnavailable("redis-server is not installed (run bash bench/peers/setup)")
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [
            exe,
            "--bind", HOST,
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "",
        ]  # fmt: skip
        self.process = ServerProcess("redis-server", argv, log_path=self.dir / "redis.log")
        self.process.start(lambda: _ping(self.port))
        aof, fsync = _config_get(self.port, "appendonly"), _config_get(self.port, "appendfsync")
        if aof != "yes" or fsync != self.appendfsync:
            self.stop()
            raise PeerUnavailable(f"redis-server runs with appendonly={aof} appendfsync={fsync}")
        self.settings = f"appendonly={aof}, appendfsync={fsync}, RDB snapshots off"

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
