"""The log under power cuts: a real node on the power-loss filesystem, producers writing with
``acks=all``, the power cut at random moments (after SIGKILL), the node started again on what
the disk kept. Every acknowledged record must be there, at its offset, byte for byte, and
no acknowledged offset is ever given to another record.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from .herald_power import PowerNode, read_partition, run_until_cut

# the smallest segments the node takes, with large records, so cuts land around rolls (a
# new file and a directory fsync) and checkpoints (a rename and a directory fsync) too
SMALL_SEGMENTS = """
[storage]
segment-bytes = 1048576
checkpoint-interval-ms = 100
"""
TOPIC = "acked"
PARTITIONS = 3


async def acked_records_survive(
    node: PowerNode, cuts: int, seed: int, *, max_value: int = 900
) -> int:
    rng = random.Random(seed)
    acked: dict[tuple[int, int], bytes] = {}
    reused: list[str] = []
    async with await node.connect() as client:
        await client.create_topic(TOPIC, PARTITIONS)
    for cut in range(cuts):
        delay = rng.uniform(0.02, 1.0)
        async with await node.connect() as client:
            producer = await client.producer(acks=-1, linger_ms=0, idempotent=False)

            def worker(w: int, producer: Any = producer, cut: int = cut) -> Any:
                async def run() -> None:
                    for i in range(1_000_000):
                        pad = rng.randbytes(rng.randint(0, max_value))
                        value = b"cut%d-w%d-%d" % (cut, w, i) + pad
                        md = await producer.send(TOPIC, value)
                        old = acked.get((md.partition, md.offset))
                        if old is not None and old != value:
                            reused.append(f"{md.partition}@{md.offset}")
                        acked[(md.partition, md.offset)] = value

                return run

            await run_until_cut(node, [worker(w) for w in range(4)], delay)
        node.process.start()
        context = f"seed {seed}, cut {cut} at {delay:.3f}s\n{node.diagnosis()}"
        assert not reused, f"acknowledged offsets given again: {reused[:10]}; {context}"
        async with await node.connect() as client:
            for part in range(PARTITIONS):
                stored = await read_partition(client, TOPIC, part)
                for (p, offset), value in acked.items():
                    if p != part:
                        continue
                    rec = stored.get(offset)
                    assert rec is not None, f"acked record {p}@{offset} lost; {context}"
                    assert rec.value == value, f"acked record {p}@{offset} changed; {context}"
    return len(acked)


async def test_acked_records_survive_power_cuts(power_node: PowerNode) -> None:
    seed = random.randrange(2**32)
    n = await acked_records_survive(power_node, cuts=4, seed=seed)
    assert n > 0
    print(f"power cuts: seed={seed} acked={n} stats={power_node.fs.stats()}")


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_acked_records_survive_many_power_cuts(power_node: PowerNode) -> None:
    seed = random.randrange(2**32)
    n = await acked_records_survive(power_node, cuts=40, seed=seed)
    assert n > 0


@pytest.fixture
def small_segment_node(powerfs: Any, tmp_path: Any, request: Any) -> Any:
    node = PowerNode(powerfs, tmp_path / "node", config=SMALL_SEGMENTS)
    node.no_power_loss = request.config.getoption("--no-power-loss")
    try:
        node.start()
        yield node
    finally:
        node.close()


async def test_acked_records_survive_power_cuts_across_segment_rolls(
    small_segment_node: PowerNode,
) -> None:
    seed = random.randrange(2**32)
    n = await acked_records_survive(small_segment_node, cuts=4, seed=seed, max_value=30_000)
    assert n > 0
    # topic names are per tenant: the open node's tenant is "default", stored "default~<name>"
    stored = f"default~{TOPIC}"
    segments = list((small_segment_node.fs.mountpoint / "log" / stored).glob("*/*.log"))
    assert len(segments) > PARTITIONS, "no segment rolled: the test did not test rolls"


async def test_fresh_node_layout_survives_power_cut(powerfs: Any, tmp_path: Any) -> None:
    node = PowerNode(powerfs, tmp_path / "node")
    try:
        node.start()
        async with await node.connect() as client:
            await client.create_topic("fresh", 1)
            producer = await client.producer(acks=-1, linger_ms=0)
            md = await producer.send("fresh", b"acknowledged")
        node.power_cut_and_restart()
        async with await node.connect() as client:
            assert await client.partition_count("fresh") == 1, node.diagnosis()
            stored = await read_partition(client, "fresh", 0)
        assert stored[md.offset].value == b"acknowledged", node.diagnosis()
    finally:
        node.close()
