"""Every benchmark module answers `--help` as the docs tell users to run it (`python -m benchmarks.NAME --help`).

A `%` in an argparse help string is a format directive: `benchmarks.pipeline --help` crashed with a TypeError
on its "±25%" until it was escaped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_help(name: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout
