"""A full disk (issue 12, item 7, storage side)."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from storage import segment
from storage.errors import StorageFull
from tests.unit.storage.test_partition import (
    assert_values_match_offsets,
    batch,
    open_partition,
    read_all,
    values_for,
)


def pbatch(seq: int, count: int = 2, pid: int = 7, first: int = 0, size: int = 20) -> bytes:
    return batch(values_for(first, count, size), producer_id=pid, base_sequence=seq)


def no_space(*_args: object, **_kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


# --------------------------------------------------------------- (a) the producer's retry
async def test_a_producer_that_hit_storage_full_is_accepted_on_retry_and_keeps_its_dedupe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = open_partition(tmp_path / "p")
    try:
        acked = [await part.append([pbatch(2 * i, first=part.log_end_offset)]) for i in range(8)]
        end = part.log_end_offset
        monkeypatch.setattr(segment.os, "pwritev", no_space)
        # more batches in flight than the producer window (5) holds: all refused together
        waits = []
        for i in range(8, 15):
            part.append_nowait([pbatch(2 * i, first=end + 2 * (i - 8))])
            fut = part.durable_future(part.log_end_offset)
            assert fut is not None
            waits.append(fut)
        results = await asyncio.gather(*waits, return_exceptions=True)
        assert all(isinstance(r, StorageFull) for r in results)
        assert (part.log_end_offset, part.high_watermark) == (end, end)
        monkeypatch.undo()  # space returns
        # the retry of the first refused batch is appended, at the offsets it would have had
        retry = await part.append([pbatch(16, first=end)])
        assert (retry.base_offset, retry.duplicate) == (end, False)
        # and the producer's window is as it was: an acknowledged batch is still a duplicate
        again = await part.append([pbatch(14, first=acked[7].base_offset)])
        assert (again.base_offset, again.duplicate) == (acked[7].base_offset, True)
        found = read_all(part)
        assert sorted(found) == list(range(end + 2))
        assert_values_match_offsets(found)
    finally:
        await part.close()
