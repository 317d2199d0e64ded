"""The servers of one benchmark run: the Herald node (required) and the peers (optional: a
peer that cannot start is recorded with the reason and its rows are skipped). Two Redis
servers run side by side: ``appendfsync everysec`` ("Redis") and ``appendfsync always``
("Redis-always", which fsyncs before it answers, as Herald's ``acks=all`` does)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.peers.herald_node import HeraldNode
from bench.peers.nats_server import NatsServer
from bench.peers.process import PeerUnavailable, say
from bench.peers.redis_server import RedisServer


class Servers:
    """The node and the peers; a peer that cannot start is recorded, not fatal."""

    def __init__(self, base: Path) -> None:
        self.herald = HeraldNode(base)
        self.redis: RedisServer | None = RedisServer(base)
        self.redis_always: RedisServer | None = RedisServer(base, "always")
        self.nats: NatsServer | None = NatsServer(base)
        self.unavailable: dict[str, str] = {}

    @contextlib.contextmanager
    def running(self) -> Iterator[Servers]:
        try:
            say("starting the Herald node")
            self.herald.start()
            for attr in ("redis", "redis_always", "nats"):
                peer = getattr(self, attr)
                assert peer is not None
                say(f"starting {peer.name}")
                try:
                    peer.start()
                except PeerUnavailable as exc:
                    say(f"{peer.name} unavailable, its rows are skipped: {exc}")
                    self.unavailable[peer.name] = str(exc).splitlines()[0]
                    setattr(self, attr, None)
            yield self
        finally:
            for server in (self.nats, self.redis_always, self.redis, self.herald):
                if server is not None:
                    say(f"stopping {server.name}")
                    server.stop()

    def target(self, system: str) -> tuple[Any, int] | None:
        """(address, pid) of a system, None if it is unavailable."""
        if system == "herald":
            return self.herald.tcp_port, self.herald.pid
        if system in ("redis", "redis-benchmark"):
            return (self.redis.port, self.redis.pid) if self.redis else None
        if system == "redis-always":
            r = self.redis_always
            return (r.port, r.pid) if r else None
        return (self.nats.url, self.nats.pid) if self.nats else None
