"""Two tenants on one real node, for the quota and per-tenant-limit tests: ``acme`` (the one
that abuses its key) and ``beta`` (a well-behaved client that must keep being served), plus
the operator. :class:`Bystander` is beta: while a test floods the node as acme, it measures
how long the node takes to answer a cheap request (the event loop's stall as a client sees
it) and keeps producing, fetching and committing; it fails the test if beta is ever refused
or left unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from broker import protocol as p
from broker.client import BrokerError, Client, Producer

from .herald_process import HeraldProcess

ACME = "acme-key-0000000000000001"
BETA = "beta-key-0000000000000001"
OPERATOR = "operator-key-00000000001"

KEYS = f"""
[[auth.keys]]
key = "{ACME}"
tenant = "acme"
scopes = ["produce", "consume", "admin"]

[[auth.keys]]
key = "{BETA}"
tenant = "beta"
scopes = ["produce", "consume", "admin"]

[[auth.keys]]
key = "{OPERATOR}"
tenant = "*"
scopes = ["produce", "consume", "admin", "metrics"]
"""


def config(extra: str = "") -> str:
    """A node config with the three keys; ``extra`` is more TOML (sections after them)."""
    return extra + "\n" + KEYS


async def connect(node: HeraldProcess, key: str, **kw: Any) -> Client:
    return await Client.connect(node.host, node.tcp_port, api_key=key, **kw)


def metrics(node: HeraldProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``/metrics`` (as the operator: the metrics scope): (name, labels) ->
    value."""
    req = urllib.request.Request(
        f"{node.http_url}/metrics", headers={"Authorization": f"Bearer {OPERATOR}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def quota_usage(node: HeraldProcess, tenant: str, quota: str) -> float:
    key = ("herald_quota_usage", frozenset({("tenant", tenant), ("quota", quota)}))
    return metrics(node).get(key, 0.0)


def http_json(
    node: HeraldProcess, method: str, path: str, body: Any = None, *, key: str
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{node.http_url}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def open_fds(node: HeraldProcess) -> int:
    assert node.proc is not None
    return len(os.listdir(f"/proc/{node.proc.pid}/fd"))


def fd_targets(node: HeraldProcess) -> list[str]:
    """What the node's open descriptors point at (paths, ``socket:[...]``...)."""
    assert node.proc is not None
    out = []
    for fd in os.listdir(f"/proc/{node.proc.pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            out.append(os.readlink(f"/proc/{node.proc.pid}/fd/{fd}"))
    return out


def rss_bytes(node: HeraldProcess) -> int:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def topic_dirs(node: HeraldProcess) -> list[str]:
    return sorted(os.listdir(node.data_dir / "log"))


class Bystander:
    """Beta, served by the same node while acme misbehaves. Use as ``async with``; then
    :attr:`worst_ms` is the longest it waited for the answer to a cheap request (a probe
    every ``every_s``), :attr:`rounds` how many produce-fetch-commit rounds succeeded,
    and :meth:`check` asserts it was never refused and the node never stalled past
    ``max_stall_ms``."""

    def __init__(self, node: HeraldProcess, *, every_s: float = 0.005) -> None:
        self.node = node
        self.every_s = every_s
        self.worst_ms = 0.0
        self.waits: list[float] = []
        self.probes = 0
        self.rounds = 0
        self.failures: list[BaseException] = []
        self._client: Client | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def __aenter__(self) -> Bystander:
        client = self._client = await connect(self.node, BETA, client_id="beta-bystander")
        await client.create_topic("beta-orders", 1, exist_ok=True)
        self._tasks = [
            asyncio.create_task(self._probe()),
            asyncio.create_task(self._work()),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        deadline = time.monotonic() + 10
        while (not self.rounds or self.probes < 2) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # at least one whole round during the test
        self._stop.set()
        await asyncio.gather(*self._tasks)
        assert self._client is not None
        await self._client.close()

    async def _probe(self) -> None:
        assert self._client is not None
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                await asyncio.wait_for(self._client.list_offsets("beta-orders", 0), 30)
            except (BrokerError, TimeoutError, OSError) as exc:
                self.failures.append(exc)
            waited = (time.perf_counter() - started) * 1000
            self.waits.append(waited)
            self.worst_ms = max(self.worst_ms, waited)
            self.probes += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every_s)

    async def _work(self) -> None:
        assert self._client is not None
        producer = await self._client.producer(linger_ms=0)  # one, as a good client keeps
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self.round(self._client, producer), 30)
                self.rounds += 1
            except (BrokerError, TimeoutError, OSError, AssertionError) as exc:
                self.failures.append(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.05)

    @staticmethod
    async def round(client: Client, producer: Producer | None = None) -> None:
        """One well-behaved round: produce a record, read it back, commit past it."""
        producer = producer or await client.producer(linger_ms=0)
        meta = await producer.send("beta-orders", b"hello", partition=0)
        (res,) = await client.fetch([("beta-orders", 0, meta.offset)])
        assert res.error is None and res.records, res
        await client.request(
            p.CommitOffsets(id=0, group="beta-g", offsets=[("beta-orders", 0, meta.offset + 1)])
        )

    async def served_after(self) -> None:
        """Beta is still served once the abuse is over: a fresh connection, a full round."""
        async with await connect(self.node, BETA) as client:
            await self.round(client)

    def check(self, max_stall_ms: float) -> None:
        print(
            f"\nbeta: worst wait {self.worst_ms:.1f} ms over {self.probes} probes, "
            f"{self.rounds} produce-fetch-commit rounds; slowest "
            f"{[round(w) for w in sorted(self.waits)[-5:]]} ms"
        )
        assert not self.failures, f"beta was refused or unanswered: {self.failures[:3]}"
        assert self.rounds > 0, "beta completed no round"
        assert self.worst_ms < max_stall_ms, (
            f"beta waited {self.worst_ms:.0f} ms for an answer (bound {max_stall_ms} ms)"
        )
