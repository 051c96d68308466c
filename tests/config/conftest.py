"""Fixtures for job-spec tests: write YAML text to a temp file and load it."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def minimal_spec() -> str:
    """The smallest valid job spec: a name and two manifest URLs."""
    return (
        "name: unit\n"
        "data:\n"
        "  train: file:///data/train/manifest.json\n"
        "  val: file:///data/val/manifest.json\n"
    )


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[[str], Path]:
    """Write dedented YAML text to jobs/x.yaml under tmp_path and return its path."""

    def write(text: str, name: str = "x.yaml") -> Path:
        path = tmp_path / "jobs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write
