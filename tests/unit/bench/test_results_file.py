"""The broker benchmark's ``## Broker`` section (``bench/scenarios``): a run of part of the
benchmark (``--scenario single``, ``--systems ...``) writes its own blocks only, each saying
so, and leaves the setup and the targets of the last full run as they were; a full run
writes all three."""

from __future__ import annotations

from pathlib import Path

from bench.scenarios import report, results_file
from bench.scenarios.measure import Sample
from bench.scenarios.single import SingleSample


def run_of(stamp: str, *, partial: bool, rate: int) -> report.Results:
    res = report.Results(stamp=stamp, partial=partial)
    res.setup = [("Command", f"`python -m bench.run` ({stamp})")]
    res.single = [
        report.SingleRow(
            "Herald",
            "Producer.send",
            [SingleSample(Sample(rate, 1.0, 0.2, 0.5), 0.3, 0.5, 0.7, 1.0)],
        ),
        report.SingleRow(
            "Redis-always",
            "XADD",
            [SingleSample(Sample(1000, 1.0, 0.3, 0.3), 0.3, 0.5, 0.7, 1.0)],
        ),
    ]
    return res


def test_a_partial_run_keeps_the_full_runs_setup_and_targets(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    full = run_of("2026-12-07 03:19 UTC, commit aaaaaaa", partial=False, rate=1100)
    results_file.write(path, report.render(full, report.blocks_of(full, ["single"])), "intro")
    part = run_of("2026-12-07 07:35 UTC, commit bbbbbbb", partial=True, rate=900)
    results_file.write(path, report.render(part, report.blocks_of(part, ["single"])), "intro")
    text = path.read_text()
    setup = text[text.index(results_file.begin("setup")) : text.index(results_file.end("setup"))]
    assert "03:19" in setup and "07:35" not in setup
    targets = text[
        text.index(results_file.begin("targets")) : text.index(results_file.end("targets"))
    ]
    assert "03:19" in targets and "1.10x" in targets  # the full run's ratio, not 0.90x
    single = text[text.index(results_file.begin("single")) : text.index(results_file.end("single"))]
    assert "07:35" in single and "in a run of part of the benchmark" in single
    assert "03:19" not in single
