"""The `vllm-batch` command, run in-process against the fake Batch API."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import httpx
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


def test_metadata_without_equals_is_an_error_not_dropped(api: FakeBatchAPI, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(chat("x")) + "\n")
    assert cli("submit", str(src), "--base-url", BASE, "--metadata", "job") == 2
    assert "expected KEY=VALUE, got 'job'" in capsys.readouterr().err
    assert not api.upload.called


def test_create_refuses_options_the_endpoint_does_not_take(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    assert cli("create", str(prompts), "--model", "e", "--endpoint", "embeddings", "--max-tokens", "5") == 1
    assert "--max-tokens and --temperature do not apply to embeddings" in capsys.readouterr().err
    assert cli("create", str(prompts), "--model", "m", "--temperature", "7") == 1
    assert "--temperature: Input should be less than or equal to 2" in capsys.readouterr().err


def test_create_without_a_model_then_submit_with_models(api: FakeBatchAPI, tmp_path: Path, capsys) -> None:
    prompts, requests = tmp_path / "p.txt", tmp_path / "r.jsonl"
    prompts.write_text("hello\n")
    assert cli("create", str(prompts), "--max-tokens", "8", "-o", str(requests)) == 0
    assert "submit them with --models" in capsys.readouterr().err
    assert cli("submit", str(requests), "--base-url", BASE, "--models", "a,b") == 0
    assert sorted(api.input_lines(b)[0]["body"]["model"] for b in api.batches) == ["a", "b"]
    assert cli("submit", str(requests), "--base-url", BASE) == 1  # and without --models, it says what to do
    assert "line 1, field 'model': no model" in capsys.readouterr().err


def test_submit_dash_reads_stdin(api: FakeBatchAPI, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    lines = "".join(json.dumps(chat(str(i))) + "\n" for i in range(2)).encode()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines)))
    assert cli("submit", "-", "--base-url", BASE) == 0
    batch_id = capsys.readouterr().out.strip()
    assert len(api.input_lines(batch_id)) == 2


def test_cancel_of_a_batch_that_already_ended_exits_1(api: FakeBatchAPI, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(chat("x")) + "\n")
    cli("submit", str(src), "--base-url", BASE, "--wait", "--no-progress", "-o", str(tmp_path / "o.jsonl"))
    batch_id = capsys.readouterr().out.strip()
    assert cli("cancel", batch_id, "--base-url", BASE) == 1
    assert "had already ended (completed); nothing was cancelled" in capsys.readouterr().err


def test_cancel_of_a_batch_already_cancelled_exits_1(api: FakeBatchAPI, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(chat("x")) + "\n")
    cli("submit", str(src), "--base-url", BASE)
    batch_id = capsys.readouterr().out.strip()
    assert cli("cancel", batch_id, "--base-url", BASE) == 0
    capsys.readouterr()
    assert cli("cancel", batch_id, "--base-url", BASE) == 1
    assert "had already ended (cancelled); nothing was cancelled" in capsys.readouterr().err
    assert api.cancel.call_count == 1


def test_messages_speak_command_line_not_python(api: FakeBatchAPI, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(chat("x")) + "\n" + json.dumps(chat("y", max_tokens="9")) + "\n")
    assert cli("submit", str(src), "--base-url", BASE) == 1
    err = capsys.readouterr().err
    assert f"{src}, line 2, field 'max_tokens'" in err
    src.write_text(json.dumps(chat("x")) + "\n")
    cli("submit", str(src), "--base-url", BASE)
    batch_id = capsys.readouterr().out.strip()
    api.steps = ["validating", "in_progress", "in_progress"]  # never ends
    assert cli("download", batch_id, "--base-url", BASE) == 1
    err = capsys.readouterr().err
    assert "once it has ended" in err and "wait()" not in err and "api_key=" not in err


def test_an_unreachable_server_is_named_and_retries_are_not_silent(api: FakeBatchAPI, capsys) -> None:
    api.retrieve.side_effect = httpx.ConnectError("[Errno 111] Connection refused")
    assert cli("status", "batch_1", "--base-url", BASE) == 1
    err = capsys.readouterr().err
    assert err.count("retrying in") == 5
    assert err.strip().splitlines()[-1] == (
        "vllm-batch: cannot reach http://batch.test/v1 ([Errno 111] Connection refused)")


@pytest.mark.parametrize(("command", "expected"), [
    ("status", ["the batch id that submit printed", "one JSON array",
                "backend (default: BATCH_PROVIDER / BATCH_BASE_URL, else the local server): --provider"]),
    ("create", ["leave it out to submit with --models", "the most tokens", "sampling temperature",
                "(default: chat)"]),
    ("list", ["how many batches to show (default: 20)", "one JSON array"]),
    ("wait", ["longest wait between polls (s) (default: 60.0)"]),
])
def test_help_explains_every_argument_and_its_default(command: str, expected: list[str], capsys) -> None:
    assert cli(command, "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in expected:
        assert phrase in text, phrase


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(found) == 1
    return dict(found[0].choices)


def test_every_subcommand_explains_every_argument_and_shows_its_default() -> None:
    """docs/client.md: `vllm-batch COMMAND --help` explains every argument and shows its default."""
    from vllm_batch._cli import build_parser

    commands = _subcommands(build_parser())
    assert {"submit", "status", "cancel", "wait", "download", "list", "create", "tail", "retry", "results",
            "mark", "marks", "export", "import-marks"} <= set(commands)
    problems = []
    for name, parser in commands.items():
        if not (parser.description or "").strip():
            problems.append(f"{name}: no description line")
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help or action.help == argparse.SUPPRESS or not action.help.strip():
                problems.append(f"{what}: no help text")
            default = action.default
            if default in (None, False, argparse.SUPPRESS) or default == []:
                continue
            if f"(default: {default})" not in text:
                problems.append(f"{what}: default {default!r} not shown")
    assert problems == []
