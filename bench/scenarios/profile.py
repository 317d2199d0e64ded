"""Sampling profiles of the Herald node while a workload runs, with py-spy (out of process:
the node is not modified or restarted). ``py-spy record --format raw`` writes collapsed stacks
(``frame;frame;... count``), which :func:`summarize` turns into the tables RESULTS.md shows:
where the event-loop thread spends its time, by function, self and inclusive.

Sampling pauses the node briefly for every sample (100 Hz here), so a profiled run is never
one of the measured ones.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# py-spy --function: "func (file:first_line)"; a thread's stack starts "thread (TID): NAME"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_THREAD = re.compile(r"^thread \((?P<tid>[^)]*)\): ?(?P<name>.*)$")
# with uvloop, the loop itself is C: a main-thread stack that ends in Runner.run is the loop
# waiting in epoll; a pool thread that ends in _worker waits for work
_IDLE_LEAVES = ("Runner.run (asyncio/runners.py)", "_worker (concurrent/futures/thread.py)")


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


@dataclass
class Profile:
    """Samples of the main (event-loop) thread, idle included, so a share is a share of wall
    time; busy = running Python code or a C call made from it. Other threads (the storage
    executor, where writes and fdatasync run) are counted apart, by their leaf function."""

    samples: int = 0
    busy: int = 0
    self_time: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    thread_samples: int = 0  # all samples of the other threads
    thread_leaves: Counter[str] = field(default_factory=Counter)  # their non-idle leaves
    threads: int = 0
    raw_path: str = ""

    def top(self, which: str, n: int) -> list[tuple[str, float]]:
        counter = self.self_time if which == "self" else self.inclusive
        total = self.samples or 1
        return [(name, c / total) for name, c in counter.most_common(n)]

    def top_threads(self, n: int) -> list[tuple[str, float]]:
        """Leaves of the other threads, as a share of one thread's wall time."""
        per_thread = self.thread_samples / self.threads if self.threads else 1
        return [(name, c / per_thread) for name, c in self.thread_leaves.most_common(n)]


def record(pid: int, seconds: float, out: Path, rate: int = 100) -> subprocess.Popen[bytes]:
    """Start py-spy on ``pid`` for ``seconds``; the caller runs the workload meanwhile and
    then waits on the returned process."""
    exe = py_spy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed (.venv/bin/pip install py-spy)")
    argv = [
        exe, "record",
        "--pid", str(pid),
        "--duration", str(int(seconds)),
        "--rate", str(rate),
        "--format", "raw",
        "--function",
        "--threads",
        "--idle",
        "--output", str(out),
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    return f"{m.group('func')} ({m.group('file')})" if m else frame.strip()


def summarize(raw: Path) -> Profile:
    """Fold py-spy's raw output (``--function --threads --idle``) into a :class:`Profile`."""
    prof = Profile(raw_path=str(raw))
    threads: set[str] = set()
    for line in raw.read_text(errors="replace").splitlines():
        body, _, count = line.rpartition(" ")
        if not body or not count.isdigit():
            continue
        n = int(count)
        frames = body.split(";")
        m = _THREAD.match(frames[0])
        if m is None:
            continue
        names = [_name(f) for f in frames[1:]]
        leaf = names[-1] if names else "?"
        idle = not names or leaf in _IDLE_LEAVES
        if m.group("name") != "MainThread":
            threads.add(m.group("tid"))
            prof.thread_samples += n
            if not idle:
                prof.thread_leaves[leaf] += n
            continue
        prof.samples += n
        if idle:
            continue
        prof.busy += n
        prof.self_time[leaf] += n
        # inclusive: count a function once per stack, skip the frames every stack shares
        for name in set(names):
            if name not in _IDLE_LEAVES and not name.startswith(_ENTRY):
                prof.inclusive[name] += n
    prof.threads = len(threads)
    return prof


_ENTRY = ("_run_module_as_main", "_run_code", "<module>", "main (broker/cli.py)", "_serve (")
