"""Fixtures for power-loss tests: a mounted power-loss filesystem (``powerfs``) and a real
``herald serve`` whose data directory is that mount (``power_node``).

Both are torn down whatever happens: the node is SIGKILLed, the daemon told to exit (or
killed) and the mount detached (``umount -l``), so a failing test leaves no mount behind.
When this machine cannot mount FUSE at all (no /dev/fuse, not root), the tests are skipped
with the reason, which ``-ra`` prints in the summary; a daemon that fails for any other
reason is an error, not a skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .control import FuseUnavailable, PowerLossFS, fuse_unavailable_reason
from .herald_power import PowerNode


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-power-loss",
        action="store_true",
        help="power-loss tests: make everything durable before each cut (a plain SIGKILL); "
        "a control run of the tests' own logic, under which every test must pass "
        "(run with --runxfail)",
    )


@pytest.fixture
def powerfs(tmp_path: Path) -> Iterator[PowerLossFS]:
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no power-loss filesystem: {reason}")
    try:
        fs = PowerLossFS.start(tmp_path / "powerfs")
    except FuseUnavailable as exc:
        pytest.skip(f"no power-loss filesystem: {exc}")
    try:
        yield fs
    finally:
        fs.close()


@pytest.fixture
def power_node(
    powerfs: PowerLossFS, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[PowerNode]:
    """A started node on the power-loss filesystem, its directories made durable (see
    ``PowerNode.start``)."""
    node = PowerNode(powerfs, tmp_path / "node")
    node.no_power_loss = request.config.getoption("--no-power-loss")
    try:
        node.start()
        yield node
    finally:
        node.close()
