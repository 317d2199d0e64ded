"""TLS on a real node (``[tls]``): HTTP and TCP served over TLS with a certificate from a
throwaway CA (EC P-256, SAN 127.0.0.1 and localhost); the SDK and the CLI verify the node
against that CA; a client that does not trust it, or speaks plain text, gets nowhere; and
TLS handshakes are admitted like any connection, so a flood of stalled handshakes is closed
at the handshake timeout while a keyed client still gets in."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.client import Client
from broker.tls import client_context

from .abuse import VICTIM_KEY, Victim, close_all, closed_by_peer, config, connect_many, meter
from .herald_process import HeraldProcess
from .tls_certs import TlsFiles, make_tls_files

NodeFactory = Callable[..., HeraldProcess]


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls")


def tls_node(factory: NodeFactory, files: TlsFiles, **sections: dict[str, object]) -> HeraldProcess:
    return factory(config=config(**sections) + files.config(), ca_file=files.ca_file)


def test_http_and_tcp_are_served_over_tls_verified_against_the_ca(
    herald_factory: NodeFactory, tls: TlsFiles
) -> None:
    node = tls_node(herald_factory, tls)
    ctx = client_context(str(tls.ca_file))

    async def over_tcp() -> bytes:
        async with await Client.connect(
            "127.0.0.1", node.tcp_port, api_key=VICTIM_KEY, ssl=ctx
        ) as client:
            await client.create_topic("secure", 1)
            producer = await client.producer()
            meta = await producer.send("secure", b"over tls", partition=0)
            await producer.close()
            (fetched,) = await client.fetch([("secure", 0, meta.offset)])
            return fetched.records

    assert b"over tls" in asyncio.run(over_tcp())
    req = urllib.request.Request(
        f"https://127.0.0.1:{node.http_port}/events",
        data=json.dumps({"topic": "t", "payload": 1}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {VICTIM_KEY}"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        assert resp.status == 200 and "event_id" in json.loads(resp.read())
    # aiohttp's routes too (the connection is handed to aiohttp over TLS)
    req = urllib.request.Request(
        f"https://127.0.0.1:{node.http_port}/topics",
        headers={"Authorization": f"Bearer {VICTIM_KEY}"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        assert "secure" in [t["name"] for t in json.loads(resp.read())["topics"]]


def test_a_client_that_does_not_trust_the_ca_or_speaks_plain_text_gets_nowhere(
    herald_factory: NodeFactory, tls: TlsFiles, tmp_path: Path
) -> None:
    node = tls_node(herald_factory, tls, admission={"handshake-timeout-ms": 1000})
    other = make_tls_files(tmp_path / "other")  # a CA that did not sign the node

    async def connect(ctx: ssl.SSLContext) -> None:
        await Client.connect("127.0.0.1", node.tcp_port, api_key=VICTIM_KEY, ssl=ctx)

    for ctx in (client_context(str(other.ca_file)), client_context(None)):
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(connect(ctx))
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(
            f"https://127.0.0.1:{node.http_port}/healthz",
            context=client_context(str(other.ca_file)),
            timeout=5,
        )
    # plain text to a TLS port: never answered, closed at the handshake timeout
    (plain,) = connect_many(node.http_port, 1)
    try:
        plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        assert closed_by_peer(plain, 5.0)
        assert time.monotonic() - started < 3.5
    finally:
        plain.close()


def test_stalled_tls_handshakes_are_admitted_and_expire_while_keyed_clients_get_in(
    herald_factory: NodeFactory, tls: TlsFiles
) -> None:
    node = tls_node(
        herald_factory,
        tls,
        limits={"max-connections": 200},
        admission={"handshake-timeout-ms": 1500},
    )
    m = meter(node)
    ctx = client_context(str(tls.ca_file))
    with Victim(node, ssl_context=ctx) as victim:
        base = m.fds()
        start = time.monotonic()
        stalled = connect_many(node.tcp_port, 600, sources=10)  # never send a ClientHello
        try:
            time.sleep(0.3)
            assert m.fds() - base <= 200 + 10  # counted at accept, before any handshake

            async def hello() -> str:
                client = await Client.connect(
                    "127.0.0.1", node.tcp_port, api_key=VICTIM_KEY, ssl=ctx
                )
                await client.close()
                return client.tenant

            assert asyncio.run(hello()) == "victim"
            time.sleep(2.5)
            assert all(closed_by_peer(s) for s in stalled)
        finally:
            close_all(stalled)
        victim.served(start, time.monotonic())


# ------------------------------------------------------------------------------ CLI
def herald_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "herald.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_the_cli_takes_the_key_from_an_option_a_file_or_the_environment_and_verifies_tls(
    herald_factory: NodeFactory, tls: TlsFiles, tmp_path: Path
) -> None:
    node = tls_node(herald_factory, tls)
    bootstrap = ["--bootstrap", f"127.0.0.1:{node.tcp_port}", "--ca-file", str(tls.ca_file)]
    key_file = tmp_path / "key"
    key_file.write_text(VICTIM_KEY + "\n")
    key_file.chmod(0o600)
    env = {"HERALD_API_KEY": ""}
    done = herald_cli("topics", "create", "cli.tls", *bootstrap, "--api-key", VICTIM_KEY, env=env)
    assert done.returncode == 0, done.stderr
    done = herald_cli("topics", "list", *bootstrap, "--api-key-file", str(key_file), env=env)
    assert done.returncode == 0 and "cli.tls" in done.stdout, done.stderr
    done = herald_cli("topics", "list", *bootstrap, env={"HERALD_API_KEY": VICTIM_KEY})
    assert done.returncode == 0 and "cli.tls" in done.stdout, done.stderr
    # no key: a clear error naming where a key can come from
    done = herald_cli("topics", "list", *bootstrap, env=env)
    assert done.returncode == 1
    assert "unauthenticated" in done.stderr and "HERALD_API_KEY" in done.stderr
    assert "Traceback" not in done.stderr
    # without the CA, the node's certificate is not trusted: a clear error, no traceback
    done = herald_cli(
        "topics", "list", "--bootstrap", f"127.0.0.1:{node.tcp_port}", "--tls", env=env
    )
    assert done.returncode == 1 and "TLS" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    # a key file that cannot be read is a usage error
    done = herald_cli("topics", "list", *bootstrap, "--api-key-file", str(tmp_path / "none"))
    assert done.returncode == 2 and "--api-key-file" in done.stderr
    assert node.healthy()
