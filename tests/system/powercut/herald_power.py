"""A real ``herald serve`` on the power-loss filesystem: start it, crash it (SIGKILL), cut
the power (everything not fsynced is lost) and start it again on what the disk kept.

Ports and the work directory (config, the node's own log) stay across restarts; the work
directory is outside the mount, so the node's log survives the power cut for diagnosis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.integration.herald_process import HeraldProcess

from .control import PowerLossFS


class PowerNode:
    def __init__(self, fs: PowerLossFS, work_dir: Path, *, config: str | None = None) -> None:
        self.fs = fs
        self.process = HeraldProcess(fs.mountpoint, work_dir, config=config)
        self.cuts: list[dict[str, Any]] = []

    @property
    def host(self) -> str:
        return self.process.host

    @property
    def tcp_port(self) -> int:
        return self.process.tcp_port

    @property
    def http_url(self) -> str:
        return self.process.http_url

    def start(self, *, settle: bool = True) -> None:
        """Start the node. On its first start, ``settle`` then makes everything durable
        (``sync_all``), as the minutes between installing a node and using it would on a
        journaling filesystem: the node never fsyncs the data directory after creating
        ``log/`` and ``state/`` in it, nor ``state/`` after LMDB creates its files, so on
        the strict model a cut before any such fsync loses the whole store (that is tested
        on its own: ``test_fresh_node_layout_survives_power_cut``)."""
        first = self.process.starts == 0
        self.process.start()
        if first and settle:
            self.fs.sync_all()

    def power_cut(self) -> dict[str, Any]:
        """SIGKILL the node, wait for it, then cut the power. Returns what was lost."""
        if self.process.proc is not None:
            self.process.kill()
        report = self.fs.power_cut()
        self.cuts.append(report)
        return report

    def power_cut_and_restart(self) -> dict[str, Any]:
        report = self.power_cut()
        self.process.start()
        return report

    def diagnosis(self) -> str:
        """What a failure message should show: the last cuts and the node's log."""
        cuts = "\n".join(_short(c) for c in self.cuts[-3:])
        return f"power cuts (last 3):\n{cuts}\nnode log:\n{self.process.log_tail(40)}"

    def close(self) -> None:
        self.process.close()


def _short(report: dict[str, Any]) -> str:
    lost = report.get("lost_bytes", {})
    return (
        f"  lost bytes {sum(lost.values())} in {len(lost)} files {sorted(lost)[:8]}; "
        f"lost names {report.get('lost_names', [])[:8]}; "
        f"restored names {report.get('restored_names', [])[:8]}"
    )
