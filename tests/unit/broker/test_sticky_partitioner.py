"""The sticky partitioner for keyless events: stay while the partition has an append waiting
for its sync, move on in turn once it has none, skip offline partitions, and move on after
``switch_bytes`` even under unbroken load."""

from __future__ import annotations

from dataclasses import dataclass

from broker.topics import StickyPartitioner


@dataclass
class FakePartition:
    high_watermark: int = 0
    log_end_offset: int = 0
    offline: bool = False

    def append(self) -> None:
        self.log_end_offset += 1

    def sync(self) -> None:
        self.high_watermark = self.log_end_offset


def test_a_round_of_appends_shares_one_partition_and_rounds_rotate() -> None:
    parts = [FakePartition() for _ in range(4)]
    sticky = StickyPartitioner()
    used_per_round = []
    for _round in range(8):
        used = set()
        for _event in range(10):  # appended before any of them is synced
            i = sticky.choose(parts, 100)
            parts[i].append()
            used.add(i)
        for part in parts:
            part.sync()
        used_per_round.append(used)
    assert all(len(used) == 1 for used in used_per_round), used_per_round
    assert [used.pop() for used in used_per_round] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_it_stays_while_the_partition_waits_for_a_sync_even_across_rounds() -> None:
    parts = [FakePartition() for _ in range(3)]
    sticky = StickyPartitioner()
    first = sticky.choose(parts, 10)
    parts[first].append()
    parts[first].sync()
    parts[first].append()  # appended again before the check: still waiting
    assert sticky.choose(parts, 10) == first


def test_offline_partitions_are_skipped() -> None:
    parts = [FakePartition() for _ in range(4)]
    sticky = StickyPartitioner()
    assert sticky.choose(parts, 10) == 0
    parts[0].append()
    parts[0].offline = True  # its sync failed: it never catches up
    parts[1].offline = True
    assert sticky.choose(parts, 10) == 2


def test_unbroken_load_still_moves_on_after_switch_bytes() -> None:
    parts = [FakePartition() for _ in range(2)]
    sticky = StickyPartitioner(switch_bytes=1000)
    chosen = []
    for _ in range(30):
        i = sticky.choose(parts, 100)
        parts[i].append()  # never synced: always waiting
        chosen.append(i)
    assert chosen == ([0] * 10 + [1] * 10) + [0] * 10
