"""``herald health``, the probe a container health check runs beside the node: it finds the
node's /healthz from the same config file the node was started with, and its exit status
says ok (0), degraded or unreachable (1), bad config (2). Against real nodes: one healthy,
one made degraded by a flipped byte in its log, one stopped, one serving HTTPS."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from broker.client import Client

from .herald_process import HeraldProcess, child_env, herald_command
from .test_corruption import consume_all, fill, segment_file
from .tls_certs import make_tls_files

NodeFactory = Callable[..., HeraldProcess]


def health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*herald_command(), "health", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
    )


def configured(factory: NodeFactory, extra: str = "", **kw: object) -> HeraldProcess:
    """A node whose config file names the HTTP port it serves on (as a deployment's
    would), so that ``herald health --config`` finds it from that file alone."""
    node = factory(config="", start=False, **kw)
    assert node.config_path is not None
    node.config_path.write_text(
        f'[listen]\nhost = "0.0.0.0"\nhttp-port = {node.http_port}\n{extra}'
    )
    node.start()
    return node


async def test_ok_then_degraded_then_unreachable(herald_factory: NodeFactory) -> None:
    node = configured(herald_factory)
    config = str(node.config_path)
    ok = health("--config", config)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "ok"

    await fill(node)
    assert node.stop() == 0
    log = segment_file(node)
    data = bytearray(log.read_bytes())
    data[len(data) // 2] ^= 0x40  # found by the read below: quarantined, reported
    log.write_bytes(bytes(data))
    node.start()
    async with Client(node.host, node.tcp_port) as client:
        _got, stop = await consume_all(client, "g1")  # the read that finds the damage
    assert stop is not None
    degraded = health("--config", config)
    assert degraded.returncode == 1, degraded.stdout + degraded.stderr
    body = json.loads(degraded.stdout)
    assert body["status"] == "degraded" and "corrupt_data" in body["reasons"], body

    assert node.stop() == 0
    gone = health("--config", config, "--timeout", "2")
    assert gone.returncode == 1
    assert f"cannot reach http://127.0.0.1:{node.http_port}/healthz" in gone.stderr
    assert gone.stdout == ""


def test_an_https_node_is_checked_against_its_ca(
    herald_factory: NodeFactory, tmp_path: Path
) -> None:
    files = make_tls_files(tmp_path / "tls")
    node = configured(herald_factory, files.config(), ca_file=files.ca_file)
    config = str(node.config_path)
    ok = health("--config", config, "--ca-file", str(files.ca_file))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "ok"
    # no CA given (a container's health check): the certificate the config names is the
    # one the node must present
    own = health("--config", config)
    assert own.returncode == 0, own.stderr
    # and without the config's certificate as the anchor, the private CA is unknown
    url = health("--url", f"https://127.0.0.1:{node.http_port}/healthz")
    assert url.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in url.stderr
    # the chain is verified: a CA that did not sign the node's certificate is refused
    other = make_tls_files(tmp_path / "other")
    refused = health("--config", config, "--ca-file", str(other.ca_file))
    assert refused.returncode == 1
    assert "cannot reach https://127.0.0.1:" in refused.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr


def test_a_bad_config_is_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[listen]\nhttp-port = 'eighty'\n")
    out = health("--config", str(bad))
    assert out.returncode == 2
    assert "http-port" in out.stderr
