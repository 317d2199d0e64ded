"""Fuzz the TCP protocol of a real node: valid requests, mutated requests and broken framing.

Two kinds of cases:

- **framed** cases (a correct length prefix around a bad or good payload: bit flips,
  truncated or spliced payloads, wrong field types, unknown ops, missing and unknown fields,
  garbage and deeply nested msgpack) are pipelined on one connection, followed by a probe
  request. Each must get exactly one reply that is a well-formed response (an ``Error`` with a
  code when the request is bad, never ``internal_error``) and the connection must stay usable:
  the probe is answered.
- **framing** cases (a random or huge declared length, a frame cut short, a partial prefix)
  each get their own connection: the node answers with ``Error`` frames or closes it, and
  nothing else.

Meanwhile a well-behaved client in another thread keeps producing and fetching on the same
node; at the end it must have seen no error and the node must still be serving.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import errors
from broker import protocol as p
from broker.client import Client
from storage import records

from .herald_process import HeraldProcess, Nodes
from .raw_wire import RawConnection, WireClosed

MAX_FRAME = 1024 * 1024
# long polls are capped by the node, so a mutated fetch cannot hold a reply for long
NODE_CONFIG = f"""
[limits]
max-frame-bytes = {MAX_FRAME}
max-batch-bytes = {MAX_FRAME // 2}
max-wait-ms = 300
"""
TOPIC = "fuzz"
GOOD_TOPIC = "steady"
DEFAULT_EXAMPLES = 700  # x ~16 cases each: over 10,000 cases
SLOW_EXAMPLES = 8_000
_LEN = struct.Struct(">I")
_enc = msgspec.msgpack.Encoder()
_dict_dec = msgspec.msgpack.Decoder(dict[str, Any])


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldProcess]:
    nodes = Nodes(tmp_path_factory.mktemp("fuzz"))
    try:
        n = nodes(config=NODE_CONFIG)
        with RawConnection(n.host, n.tcp_port) as conn:
            for name in (TOPIC, GOOD_TOPIC):
                resp = conn.request(p.CreateTopic(id=1, topic=name, partitions=2))
                assert isinstance(resp, p.TopicCreated)
        yield n
    finally:
        nodes.close()


# ----------------------------------------------------------------------- strategies
ids = st.integers(0, 2**64 - 1)
ints = st.integers(-3, 5) | st.integers(-(2**63), 2**64 - 1)
names = st.sampled_from([TOPIC, TOPIC, "fz-other", "nope", "", "x" * 201, "__events", "a/b"])
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def batches(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=120))
    values = draw(st.lists(st.binary(max_size=30), min_size=1, max_size=4))
    idem = draw(st.booleans())
    return records.encode_batch(
        [(0, draw(st.none() | st.binary(max_size=6)), v) for v in values],
        first_timestamp=draw(st.integers(0, 2**40)),
        producer_id=draw(st.integers(0, 50)) if idem else records.NO_PRODUCER,
        base_sequence=draw(st.integers(0, 20)) if idem else records.NO_SEQUENCE,
    )


fetch_partitions = st.builds(
    p.FetchPartition,
    topic=names,
    partition=st.integers(-1, 3),
    offset=st.integers(-2, 40) | ints,
    max_bytes=st.integers(-10, 1 << 16),
)
groups = st.sampled_from(["g1", "g2", ""]) | st.text(max_size=6)
# requests whose mutations are harmless to the node's state; admin requests (create and
# delete topic) are sent only as generated, so a bit flip cannot make or drop arbitrary topics
requests: st.SearchStrategy[Any] = st.one_of(
    st.builds(
        p.Hello,
        id=ids,
        version=st.sampled_from([p.PROTOCOL_VERSION, 0, 2]),
        client_id=st.text(max_size=8),
        api_key=st.none() | st.text(max_size=20),
    ),
    st.builds(
        p.Produce,
        id=ids,
        topic=names,
        batches=st.lists(batches(), max_size=3),
        partition=st.none() | st.integers(-1, 3) | ints,
        key=st.none() | st.binary(max_size=8),
        acks=st.sampled_from([0, 1, -1]),
    ),
    st.builds(
        p.Fetch,
        id=ids,
        partitions=st.lists(fetch_partitions, max_size=3),
        max_wait_ms=st.integers(-5, 50),
        min_bytes=st.integers(-1, 1 << 20),
        max_bytes=st.integers(-1, 1 << 20),
    ),
    st.builds(
        p.ListOffsets,
        id=ids,
        topic=names,
        partition=st.integers(-1, 3),
        spec=st.sampled_from(["earliest", "latest"]) | ints,
    ),
    st.builds(p.Metadata, id=ids, topics=st.none() | st.lists(names, max_size=3)),
    st.builds(p.InitProducer, id=ids),
    st.builds(
        p.JoinGroup,
        id=ids,
        group=groups,
        topics=st.lists(names, max_size=3),
        member_id=st.none() | st.text(max_size=8),
        session_timeout_ms=st.none() | st.sampled_from([-1, 0, 999, 1000, 2000]) | ints,
        assignor=st.sampled_from([None, "range", "sticky"]),
    ),
    st.builds(
        p.Heartbeat,
        id=ids,
        group=groups,
        member_id=st.text(max_size=8),
        generation=ints,
        owned=st.lists(st.tuples(names, st.integers(-1, 3)), max_size=3),
    ),
    st.builds(p.LeaveGroup, id=ids, group=groups, member_id=st.text(max_size=8)),
    st.builds(
        p.CommitOffsets,
        id=ids,
        group=groups,
        offsets=st.lists(st.tuples(names, st.integers(-1, 3), ints), max_size=3),
        member_id=st.none() | st.text(max_size=8),
        generation=ints,
        metadata=st.text(max_size=10),
    ),
    st.builds(
        p.FetchOffsets,
        id=ids,
        group=groups,
        partitions=st.none() | st.lists(st.tuples(names, st.integers(-1, 3)), max_size=3),
    ),
    st.builds(p.ListGroups, id=ids),
    st.builds(p.DescribeGroup, id=ids, group=groups),
)
admin_requests: st.SearchStrategy[Any] = st.one_of(
    st.builds(
        p.CreateTopic,
        id=ids,
        topic=st.sampled_from(["fz-made", "fz-made", "", "__x", TOPIC]),
        partitions=st.none() | st.integers(-1, 2),
        retention_ms=st.none() | ints,
        retention_bytes=st.none() | ints,
        exist_ok=st.booleans(),
    ),
    st.builds(p.DeleteTopic, id=ids, topic=st.sampled_from(["fz-made", "nope", "__events", ""])),
)


# ------------------------------------------------------------------------- mutations
def mutate(rng: random.Random, payload: bytes, value: object) -> bytes:
    """One malformed payload derived from a valid one."""
    kind = rng.randrange(10)
    data = bytearray(payload)
    if kind == 0 and data:  # bit flips
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == 1 and data:  # a byte replaced by an interesting one
        data[rng.randrange(len(data))] = rng.choice([0x00, 0xC0, 0xC1, 0xDC, 0xDD, 0xDF, 0xFF])
        return bytes(data)
    if kind == 2:  # truncated payload (the frame itself is well formed)
        return bytes(data[: rng.randrange(len(data) + 1)])
    if kind == 3:  # trailing garbage
        return bytes(data) + rng.randbytes(rng.randint(1, 16))
    if kind == 4 and data:  # a span replaced by random bytes
        i = rng.randrange(len(data))
        j = min(len(data), i + rng.randint(1, 12))
        return bytes(data[:i]) + rng.randbytes(j - i) + bytes(data[j:])
    fields = _dict_dec.decode(payload)
    if kind == 5:  # a field of the wrong type
        victim = rng.choice(sorted(fields))
        fields[victim] = value
    elif kind == 6:  # an unknown op
        fields["op"] = rng.choice(["", "produce ", "PRODUCE", "drop_table", "\x00", "error"])
    elif kind == 7:  # a field dropped
        fields.pop(rng.choice(sorted(fields)))
    elif kind == 8:  # an unknown field
        fields[rng.choice(["x", "opp", "Id", ""])] = value
    else:  # the op tag as another type
        fields["op"] = value
    return _enc.encode(fields)


def garbage(rng: random.Random, value: object) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 64))
    if kind == 1:
        return _enc.encode(value)
    if kind == 2:  # nesting deeper than any decoder's recursion limit
        depth = rng.choice([100, 5_000, 200_000])
        opener = rng.choice([b"\x91", b"\x81\xa1k"])
        return b"\x82\xa1x" + opener * depth + b"\xc0" + b"\xa2op\xa5hello"
    return b"\x82\xa2op" + rng.randbytes(rng.randint(0, 40))


def framing_attack(rng: random.Random, frame: bytes) -> tuple[str, bytes, bool]:
    """(kind, bytes, expect_close_without_eof): send these on a fresh connection."""
    kind = rng.randrange(4)
    if kind == 0:  # a declared length over the limit: refused at once, then closed
        size = rng.choice([MAX_FRAME + 1, 2**31, 2**32 - 1, rng.randint(MAX_FRAME + 1, 2**32 - 1)])
        return "huge", _LEN.pack(size) + rng.randbytes(rng.randint(0, 32)), True
    if kind == 1:  # a random length prefix, within the limit, around random bytes
        size = rng.choice([0, 1, 3, rng.randint(0, 4096), rng.randint(0, MAX_FRAME)])
        return "random_length", _LEN.pack(size) + rng.randbytes(rng.randint(0, 64)), False
    if kind == 2:  # a valid frame cut short
        return "cut", frame[: rng.randrange(len(frame))], False
    return "partial_prefix", frame[: rng.randint(1, 3)], False


# ------------------------------------------------------------------------- the good client
class SteadyClient(threading.Thread):
    """Produces one record at a time with acks=all and fetches it back, on its own loop."""

    def __init__(self, node: HeraldProcess) -> None:
        super().__init__(name="steady-client", daemon=True)
        self.node = node
        self.stop_event = threading.Event()
        self.rounds = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self.errors.append(exc)

    async def _run(self) -> None:
        async with await Client.connect(self.node.host, self.node.tcp_port) as client:
            expected = await client.list_offsets(GOOD_TOPIC, 0)
            while not self.stop_event.is_set():
                value = b"steady-%d" % self.rounds
                batch = records.encode_batch([(0, None, value)], first_timestamp=1)
                resp = await client.request(
                    p.Produce(id=0, topic=GOOD_TOPIC, partition=0, batches=[batch])
                )
                assert isinstance(resp, p.Produced), resp
                assert resp.base_offset == expected, (resp, expected)
                (res,) = await client.fetch([(GOOD_TOPIC, 0, expected)])
                assert res.error is None, res
                (pos, header), *_ = list(records.iter_batches(res.records))
                recs = records.decode_records(res.records[pos : pos + header.batch_length], header)
                assert recs[expected - header.base_offset].value == value
                expected += 1
                self.rounds += 1
                await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- checks
class Tally:
    def __init__(self) -> None:
        self.framed = 0
        self.framing = 0
        self.errors: dict[str, int] = {}
        self.closed_by_node = 0


def check_reply(resp: p.Response, tally: Tally) -> None:
    if isinstance(resp, p.Error):
        assert resp.code, resp
        assert resp.code != errors.Internal.code, f"the node failed on a request: {resp}"
        tally.errors[resp.code] = tally.errors.get(resp.code, 0) + 1


def run_framed(conn: RawConnection, payloads: list[bytes], probe_id: int, tally: Tally) -> None:
    """Pipeline ``payloads`` and a probe; expect exactly one reply each, probe included."""
    probe = p.Metadata(id=probe_id, topics=[TOPIC])
    conn.send_bytes(b"".join(p.encode_frame(x) for x in payloads) + p.encode_message(probe))
    replies = [conn.recv() for _ in range(len(payloads) + 1)]
    probes = [r for r in replies if r.id == probe_id and isinstance(r, p.MetadataResult)]
    assert probes, f"the probe was not answered; replies: {replies}"
    for resp in replies:
        check_reply(resp, tally)
    tally.framed += len(payloads)


def run_framing(node: HeraldProcess, kind: str, data: bytes, closes: bool, tally: Tally) -> None:
    with RawConnection(node.host, node.tcp_port, timeout=15) as conn:
        try:
            conn.send_bytes(data)
            if not closes:
                conn.sock.shutdown(socket.SHUT_WR)  # EOF mid-frame: the node must hang up
        except (BrokenPipeError, ConnectionResetError):
            pass  # already refused and closed
        replies = conn.read_until_closed()
    for resp in replies:
        assert isinstance(resp, p.Error), (kind, resp)
        check_reply(resp, tally)
    if kind == "huge":
        assert [r.code for r in replies] == [errors.FrameTooLarge.code], replies
        tally.closed_by_node += 1
    tally.framing += 1


def fuzz(node: HeraldProcess, examples: int) -> Tally:
    tally = Tally()
    conn = RawConnection(node.host, node.tcp_port, timeout=20)
    probe_ids = iter(range(2**63, 2**64))

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        req=requests,
        admin=st.none() | admin_requests,
        values=st.lists(msgpack_values, min_size=3, max_size=3),
        seed=st.integers(0, 2**32),
    )
    def example(req: Any, admin: Any, values: list[object], seed: int) -> None:
        rng = random.Random(seed)
        payload = _enc.encode(req)
        payloads = [payload]
        payloads += [mutate(rng, payload, values[i % 3]) for i in range(12)]
        payloads += [garbage(rng, values[i]) for i in range(2)]
        if admin is not None:
            payloads.append(_enc.encode(admin))
        rng.shuffle(payloads)
        try:
            run_framed(conn, payloads, next(probe_ids), tally)
        except WireClosed:
            pytest.fail("the node closed a connection over a well-framed request")
        run_framing(node, *framing_attack(rng, p.encode_frame(payload)), tally)

    try:
        example()
    finally:
        conn.close()
    return tally


def assert_survived(node: HeraldProcess, steady: SteadyClient) -> None:
    steady.stop_event.set()
    steady.join(30)
    assert not steady.is_alive()
    assert steady.errors == [], steady.errors
    assert steady.rounds > 20, f"the good client made only {steady.rounds} rounds"
    assert node.running, f"the node died:\n{node.log_tail()}"
    assert node.healthy()
    assert "Traceback" not in node.log_text(), node.log_tail(80)


def run_campaign(node: HeraldProcess, examples: int, min_cases: int) -> Tally:
    steady = SteadyClient(node)
    steady.start()
    try:
        tally = fuzz(node, examples)
    finally:
        steady.stop_event.set()
    assert_survived(node, steady)
    assert tally.framed + tally.framing >= min_cases, vars(tally)
    # the generators reach the interesting errors, not just one kind
    for code in (errors.BadFrame.code, errors.InvalidRequest.code, errors.UnknownTopic.code):
        assert tally.errors.get(code, 0) > 0, tally.errors
    return tally


def test_fuzzed_frames_get_error_replies_and_never_stop_the_node(node: HeraldProcess) -> None:
    run_campaign(node, DEFAULT_EXAMPLES, 10_000)


@pytest.mark.slow
def test_fuzzed_frames_long_run(node: HeraldProcess) -> None:
    run_campaign(node, SLOW_EXAMPLES, 100_000)


def test_deeply_nested_request_is_answered_and_the_connection_stays_usable(
    node: HeraldProcess,
) -> None:
    with RawConnection(node.host, node.tcp_port) as conn:
        nested = b"\x82\xa1x" + b"\x91" * 200_000 + b"\xc0" + b"\xa2op\xa5hello"
        conn.send_bytes(p.encode_frame(nested) + p.encode_message(p.ListGroups(id=7)))
        first, second = conn.recv(), conn.recv()
        assert isinstance(first, p.Error)
        assert first.code == errors.BadFrame.code
        assert isinstance(second, p.GroupsListed)
        assert second.id == 7
