"""The `vllm-batch` command, run in-process against the fake Batch API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.client.conftest import BASE, FakeBatchAPI, chat
from vllm_batch._cli import main


def cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    return int(info.value.code or 0)


def test_create_then_submit_wait_to_stdout(api: FakeBatchAPI, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2+2?\n\nName a colour\n")
    requests = tmp_path / "requests.jsonl"
    assert cli("create", str(prompts), "--model", "m1", "--system", "Be brief", "--max-tokens", "16",
               "-o", str(requests)) == 0
    lines = [json.loads(x) for x in requests.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["line-1", "line-3"]
    assert lines[1]["body"] == {"model": "m1", "max_tokens": 16, "messages": [
        {"role": "system", "content": "Be brief"}, {"role": "user", "content": "Name a colour"}]}
    capsys.readouterr()

    assert cli("submit", str(requests), "--base-url", BASE, "--wait", "-o", "-", "--no-progress") == 0
    captured = capsys.readouterr()
    out = [json.loads(x) for x in captured.out.splitlines()]
    assert sorted(x["custom_id"] for x in out) == ["line-1", "line-3"]
    assert "completed" in captured.err
    assert api.create.call_count == 1 and api.content.call_count == 1


def test_submit_prints_the_id_and_the_other_commands_take_it(api: FakeBatchAPI, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(chat(str(i))) + "\n" for i in range(3)))
    assert cli("submit", str(src), "--base-url", BASE, "--metadata", "job=nightly") == 0
    batch_id = capsys.readouterr().out.strip()
    assert api.batches[batch_id]["metadata"]["job"] == "nightly"

    assert cli("status", batch_id, "--base-url", BASE) == 0
    assert batch_id in capsys.readouterr().out
    assert cli("wait", batch_id, "--base-url", BASE, "--no-progress") == 0
    assert "completed, 0 failed of 3" in capsys.readouterr().out
    out, err = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    assert cli("download", batch_id, "--base-url", BASE, "-o", str(out), "-e", str(err)) == 0
    assert len(out.read_text().splitlines()) == 3 and not err.exists()
    assert cli("list", "--base-url", BASE, "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == batch_id  # one JSON array


def test_cancel_and_errors_exit_nonzero(api: FakeBatchAPI, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(chat("x")) + "\n")
    cli("submit", str(src), "--base-url", BASE)
    batch_id = capsys.readouterr().out.strip()
    assert cli("cancel", batch_id, "--base-url", BASE) == 0
    assert "cancelled" in capsys.readouterr().out
    assert cli("status", "batch_missing", "--base-url", BASE) == 1
    assert "404" in capsys.readouterr().err


def test_submit_with_models_shards_per_model(api: FakeBatchAPI, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert cli("submit", str(src), "--base-url", BASE, "--models", "a,b,c") == 0
    assert "(3 batches)" in capsys.readouterr().err
    assert sorted(api.input_lines(b)[0]["body"]["model"] for b in api.batches) == ["a", "b", "c"]


def test_invalid_file_is_refused_before_upload(api: FakeBatchAPI, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(chat("x", temperature=5)) + "\n")
    assert cli("submit", str(src), "--base-url", BASE) == 1
    assert "temperature" in capsys.readouterr().err
    assert not api.upload.called


def test_failed_batch_exits_1(api: FakeBatchAPI, tmp_path: Path, capsys) -> None:
    api.steps = ["validating", "failed"]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(chat("x")) + "\n")
    assert cli("submit", str(src), "--base-url", BASE, "--wait", "--no-progress") == 1
    assert "bad line" in capsys.readouterr().err
