"""Fixtures that run a real ``herald serve`` on 127.0.0.1 with free ports and a temporary
data directory, and always stop it at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .herald_process import HeraldProcess, Nodes

NodeFactory = Callable[..., HeraldProcess]


@pytest.fixture
def herald_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    """``herald_factory(config=TOML)`` starts another node (each with its own data dir)."""
    nodes = Nodes(tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


@pytest.fixture
def herald(herald_factory: NodeFactory) -> HeraldProcess:
    """A started node with the embedded default config (open, loopback only)."""
    return herald_factory()


@pytest.fixture(scope="module")
def shared_herald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldProcess]:
    """One node for a whole module of tests that only add topics and records (cheaper than a
    node per test); tests use their own topic names."""
    nodes = Nodes(tmp_path_factory.mktemp("herald"))
    try:
        yield nodes()
    finally:
        nodes.close()
