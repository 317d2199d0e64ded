"""The ``## Broker`` section of ``bench/RESULTS.md``.

The section holds generated blocks between markers, one per scenario plus the setup and the
targets; a run replaces the blocks it produced and leaves the others (and any text written by
hand around them) alone, so ``--scenario produce`` refreshes the produce table only. Other
sections of the file belong to other benchmarks: the file is read right before it is written.
"""

from __future__ import annotations

from pathlib import Path

SECTION = "## Broker"
BLOCKS = ("setup", "limits", "produce", "consume", "latency", "http", "single", "targets")
TITLE = (
    "# Herald benchmark results\n\n"
    "One section per benchmark, each with the command that produced it. Figures are "
    "measured, never edited by hand.\n"
)


def begin(block: str) -> str:
    return f"<!-- bench.run:{block} generated, replaced by the next run -->"


def end(block: str) -> str:
    return f"<!-- bench.run:{block} end -->"


def write(path: Path, blocks: dict[str, str], intro: str) -> None:
    """Replace the given blocks inside ``## Broker`` of ``path`` (read right before
    writing: another benchmark owns other sections of the same file), creating the section
    or the file if needed."""
    text = path.read_text() if path.exists() else TITLE
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == SECTION), None)
    if start is None:
        section = f"{SECTION}\n\n{intro}\n\n"
        before, after = text.rstrip("\n") + "\n\n", ""
    else:
        stop = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        before, section, after = (
            "".join(lines[:start]),
            "".join(lines[start:stop]),
            "".join(lines[stop:]),
        )
    for name in BLOCKS:
        if name not in blocks:
            continue
        chunk = f"{begin(name)}\n\n{blocks[name]}\n\n{end(name)}"
        if begin(name) in section and end(name) in section:
            a = section.index(begin(name))
            b = section.index(end(name)) + len(end(name))
            section = section[:a] + chunk + section[b:]
            continue
        # insert after the nearest earlier block present, else at the end of the section
        anchor = None
        for prev in reversed(BLOCKS[: BLOCKS.index(name)]):
            if end(prev) in section:
                anchor = section.index(end(prev)) + len(end(prev))
                break
        if anchor is None:
            section = section.rstrip("\n") + "\n\n" + chunk + "\n"
        else:
            section = section[:anchor] + "\n\n" + chunk + section[anchor:]
    section = section.rstrip("\n") + "\n"
    if after:
        section += "\n"
    path.write_text(before + section + after)
