"""The machine a benchmark ran on, and page-cache control for warm and cold measurements.

Reads ``/proc`` and ``/sys`` only; evicting touches nothing but the files it is given (no
global ``drop_caches``), so it is safe next to other work on the same machine.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

MiB = 1024 * 1024


def mount_of(path: Path) -> tuple[str, str, str, str]:
    """(device, mount point, fs type, options) of the filesystem holding ``path``."""
    real = str(path.resolve())
    best = ("?", "/", "?", "")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype, opts = line.split()[:4]
            mnt = mnt.replace("\\040", " ")
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[1]):
                best = (dev, mnt, fstype, opts)
    return best


def disk_description(path: Path) -> str:
    dev, mnt, fstype, opts = mount_of(path)
    block = Path(dev).name
    sys_dir = Path("/sys/block") / block
    extra = []
    if sys_dir.exists():
        rot = (sys_dir / "queue/rotational").read_text().strip()
        extra.append(
            "rotational=1 (as reported; virtual disks often claim it)"
            if rot == "1"
            else "rotational=0"
        )
        model = sys_dir / "device/model"
        if model.exists():
            extra.append(f"model={model.read_text().strip()}")
        elif (sys_dir / "device/driver").exists():
            extra.append(f"driver={(sys_dir / 'device/driver').resolve().name}")
    st = os.statvfs(path)
    size_gb = st.f_blocks * st.f_frsize / 1e9
    free_gb = st.f_bavail * st.f_frsize / 1e9
    flags = ",".join(
        o
        for o in opts.split(",")
        if o in ("relatime", "noatime", "discard", "barrier=0", "nobarrier", "sync")
    )
    return (
        f"{dev} mounted at {mnt}, {fstype} ({flags or 'default options'}), "
        f"{size_gb:.0f} GB, {free_gb:.0f} GB free; {', '.join(extra)}"
    )


def machine_description(data_dir: Path, libraries: str) -> list[tuple[str, str]]:
    """(label, value) rows: CPU, memory, kernel, Python with ``libraries``, data disk."""
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return [
        (
            "CPU",
            f"{cpu}, {os.cpu_count()} logical cores "
            f"({len(os.sched_getaffinity(0))} usable by this process)",
        ),
        ("Memory", f"{mem_kb / 1024 / 1024:.1f} GiB"),
        ("Kernel", platform.release()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}; {libraries}"),
        ("Interpreter", interpreter_description()),
        ("Data dir", f"{data_dir} on {disk_description(data_dir)}"),
    ]


def interpreter_description() -> str:
    """The interpreter binary and how libpython is linked into it: the node spends 12-18%
    less CPU a request on Debian's build of 3.11 (libpython linked in, PGO and LTO) than on
    a pyenv build without ``--enable-optimizations`` (shared), so a result names it."""
    with open("/proc/self/maps") as f:
        shared = any("libpython" in line for line in f)
    how = "libpython shared" if shared else "libpython linked in"
    return f"{os.path.realpath(sys.executable)} ({how})"


def evict(directory: Path) -> None:
    """Drop ``directory``'s files from the page cache (only those files: no global
    drop_caches). Dirty pages cannot be dropped, so sync each file first."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def prewarm(directory: Path) -> None:
    """Read the partition's files so a "warm" measurement really finds them cached."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(8 * MiB):
                    pass


def process_cpu_seconds() -> dict[int, tuple[str, float]]:
    """{pid: (command name, CPU seconds so far)} for every process (kernel threads too)."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                raw = f.read()
        except OSError:
            continue  # gone meanwhile
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        found[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return found


def top_other_cpu(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    own: int,
    n: int | None = 4,
) -> list[tuple[str, float]]:
    """The ``n`` (None: all) command names, other than pid ``own``, that used the most CPU
    seconds between two :func:`process_cpu_seconds` snapshots, summed by name. Processes
    that ended in between are not counted."""
    used: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        if pid == own:
            continue
        delta = cpu - before.get(pid, (name, 0.0))[1]
        if delta > 0:
            used[name] = used.get(name, 0.0) + delta
    return sorted(used.items(), key=lambda item: -item[1])[:n]
