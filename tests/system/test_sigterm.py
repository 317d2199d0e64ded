"""SIGTERM under load: the node drains and exits 0 within 5 s, and every record it
acknowledged with acks=all is there, byte for byte, after a restart on the same data
directory. A second node on a data directory in use refuses to start."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from herald_process import HeraldProcess

from broker import protocol as p
from broker.client import BrokerError, Client
from storage import records

# bounds on the node's CPU time or latency: run alone, after the parallel pass (make test)
pytestmark = pytest.mark.serial

TOPIC = "ledger"
IDLE_TOPIC = "quiet"
PARTITIONS = 4
PRODUCERS = 4
EXIT_WITHIN_S = 5.0


@dataclass
class Acked:
    partition: int
    base_offset: int
    batch: bytes  # exactly what was sent


@dataclass
class Load:
    acked: list[Acked] = field(default_factory=list)
    stopped_by: list[BaseException] = field(default_factory=list)
    polls_answered_at: list[float] = field(default_factory=list)


async def produce_until_refused(node: HeraldProcess, k: int, load: Load) -> None:
    client = Client(node.host, node.tcp_port, client_id=f"producer-{k}")
    try:
        n = 0
        while True:
            rows: list[records.RecordInput] = [
                (i, b"p%d" % k, b"producer-%d batch-%d record-%d " % (k, n, i) + bytes(64))
                for i in range(20)
            ]
            batch = records.encode_batch(rows, first_timestamp=1_700_000_000_000 + n)
            partition = (k + n) % PARTITIONS
            try:
                resp = await client.request(
                    p.Produce(id=0, topic=TOPIC, partition=partition, batches=[batch], acks=-1),
                    retries=0,
                )
            except (BrokerError, OSError) as exc:
                load.stopped_by.append(exc)
                return
            assert isinstance(resp, p.Produced), resp
            assert resp.last_offset - resp.base_offset == 19
            load.acked.append(Acked(resp.partition, resp.base_offset, batch))
            n += 1
    finally:
        await client.close()


async def long_poll_until_refused(node: HeraldProcess, load: Load) -> None:
    """A consumer parked in a long poll on a topic nobody writes to: shutdown must not wait
    for its max_wait."""
    client = Client(node.host, node.tcp_port, client_id="tailer")
    try:
        while True:
            try:
                await client.fetch([(IDLE_TOPIC, 0, 0)], max_wait_ms=30_000)
            except (BrokerError, OSError):
                return
            load.polls_answered_at.append(time.monotonic())
    finally:
        await client.close()


async def stored_batches(client: Client, partition: int) -> dict[int, bytes]:
    """base offset -> the stored batch, for the whole partition."""
    out: dict[int, bytes] = {}
    offset = 0
    while True:
        (res,) = await client.fetch([(TOPIC, partition, offset)])
        assert res.error is None, res
        if not res.records:
            return out
        for pos, h in records.iter_batches(res.records):
            out[h.base_offset] = res.records[pos : pos + h.batch_length]
            offset = h.next_offset


async def test_sigterm_under_load_exits_0_in_time_and_keeps_every_acked_record(
    tmp_path: Path,
) -> None:
    node = HeraldProcess(tmp_path / "data", tmp_path)
    try:
        node.start()
        async with await Client.connect(node.host, node.tcp_port) as admin:
            await admin.create_topic(TOPIC, PARTITIONS)
            await admin.create_topic(IDLE_TOPIC, 1)
        load = Load()
        tasks = [asyncio.ensure_future(produce_until_refused(node, k, load)) for k in range(3)]
        tasks.append(asyncio.ensure_future(long_poll_until_refused(node, load)))
        tasks += [
            asyncio.ensure_future(produce_until_refused(node, k, load)) for k in range(3, PRODUCERS)
        ]
        await asyncio.sleep(1.5)
        acked_before = len(load.acked)
        assert acked_before > 0
        assert not any(t.done() for t in tasks), [t for t in tasks if t.done()]

        sent_at = time.monotonic()
        node.signal(signal.SIGTERM)
        assert node.proc is not None
        try:
            code = await asyncio.get_running_loop().run_in_executor(
                None, node.proc.wait, EXIT_WITHIN_S + 10
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit after SIGTERM:\n{node.log_tail()}") from None
        took = time.monotonic() - sent_at
        assert code == 0, node.log_tail()
        assert took <= EXIT_WITHIN_S, f"exit took {took:.2f}s:\n{node.log_tail()}"
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert len(load.stopped_by) == PRODUCERS
        assert len(load.acked) >= acked_before
        # the parked long poll was answered by the drain, not cut off when it gave up
        assert any(t >= sent_at for t in load.polls_answered_at), "long poll cut off"

        node.start()  # the same data directory and ports
        async with await Client.connect(node.host, node.tcp_port) as reader:
            stored = {i: await stored_batches(reader, i) for i in range(PARTITIONS)}
        for a in load.acked:
            got = stored[a.partition].get(a.base_offset)
            assert got is not None, f"acked batch at {a.partition}/{a.base_offset} is gone"
            # the node stamps offsets into the header; the records are the producer's bytes
            assert got[records.HEADER_SIZE :] == a.batch[records.HEADER_SIZE :]
            header, recs = records.decode_batch(got)
            assert header.base_offset == a.base_offset
            assert [r.value for r in recs] == [r.value for r in records.decode_batch(a.batch)[1]]
        assert "event=stopped" in node.log_text()
    finally:
        node.close()


def exit_code_of(node: HeraldProcess, within_s: float) -> int:
    """Start ``node``, which is expected to give up; its exit code (killed if it has not
    exited within ``within_s``: the wait raises)."""
    proc = node.spawn()
    try:
        code: int = proc.wait(within_s)
        return code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_second_node_on_a_data_dir_in_use_fails_fast_naming_it(tmp_path: Path) -> None:
    node = HeraldProcess(tmp_path / "data", tmp_path / "first")
    try:
        node.start()
        intruder = HeraldProcess(tmp_path / "data", tmp_path / "second")
        code = exit_code_of(intruder, 15)
        out = intruder.log_text()
        assert code != 0, out
        assert "data directory" in out, out
        assert str(tmp_path / "data") in out, out
        assert "Traceback" not in out, out
        assert node.healthy(), "the running node must not notice"
    finally:
        node.close()


def test_a_node_whose_port_is_taken_fails_fast_in_one_line_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    """The WebSocket port is the last to be bound, after the engines and the gateway's
    reader have started: the node stops what it started (no task left reading a closed
    state store), says which address is taken, in one line, and exits 1."""
    node = HeraldProcess(tmp_path / "data", tmp_path / "work")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((node.host, node.ws_port))
        taken.listen()
        code = exit_code_of(node, 30)
    out = node.log_text()
    assert code == 1, out
    assert "herald: cannot listen: error while attempting to bind on address" in out, out
    assert f"('{node.host}', {node.ws_port}): address already in use" in out, out
    assert "component_stopped component=gateway" in out, out
    assert "Traceback" not in out, out
    assert "exception was never retrieved" not in out, out
