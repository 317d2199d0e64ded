"""The Dockerfile installs what pyproject.toml packages: a package added to the project but
not copied into the image breaks ``pip install .`` in the build (it happened: herald/ and
notify/ were missing until 2026-12-07). Building the image needs a Docker engine and a
registry, neither of which a test run has; README § Running in a container says how it was
checked by hand."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def copied() -> set[str]:
    text = (ROOT / "Dockerfile").read_text()
    return {m.group(1) for m in re.finditer(r"^COPY\s+(\S+)\s+\./\1\s*$", text, re.M)}


def test_the_image_copies_every_package_pyproject_installs() -> None:
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]
    assert packages, "pyproject.toml lists no packages"
    assert set(packages) <= copied(), f"not copied into the image: {set(packages) - copied()}"


def test_the_build_context_keeps_what_the_image_copies() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    needed = copied() | {"pyproject.toml", "README.md", "config.example.toml"}
    assert not needed & ignored, f".dockerignore drops what the build copies: {needed & ignored}"
