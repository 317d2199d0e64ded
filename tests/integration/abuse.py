"""What the admission tests need besides a node: measurements of the node process (resident
memory, open file descriptors, CPU time), a well-behaved client of another tenant that keeps
using the node while a test attacks it (its round-trip times are the loop-stall probe), and
sockets from chosen loopback source addresses (127.0.0.2, ...: Linux routes all of 127/8 to
loopback, so per-address limits can be exercised from one machine).

No pytest in here: ``test_admission.py`` (short floods, default suite) and ``test_abuse.py``
(full-size floods, ``-m slow``) share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import protocol as p
from broker.client import Client

from .herald_process import HOST, HeraldProcess, Nodes
from .raw_http import RawHttp
from .raw_wire import RawConnection

# keys of the tenants the tests play
VICTIM_KEY = "victim-key-0000000001"
MALLORY_KEY = "mallory-key-000000001"
OPERATOR_KEY = "operator-metrics-key-1"
MALLORY_PRODUCER_KEY = "mallory-producer-key1"

KEYS = f"""
[[auth.keys]]
key = "{VICTIM_KEY}"
tenant = "victim"
scopes = ["produce", "consume", "admin"]

[[auth.keys]]
key = "{MALLORY_KEY}"
tenant = "mallory"
scopes = ["produce", "consume", "admin"]

[[auth.keys]]
key = "{MALLORY_PRODUCER_KEY}"
tenant = "mallory"
scopes = ["produce"]

[[auth.keys]]
key = "{OPERATOR_KEY}"
tenant = "*"
scopes = ["metrics"]
"""


def config(*, keys: bool = True, **sections: dict[str, object]) -> str:
    """A node config: the tenants' keys (unless ``keys=False``) and the given sections,
    e.g. ``admission={"header-timeout-ms": 1000}``."""
    out = [KEYS] if keys else []
    for section, values in sections.items():
        out.append(f"[{section}]")
        for k, v in values.items():
            out.append(f"{k} = {json.dumps(v)}")
    return "\n".join(out) + "\n"


def source(i: int) -> str:
    """The ``i``-th spare loopback address (127.0.1.0 + i): the well-behaved clients use
    127.0.0.1, attackers these."""
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


# ------------------------------------------------------------------ the node process
class Meter:
    """Reads a process's resident memory, open descriptors and CPU time from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._tick = os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / self._tick


def meter(node: HeraldProcess) -> Meter:
    assert node.proc is not None
    return Meter(node.proc.pid)


# ------------------------------------------------------------------- the victim
@dataclass
class Round:
    at: float
    seconds: float
    error: str | None = None
    steps: tuple[float, ...] = ()  # produce, fetch, http: where a slow round spent its time


@dataclass
class VictimReport:
    rounds: list[Round] = field(default_factory=list)

    def between(self, start: float, end: float) -> list[Round]:
        return [r for r in self.rounds if start <= r.at <= end]

    def errors(self) -> list[str]:
        return [r.error for r in self.rounds if r.error]

    def worst(self, start: float = 0.0, end: float = float("inf")) -> float:
        return max((r.seconds for r in self.between(start, end)), default=0.0)


class Victim:
    """A client of the tenant ``victim`` (or of an open node) that, every ``interval``
    seconds, produces one record over TCP and reads it back, and posts one event over HTTP
    (keep-alive), each from 127.0.0.1, in a thread with its own event loop. Each round's
    time is recorded: the longest is what the node's worst loop stall cost a client.

    Use as a context manager; :meth:`mark` notes a moment (flood start, flood end)."""

    def __init__(
        self,
        node: HeraldProcess,
        *,
        key: str | None = VICTIM_KEY,
        interval: float = 0.02,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.node = node
        self.key = key
        self.interval = interval
        self.ssl_context = ssl_context
        self.report = VictimReport()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="victim", daemon=True)
        self._failure: BaseException | None = None

    def __enter__(self) -> Victim:
        self._thread.start()
        if not self._ready.wait(15):
            raise AssertionError(f"victim did not start: {self._failure!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def served(self, start: float, end: float) -> None:
        """Served during ``[start, end]`` (at least one round ran in it and succeeded, none
        failed since ``start``) and after it (three more rounds)."""
        during = [
            r
            for r in self.report.rounds
            if r.error is None and r.at <= end and r.at + r.seconds >= start
        ]
        slow = [r for r in self.report.rounds if r.at < end and r.at + r.seconds > start]
        assert during, (
            f"no round completed during the {end - start:.2f} s of the attack; "
            f"rounds overlapping it: {[(round(r.at - start, 3), r.steps, r.error) for r in slow]}"
        )
        self.served_since(end)
        errors = [r.error for r in self.report.between(start, float("inf")) if r.error]
        assert not errors, errors[:5]

    def served_since(self, start: float, *, rounds: int = 3, timeout: float = 10.0) -> None:
        """Wait until ``rounds`` rounds since ``start`` succeeded; fail on any error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            good = [r for r in self.report.between(start, float("inf")) if r.error is None]
            if len(good) >= rounds:
                break
            time.sleep(0.05)
        errors = [r.error for r in self.report.between(start, float("inf")) if r.error]
        assert not errors, errors[:5]
        good = [r for r in self.report.between(start, float("inf")) if r.error is None]
        assert len(good) >= rounds, f"only {len(good)} rounds served since the mark"

    @staticmethod
    async def _round(
        producer: Any,
        client: Client,
        topic: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: bytes,
    ) -> Round:
        started = time.monotonic()
        error = None
        steps: list[float] = []
        try:
            async with asyncio.timeout(20):
                meta = await producer.send(topic, b"v", partition=0)
                steps.append(time.monotonic() - started)
                fetched = await client.fetch([(topic, 0, meta.offset)], max_wait_ms=0)
                assert fetched[0].records, "produced record not fetched"
                steps.append(time.monotonic() - started)
                writer.write(request)
                status = await reader.readline()
                assert status.startswith(b"HTTP/1.1 200"), status
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - started
        return Round(started, elapsed, error, (*steps, elapsed))

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        node = self.node
        client = await Client.connect(
            HOST, node.tcp_port, api_key=self.key, client_id="victim", ssl=self.ssl_context
        )
        topic = "victim.orders"
        await client.create_topic(topic, 1, exist_ok=True)
        producer = await client.producer()
        reader, writer = await asyncio.open_connection(
            HOST,
            node.http_port,
            ssl=self.ssl_context,
            server_hostname=None if self.ssl_context is None else HOST,
        )
        auth = f"Authorization: Bearer {self.key}\r\n" if self.key else ""
        body = json.dumps({"topic": "victim", "payload": {"ok": True}}).encode()
        request = (
            f"POST /events HTTP/1.1\r\nHost: {HOST}\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        try:
            # one round before the attack: its connections have shown the key, as a client's
            # long-lived connections have (a new one that has not yet may be evicted)
            await self._round(producer, client, topic, reader, writer, request)
            self._ready.set()
            while not self._stop.is_set():
                self.report.rounds.append(
                    await self._round(producer, client, topic, reader, writer, request)
                )
                await asyncio.sleep(self.interval)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await producer.close()
            await client.close()


class Probe:
    """The event-loop stall probe: a thread that sends the cheapest request there is (a
    repeated ``hello``: one key comparison) over TCP every ``interval`` seconds and records
    each round trip. One round trip is one
    turn of the node's loop for this connection, so the longest is (an upper bound of) the
    longest stall another client saw."""

    def __init__(
        self, node: HeraldProcess, *, key: str | None = VICTIM_KEY, interval: float = 0.005
    ):
        self.node = node
        self.key = key
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (at, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)

    def __enter__(self) -> Probe:
        self._conn = RawConnection(HOST, self.node.tcp_port)
        reply = self._conn.request(p.Hello(id=1, api_key=self.key))
        assert isinstance(reply, p.HelloOk), reply
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._conn.close()

    def worst(self, start: float = 0.0, end: float = float("inf")) -> float:
        return max((s for at, s in self.samples if start <= at <= end), default=0.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            at = time.monotonic()
            self._conn.request(p.Hello(id=2, api_key=self.key))
            self.samples.append((at, time.monotonic() - at))
            time.sleep(self.interval)


def attack_for(seconds: float) -> Iterator[int]:
    """Repeat an attack for ``seconds`` (at least once): long enough that the victim's rounds
    run during it."""
    end = time.monotonic() + seconds
    i = 0
    while i == 0 or time.monotonic() < end:
        yield i
        i += 1


# ----------------------------------------------------------------------- sockets
def connect_many(
    port: int, count: int, *, sources: int = 1, first_source: int = 0, timeout: float = 5.0
) -> list[socket.socket]:
    """``count`` plain TCP connections to ``port``, spread over ``sources`` spare loopback
    source addresses. Connections the node refuses still count (they close soon after)."""
    socks = []
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.bind((source(first_source + i % sources), 0))
        s.connect((HOST, port))
        socks.append(s)
    return socks


def closed_by_peer(sock: socket.socket, timeout: float = 0.0) -> bool:
    """True if the peer closed (EOF or reset) ``sock``; reads and drops what it sent."""
    sock.settimeout(timeout if timeout > 0 else 0.0001)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (BlockingIOError, TimeoutError):
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


def start(factory: Nodes, toml: str) -> HeraldProcess:
    return factory(config=toml)


def flood_with_cut_requests(
    node: HeraldProcess, one: bytes, total_bytes: int, timeout: float
) -> Victim:
    """Pipeline copies of the request ``one`` over one connection, ``total_bytes`` in all,
    every write ending mid-request (the old hand-off buffer kept every byte since the last
    request boundary, so such a stream grew it byte for byte); check each complete request is
    answered 400 and that a victim of another tenant is served meanwhile."""
    stream = one * 4096
    rounds = total_bytes // len(stream)
    expected = rounds * 4096 - 1  # every write ends mid-request; the last one is never done
    cut = len(stream) - len(one) // 2
    with Victim(node) as victim, RawHttp(node.host, node.http_port, source=source(0)) as conn:
        start = time.monotonic()
        answers = 0

        def read() -> None:
            nonlocal answers
            while answers < expected:
                assert conn.response().status == 400
                answers += 1

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for i in range(rounds):
            conn.send(stream[:cut] if i == 0 else stream[cut:] + stream[:cut])
        reader.join(timeout)
        assert answers == expected
        victim.served(start, time.monotonic())
    return victim
