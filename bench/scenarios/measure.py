"""Numbers and their spread: repeated measurements, percentiles, CPU time of a process.

Pure where it can be; the ``/proc`` readers are the only I/O (Linux only, like the
benchmark)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Spread:
    """Repeated measurements of one quantity: median and min-max."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def fmt(self, scale: float = 1.0, digits: int = 0, unit: str = "") -> str:
        if not self.values:
            return "n/a"
        med = self.median / scale
        lo, hi = min(self.values) / scale, max(self.values) / scale
        if len(self.values) == 1 or lo == hi:
            return f"{med:,.{digits}f}{unit}"
        return f"{med:,.{digits}f}{unit} ({lo:,.{digits}f}-{hi:,.{digits}f})"


@dataclass
class Sample:
    """One timed window of a throughput measurement. CPU figures are in cores (1.0 = one core
    busy for the whole window); ``stored_bytes`` is what the server's log grew by, when the
    workload can tell."""

    count: int
    seconds: float
    client_cpu: float
    server_cpu: float
    stored_bytes: int = 0
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of already sorted values (``q`` in [0, 1])."""
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


def percentiles(values: Iterable[float], qs: Sequence[float]) -> list[float]:
    s = sorted(values)
    return [quantile(s, q) for q in qs]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by every thread of ``pid`` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0.0
    # the command name may contain spaces; fields after it start at index 2 (state)
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class CpuMeter:
    """CPU used by ``pids`` and by this process between :meth:`start` and :meth:`stop`, as a
    fraction of one core (1.0 = one core busy for the whole interval)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._t0 = 0.0
        self._proc0: list[float] = []
        self._self0 = 0.0
        self.wall = 0.0
        self.server: list[float] = []
        self.client = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._proc0 = [cpu_seconds(p) for p in self.pids]
        self._self0 = time.process_time()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._t0
        self.server = [
            (cpu_seconds(p) - c0) / self.wall for p, c0 in zip(self.pids, self._proc0, strict=True)
        ]
        self.client = (time.process_time() - self._self0) / self.wall


def all_process_cpu() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) for every process we can read."""
    out: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        out[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def descendants(root: int, table: dict[int, tuple[int, float]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _cpu) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def write_bytes(pid: int) -> int:
    """Bytes ``pid`` caused to be written to storage so far (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for line in f:
                if line.startswith(b"write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class ForeignLoad:
    """CPU used by processes outside this benchmark (not this process, its descendants or
    kernel threads) during an interval, in cores: the machine is shared, and a busy
    neighbour is the first thing to rule out when a figure looks odd. Processes that start
    and end inside the interval are not seen, so this is a lower bound."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._cpu0: dict[int, float] = {}
        self._io0: dict[int, int] = {}
        self.cores = 0.0
        self.write_mb_s = 0.0  # what those processes wrote to storage, MB/s
        self.top: list[tuple[str, float]] = []

    def start(self) -> None:
        self._t0 = time.perf_counter()
        table = all_process_cpu()
        self._cpu0 = {pid: cpu for pid, (_pp, cpu) in table.items()}
        ours = descendants(os.getpid(), table)
        self._io0 = {pid: write_bytes(pid) for pid in table if pid not in ours}

    def stop(self) -> None:
        wall = time.perf_counter() - self._t0
        table = all_process_cpu()
        ours = descendants(os.getpid(), table)
        used: dict[int, float] = {}
        written = 0
        for pid, (ppid, cpu) in table.items():
            # kernel threads (children of kthreadd, pid 2) do our I/O too: not foreign
            if pid in ours or pid not in self._cpu0 or pid == 2 or ppid == 2:
                continue
            d = cpu - self._cpu0[pid]
            if d > 0:
                used[pid] = d / wall
            if pid in self._io0:
                written += max(0, write_bytes(pid) - self._io0[pid])
        self.cores = sum(used.values())
        self.write_mb_s = written / wall / 1e6
        self.top = []
        for pid, cores in sorted(used.items(), key=lambda kv: -kv[1])[:3]:
            if cores < 0.05:
                break
            self.top.append((_cmdline(pid), cores))


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
    except OSError:
        return str(pid)
    text = " ".join(p.decode(errors="replace") for p in parts if p)
    return text[:80] or str(pid)
