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


def test_grouping_speed_measures_only_the_shapes_asked_for() -> None:
    from benchmarks import grouping_speed

    payload = grouping_speed.main(["--shapes", "multi-turn,nothing shared", "--requests", "300", "--lookahead", "100",
                                   "--repeats", "2", "--no-json"])
    assert sorted(payload["results"]) == ["multi-turn conversations", "short chats, nothing shared"]
    for r in payload["results"].values():
        assert r["pairs"] == 3 * 2  # every chunk of every pass measured back to back
        assert min(r["parse_us"], r["parse_held_us"], r["parse_grouped_us"]) > 0
        assert r["grouping_us"] == pytest.approx(r["parse_grouped_us"] - r["parse_held_us"])
    single = grouping_speed.main(["--shapes", "nothing shared", "--requests", "50", "--repeats", "1", "--no-json"])
    assert single["results"]["short chats, nothing shared"]["pairs"] == 1  # one pair is enough to report


def test_grouping_speed_names_the_shapes_when_none_matches(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import grouping_speed

    with pytest.raises(SystemExit) as exited:
        grouping_speed.main(["--shapes", "tables", "--no-json"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "no shape matches --shapes 'tables'" in err and "multi-turn conversations" in err


def test_big_batch_checks_every_id_and_survives_its_own_kill() -> None:
    """benchmarks.big_batch at toy sizes: the exactly-once check, the kill -9 resume and the GC timing work."""
    from benchmarks import big_batch

    payload = big_batch.main(["--lines", "2000", "--resume-lines", "8000", "--kill-at", "0.3", "--sample", "0.05",
                              "--poll", "0.05", "--no-json"])
    (run,) = payload["runs"]
    assert (run["results"], run["duplicated"], run["missing"], run["exactly_once"]) == (2000, 0, 0, True)
    assert run["peak_rss_mib"] > 0 and run["gc_during_run"] is not None
    resume = payload["resume"]
    assert resume["exactly_once"] and resume["results"] == 8000
    assert payload["targets"]["exactly_once"] is True
