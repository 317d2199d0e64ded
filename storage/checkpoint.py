"""The recovery checkpoint of a partition: where its log was last known synced, and the
idempotent-producer table as of that point.

Written atomically (temporary file, fsync, rename, fsync of the directory) so a crash leaves
either the old or the new checkpoint, never a torn one; a checksum guards against the rest.
A missing or unreadable checkpoint is not an error: recovery then scans the whole log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import msgspec
import xxhash

from storage.durable import replace_file
from storage.producers import ProducerEntry

FILE_NAME: Final = "recovery-checkpoint"
_VERSION: Final = 1


class Checkpoint(msgspec.Struct, frozen=True):
    """``segment_base``/``position``: the first ``position`` bytes of that segment, and every
    segment before it, hold synced, valid batches. ``next_offset`` is the offset after them."""

    version: int
    segment_base: int
    position: int
    next_offset: int
    producers: list[ProducerEntry] = []


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Checkpoint)


def write_checkpoint(directory: Path, checkpoint: Checkpoint) -> None:
    """Atomically replace the checkpoint. Blocking (two fsyncs): run it off the event loop."""
    body = _encoder.encode(checkpoint)
    replace_file(directory, FILE_NAME, xxhash.xxh3_64_intdigest(body).to_bytes(8, "little") + body)


def read_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint, or None if it is missing, torn or of an unknown version."""
    try:
        data = (directory / FILE_NAME).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < 8 or int.from_bytes(data[:8], "little") != xxhash.xxh3_64_intdigest(data[8:]):
        return None
    try:
        checkpoint = _decoder.decode(data[8:])
    except msgspec.DecodeError:
        return None
    return checkpoint if checkpoint.version == _VERSION else None


def new_checkpoint(
    segment_base: int, position: int, next_offset: int, producers: list[ProducerEntry]
) -> Checkpoint:
    return Checkpoint(_VERSION, segment_base, position, next_offset, producers)
