"""A real ``herald serve`` on the power-loss filesystem: start it, crash it (SIGKILL), cut
the power (everything not fsynced is lost) and start it again on what the disk kept.

Ports and the work directory (config, the node's own log) stay across restarts; the work
directory is outside the mount, so the node's log survives the power cut for diagnosis.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from broker import protocol as p
from broker.client import Client, Consumer, ConsumerRecord
from tests.integration.herald_process import HeraldProcess, child_env, herald_command

from .control import PowerLossFS

OPERATOR_KEY = "powercut-operator-key-0123456789"
# an operator key (tenant "*"), for tests that read the internal topic __events
OPERATOR_CONFIG = f"""
[[auth.keys]]
key = "{OPERATOR_KEY}"
tenant = "*"
scopes = ["produce", "consume", "admin"]
name = "powercut-tests"
"""


class PowerNode:
    def __init__(
        self,
        fs: PowerLossFS,
        work_dir: Path,
        *,
        config: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.fs = fs
        self.process = HeraldProcess(fs.mountpoint, work_dir, config=config)
        self.api_key = api_key
        self.cuts: list[dict[str, Any]] = []
        # control runs (pytest --no-power-loss): a "power cut" first makes everything
        # durable, so it is a plain SIGKILL and restart; every test must pass that way
        self.no_power_loss = False

    async def connect(self) -> Client:
        """A client of the node's TCP protocol (with the node's API key, if any)."""
        return await Client.connect(self.host, self.tcp_port, api_key=self.api_key)

    @property
    def host(self) -> str:
        return self.process.host

    @property
    def tcp_port(self) -> int:
        return self.process.tcp_port

    @property
    def http_url(self) -> str:
        return self.process.http_url

    def start(self) -> None:
        """Start the node (nothing is made durable for it: a fresh node fsyncs the
        directories it creates itself, as ``test_fresh_node_layout_survives_power_cut``
        checks)."""
        self.process.start()

    def power_cut(self) -> dict[str, Any]:
        """SIGKILL the node, wait for it, then cut the power. Returns what was lost."""
        if self.process.proc is not None:
            self.process.kill()
        if self.no_power_loss:
            self.fs.sync_all()
        report = self.fs.power_cut()
        self.cuts.append(report)
        return report

    def power_cut_and_restart(self) -> dict[str, Any]:
        report = self.power_cut()
        self.process.start()
        return report

    def diagnosis(self) -> str:
        """What a failure message should show: the last cuts and the node's log."""
        cuts = "\n".join(_short(c) for c in self.cuts[-3:])
        return f"power cuts (last 3):\n{cuts}\nnode log:\n{self.process.log_tail(40)}"

    def close(self) -> None:
        self.process.close()


def _short(report: dict[str, Any]) -> str:
    lost = report.get("lost_bytes", {})
    return (
        f"  lost bytes {sum(lost.values())} in {len(lost)} files {sorted(lost)[:8]}; "
        f"lost names {report.get('lost_names', [])[:8]}; "
        f"restored names {report.get('restored_names', [])[:8]}"
    )


# ---------------------------------------------------------------------- client-side helpers
async def run_until_cut(
    node: PowerNode, workers: list[Callable[[], Awaitable[None]]], delay: float
) -> dict[str, Any]:
    """Run ``workers`` for ``delay`` seconds, then SIGKILL the node and cut the power while
    they are mid-request. Replies the node sent before it died still count as sent."""
    tasks = [asyncio.create_task(w()) for w in workers]
    await asyncio.sleep(delay)
    report = node.power_cut()  # blocks the loop: nothing more is sent meanwhile
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return report


async def read_partition(client: Client, topic: str, partition: int) -> dict[int, ConsumerRecord]:
    """Every record of one partition below its high watermark, by offset."""
    end = await client.list_offsets(topic, partition, "latest")
    consumer = Consumer(client, [topic], group=None, auto_offset_reset="earliest")
    await consumer.assign([(topic, partition)])
    out: dict[int, ConsumerRecord] = {}
    try:
        async with asyncio.timeout(20):
            while consumer.positions[(topic, partition)] < end:
                for rec in await consumer.getmany(timeout_ms=200):
                    out[rec.offset] = rec
    finally:
        await consumer.close()
    return out


async def committed_offset(client: Client, group: str, topic: str, partition: int) -> int:
    """The group's committed offset for a partition, -1 when none."""
    resp = await client.request(p.FetchOffsets(id=0, group=group, partitions=[(topic, partition)]))
    assert isinstance(resp, p.OffsetsFetched)
    for o in resp.offsets:
        if (o.topic, o.partition) == (topic, partition):
            return o.offset
    return -1


def topics_list_cli(node: PowerNode) -> list[str]:
    """``herald topics list --json``, as an operator runs it."""
    out = subprocess.run(
        [
            *herald_command(),
            "topics",
            "list",
            "--json",
            "--bootstrap",
            f"{node.host}:{node.tcp_port}",
            *(["--api-key", node.api_key] if node.api_key else []),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        check=False,
    )
    assert out.returncode == 0, f"topics list failed: {out.stderr}"
    return [t["name"] for t in json.loads(out.stdout)]


def post_event(node: PowerNode, event: dict[str, Any], timeout: float = 10.0) -> tuple[int, Any]:
    """``POST /events``: (status, decoded answer)."""
    req = urllib.request.Request(
        f"{node.http_url}/events",
        data=json.dumps(event).encode(),
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {node.api_key}"} if node.api_key else {}),
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, body.decode(errors="replace")
