"""The collector's settings (herald/collector.py): start-up's objects frozen out of
collections, long collections logged."""

from __future__ import annotations

import gc
import logging

import pytest

from herald.collector import PauseLog, freeze_startup

# bounds on the node's CPU time or latency: run alone, after the parallel pass (make test)
pytestmark = pytest.mark.serial


class Node:
    """A start-up object in a reference cycle (as most classes and modules are)."""

    def __init__(self) -> None:
        self.me = self


def test_objects_made_before_the_freeze_are_left_out_of_every_collection() -> None:
    before = Node()
    try:
        freeze_startup()
        assert gc.get_freeze_count() > 0
        after = Node()
        walked = {id(o) for o in gc.get_objects()}  # what a full collection walks
        assert id(before) not in walked
        assert id(after) in walked
        assert before.me is before  # frozen, not freed
    finally:
        gc.unfreeze()


def test_a_collection_over_the_threshold_is_logged_with_its_generation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pauses = PauseLog(threshold_ms=0).install()
    try:
        with caplog.at_level(logging.WARNING, logger="herald.node"):
            gc.collect(2)
    finally:
        pauses.remove()
    assert "event=gc_pause generation=2" in caplog.text
    assert pauses.logged >= 1


def test_a_collection_under_the_threshold_is_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pauses = PauseLog(threshold_ms=60_000).install()
    try:
        with caplog.at_level(logging.WARNING, logger="herald.node"):
            gc.collect(2)
    finally:
        pauses.remove()
    assert "event=gc_pause" not in caplog.text
    assert pauses.logged == 0
    assert pauses not in gc.callbacks
