"""Retention: which of a partition's oldest segments go (pure: no files, the clock given).

Retention deletes whole segments, from the oldest, and stops at the first that must stay. A
segment goes only if it is not the active one, nothing uses its file (``in_use``: a job or
a read in a worker thread, or it is not wholly synced), and it is

- **expired**: its max timestamp (the producers' timestamps, as Kafka's ``CreateTime``) is
  older than ``now_ms - retention_ms`` (``None``: keep forever), or
- **oversize**: the partition would still hold at least ``retention_bytes`` without it
  (``None``: no size limit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from storage.segment import Segment


def segments_to_delete(
    segments: Sequence[Segment],
    *,
    now_ms: int,
    retention_ms: int | None,
    retention_bytes: int | None,
    in_use: Callable[[Segment], bool],
) -> int:
    """How many of ``segments`` (oldest first, the last one active) retention deletes."""
    total = sum(s.size for s in segments)
    count = 0
    while count < len(segments) - 1:
        seg = segments[count]
        if in_use(seg):
            break
        expired = retention_ms is not None and seg.max_timestamp < now_ms - retention_ms
        oversize = retention_bytes is not None and total - seg.size >= retention_bytes
        if not (expired or oversize):
            break
        total -= seg.size
        count += 1
    return count
