"""The storage layer's exceptions: one hierarchy under :class:`StorageError`.

Each class carries a stable ``code``, whether a client may retry (``retriable``) and the HTTP
status that fits it (``http_status``): the broker's transports answer from these three
attributes (``broker/errors.py`` describes the whole vocabulary), so a producer sees
``storage_full`` rather than a stack trace.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error the storage layer raises on purpose."""

    code = "storage_error"
    retriable = False
    http_status = 500


class CorruptBatch(StorageError):
    """A record batch failed validation: bad magic, length, checksum or record section."""

    code = "corrupt_batch"
    retriable = False
    http_status = 400


class IncompleteBatch(CorruptBatch):
    """The input ends before the batch does (a truncated frame or a torn log tail)."""

    code = "incomplete_batch"
    retriable = False
    http_status = 400


class OffsetOutOfRange(StorageError):
    """A read asked for an offset below the log start or above the high watermark."""

    code = "offset_out_of_range"
    retriable = False
    http_status = 416

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
    retriable = True
    http_status = 507


class LogOffline(StorageError):
    """The partition stopped taking writes after an I/O error it cannot trust (e.g. a failed
    fsync: the page cache may have dropped the data, so retrying the sync proves nothing)."""

    code = "log_offline"
    retriable = False
    http_status = 503


class DuplicateSequence(StorageError):
    """An idempotent producer re-sent a batch the log already holds (not an error for the
    producer: the broker answers with the original offsets)."""

    code = "duplicate_sequence"
    retriable = False
    http_status = 409


class OutOfOrderSequence(StorageError):
    """An idempotent producer skipped sequence numbers or went backwards beyond the window the
    log remembers; the producer must reset (new producer id)."""

    code = "out_of_order_sequence"
    retriable = False
    http_status = 409


class LogClosed(StorageError):
    """The partition or log was closed."""

    code = "log_closed"
    retriable = True
    http_status = 503


class TopicExists(StorageError):
    code = "topic_exists"
    retriable = False
    http_status = 409


class UnknownTopic(StorageError):
    code = "unknown_topic"
    retriable = False
    http_status = 404


class TopicBeingDeleted(StorageError):
    """The name is free once the deletion in progress has moved the old files away."""

    code = "topic_being_deleted"
    retriable = True
    http_status = 409


class IllegalTransition(StorageError):
    """A state machine was asked for a move its table does not allow (the flush pipeline's
    :class:`~storage.flush.FlushState`). A bug in the storage layer, never a disk condition:
    it is raised so that the bug shows where it happens instead of corrupting state."""

    code = "illegal_transition"
    retriable = False
    http_status = 500


class CorruptData(StorageError):
    """A read reached a quarantined range of the log: stored bytes that failed their
    checksums (or whose offsets do not follow), found by recovery or by an earlier read.
    They are never served. Not retriable: the same read fails the same way until the
    consumer is moved past the range, to ``end_offset`` (what
    ``Partition.next_readable_offset`` returns); records before ``first_offset`` and from
    ``end_offset`` on are served normally."""

    code = "corrupt_data"
    retriable = False
    http_status = 500

    def __init__(
        self,
        partition: str,
        *,
        segment: int,
        position: int,
        length: int,
        first_offset: int,
        end_offset: int,
    ) -> None:
        super().__init__(
            f"partition {partition}: offsets {first_offset}..{end_offset - 1} are corrupt "
            f"({length} bytes at position {position} of segment {segment}); they are "
            f"quarantined and never served; reading from offset {end_offset} works"
        )
        self.partition = partition
        self.segment = segment
        self.position = position
        self.length = length
        self.first_offset = first_offset
        self.end_offset = end_offset
