"""What a run ran on: machine, disk, software versions, the commit measured. Written into the
results so a figure can always be traced to its conditions."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from bench.machine import interpreter_description
from bench.peers import nats_server, redis_server
from bench.peers.process import say
from bench.peers.servers import Servers

REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    def git(*a: str) -> str:
        out = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "broker", "storage")
    return sha + (" + uncommitted changes in broker/ or storage/" if dirty else "")


def mount_of(path: Path) -> tuple[str, str, str]:
    real = str(path.resolve())
    best = ("?", "/", "?")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                best = (dev, mnt, fstype)
    return best


def machine(base: Path, servers: Servers, commit: str) -> list[tuple[str, str]]:
    import aiohttp
    import msgspec
    import uvloop

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal:"))
    dev, mnt, fstype = mount_of(base)
    same = os.stat(base).st_dev == os.stat(REPO).st_dev
    clients = [f"uvloop {getattr(uvloop, '__version__', '?')}", f"msgspec {msgspec.__version__}"]
    clients.append(f"aiohttp {aiohttp.__version__}")
    try:
        import redis
        import redis.utils

        parser = "hiredis parser" if redis.utils.HIREDIS_AVAILABLE else "pure-Python parser"
        clients.append(f"redis-py {redis.__version__} ({parser})")
    except ImportError:
        clients.append("redis-py not installed")
    try:
        from importlib.metadata import version

        clients.append(f"nats-py {version('nats-py')}")
    except Exception:
        clients.append("nats-py not installed")
    rv, nv = redis_server.version(), nats_server.version()
    peers = []
    for redis_peer in (servers.redis, servers.redis_always):
        if redis_peer is not None:
            peers.append(f"{redis_peer.name} {rv} ({redis_peer.settings})")
    if servers.nats is not None:
        peers.append(f"NATS {nv} ({servers.nats.settings})")
    peers += [f"{name} unavailable: {why}" for name, why in servers.unavailable.items()]
    return [
        (
            "Herald",
            f"commit {commit} (the working tree as it was when the run started);"
            f" {servers.herald.settings}",
        ),
        ("CPU", f"{cpu}, {os.cpu_count()} logical cores"),
        ("Memory", f"{mem_kb / 1024 / 1024:.1f} GiB"),
        ("Kernel", platform.release()),
        (
            "Python",
            f"{platform.python_version()}, {interpreter_description()} (the node and every"
            f" client); clients: {', '.join(clients)}",
        ),
        (
            "Client processes",
            "one per workload, each keeping freed memory instead of returning it to the kernel"
            " (glibc mmap/trim thresholds, `broker/malloc.py`, as `herald serve` does), for"
            " every system alike",
        ),
        (
            "Disk",
            f"data directories under `{base.relative_to(REPO)}` on {dev} ({fstype}, mounted at"
            f" {mnt}); same filesystem as the repository: {'yes' if same else 'NO'}",
        ),
        ("Peers", "; ".join(peers) or "none"),
    ]


def check_disk(base: Path) -> None:
    _dev, _mnt, fstype = mount_of(base)
    if fstype in ("tmpfs", "ramfs"):
        say(f"WARNING: {base} is on {fstype}: fsync costs nothing there, figures mean little")
    if os.stat(base).st_dev != os.stat(REPO).st_dev:
        say(f"WARNING: {base} is not on the repository's filesystem")
