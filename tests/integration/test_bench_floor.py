"""``bench.peers.bare_produce``, the floor ``bench.roundtrip --floor`` measures Herald
against, does what its figures claim: it answers Herald's own client, checks each batch
(a damaged one is refused, not written) and writes the batches it acknowledges, stamped with
their offsets, where the next begins."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.peers.herald_node import REPO
from bench.peers.process import HOST, ServerProcess, free_port, port_open
from broker import protocol as p
from broker.client import BrokerError, Client
from storage import records


@pytest.fixture
def floor(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, log = free_port(), tmp_path / "floor.log"
    server = ServerProcess(
        "bare produce",
        [sys.executable, "-m", "bench.peers.bare_produce", str(port), str(log)],
        log_path=tmp_path / "floor.out",
        cwd=REPO,
    )
    server.start(lambda: port_open(port))
    try:
        yield port, log
    finally:
        server.stop()


async def test_the_floor_acknowledges_what_it_checked_and_wrote(floor: tuple[int, Path]) -> None:
    port, log = floor
    async with await Client.connect(HOST, port, client_id="floor") as client:
        await client.create_topic("roundtrip", 1, exist_ok=True)
        producer = await client.producer(acks=-1, linger_ms=0.0)
        metas = [await producer.send("roundtrip", b"v%d" % i, partition=0) for i in range(3)]
        assert [m.offset for m in metas] == [0, 1, 2]
        raw = bytearray(records.encode_batch([(0, None, b"damaged")], first_timestamp=1))
        raw[-1] ^= 0xFF  # the body no longer matches its checksum
        damaged = p.Produce(id=0, topic="roundtrip", batches=[bytes(raw)], partition=0)
        with pytest.raises(BrokerError) as refused:
            await client.request(damaged, retries=0)
        assert refused.value.code == "corrupt_batch"
    data = log.read_bytes()
    found, pos = [], 0
    for _ in range(3):  # back to back from the start of the file, each whole and valid
        header = records.parse_header(data[pos : pos + records.HEADER_SIZE])
        batch = data[pos : pos + header.batch_length]
        records.validate_batch(batch)
        found += [(header.base_offset, r.value) for r in records.decode_records(batch, header)]
        pos += header.batch_length
    assert found == [(0, b"v0"), (1, b"v1"), (2, b"v2")]
    assert not data[pos : pos + records.HEADER_SIZE].strip(b"\0"), "the damaged batch was written"
