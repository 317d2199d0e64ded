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


def rss_mib(kind: str = "VmRSS") -> float:
    """Resident memory in MiB: ``VmRSS`` (all), ``RssAnon`` (heap and other private memory)
    or ``RssFile`` (mapped files: LMDB's pages, which the kernel may drop at will)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        listen=msgspec.structs.replace(cfg.listen, http_port=0, tcp_port=0, ws_port=0),
        storage=msgspec.structs.replace(cfg.storage, data_dir=str(data_dir)),
        notify=NotifyConfig(channels=channels, **notify),
        channels=ChannelsConfig(webhook=WebhookConfig(allow_networks=["127.0.0.1/32"])),
    )


def serve_settings() -> None:
    """The process settings ``herald serve`` makes (``herald/cli.py``): the node in this
    process runs as it would there."""
    from herald.collector import tune_collector
    from herald.malloc import keep_freed_memory

    keep_freed_memory()
    tune_collector()


def node_ready(ready: asyncio.Future[None]) -> Any:
    """The ``on_ready`` of ``herald serve``, then ``ready`` resolved."""
    from herald.collector import freeze_startup

    def on_ready(_node: Any) -> None:
        freeze_startup()
        ready.set_result(None)

    return on_ready


@contextlib.asynccontextmanager
async def running_node(cfg: Any, directory: Any) -> AsyncIterator[Any]:
    from herald.node import Node

    serve_settings()
    node = Node(cfg, directory=lambda kv: directory, shutdown_timeout=1.0)
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(node.run(node_ready(ready)))
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
        # when the worker's commits were stored: polling would see the last one only after
        # whatever holds the loop then (the audit indexer's slices), not when it happened
        commits: list[float] = []
        store_commit = worker._commit_queued

        def timed_commit() -> None:
            store_commit()
            commits.append(time.perf_counter())

        setattr(worker, "_commit_queued", timed_commit)  # noqa: B010 (an instance's own)
        lateness = LoopLateness()
        for i in range(runs + 1):  # the first is a warm-up
            sent0, rec0, audit0 = worker.delivered, fan.recipients, audit.folded
            batches0 = worker.batches
            lateness.start()
            c0, t0 = cpu_s(), time.perf_counter()
            await publish(node, topic=topic)
            t_fan = await until(lambda r=rec0: fan.recipients - r >= users, 120, "fan-out")
            t_done = await until(lambda s=sent0: worker.delivered - s >= users, 120, "delivery")
            await until(lambda b=batches0: worker.batches > b and worker.settled, 120, "commit")
            t_commit = commits[-1]
            # every delivery makes a queued and a delivered audit record
            t_audit = await until(lambda a=audit0: audit.folded - a >= 2 * users, 120, "audit")
            c1 = cpu_s()
            worst_late = lateness.stop()
            if i == 0:
                continue
            results.append(
                {
                    "fanout_s": t_fan - t0,
                    "delivered_s": t_done - t0,
                    "committed_s": t_commit - t0,
                    "audited_s": t_audit - t0,
                    "cpu_s": c1 - c0,
                    "worst_late_ms": worst_late * 1000,
                }
            )
            say(
                f"run {i}: fan-out {users / (t_fan - t0):,.0f}/s, delivered "
                f"{users / (t_done - t0):,.0f}/s, audited {users / (t_audit - t0):,.0f}/s, "
                f"loop late by {worst_late * 1000:.1f} ms at worst"
            )
        return {"runs": results, "rss_mib": rss_mib()}


class LoopLateness:
    """A 1 ms timer on the loop, from :meth:`start` to :meth:`stop`: how late it fired at
    worst, i.e. the longest the loop was held (every connection of a node waits that long)."""

    TICK_S = 0.001

    def __init__(self) -> None:
        self.worst = 0.0
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.worst = 0.0
        self._arm()

    def _arm(self) -> None:
        self._due = time.perf_counter() + self.TICK_S
        self._handle = asyncio.get_running_loop().call_later(self.TICK_S, self._tick)

    def _tick(self) -> None:
        self.worst = max(self.worst, time.perf_counter() - self._due)
        self._arm()

    def stop(self) -> float:
        """The worst lateness in seconds since :meth:`start`."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        return self.worst


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


async def scenario_fanout(args: argparse.Namespace) -> str:
    data = Path(tempfile.mkdtemp(prefix="notify-fanout-", dir=OUT))
    try:
        users = args.users or 10_000
        load0 = os.getloadavg()[0]
        out = await fanout_runs(users, args.runs, data)
        load1 = os.getloadavg()[0]
        runs = out["runs"]
        rate = [users / r["committed_s"] for r in runs]
        fan = [users / r["fanout_s"] for r in runs]
        audited = [users / r["audited_s"] for r in runs]
        cpu = [r["cpu_s"] / users * 1e6 for r in runs]
        late = [r["worst_late_ms"] for r in runs]
        text = (
            f"Command: `python -m bench.notify fanout --runs {args.runs}"
            + (f" --users {users}" if users != 10_000 else "")
            + f"`, on commit {commit()}  \n"
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average (1 min) "
            f"{load0:.2f} at the start, {load1:.2f} at the end (2 cores, shared with other "
            "work).  \nOne node in the "
            "benchmark's process (uvloop); one event to a topic of "
            f"{users:,} subscribers (a computed audience: no registry reads), default plan, "
            "channel `null`. Medians of "
            f"{len(runs)} runs after one warm-up, (min-max) in brackets. A delivery counts once "
            "it is appended with acks=all (fsynced) to `__deliver.null`, consumed by the null "
            "channel's worker and its batch committed; each also makes two transitions that "
            "the audit indexer folds into LMDB (queued: its delivery page itself; delivered: "
            "the worker's audit page); the indexer gives way while "
            "deliveries are being made (for at most `notify.audit-max-lag-ms`), so the "
            "index is complete later than the deliveries (third row). The end-to-end time is "
            "that of the worker's last commit, taken when it is stored; the CPU is the whole "
            "process's until every audit record is indexed.\n\n"
            + machine_table(data)
            + "\n\n| Measure | Result |\n|---|---|\n"
            f"| fan-out: deliveries appended (acks=all) | {med(fan):,.0f} "
            f"({min(fan):,.0f}-{max(fan):,.0f}) /s |\n"
            f"| **end to end: appended, consumed by the worker, committed** | "
            f"**{med(rate):,.0f}** ({min(rate):,.0f}-{max(rate):,.0f}) deliveries/s |\n"
            f"| ... and every audit record indexed | {med(audited):,.0f} "
            f"({min(audited):,.0f}-{max(audited):,.0f}) deliveries/s |\n"
            f"| CPU per delivery (whole process, all stages) | {med(cpu):.1f} µs |\n"
            f"| the loop held at worst (a 1 ms timer's lateness, publish to indexed) | "
            f"{med(late):.1f} ({min(late):.1f}-{max(late):.1f}) ms |\n"
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


# --------------------------------------------------------------------------- start-up
def spawn(cmd: list[str], log_file: Any) -> subprocess.Popen[bytes]:
    """Start a process of the repository's code with its output in ``log_file``."""
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def herald_bin() -> str:
    return str(Path(sys.executable).with_name("herald"))


def park_timers(data: Path, count: int, chunk: int = 50_000) -> float:
    """Write ``count`` parked runs (a one-hour delay each) straight into the state store,
    as a node's fan-out would have; returns the seconds it took."""
    from notify import ids
    from notify.model import ParkedEvent, TimerRow, Workflow
    from notify.plans import Plans
    from notify.timers import TimerStore
    from storage.kv import KV

    kv = KV(data / "state", map_size=8 << 30)
    try:
        plans = Plans(kv)
        ref, _plan, _where = plans.for_workflow(
            Workflow(steps=[{"delay": "1h"}, {"channel": "null"}])
        )
        timers = TimerStore(kv)
        due = time.time_ns() // 1_000_000 + 3_600_000
        started = time.perf_counter()
        event = ParkedEvent(
            tenant="default", event_id="e-parked", topic="slow", data=b"{}", received_ms=due
        )
        for base in range(0, count, chunk):
            with kv.transaction() as txn:
                for i in range(base, min(count, base + chunk)):
                    user = f"u{i:07d}"
                    run = ids.run_id("default", "e-parked", user)
                    timers.put(
                        TimerRow(
                            timer_id=ids.timer_id(run, "delay", 0),
                            kind="delay",
                            due_ms=due + i // 1000,
                            user=user,
                            run_id=run,
                            event=event,
                            plan_ref=ref,
                            resume_at=1,
                            step=0,
                            created_ms=due,
                        ),
                        txn,
                    )
        kv.sync_now()
        return time.perf_counter() - started
    finally:
        kv.close()


def start_and_time(data: Path, config: Path) -> tuple[float, float, str]:
    """Start ``herald serve`` on ``data``: seconds to /healthz ok, the notify component's
    own start-up seconds (from its log line), and the log."""
    import json
    import re
    import signal
    import urllib.request

    port = free_port()
    log_path = data.parent / "serve.log"
    with open(log_path, "w") as log_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [
                herald_bin(),
                "serve",
                "--data-dir",
                str(data),
                "--config",
                str(config),
                "--http-port",
                str(port),
                "--tcp-port",
                str(free_port()),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                        if json.loads(r.read()).get("status") == "ok":
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.perf_counter() - t0 > 120:
                    raise RuntimeError(log_path.read_text()[-3000:])
                time.sleep(0.01)
            ready = time.perf_counter() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    text = log_path.read_text()
    found = re.findall(r"component=notify seconds=([0-9.]+)", text)
    return ready, float(found[0]) if found else float("nan"), text


async def scenario_startup(args: argparse.Namespace) -> str:
    count = args.timers or 1_000_000
    base = Path(tempfile.mkdtemp(prefix="notify-startup-", dir=OUT))
    data = base / "data"
    config = base / "herald.toml"
    config.write_text('[storage]\nkv-map-size = 8589934592\n\n[notify]\nchannels = ["null"]\n')
    try:
        empty = [start_and_time(data, config) for _ in range(2)][1:]  # topics made by the first
        say(f"empty node: ready in {empty[0][0]:.3f} s (notify {empty[0][1]:.3f} s)")
        parked_s = park_timers(data, count)
        size = sum(f.stat().st_size for f in (data / "state").iterdir())
        say(f"parked {count:,} timers in {parked_s:.1f} s; state store {size / 1e6:.0f} MB")
        runs = [start_and_time(data, config) for _ in range(args.runs)]
        for ready, comp, _t in runs:
            say(f"with {count:,} parked: ready in {ready:.3f} s (notify {comp:.3f} s)")
        readies = [r[0] for r in runs]
        comps = [r[1] for r in runs]
        text = (
            f"Command: `python -m bench.notify startup --runs {args.runs}`, "
            f"on commit {commit()}  \n"
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"load average at the end: {os.getloadavg()[0]:.2f} (2 cores, shared).  \n"
            f"`herald serve` (notify channels: null) started on a data directory holding "
            f"{count:,} parked runs (a one-hour delay each, written into the state store as a "
            f"fan-out would: {parked_s:.0f} s; the state store is {size / 1e6:.0f} MB), timed "
            "from the process start to `/healthz` answering ok, and the notify component's own "
            "start-up (its `component_ready` line). Medians of "
            f"{len(runs)} starts, (min-max) in brackets.\n\n"
            + machine_table(data)
            + "\n\n| Start | To /healthz ok | notify component |\n|---|---|---|\n"
            f"| empty node (no timers) | {empty[0][0]:.3f} s | {empty[0][1]:.3f} s |\n"
            f"| {count:,} parked timers | {med(readies):.3f} "
            f"({min(readies):.3f}-{max(readies):.3f}) s "
            f"| {med(comps):.3f} ({min(comps):.3f}-{max(comps):.3f}) s |\n\n"
            f"Target: start-up < 2 s with 1,000,000 parked: "
            f"{'met' if med(readies) < 2 else 'not met'}. The timers are not read at start: the "
            "loop seeks the first key of the due-ordered index when it first runs.\n"
        )
        write_section(
            RESULTS,
            "Notifications: start-up with 1,000,000 parked timers",
            "bench.notify.startup",
            text,
        )
        return text
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- latency
async def scenario_latency(args: argparse.Namespace) -> str:
    """POST /events (one event for one user each) at a fixed rate to a ``herald serve``
    subprocess; each becomes a signed webhook to the receiver in this process, which
    records the time from just before the POST to the webhook's arrival."""
    import aiohttp
    from aiohttp import web

    rates = [int(r) for r in (args.rates or "100,300,1000").split(",")]
    seconds = args.seconds or 20
    rows: list[str] = []
    # the disk settled first (what an earlier run wrote, and freed, is not synced and
    # discarded under this one: bench.gateway_bench found whichever of two back-to-back
    # runs came second had the worse p99)
    os.sync()
    await asyncio.sleep(2)
    base = Path(tempfile.mkdtemp(prefix="notify-latency-", dir=OUT))
    data = base / "data"
    config = base / "herald.toml"
    config.write_text(
        '[notify]\nchannels = ["webhook"]\ndeliver-concurrency = 128\n\n'
        '[channels.webhook]\nallow-networks = ["127.0.0.1/32"]\n'
        "concurrency-per-endpoint = 128\npool-size = 256\n"
    )
    latencies: list[float] = []
    sent: dict[str, int] = {}
    rate = rates[0]
    trace = base / "trace.jsonl" if args.trace else None
    # with --trace: per rate, each measured event's POST and arrival times (perf_counter_ns)
    traced: dict[int, dict[str, tuple[int, int]]] = {}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        arrived = time.perf_counter_ns()
        eid = msgspec.json.decode(body)["data"]["event_id"]
        t0 = sent.pop(eid, None)
        if t0 is not None:
            latencies.append((arrived - t0) / 1e6)
            if trace is not None:
                traced.setdefault(rate, {})[eid] = (t0, arrived)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook/{user}", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    recv_port = runner.addresses[0][1]
    http_port = free_port()
    log_file = open(base / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = spawn(
        [
            sys.executable,
            "-m",
            "bench.notify_node",
            f"http://127.0.0.1:{recv_port}",
            "webhook",
            *(["--trace", str(trace)] if trace is not None else []),
            "--data-dir",
            str(data),
            "--config",
            str(config),
            "--http-port",
            str(http_port),
            "--tcp-port",
            str(free_port()),
            "--ws-port",
            str(free_port()),
        ],
        log_file,
    )
    try:
        url = f"http://127.0.0.1:{http_port}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{url}/healthz") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.05)
            errors = 0

            async def post(i: int, measure: bool) -> None:
                nonlocal errors
                eid = f"{i:08x}-0000-4000-8000-{os.getpid():012x}"
                body = msgspec.json.encode(
                    {
                        "topic": "orders",
                        "event_id": eid,
                        "users": [f"u{i % 1000:07d}"],
                        "payload": {"n": i},
                    }
                )
                if measure:
                    sent[eid] = time.perf_counter_ns()
                try:
                    async with session.post(
                        f"{url}/events", data=body, headers={"Content-Type": "application/json"}
                    ) as r:
                        await r.read()
                        if r.status >= 300:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1

            async def load(start: int, count: int, measure: bool) -> None:
                tasks = set()
                t0 = time.perf_counter()
                for i in range(count):
                    due = t0 + i / rate
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    task = asyncio.create_task(post(start + i, measure))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.gather(*tasks)

            for rate in rates:
                latencies.clear()
                sent.clear()
                errors = 0
                say(f"warm-up: {rate} events/s for 3 s")
                await load(rate * 1_000_000, rate * 3, False)
                await asyncio.sleep(2)
                say(f"measuring: {rate} events/s for {seconds} s")
                c0 = cpu_s()
                n0 = proc_cpu_s(proc.pid)
                t0 = time.perf_counter()
                await load(rate * 1_000_000 + 500_000, rate * seconds, True)
                sent_for = time.perf_counter() - t0
                deadline = time.perf_counter() + 30
                while sent and time.perf_counter() < deadline:
                    await asyncio.sleep(0.1)
                bench_cpu = cpu_s() - c0
                node_cpu = proc_cpu_s(proc.pid) - n0
                lat = sorted(latencies)
                n = len(lat)

                def q(p: float, lat: list[float] = lat, n: int = n) -> float:
                    return lat[min(n - 1, int(p * n))]

                rows.append(
                    f"| {rate:,}/s | {rate * seconds:,} / {n:,} ({errors} errors, "
                    f"{len(sent)} missing) | {q(0.5):.1f} | {q(0.9):.1f} | **{q(0.99):.1f}** | "
                    f"{lat[-1]:.1f} | {node_cpu / sent_for * 100:.0f}% "
                    f"({node_cpu / (rate * seconds) * 1e6:.0f} µs) | "
                    f"{bench_cpu / sent_for * 100:.0f}% | {os.getloadavg()[0]:.2f} |"
                )
                say(rows[-1])
                last_p99 = q(0.99)
    finally:
        proc.terminate()
        proc.wait(30)
        log_file.close()
        await runner.cleanup()
        breakdown = trace_breakdown(trace, traced) if trace is not None else ""
        shutil.rmtree(base, ignore_errors=True)
    if breakdown:
        print(breakdown)
        return breakdown
    text = (
        f"Command: `python -m bench.notify latency --rates {','.join(map(str, rates))} "
        f"--seconds {seconds}`, on commit {commit()}  \n"
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 2 cores shared with "
        "other work (the load average is the 1-minute figure at the end of each rate).  \n"
        "`herald serve` in its own process (computed audience; channel webhook); this "
        "process posts one event per `POST /events` (each for one of 1,000 users) at each "
        f"rate for {seconds} s after a 3 s warm-up, and runs the receiver (aiohttp on "
        "127.0.0.1) that gets the Standard Webhooks signed POSTs. Latency: from just before "
        "the POST is sent to the webhook's arrival at the receiver (one clock), in ms.\n\n"
        "| Rate | Events sent / webhooks received | p50 | p90 | p99 | max | node CPU (per "
        "event) | this process CPU | load avg |\n|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nTarget p99 < 50 ms at {rates[-1]:,} events/s: "
        f"{'met' if last_p99 < 50 else 'not met'}.\n"
    )
    write_section(
        RESULTS, "Notifications: ingest to signed webhook latency", "bench.notify.latency", text
    )
    return text


def trace_breakdown(path: Path, traced: dict[int, dict[str, tuple[int, int]]]) -> str:
    """Per rate, p50 / p99 (ms) of each segment of an event's way to the webhook."""
    from bench.notify_trace import breakdown

    steps = ["post", "intake", "durable", "fanout", "out_acked", "worker", "send", "arrived"]
    return breakdown(path, traced, steps)


# ---------------------------------------------------------------------- a million
async def scenario_million(args: argparse.Namespace) -> str:
    """Register a million subscribers of one topic in the node's own registry, then fan one
    event out to all of them into the null channel; resident memory sampled throughout."""
    from notify.directory import RegistryDirectory
    from notify.model import Subscription
    from notify.registry import Registry

    users = args.users or 1_000_000
    data = Path(tempfile.mkdtemp(prefix="notify-million-", dir=OUT))
    cfg = node_config(data, ["null"], fanout_page=1000, fanout_flush_records=20_000)
    cfg = msgspec.structs.replace(
        cfg, storage=msgspec.structs.replace(cfg.storage, kv_map_size=16 << 30)
    )
    samples: dict[str, list[tuple[float, float]]] = {"register": [], "fanout": []}
    phase = ["idle"]

    async def sample() -> None:
        while True:
            if phase[0] in samples:
                samples[phase[0]].append((rss_mib("RssAnon"), rss_mib("RssFile")))
            await asyncio.sleep(0.25)

    state_file = data / "state" / "data.mdb"
    try:
        from herald.node import Node

        serve_settings()
        node = Node(cfg, shutdown_timeout=1.0)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(node.run(node_ready(ready)))
        await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        sampler = asyncio.create_task(sample())
        try:
            engine = node.engine
            assert engine is not None and isinstance(engine.directory, RegistryDirectory)
            registry: Registry = engine.directory.registry
            rss0 = rss_mib("RssAnon")
            size0 = state_file.stat().st_size
            sub = Subscription(channels=["null"])
            phase[0] = "register"
            t0 = time.perf_counter()
            c0 = cpu_s()
            now = time.time_ns() // 1_000_000
            for base in range(0, users, 1000):
                registry.subscribe_many(
                    "default",
                    "crowd",
                    [(f"u{i:07d}", sub) for i in range(base, min(users, base + 1000))],
                    now_ms=now,
                )
                if base % 50_000 == 0:
                    await asyncio.sleep(0)
            await registry.sync()
            reg_s, reg_cpu = time.perf_counter() - t0, cpu_s() - c0
            size1 = state_file.stat().st_size
            grown = (size1 - size0) / 1e6
            say(f"registered {users:,} in {reg_s:.1f} s; state store +{grown:.0f} MB")
            phase[0] = "fanout"
            worker, fan = engine.workers["null"], engine.fanout
            assert fan is not None
            t0, c0 = time.perf_counter(), cpu_s()
            await publish(node, topic="crowd")
            t_fan = await until(lambda: fan.recipients >= users, 3600, "fan-out")
            fan_cpu = cpu_s() - c0
            t_done = await until(lambda: worker.delivered >= users, 3600, "delivered")
            done_cpu = cpu_s() - c0
            phase[0] = "idle"
            say(f"fan-out {users / (t_fan - t0):,.0f}/s; delivered {users / (t_done - t0):,.0f}/s")
        finally:
            sampler.cancel()
            node.stop()
            await asyncio.wait_for(task, 120)
        reg_rss, fan_rss = samples["register"], samples["fanout"]
        text = (
            f"Command: `python -m bench.notify million`, on commit {commit()}  \n"
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at the "
            f"end: {os.getloadavg()[0]:.2f} (2 cores, shared with other work).  \n"
            f"One node in the benchmark's process (uvloop). {users:,} users subscribe to one "
            "topic through the node's registry (`Registry.subscribe_many`, 1,000 per "
            "transaction, one sync at the end); then one event to that topic is fanned out "
            "through the real registry and policy (each recipient: one page entry, one "
            "profile read, a policy decision) into the `null` channel. Resident memory of the "
            "whole process sampled every 250 ms, private (heap) apart from mapped files (LMDB's "
            "pages).\n\n" + machine_table(data) + "\n\n| Measure | Result |\n|---|---|\n"
            f"| registering | {users / reg_s:,.0f} subscribers/s ({reg_cpu:.0f} CPU-s) |\n"
            f"| state store growth | {(size1 - size0) / users:.0f} bytes per subscriber "
            "(LMDB file, both index sides and counts) |\n"
            f"| private resident memory (RssAnon) before / while registering | {rss0:.0f} MiB"
            f" / {min(a for a, _f in reg_rss):.0f}-{max(a for a, _f in reg_rss):.0f} MiB |\n"
            f"| **fan-out** (deliveries appended acks=all) | **{users / (t_fan - t0):,.0f} "
            f"recipients/s** ({t_fan - t0:.1f} s, {fan_cpu / users * 1e6:.1f} CPU-µs each) |\n"
            f"| ... consumed by the null worker | {users / (t_done - t0):,.0f}/s "
            f"({t_done - t0:.1f} s, {done_cpu / users * 1e6:.1f} CPU-µs each, all stages) |\n"
            f"| private resident memory while fanning out and delivering | "
            f"{min(a for a, _f in fan_rss):.0f}-{max(a for a, _f in fan_rss):.0f} MiB |\n"
            f"| mapped LMDB pages resident meanwhile (RssFile; the kernel's to drop) | "
            f"{min(f for _a, f in fan_rss):.0f}-{max(f for _a, f in fan_rss):.0f} MiB |\n"
        )
        write_section(
            RESULTS,
            "Notifications: 1,000,000 subscribers on one topic",
            "bench.notify.million",
            text,
        )
        return text
    finally:
        shutil.rmtree(data, ignore_errors=True)


SCENARIOS = {
    "fanout": scenario_fanout,
    "million": scenario_million,
    "startup": scenario_startup,
    "latency": scenario_latency,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.notify")
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--users", type=int, default=0)
    parser.add_argument("--timers", type=int, default=0)
    parser.add_argument("--rates", default="")
    parser.add_argument("--seconds", type=int, default=0)
    parser.add_argument(
        "--trace",
        action="store_true",
        help="latency: time each event's stage boundaries in the node and print where the "
        "time goes (RESULTS.md is left alone)",
    )
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
