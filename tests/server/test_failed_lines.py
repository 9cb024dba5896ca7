"""Which lines a retry of several batches takes (results/failed_lines.py): exactly the requests no batch
answered, each once, from the first batch and line that has it; the same whether the sort spills to disk or
not, in memory bounded by its run length rather than by the batches. The endpoint itself is tested in
tests/server/test_retry.py."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import pytest

from vllm_batch_server.queue.custom_ids import LineSet
from vllm_batch_server.results import failed_lines as module
from vllm_batch_server.results.failed_lines import TooMany, failed_lines


def write_input(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(json.dumps({"custom_id": i, "method": "POST", "url": "/v1/chat/completions",
                                        "body": {"model": "m", "messages": []}}) + "\n" for i in ids))
    return path


def write_output(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"batch_req_{n}", "custom_id": i,
                                        "response": {"status_code": 200, "body": {}}, "error": None}) + "\n"
                            for n, i in enumerate(ids)))
    return path


def chosen(sets: list[LineSet]) -> list[list[int]]:
    return [sorted(s) for s in sets]


@pytest.fixture(params=["in memory", "spilled"])
def spill(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "spilled":
        monkeypatch.setattr(module, "RUN", 3)  # runs of 3 records, merged 2 at a time: several merge passes
        monkeypatch.setattr(module, "FAN_IN", 2)
    return str(request.param)


@pytest.mark.usefixtures("spill")
def test_the_requests_no_batch_answered_are_taken_once_from_the_first_batch(tmp_path: Path) -> None:
    original = write_input(tmp_path / "in0", ["a", "b", "c", "d", "e"])
    answered = write_output(tmp_path / "out0", ["b", "d"])
    retry = write_input(tmp_path / "in1", ["a", "c", "e"])  # the first retry: a, c and e again
    retry_answered = write_output(tmp_path / "out1", ["c"])
    assert chosen(failed_lines([original], [answered], 100)) == [[1, 3, 5]]  # line numbers
    # Retrying both: c was answered by the retry; a and e come from the original's lines, not again from the retry's.
    assert chosen(failed_lines([original, retry], [answered, retry_answered], 100)) == [[1, 5], []]
    # Given the other way round, the first batch given is the retry.
    assert chosen(failed_lines([retry, original], [retry_answered, answered], 100)) == [[1, 3], []]
    # A batch with no output (cancelled before anything was committed).
    assert chosen(failed_lines([original], [None], 100)) == [[1, 2, 3, 4, 5]]


@pytest.mark.usefixtures("spill")
def test_ids_are_compared_as_strings_whatever_they_hold(tmp_path: Path) -> None:
    ids = ['quote"d', "back\\slash", "ünïcödé", "lone \ud800 surrogate", "new\nline", "", " ", "emoji 🙂"]
    original = write_input(tmp_path / "in", ids)
    answered = write_output(tmp_path / "out", ids[::2])
    assert chosen(failed_lines([original], [answered], 100)) == [[2, 4, 6, 8]]


@pytest.mark.usefixtures("spill")
def test_past_the_limit_it_stops(tmp_path: Path) -> None:
    original = write_input(tmp_path / "in", [f"r{n}" for n in range(10)])
    assert chosen(failed_lines([original], [None], 10)) == [list(range(1, 11))]
    with pytest.raises(TooMany):
        failed_lines([original], [None], 9)


def test_spilled_and_in_memory_agree_with_a_plain_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    ids = [f"id-{n}" for n in range(2_000)]
    inputs: list[Path] = []
    outputs: list[Path | None] = []
    for batch in range(4):
        mine = rng.sample(ids, 800)
        inputs.append(write_input(tmp_path / f"in{batch}", mine))
        # The third batch has no output (cancelled before a commit).
        outputs.append(write_output(tmp_path / f"out{batch}", rng.sample(mine, 300)) if batch != 2 else None)
    answered = {json.loads(line)["custom_id"] for out in outputs if out is not None
                for line in out.read_text().splitlines()}
    expected: list[list[int]] = [[] for _ in inputs]
    seen: set[str] = set()
    for batch, path in enumerate(inputs):
        for line, raw in enumerate(path.read_text().splitlines(), start=1):
            custom_id = json.loads(raw)["custom_id"]
            if custom_id not in answered and custom_id not in seen:
                seen.add(custom_id)
                expected[batch].append(line)
    in_memory = chosen(failed_lines(inputs, outputs, 10_000))
    monkeypatch.setattr(module, "RUN", 97)
    monkeypatch.setattr(module, "FAN_IN", 4)
    spilled = chosen(failed_lines(inputs, outputs, 10_000, scratch=tmp_path))
    assert in_memory == spilled == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("retry-sort-")]  # its files are gone


def test_memory_is_bounded_by_the_run_not_by_the_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "RUN", 2_000)

    def peak(lines: int) -> int:
        ids = [f"request-{n:08d}" for n in range(lines)]
        original = write_input(tmp_path / f"in{lines}", ids)
        answered = write_output(tmp_path / f"out{lines}", ids[::3])
        tracemalloc.start()
        try:
            result = failed_lines([original], [answered], lines)
            assert len(result[0]) == lines - len(range(0, lines, 3))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(10_000), peak(100_000)
    # Ten times the lines, not ten times the memory: a set of the ids alone would take ~9 MB at 100,000.
    assert large < 2 * small + 256 * 1024, (small, large)
