"""From results to a dataset on the real CPU engine: run a chat batch while following its results, mark answers gold
from the CLI, export them to a fine-tuning file that `datasets` loads and the model's chat template renders, and a
PostgreSQL result handler that has every row after a kill -9 between the batch's end and the delivery. On the
server test_online_preemption.py used before (`small_cache_server`), which this test kills and restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import postgres
from tests.helpers.handlers import run_of
from tests.helpers.server import RunningServer
from tests.vllm.conftest import CHAT_MODEL, MAX_TOKENS, QUESTIONS, chat_line
from vllm_batch import VLLMBatch
from vllm_batch._cli import main

pytestmark = pytest.mark.vllm

SYSTEM = "Answer in a few words."


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    assert info.value.code in (0, None), err
    return out, err


def test_batch_to_gold_fine_tuning_data_and_postgres_rows_after_kill9(
        small_cache_server: RunningServer, pg: postgres.Postgres, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    server = small_cache_server  # its batches fit its small KV cache: 8 short chats of one block each
    import psycopg
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from vllm_batch_server.engines.model_files import resolve
    from vllm_batch_server.settings import default_cache_dir

    pg.stop("immediate")  # down when the batch ends: the handler cannot deliver yet
    lines = [chat_line(f"q{i}", question, SYSTEM) for i, question in enumerate(QUESTIONS[:8])]
    with VLLMBatch(base_url=server.base_url, workdir=tmp_path / "w") as batch:
        batch.add_requests([{"custom_id": line["custom_id"], **line["body"]} for line in lines])
        batch_id = batch.submit()
        followed = list(batch.follow(poll_interval=1.0, timeout=900))
        status = batch.status()
    assert status.status == "completed" and status.request_counts.completed == 8
    assert sorted(r.index for r in followed) == list(range(8))
    answers = {r.custom_id: r.text for r in followed}
    assert all(isinstance(text, str) and text.strip() for text in answers.values()), answers

    # Gold from the command line, then the fine-tuning file.
    url = ["--base-url", server.base_url]
    cli(capsys, "mark", batch_id, "q0", "q2", "q5", "--label", "gold", *url)
    cli(capsys, "mark", batch_id, "q1", "--label", "reject", "--note", "off topic", *url)
    train = tmp_path / "gold.jsonl"
    _, err = cli(capsys, "export", batch_id, "-o", str(train), "--label", "gold", *url)
    assert "wrote 3 openai records" in err
    rows = load_dataset("json", data_files=str(train), split="train")
    assert len(rows) == 3 and rows.column_names == ["messages"]
    tokenizer = AutoTokenizer.from_pretrained(resolve(CHAT_MODEL, default_cache_dir()).path)
    for row, custom_id in zip(rows, ("q0", "q2", "q5"), strict=True):
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][2]["content"] == answers[custom_id]
        rendered = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert answers[custom_id] in rendered

    # The handler is retrying against the stopped PostgreSQL; kill -9, PostgreSQL back, restart.
    waiting = run_of(server, batch_id, "warehouse", "retrying", timeout=60)
    assert waiting["attempts"] >= 1 and waiting["last_error"]
    server.kill()
    pg.start()
    server.start(timeout=120)
    delivered = run_of(server, batch_id, "warehouse", "succeeded", timeout=120)
    assert delivered["attempts"] >= 2
    with psycopg.connect(pg.dsn) as conn:
        found = conn.execute("SELECT custom_id, line, status_code, request, response FROM answers "
                             "WHERE batch_id = %s ORDER BY line", (batch_id,)).fetchall()
    assert [row[0] for row in found] == [f"q{i}" for i in range(8)]  # each once, in input order
    assert [row[1] for row in found] == list(range(1, 9))
    for custom_id, _, status_code, request, response in found:
        assert status_code == 200 and request["max_tokens"] == MAX_TOKENS
        assert response["model"] == CHAT_MODEL
        assert response["choices"][0]["message"]["content"] == answers[custom_id]
    json.dumps(found, default=str)  # plain JSON values all the way
