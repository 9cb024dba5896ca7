"""After submitting, against the real server (echo engine): follow() a running batch, retry_failed() and the merged
view, marks, export() read back by the `datasets` library, Label Studio round trip, and the same from the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.client_integration.conftest import CHAT_MODEL, ask
from tests.conftest import ServerFactory
from tests.helpers.server import RunningServer
from vllm_batch import AsyncVLLMBatch, BatchResult, Mark, NotFoundError, UnsupportedError, VLLMBatch
from vllm_batch._cli import main

SYSTEM = "Answer briefly."


def chat(text: str, **body: Any) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "messages": [{"role": "system", "content": SYSTEM},
                                              {"role": "user", "content": text}], **body}


def complete(text: str) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "prompt": text}


def broken() -> dict[str, Any]:
    """A completion the client accepts and the echo engine answers with a 400 (it takes one text prompt only):
    it fails every time."""
    return {"model": CHAT_MODEL, "prompt": ["two", "prompts"]}


@pytest.fixture
def slow_server(server_factory: ServerFactory) -> RunningServer:
    return server_factory(extra_args=["--echo-delay", "0.02", "--window", "2", "--checkpoint-seconds", "0.1"])


def test_follow_yields_each_result_while_the_batch_runs(slow_server: RunningServer, tmp_path: Path) -> None:
    with VLLMBatch(base_url=slow_server.base_url, workdir=tmp_path / "w") as batch:
        for i in range(120):
            batch.add_to_batch(custom_id=f"q{i}", **(complete(f"question {i}") if i != 60 else broken()))
        batch.submit()
        statuses: set[str] = set()
        seen: list[BatchResult] = []
        for result in batch.follow(poll_interval=0.3, timeout=60):
            if len(seen) % 20 == 0:
                statuses.add(batch.status().status)
            seen.append(result)
        assert "in_progress" in statuses, "results arrived while the batch ran"
        assert sorted(r.index for r in seen) == list(range(120))
        assert len({r.custom_id for r in seen}) == 120
        by_id = {r.custom_id: r for r in seen}
        assert by_id["q7"].text == "question 7" and by_id["q7"].request["prompt"] == "question 7"
        assert not by_id["q60"].ok and by_id["q60"].status_code == 400
        assert batch.status().status == "completed"
        only_ok = list(batch.follow(errors=False))  # an ended batch: everything at once
        assert len(only_ok) == 119 and all(r.ok for r in only_ok)


def test_follow_after_resume_in_another_process(slow_server: RunningServer, tmp_path: Path) -> None:
    with VLLMBatch(base_url=slow_server.base_url) as batch:
        batch.add_requests([chat(f"n{i}") for i in range(30)])
        batch_id = batch.submit()
    with VLLMBatch.resume(batch_id, base_url=slow_server.base_url) as again:
        results = list(again.follow(poll_interval=0.3, timeout=60))
    assert sorted((r.index, r.text) for r in results) == [(i, f"n{i}") for i in range(30)]


def test_retry_failed_and_the_merged_view(server_factory: ServerFactory, tmp_path: Path) -> None:
    server = server_factory(extra_args=["--echo-fault", "crash-after=25,times=1", "--engine-max-restarts", "0",
                                        "--window", "1"])
    with VLLMBatch(base_url=server.base_url, workdir=tmp_path / "w") as batch:
        for i in range(60):
            batch.add_to_batch(custom_id=f"r{i}", **(broken() if i == 40 else complete(f"item {i}")))
        batch.submit(metadata={"job": "nightly"})
        status = batch.wait(poll_interval=0.3, progress=False, raise_on_failure=False, timeout=60)
        assert status.status == "failed" and status.request_counts.completed == 25
        first_pass = list(batch.results())
        assert sum(r.ok for r in first_pass) == 25

        with batch.retry_failed(metadata={"job": "nightly-retry"}) as again:
            assert again.status().metadata == {"job": "nightly-retry", "retry_of": batch.id}
            done = again.wait(poll_interval=0.3, progress=False, raise_on_failure=False, timeout=60)
            assert done.request_counts.total == 35  # the 35 without a result, under the same custom_ids
            assert {r.custom_id for r in again.results()} == {f"r{i}" for i in range(25, 60)}
            retry_id = again.id

        assert [b.id for b in batch.retries()] == [retry_id]
        merged = list(batch.merged_results())
        assert [r.custom_id for r in merged] == [f"r{i}" for i in range(60)]  # input order
        assert [r.index for r in merged] == list(range(60))
        assert all(r.ok for r in merged if r.custom_id != "r40")
        assert {r.batch_id for r in merged if r.ok} == {batch.id, retry_id}
        assert merged[30].text == "item 30" and merged[30].batch_id == retry_id
        assert not merged[40].ok and merged[40].batch_id == retry_id  # failed again: the newest failure

        # A retry of the original with its retry: only what failed in both (r40) goes again.
        with batch.retry_failed(also=[retry_id]) as third:
            third.wait(poll_interval=0.3, progress=False, raise_on_failure=False, timeout=60)
            assert [r.custom_id for r in third.results()] == ["r40"]
        assert len(batch.retries()) == 2


def test_marks_and_export_to_every_format(server: RunningServer, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    with VLLMBatch(base_url=server.base_url, workdir=tmp_path / "w") as batch:
        for i in range(11):
            batch.add_to_batch(custom_id=f"e/{i}", **chat(f"fact {i}"))
        batch.submit()
        batch.wait(poll_interval=0.3, progress=False, timeout=60)
        results = list(batch.results())
        assert batch.mark("e/1", label="gold", score=5, note="clear") == Mark(
            "e/1", "gold", 5.0, "clear", batch.id, batch.marks()[0].updated_at)
        batch.mark(results[3], label="gold", score=3)
        batch.mark("e/4", label="reject")
        assert [m.custom_id for m in batch.marks()] == ["e/1", "e/3", "e/4"]
        assert [m.custom_id for m in batch.marks(label="reject")] == ["e/4"]
        with pytest.raises(NotFoundError) as missing:
            batch.mark("e/99", label="gold")
        assert missing.value.code == "custom_id_not_found"

        gold = tmp_path / "gold.jsonl"
        assert batch.export(gold, labels="gold") == 2
        rows = datasets.load_dataset("json", data_files=str(gold), split="train")
        assert rows.column_names == ["messages"]
        assert [m["content"] for m in rows[0]["messages"]] == [SYSTEM, "fact 1", "fact 1"]
        assert [m["role"] for m in rows[1]["messages"]] == ["system", "user", "assistant"]

        assert batch.export(tmp_path / "all.jsonl", exclude_labels=["reject"]) == 10  # 11 ok, less one reject
        assert batch.export(tmp_path / "best.jsonl", min_score=4) == 1
        assert batch.export(tmp_path / "odd.jsonl", where=lambda r, m: int(r.custom_id[2:]) % 2 == 1) == 5

        assert batch.export(tmp_path / "share.jsonl", "sharegpt", labels="gold") == 2
        share = datasets.load_dataset("json", data_files=str(tmp_path / "share.jsonl"), split="train")
        assert share[0]["conversations"] == [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "fact 1"},
                                             {"from": "gpt", "value": "fact 1"}]
        assert batch.export(tmp_path / "alpaca.jsonl", "alpaca", labels="gold") == 2
        alpaca = datasets.load_dataset("json", data_files=str(tmp_path / "alpaca.jsonl"), split="train")
        assert alpaca[0] == {"instruction": "fact 1", "input": "", "output": "fact 1", "system": SYSTEM}

        assert batch.export(tmp_path / "shots.json", "in-context", labels="gold", limit=1) == 1
        shots = json.loads((tmp_path / "shots.json").read_text())
        assert shots["messages"] == [{"role": "user", "content": "fact 1"}, {"role": "assistant", "content": "fact 1"}]
        assert shots["examples"][0]["score"] == 5.0

        # Label Studio: tasks out, annotations back in as marks.
        assert batch.export(tmp_path / "tasks.json", "label-studio") == 11
        tasks = json.loads((tmp_path / "tasks.json").read_text())
        assert tasks[1]["data"]["custom_id"] == "e/1" and tasks[1]["data"]["answer"] == "fact 1"
        assert tasks[1]["predictions"][0]["result"][0]["value"] == {"choices": ["gold"]}
        annotated = [{**task, "annotations": [{"id": 1, "was_cancelled": False, "updated_at": "2026-01-01T00:00:00Z",
                                               "result": [{"from_name": "label", "to_name": "answer",
                                                           "type": "choices", "value": {"choices": ["reject"]}}]}]}
                     for task in tasks[5:7]]
        (tmp_path / "annotations.json").write_text(json.dumps(annotated))
        assert batch.import_label_studio(tmp_path / "annotations.json") == 2
        assert [m.custom_id for m in batch.marks(label="reject")] == ["e/4", "e/5", "e/6"]

        assert batch.unmark("e/4") is True and batch.unmark("e/4") is False
        with pytest.raises(ValueError, match="only the label-studio format"):
            batch.export(tmp_path / "x.jsonl", errors=True)
        assert not (tmp_path / "x.jsonl").exists()


def test_export_with_retries_uses_the_best_answer(server_factory: ServerFactory, tmp_path: Path) -> None:
    server = server_factory(extra_args=["--echo-fault", "crash-after=3,times=1", "--engine-max-restarts", "0",
                                        "--window", "1"])
    with VLLMBatch(base_url=server.base_url, workdir=tmp_path / "w") as batch:
        batch.add_requests([{**chat(f"t{i}"), "custom_id": f"t{i}"} for i in range(8)])
        batch.submit()
        batch.wait(poll_interval=0.3, progress=False, raise_on_failure=False, timeout=60)
        with batch.retry_failed() as again:
            again.wait(poll_interval=0.3, progress=False, timeout=60)
            again.mark("t6", label="gold")  # marked on the retry, where its answer came from
        batch.mark("t1", label="gold")
        assert batch.export(tmp_path / "without.jsonl", labels="gold") == 1
        assert batch.export(tmp_path / "with.jsonl", labels="gold", with_retries=True) == 2
        lines = [json.loads(x) for x in (tmp_path / "with.jsonl").read_text().splitlines()]
        assert [line["messages"][-1]["content"] for line in lines] == ["t1", "t6"]


def test_async_client_has_the_same_methods(slow_server: RunningServer, tmp_path: Path) -> None:
    import anyio

    async def scenario() -> None:
        async with AsyncVLLMBatch(base_url=slow_server.base_url, workdir=tmp_path / "w") as batch:
            for i in range(40):
                batch.add_to_batch(custom_id=f"a{i}", **(broken() if i == 5 else complete(f"async {i}")))
            await batch.submit()
            seen = [r async for r in batch.follow(poll_interval=0.3, timeout=60)]
            assert sorted(r.index for r in seen) == list(range(40))
            await batch.mark("a2", label="gold")
            assert [m.custom_id for m in await batch.marks()] == ["a2"]
            assert await batch.export(tmp_path / "a.jsonl", labels="gold") == 1
            again = await batch.retry_failed()
            async with again:
                await again.wait(poll_interval=0.3, progress=False, raise_on_failure=False, timeout=60)
            assert [b.id for b in await batch.retries()] == [again.id]
            merged = [r async for r in batch.merged_results()]
            assert [r.custom_id for r in merged] == [f"a{i}" for i in range(40)]
            assert merged[5].batch_id == again.id and not merged[5].ok
            assert await batch.unmark("a2") is True

    anyio.run(scenario)


def test_extensions_on_a_backend_without_them_say_so(server: RunningServer, tmp_path: Path) -> None:
    """Another OpenAI-compatible server has no marks route: the error says what is missing."""
    import respx
    from httpx import Response

    with VLLMBatch(base_url=server.base_url, workdir=tmp_path / "w") as batch:
        batch.add_to_batch(**ask("x"))
        batch.submit()
        batch.wait(poll_interval=0.3, progress=False, timeout=60)
        with respx.mock(assert_all_called=False) as mock:
            mock.route(method="PUT").mock(return_value=Response(404, json={"error": {
                "message": "Unknown request URL", "type": "invalid_request_error", "param": None, "code": None}}))
            mock.route().pass_through()
            with pytest.raises(UnsupportedError, match="marks"):
                batch.mark(batch.results().__next__().custom_id, label="gold")


# ---- the command line --------------------------------------------------------------------------------------


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: str, check: bool = True) -> Ran:
    """`vllm-batch ARGS` in this process (a subprocess per command costs seconds of imports)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    ran = Ran(int(info.value.code or 0), captured.out, captured.err)
    if check:
        assert ran.returncode == 0, ran.stderr
    return ran


def test_cli_tail_retry_mark_export_import(server_factory: ServerFactory, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    datasets = pytest.importorskip("datasets")

    def cli(*args: str, check: bool = True) -> Ran:
        return run_cli(capsys, *args, check=check)

    server = server_factory(extra_args=["--echo-delay", "0.01", "--window", "2"])
    url = ["--base-url", server.base_url]
    requests = tmp_path / "requests.jsonl"
    lines = [{"custom_id": f"c{i}", "body": broken() if i == 3 else complete(f"cli {i}")} for i in range(40)]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batch_id = cli("submit", str(requests), *url).stdout.strip()

    tailed = [json.loads(x) for x in cli("tail", batch_id, *url, "--poll-interval", "0.3").stdout.splitlines()]
    assert sorted(t["custom_id"] for t in tailed) == sorted(f"c{i}" for i in range(40))
    assert next(t for t in tailed if t["custom_id"] == "c3")["error"]["status_code"] == 400

    assert cli("mark", batch_id, "c1", "c2", "--label", "gold", *url).returncode == 0
    assert cli("mark", batch_id, "c5", "--score", "2", "--note", "meh", *url).returncode == 0
    listed = cli("marks", batch_id, "--json", *url).stdout.splitlines()
    assert [json.loads(x)["custom_id"] for x in listed] == ["c1", "c2", "c5"]
    assert cli("marks", batch_id, *url).stdout.splitlines()[2] == "c5\t-\t2\tmeh"
    missing = cli("mark", batch_id, "nope", "--label", "gold", *url, check=False)
    assert missing.returncode == 1 and "custom_id_not_found" in missing.stderr
    assert cli("mark", batch_id, "c1", *url, check=False).returncode == 2

    train = tmp_path / "train.jsonl"
    assert "wrote 2 openai records" in cli("export", batch_id, "-o", str(train), "--label", "gold", *url).stderr
    assert len(datasets.load_dataset("json", data_files=str(train), split="train")) == 2
    tasks = tmp_path / "tasks.json"
    cli("export", batch_id, "-o", str(tasks), "--format", "label-studio", "--errors", *url)
    assert json.loads(tasks.read_text())[3]["data"]["ok"] is False  # failures can be reviewed too
    cli("export", batch_id, "-o", str(tasks), "--format", "label-studio", "--limit", "4", *url)
    assert (tmp_path / "tasks.label-config.xml").read_text().startswith("<View>")
    annotated = [{**t, "annotations": [{"result": [{"type": "rating", "from_name": "score", "to_name": "answer",
                                                     "value": {"rating": 4}}]}]} for t in json.loads(tasks.read_text())]
    (tmp_path / "done.json").write_text(json.dumps(annotated))
    assert "set 4 marks" in cli("import-marks", batch_id, str(tmp_path / "done.json"), *url).stderr
    scores = {json.loads(x)["custom_id"]: json.loads(x)["score"] for x in cli("marks", batch_id, "--json",
                                                                              *url).stdout.splitlines()}
    assert scores == {"c0": 4.0, "c1": 4.0, "c2": 4.0, "c4": 4.0, "c5": 2.0}  # c3 failed: not exported

    retried = cli("retry", batch_id, "--wait", "--no-progress", "--poll-interval", "0.3", *url)
    assert retried.returncode == 0 and "completed" not in retried.stdout
    retry_id = retried.stdout.strip()
    merged = [json.loads(x) for x in cli("results", batch_id, "--with-retries", *url).stdout.splitlines()]
    assert [m["custom_id"] for m in merged] == [f"c{i}" for i in range(40)]
    assert merged[3]["batch_id"] == retry_id
    assert cli("mark", batch_id, "c1", "--delete", *url).returncode == 0
    assert "c1" not in cli("marks", batch_id, *url).stdout
