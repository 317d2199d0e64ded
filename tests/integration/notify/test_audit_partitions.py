"""``__audit`` has a partition count of its own (``notify.audit-partitions``, default 1): it
is read only by this node's audit indexer, and every partition a stage's batch touches is a
write-and-sync round (docs/NOTIFY.md). The count is fixed when the topic is created: a node
whose ``__audit`` was made with more partitions (every node before the setting existed had
``notify.partitions`` of them) keeps them, and its events' transitions are still folded."""

from __future__ import annotations

from pathlib import Path

from broker.config import NotifyConfig

from .conftest import NodeFactory, RunningNode

USERS = [f"u{i:02d}" for i in range(12)]


def partitions(node: RunningNode, topic: str) -> int:
    return node.engine.service.log.topics[topic].partitions


def holding(node: RunningNode, topic: str) -> int:
    """How many of ``topic``'s partitions hold records."""
    log = node.engine.service.log
    n = log.topics[topic].partitions
    return sum(1 for i in range(n) if log.partition(topic, i).high_watermark > 0)


async def delivered_to_all(node: RunningNode, topic: str) -> None:
    for u in USERS:
        await node.user(u, None, topic, channels=("console",))
    ids = [(await node.publish(topic=topic, users=[u]))["event_id"] for u in USERS]
    await node.drained()
    for event_id in ids:
        rows = await node.statuses(event_id)
        assert [r["status"] for r in rows] == ["delivered"], rows


def test_the_default_is_one_partition() -> None:
    assert NotifyConfig().audit_partitions == 1
    assert NotifyConfig().partitions == 8  # the queues' count is not the audit's


async def test_audit_has_its_own_count_and_a_topic_keeps_the_count_it_was_made_with(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    data = tmp_path / "node"
    old = await start_node(data=data, audit_partitions=3)
    assert partitions(old, "__audit") == 3
    assert partitions(old, "__deliver.console") == 2  # notify.partitions of the test config
    await delivered_to_all(old, "before")
    assert holding(old, "__audit") >= 2  # one event per user: spread over the partitions
    await old.stop()

    again = await start_node(data=data)  # audit-partitions back to its default
    assert partitions(again, "__audit") == 3
    await delivered_to_all(again, "after")


async def test_a_new_node_writes_every_transition_to_its_one_partition(
    start_node: NodeFactory,
) -> None:
    node = await start_node()
    assert partitions(node, "__audit") == 1
    await delivered_to_all(node, "news")
    assert holding(node, "__audit") == 1
