"""SIGKILL a writer process at random moments; every acknowledged record must survive.

The writer (``crash_writer.py``) appends with ``acks=ALL`` from several coroutines and prints
each acknowledged offset range. After each kill this process reopens the partition (running
recovery), reads the whole log and checks every record byte for byte against the value its
offset implies, then appends once more. The same directory is reused across trials, so
recovery runs on a growing, multi-segment log with a checkpoint.

A killed process leaves the page cache behind: this proves the recovery logic (torn tails,
checkpoints, index rebuilds, offsets handed out once), not fsync discipline, which
``tests/unit/storage/test_partition.py`` tests with an injected failing fsync.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from crash_writer import CONFIG, encode, record_key, record_value

from storage import records, segment
from storage.partition import Acks, Partition, RecoveryReport

REPO = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).resolve().with_name("crash_writer.py")
TRIALS_PER_DIRECTORY = 50  # then a fresh log, so long runs do not re-read an ever larger one
START_TIMEOUT_S = 15.0


class ExpectedLog:
    """Keys and values by offset, computed once and reused by every trial."""

    def __init__(self) -> None:
        self.keys: list[bytes | None] = []
        self.values: list[bytes] = []

    def upto(self, end: int) -> None:
        for o in range(len(self.values), end):
            self.keys.append(record_key(o))
            self.values.append(record_value(o))


@dataclass
class Stats:
    trials: int = 0
    acked_appends: int = 0
    truncated_bytes: int = 0
    scanned_bytes: int = 0
    segments: list[int] = field(default_factory=list)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_and_kill(directory: Path, seed: int, delay: float, out_dir: Path) -> list[tuple[int, int]]:
    """Start the writer, wait for its first acknowledgement, let it run ``delay`` seconds more,
    SIGKILL it. Returns the acknowledged ``(base_offset, last_offset)`` ranges."""
    out, err = out_dir / "writer.out", out_dir / "writer.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(directory), str(seed)],
            stdout=fo,
            stderr=fe,
            env=_child_env(),
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while out.stat().st_size == 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"writer never acknowledged (rc={proc.poll()}): {err.read_text()}")
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"writer exited by itself: {err.read_text()}"
    acked = []
    for line in out.read_bytes().split(b"\n")[:-1]:  # the last piece is "" or a torn line
        base, last = line.split()
        acked.append((int(base), int(last)))
    return acked


async def check_recovered(
    directory: Path, acked: list[tuple[int, int]], expected: ExpectedLog
) -> tuple[RecoveryReport, int]:
    """Reopen, verify every record from the log start to the high watermark, append once."""
    part, report = Partition.open(directory, CONFIG)
    try:
        hw = part.high_watermark
        assert part.log_end_offset == hw, "recovery leaves everything it kept durable"
        assert part.log_start_offset == 0
        # each acknowledged range was handed out once
        ranges = sorted(acked)
        for (_b1, l1), (b2, _l2) in itertools.pairwise(ranges):
            assert l1 < b2, f"overlapping acknowledged ranges {ranges}"
        if ranges:
            assert ranges[-1][1] < hw, f"acknowledged offset {ranges[-1][1]} lost (hw {hw})"
        expected.upto(hw + 3)
        offset = 0
        while offset < hw:
            data = part.read(offset, 256 * 1024)
            assert data, f"nothing readable at {offset} below the high watermark {hw}"
            walked = 0
            for pos, header in records.iter_batches(data):  # verifies both checksums
                assert header.base_offset == offset, f"gap or repeat at {offset}"
                recs = records.decode_records(data[pos : pos + header.batch_length], header)
                end = offset + len(recs)
                assert [r.value for r in recs] == expected.values[offset:end], f"at {offset}"
                assert [r.key for r in recs] == expected.keys[offset:end], f"at {offset}"
                offset = end
                walked = pos + header.batch_length
            assert walked == len(data), f"a read at {offset} returned a partial batch"
        assert offset == hw
        # the log takes appends where it left off
        now = time.time_ns() // 1_000_000
        result = await part.append([encode(hw, 3, now)], Acks.ALL)
        assert (result.base_offset, result.last_offset) == (hw, hw + 2)
        assert part.high_watermark == hw + 3
        segments = len(part.segments)
    finally:
        await part.close()
    return report, segments


def run_trials(base: Path, trials: int, seed: int) -> Stats:
    rng = random.Random(seed)
    expected = ExpectedLog()
    stats = Stats()
    for trial in range(trials):
        directory = base / f"log-{trial // TRIALS_PER_DIRECTORY}"
        delay = rng.uniform(0.003, 0.150)
        child_seed = rng.randrange(2**31)
        context = f"trial {trial} (seed {seed}, delay {delay:.3f}s, writer seed {child_seed})"
        acked = run_and_kill(directory, child_seed, delay, base)
        assert acked, context
        torn = b""
        torn_base = -1
        if rng.random() < 0.3:
            # as if a power cut had kept part of an unacknowledged write: bytes past the last
            # whole batch, which recovery must cut and report
            torn = rng.randbytes(rng.randint(1, 300))
            last = max(directory.glob("*.log"))
            torn_base = int(last.name[:20])
            with open(last, "ab") as f:
                # a last byte equal to the fill at its position would read as fill: not torn
                end = f.tell() + len(torn) - 1
                if torn[-1:] == segment.fill_bytes(end, 1):
                    torn = torn[:-1] + bytes([torn[-1] ^ 0xFF])
                f.write(torn)
            context += f", {len(torn)} torn bytes in segment {torn_base}"
        try:
            report, segments = asyncio.run(check_recovered(directory, acked, expected))
            # cut from the segment, or gone with it (a segment past a gap is removed whole)
            assert report.truncated_bytes >= len(torn) or torn_base in report.removed_segments
        except AssertionError as exc:
            raise AssertionError(f"{context}: {exc}") from exc
        stats.trials += 1
        stats.acked_appends += len(acked)
        stats.truncated_bytes += report.truncated_bytes
        stats.scanned_bytes += report.scanned_bytes
        stats.segments.append(segments)
    return stats


@pytest.mark.timeout(60)
def test_acked_records_survive_sigkill(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    stats = run_trials(tmp_path, 50, seed)
    assert stats.trials == 50
    assert stats.acked_appends >= 50
    print(f"crash: seed={seed} appends={stats.acked_appends} truncated={stats.truncated_bytes}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_acked_records_survive_sigkill_many(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    stats = run_trials(tmp_path, 500, seed)
    assert stats.trials == 500
    print(f"crash: seed={seed} appends={stats.acked_appends} truncated={stats.truncated_bytes}")
