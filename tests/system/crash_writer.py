"""The process that ``test_crash.py`` kills: appends to a partition until SIGKILL.

    python crash_writer.py DIRECTORY SEED

Opens the partition in DIRECTORY and runs several appender coroutines that append batches of
varied sizes with ``acks=ALL``, so appends share syncs (group commit) and segments roll
often. Every record's key and value are a function of the offset it gets
(:func:`record_value`), so a reader can check each record byte for byte without being told
what was written. After each acknowledged append it writes ``"<base_offset> <last_offset>\\n"``
to stdout, unbuffered: a line there means the append was acknowledged.

Exits on its own after ``LIFETIME_S`` so a lost test run cannot leave it behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sys
import time
from pathlib import Path

from storage import records
from storage.partition import Acks, Partition, PartitionConfig

CONFIG = PartitionConfig(
    segment_bytes=64 * 1024,
    index_interval_bytes=1024,
    checkpoint_interval_ms=20,  # checkpoints land at varied points of a short run
)
APPENDERS = 4
LIFETIME_S = 20.0


def record_key(offset: int) -> bytes | None:
    return None if offset % 7 == 0 else b"key-%d" % (offset % 101)


def record_value(offset: int) -> bytes:
    """8 bytes of offset, then 0..255 bytes derived from it."""
    seed = offset.to_bytes(8, "little")
    n = (offset * 7919) % 256
    pad = hashlib.blake2b(seed, digest_size=64).digest() * 4
    return seed + pad[:n]


def encode(first: int, count: int, timestamp: int) -> bytes:
    return records.encode_batch(
        [(0, record_key(o), record_value(o)) for o in range(first, first + count)],
        first_timestamp=timestamp,
    )


async def appender(part: Partition, rng: random.Random) -> None:
    while True:
        first = part.log_end_offset  # the offset the batch will get: nothing awaits before
        now = time.time_ns() // 1_000_000
        sizes = [rng.choice((1, 1, 2, 3, 5, 8, 13, 30))]
        if rng.random() < 0.2:
            sizes.append(rng.randint(1, 10))  # two batches in one append
        batches = []
        offset = first
        for n in sizes:
            batches.append(encode(offset, n, now))
            offset += n
        result = await part.append(batches, Acks.ALL)
        if result.base_offset != first or result.last_offset != offset - 1:
            sys.stderr.write(f"expected offsets {first}..{offset - 1}, got {result}\n")
            os._exit(3)
        os.write(1, b"%d %d\n" % (result.base_offset, result.last_offset))
        await asyncio.sleep(rng.random() * 0.002)


async def main(directory: Path, seed: int) -> None:
    part, _report = Partition.open(directory, CONFIG)
    rng = random.Random(seed)
    try:
        async with asyncio.timeout(LIFETIME_S), asyncio.TaskGroup() as tg:
            for i in range(APPENDERS):
                tg.create_task(appender(part, random.Random(rng.randrange(2**32) + i)))
    except TimeoutError:
        pass
    finally:
        await part.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
