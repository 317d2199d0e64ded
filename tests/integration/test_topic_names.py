"""Topic names are per tenant ("medium and low" of issue 13): two tenants each have
"orders", a tenant can neither confirm nor squat another's names, the operator sees and
addresses the stored names, and topics made before (names global, owner in LMDB) keep
working for their owner after the upgrade, with the owner moved into topic.meta.

Real node; beta (a :class:`Bystander`) is served throughout."""

from __future__ import annotations

import time

import msgspec
import pytest

from broker import errors
from broker import protocol as p
from broker.client import BrokerError
from storage import records
from storage.kv import KV
from storage.log import META_FILE, Log, TopicMeta
from storage.partition import PartitionConfig

from .conftest import NodeFactory
from .tenants import ACME, BETA, OPERATOR, Bystander, config, connect, http_json


async def test_two_tenants_each_have_their_own_orders(herald_factory: NodeFactory) -> None:
    node = herald_factory(config=config())
    async with (
        await connect(node, ACME) as acme,
        await connect(node, BETA) as beta,
        Bystander(node) as bystander,
    ):
        # what beta is told about a name acme holds is what it is told about a free name
        await acme.create_topic("orders", 2)
        held = http_json(node, "GET", "/topics/orders", key=BETA)
        free = http_json(node, "GET", "/topics/never-made", key=BETA)
        assert held[0] == free[0] == 404
        assert held[1]["error"]["message"].replace("orders", "X") == free[1]["error"][
            "message"
        ].replace("never-made", "X")
        # and it may take the name for itself, without touching acme's
        info = await beta.create_topic("orders", 5)
        assert (info.name, len(info.partitions)) == ("orders", 5)
        acme_producer = await acme.producer()
        beta_producer = await beta.producer()
        await acme_producer.send("orders", b"acme's", partition=0)
        await beta_producer.send("orders", b"beta's", partition=0)
        (a,) = await acme.fetch([("orders", 0, 0)])
        (b,) = await beta.fetch([("orders", 0, 0)])
        assert b"acme's" in a.records and b"beta's" not in a.records
        assert b"beta's" in b.records and b"acme's" not in b.records
        assert [t.name for t in await acme.metadata()] == ["orders"]
        assert len((await acme.metadata(["orders"]))[0].partitions) == 2
        with pytest.raises(BrokerError) as info:
            await beta.create_topic("orders", 1)
        assert info.value.code == errors.TopicExists.code
        # the operator sees the stored names, and can act on them
        async with await connect(node, OPERATOR) as op:
            names = [t.name for t in await op.metadata()]
            assert {"acme~orders", "beta~orders", "__events"} <= set(names)
            (res,) = await op.fetch([("acme~orders", 0, 0)])
            assert b"acme's" in res.records
            await op.create_topic("acme~made-by-op", 1)
            await op.delete_topic("beta~orders")
        assert "made-by-op" in [t.name for t in await acme.metadata()]
        assert "orders" not in [t.name for t in await beta.metadata()]
        (a,) = await acme.fetch([("orders", 0, 0)])
        assert b"acme's" in a.records  # acme's survived the delete of beta's
    bystander.check(250)
    await bystander.served_after()


class _LegacyOwner(msgspec.Struct, array_like=True):
    tenant: str


async def test_topics_made_before_keep_their_names_for_their_owner(
    herald_factory: NodeFactory,
) -> None:
    node = herald_factory(config=config(), start=False)
    # the layout of the previous version: names global, the owner in an LMDB table
    log = Log(node.data_dir)
    log.create_topic("ledger", 1, PartitionConfig())  # owner None: not in topic.meta
    log.create_topic("orphan", 1, PartitionConfig())
    await log.close()
    kv = KV(node.data_dir / "state")
    kv.table("topic_owners", _LegacyOwner).put("ledger", _LegacyOwner("acme"))
    kv.close()
    node.start()
    async with await connect(node, ACME) as acme, Bystander(node) as bystander:
        assert [t.name for t in await acme.metadata()] == ["ledger"]
        resp = await acme.request(p.Produce(id=0, topic="ledger", partition=0, batches=[_batch()]))
        assert isinstance(resp, p.Produced)
        async with await connect(node, BETA) as beta:
            assert "ledger" not in [t.name for t in await beta.metadata()]
            await beta.create_topic("ledger", 1)  # its own, beside acme's
        async with await connect(node, OPERATOR) as op:
            names = {t.name for t in await op.metadata()}
            assert {"ledger", "orphan", "beta~ledger"} <= names
    bystander.check(250)
    await bystander.served_after()
    meta = msgspec.msgpack.decode(
        (node.data_dir / "log" / "ledger" / META_FILE).read_bytes(), type=TopicMeta
    )
    assert meta.owner == "acme"
    meta = msgspec.msgpack.decode(
        (node.data_dir / "log" / "orphan" / META_FILE).read_bytes(), type=TopicMeta
    )
    assert meta.owner == "*"  # no owner known: the operator's, as it was visible only to it
    node.restart()
    async with await connect(node, ACME) as acme:
        assert [t.name for t in await acme.metadata()] == ["ledger"]


def _batch() -> bytes:
    return records.encode_batch([(0, None, b"x")], first_timestamp=time.time_ns() // 1_000_000)
