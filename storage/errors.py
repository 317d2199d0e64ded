"""The storage layer's exceptions: one hierarchy under :class:`StorageError`.

Each class carries a stable ``code`` that the wire protocol and the HTTP layer map to a
response, so a producer sees ``storage_full`` rather than a stack trace.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error the storage layer raises on purpose."""

    code = "storage_error"


class CorruptBatch(StorageError):
    """A record batch failed validation: bad magic, length, checksum or record section."""

    code = "corrupt_batch"


class IncompleteBatch(CorruptBatch):
    """The input ends before the batch does (a truncated frame or a torn log tail)."""

    code = "incomplete_batch"


class OffsetOutOfRange(StorageError):
    """A read asked for an offset below the log start or above the high watermark."""

    code = "offset_out_of_range"

    def __init__(self, offset: int, log_start: int, high_watermark: int) -> None:
        super().__init__(
            f"offset {offset} is outside [{log_start}, {high_watermark}] "
            f"(log start, high watermark)"
        )
        self.offset = offset
        self.log_start = log_start
        self.high_watermark = high_watermark


class StorageFull(StorageError):
    """The disk is full (ENOSPC/EDQUOT). The append was rolled back and not acknowledged."""

    code = "storage_full"


class LogOffline(StorageError):
    """The partition stopped taking writes after an I/O error it cannot trust (e.g. a failed
    fsync: the page cache may have dropped the data, so retrying the sync proves nothing)."""

    code = "log_offline"


class DuplicateSequence(StorageError):
    """An idempotent producer re-sent a batch the log already holds (not an error for the
    producer: the broker answers with the original offsets)."""

    code = "duplicate_sequence"


class OutOfOrderSequence(StorageError):
    """An idempotent producer skipped sequence numbers or went backwards beyond the window the
    log remembers; the producer must reset (new producer id)."""

    code = "out_of_order_sequence"


class LogClosed(StorageError):
    """The partition or log was closed."""

    code = "log_closed"
