"""Benchmarks of the notifications engine (``notify/``), each writing its own section of
``bench/RESULTS.md``::

    python -m bench.notify fanout      # one event -> 10,000 subscribers -> the null channel
    python -m bench.notify million     # one event -> 1,000,000 subscribers: rate and memory
    python -m bench.notify latency     # POST /events -> signed webhook received, 1,000 ev/s
    python -m bench.notify startup     # start-up with 1,000,000 parked timers
    python -m bench.notify all

The fan-out scenarios run a node in this process (uvloop), with a computed audience
(``bench/notify_audience.py``) so that the engine is measured, not a registry. The latency
scenario runs ``herald serve`` as a subprocess with the same audience and posts events over
HTTP from this process, which also runs the receiving webhook server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from bench.machine import machine_description
from bench.notify_audience import Audience
from bench.results import write_section
from bench.storage import libraries

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
OUT = REPO / "bench" / "out"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "notify", "broker", "storage"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def machine_table(data_dir: Path) -> str:
    rows = machine_description(data_dir, libraries())
    return "| Machine | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def node_config(data_dir: Path, channels: list[str], **notify: Any) -> Any:
    from broker.config import Config, NotifyConfig
    from channels.config import ChannelsConfig, WebhookConfig

    cfg = Config()
    return msgspec.structs.replace(
        cfg,
        listen=msgspec.structs.replace(cfg.listen, http_port=0, tcp_port=0),
        storage=msgspec.structs.replace(cfg.storage, data_dir=str(data_dir)),
        notify=NotifyConfig(channels=channels, **notify),
        channels=ChannelsConfig(webhook=WebhookConfig(allow_networks=["127.0.0.1/32"])),
    )


@contextlib.asynccontextmanager
async def running_node(cfg: Any, directory: Any) -> AsyncIterator[Any]:
    from herald.node import Node

    node = Node(cfg, directory=lambda kv: directory, shutdown_timeout=1.0)
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(node.run(lambda n: ready.set_result(None)))
    done, _ = await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield node
    finally:
        node.stop()
        await asyncio.wait_for(task, 30)


async def publish(node: Any, **event: Any) -> str:
    from broker.auth import OPEN_PRINCIPAL
    from broker.events import EventIn

    event.setdefault("payload", msgspec.Raw(b'{"sale":true}'))
    accepted = node.service and node.engine.intake.publish(
        OPEN_PRINCIPAL, [msgspec.convert(event, EventIn)], batch=False
    )
    if accepted.ack is not None:
        await accepted.ack
    return str(accepted.results[0].event_id)


async def until(check: Any, within: float, what: str) -> float:
    """Poll ``check`` every millisecond; the time it first held."""
    deadline = time.perf_counter() + within
    while not check():
        if time.perf_counter() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.001)
    return time.perf_counter()


# --------------------------------------------------------------------------- fan-out
async def fanout_runs(users: int, runs: int, data_dir: Path) -> dict[str, Any]:
    cfg = node_config(data_dir, ["null"], fanout_page=1000, fanout_flush_records=40_000)
    async with running_node(cfg, Audience("null")) as node:
        engine = node.engine
        worker = engine.workers["null"]
        fan = engine.fanout
        audit = engine.audit
        topic = f"crowd-{users}"
        results = []
        for i in range(runs + 1):  # the first is a warm-up
            sent0, rec0, audit0 = worker.delivered, fan.recipients, audit.folded
            batches0 = worker.batches
            c0, t0 = cpu_s(), time.perf_counter()
            await publish(node, topic=topic)
            t_fan = await until(lambda: fan.recipients - rec0 >= users, 120, "fan-out")
            t_done = await until(lambda: worker.delivered - sent0 >= users, 120, "delivery")
            await until(lambda: worker.batches > batches0 and not worker._busy, 120, "commit")
            t_commit = time.perf_counter()
            # every delivery makes a queued and a delivered audit record
            t_audit = await until(lambda: audit.folded - audit0 >= 2 * users, 120, "audit")
            c1 = cpu_s()
            if i == 0:
                continue
            results.append(
                {
                    "fanout_s": t_fan - t0,
                    "delivered_s": t_done - t0,
                    "committed_s": t_commit - t0,
                    "audited_s": t_audit - t0,
                    "cpu_s": c1 - c0,
                }
            )
            say(
                f"run {i}: fan-out {users / (t_fan - t0):,.0f}/s, delivered "
                f"{users / (t_done - t0):,.0f}/s, audited {users / (t_audit - t0):,.0f}/s"
            )
        return {"runs": results, "rss_mib": rss_mib()}


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


async def scenario_fanout(args: argparse.Namespace) -> str:
    data = Path(tempfile.mkdtemp(prefix="notify-fanout-", dir=OUT))
    try:
        users = args.users or 10_000
        out = await fanout_runs(users, args.runs, data)
        runs = out["runs"]
        rate = [users / r["committed_s"] for r in runs]
        fan = [users / r["fanout_s"] for r in runs]
        audited = [users / r["audited_s"] for r in runs]
        cpu = [r["cpu_s"] / users * 1e6 for r in runs]
        text = (
            f"Command: `python -m bench.notify fanout --runs {args.runs}`, on commit {commit()}  \n"
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. One node in the "
            "benchmark's process (uvloop); one event to a topic of "
            f"{users:,} subscribers (a computed audience: no registry reads), default plan, "
            "channel `null`. Medians of "
            f"{len(runs)} runs after one warm-up, (min-max) in brackets. A delivery counts once "
            "it is appended with acks=all (fsynced) to `__deliver.null`, consumed by the null "
            "channel's worker and its batch committed; each also writes two audit records "
            "(queued, delivered) that the audit indexer folds into LMDB.\n\n"
            + machine_table(data)
            + "\n\n| Measure | Result |\n|---|---|\n"
            f"| fan-out: deliveries appended (acks=all) | {med(fan):,.0f} "
            f"({min(fan):,.0f}-{max(fan):,.0f}) /s |\n"
            f"| **end to end: appended, consumed by the worker, committed** | "
            f"**{med(rate):,.0f}** ({min(rate):,.0f}-{max(rate):,.0f}) deliveries/s |\n"
            f"| ... and every audit record indexed | {med(audited):,.0f} "
            f"({min(audited):,.0f}-{max(audited):,.0f}) deliveries/s |\n"
            f"| CPU per delivery (whole process, all stages) | {med(cpu):.1f} µs |\n"
            f"| resident memory after the runs | {out['rss_mib']:.0f} MiB |\n"
            f"| target | >= 200,000 deliveries/s: "
            f"{'met' if med(rate) >= 200_000 else 'not met'} |\n"
        )
        write_section(
            RESULTS, "Notifications: fan-out to 10,000 subscribers", "bench.notify.fanout", text
        )
        return text
    finally:
        shutil.rmtree(data, ignore_errors=True)


SCENARIOS = {"fanout": scenario_fanout}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.notify")
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--users", type=int, default=0)
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    import logging

    logging.basicConfig(level=logging.WARNING)
    import uvloop

    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    for name in names:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            text = runner.run(SCENARIOS[name](args))
        print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
