"""Every benchmark module answers `--help` as the docs tell users to run it (`python -m benchmarks.NAME --help`).

A `%` in an argparse help string is a format directive: `benchmarks.pipeline --help` crashed with a TypeError
on its "±25%" until it was escaped."""

from __future__ import annotations

import json
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


def test_frontend_profile_counts_a_sample_for_the_innermost_code_that_owns_it() -> None:
    """Library frames (pydantic, json, starlette) count for whoever called them; vLLM's tokenizer called from our
    engine adapter is tokenizing; py-spy's raw lines are `frame;frame;... count`, outermost first."""
    from benchmarks.frontend_profile import OTHER, component_of, read_raw

    ours = "VLLMEngine._parse (vllm_batch_server/engines/vllm.py:420)"
    validate = "TypeAdapter.validate_python (pydantic/type_adapter.py:410)"
    chat = "OpenAIServingChat.create_chat_completion (vllm/entrypoints/openai/chat_completion/serving.py:292)"
    tokenize = "TokenizerPool.__call__ (vllm/tokenizers/hf.py:93);_encode_plus (transformers/tokenization.py:1)"
    status = ("run_asgi (uvicorn/protocols/http/httptools_impl.py:420);retrieve_batch (vllm_batch_server/api/"
              "batches.py:145);Database.get_batch (vllm_batch_server/store/database.py:373)")
    run_batch = "run_request (vllm/entrypoints/launchers/run_batch.py:561)"
    lines = [f"Runner.run (asyncio/runners.py:118);{ours};{validate} 7\n", f"{ours};{chat};{tokenize} 3\n",
             f"{status} 2\n", f"{run_batch};{validate} 4\n", "Runner.run (asyncio/runners.py:118) 1\n", "\n"]
    samples = [(component_of(stack), count) for stack, count in read_raw(lines)]
    assert samples == [("ours: engine adapter (validation, result body)", 7), ("vLLM: tokenize", 3),
                       ("ours: SQLite", 2), ("run_batch: reading the file, result lines", 4), (OTHER, 1)]


def test_the_event_watch_returns_at_the_end_of_its_batch_and_not_another() -> None:
    from benchmarks._harness import EventWatch

    def message(seq: int, kind: str, batch: str) -> list[str]:
        data = json.dumps({"object": "event", "type": kind, "data": {"id": batch}})
        return [f"id: {seq}", f"event: {kind}", f"data: {data}", ""]

    stream = iter(["retry: 2000", "", ": keep-alive", "", *message(1, "batch.in_progress", "batch_a"),
                   *message(2, "batch.completed", "batch_b"), *message(3, "batch.completed", "batch_a"),
                   *message(4, "batch.failed", "batch_c")])
    EventWatch(stream).until_ended("batch_a")
    assert next(stream) == "id: 4"  # it stopped reading at the end of batch_a's message
    with pytest.raises(RuntimeError, match="batch_z"):
        EventWatch(iter(message(5, "batch.completed", "batch_y"))).until_ended("batch_z")

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
