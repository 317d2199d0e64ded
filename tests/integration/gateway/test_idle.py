"""An idle node writes nothing: once its work is done, no state-store transaction is
committed and no fsync runs (before, an idle node committed the gateway reader's unchanged
offsets five times a second, rewrote the event index's marks and fsynced the state store
three times a second)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .conftest import Running


async def test_an_idle_node_commits_and_syncs_nothing(
    start_node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    node: Running = await start_node()
    alice = await node.connect("alice")
    await node.publish(topic="orders", users=["alice"], payload={"n": 1})
    await alice.wait_for(lambda d: len(d.notifications) == 1)
    assert node.node.service is not None
    kv = node.node.service.kv
    syncs = 0
    real = kv.sync_now

    def counting() -> None:
        nonlocal syncs
        syncs += 1
        real()

    monkeypatch.setattr(kv, "sync_now", counting)
    # the work of that event settles (the audit indexer lingers 50 ms, commits and the
    # periodic sync follow within a second or two)
    async with asyncio.timeout(15):
        while True:
            before = kv._last_txn()
            await asyncio.sleep(1.5)
            if kv._last_txn() == before:
                break
    syncs = 0
    txn = kv._last_txn()
    await asyncio.sleep(2.5)  # two periodic syncs, a dozen reader commit intervals
    assert kv._last_txn() == txn
    assert syncs == 0
    # and a new event is still delivered, and its commits synced
    await node.publish(topic="orders", users=["alice"], payload={"n": 2})
    await alice.wait_for(lambda d: len(d.notifications) == 2)
    async with asyncio.timeout(10):
        while syncs == 0:
            await asyncio.sleep(0.05)
