"""The floor under Herald's one-at-a-time produce: a bare server of Herald's wire protocol.

    python -m bench.peers.bare_produce PORT FILE

It answers what :class:`broker.client.Client` asks before producing (hello, create topic,
metadata, a producer id) with fixed replies, and a produce as a durable server at its
leanest would: decode the frame, check and stamp the one batch
(:func:`storage.records.accept_batch`: its CRC, its header, offsets assigned), write it with
``pwritev`` into a file whose blocks exist (64 MiB written ahead, as Herald's fill), then
``fdatasync`` on the loop, then reply. No authentication, no producer sequence table, no
index, no checkpoint, no group commit, one partition, no concurrency: not a broker, only the
cost of Python, uvloop and the protocol around the same disk round trip.
:mod:`bench.roundtrip` runs it beside Herald and Redis-always, so a gap between Herald and
Redis-always can be split into what the node's own layers cost and what no Python server of
this protocol can avoid.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import cast

from broker import protocol as p
from storage import records
from storage.errors import CorruptBatch

PREWRITE_BYTES = 64 << 20


class BareProduce(asyncio.Protocol):
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.position = 0
        self.next_offset = 0
        self.decoder = p.FrameDecoder(16 << 20)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for frame in self.decoder.feed(data):
            self.transport.write(p.encode_message(self.answer(p.decode_request(frame))))

    def answer(self, req: p.Request) -> p.Response:
        if isinstance(req, p.Produce):
            batch = req.batches[0]
            try:
                head, header = records.accept_batch(batch, self.next_offset, 0)
            except CorruptBatch as exc:  # refused, not written, as any server must
                return p.Error(id=req.id, code=CorruptBatch.code, message=str(exc))
            os.pwritev(self.fd, [head, memoryview(batch)[records.HEADER_SIZE :]], self.position)
            os.fdatasync(self.fd)
            base = self.next_offset
            self.position += len(batch)
            self.next_offset += header.record_count
            return p.Produced(
                id=req.id,
                topic=req.topic,
                partition=0,
                base_offset=base,
                last_offset=self.next_offset - 1,
            )
        if isinstance(req, p.Hello):
            return p.HelloOk(
                id=req.id, version=p.PROTOCOL_VERSION, node_id=0, tenant="bare", scopes=["admin"]
            )
        topic = p.TopicInfo(
            name="roundtrip",
            partitions=[p.PartitionInfo(0, 0, 0, self.next_offset, self.position, 1)],
            internal=False,
            retention_ms=None,
            retention_bytes=None,
        )
        if isinstance(req, p.CreateTopic):
            return p.TopicCreated(id=req.id, topic=topic, created=True)
        if isinstance(req, p.Metadata):
            return p.MetadataResult(id=req.id, node_id=0, topics=[topic])
        if isinstance(req, p.InitProducer):
            return p.ProducerId(id=req.id, producer_id=1)
        return p.Error(id=req.id, code="unsupported", message=type(req).__name__)


async def serve(port: int, path: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"\0" * PREWRITE_BYTES)
    os.fsync(fd)
    server = await asyncio.get_running_loop().create_server(
        lambda: BareProduce(fd), "127.0.0.1", port
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    import uvloop

    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[2].strip())
        raise SystemExit(0 if len(sys.argv) == 2 else 2)
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2]))


if __name__ == "__main__":
    main()
