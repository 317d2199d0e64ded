"""Write one benchmark's results into its section of ``bench/RESULTS.md``.

Each benchmark owns one ``## <Title>`` section and, inside it, one generated block between
two marker comments. A re-run replaces only that block: other sections, and notes written by
hand inside the section, stay as they are.
"""

from __future__ import annotations

from pathlib import Path

HEADER = (
    "# Herald benchmark results\n\n"
    "One section per benchmark, each with the command that produced it. Figures are "
    "measured, never edited by hand.\n"
)


def markers(owner: str) -> tuple[str, str]:
    return (
        f"<!-- {owner}: generated, replaced on every run -->",
        f"<!-- {owner}: end of generated part -->",
    )


def write_section(path: Path, title: str, owner: str, generated: str) -> None:
    """Put ``generated`` in the block ``owner`` writes inside ``## {title}`` of ``path``,
    creating the file or the section if missing."""
    begin, end = markers(owner)
    block = f"{begin}\n\n{generated.rstrip()}\n\n{end}"
    heading = f"## {title}"
    text = path.read_text() if path.exists() else HEADER
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    if start is None:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    else:
        stop = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        section = "".join(lines[start:stop])
        if begin in section and end in section:
            a = section.index(begin)
            b = section.index(end) + len(end)
            section = section[:a] + block + section[b:]
        else:  # a section written by hand so far: the generated block goes first
            rest = section[len(heading) :].strip("\n")
            section = f"{heading}\n\n{block}\n" + (f"\n{rest}\n" if rest else "")
        tail = "".join(lines[stop:])
        text = "".join(lines[:start]) + section.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    path.write_text(text.rstrip("\n") + "\n")
