"""Export formats and Label Studio reading, at the unit level: each format for chat (multi-turn, tools, content
parts), completions and responses answers, read back the way trainers read them (`datasets`, a chat template)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vllm_batch import ExportError, LabelStudioError, Mark, label_studio_config
from vllm_batch._curation import Selection
from vllm_batch._export import conversation, write_export
from vllm_batch._labelstudio import read_annotations
from vllm_batch._requests import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES
from vllm_batch._results import BatchResult, ResultError

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}}]


def chat_result(custom_id: str, messages: list[dict[str, Any]], answer: dict[str, Any], **request: Any) -> BatchResult:
    body = {"model": "m", "messages": messages, **request}
    response = {"object": "chat.completion", "choices": [{"index": 0, "message": answer, "finish_reason": "stop"}]}
    return BatchResult(index=0, custom_id=custom_id, endpoint=CHAT, model="m", request=body, response=response,
                       error=None, status_code=200, batch_id="batch_1")


SIMPLE = chat_result("simple", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                     {"role": "assistant", "content": "4", "refusal": None, "reasoning_content": "adding"})
MULTI = chat_result("multi", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                              {"role": "user", "content": [{"type": "text", "text": "Name "},
                                                           {"type": "text", "text": "a colour"}]}],
                    {"role": "assistant", "content": "Blue"})
TOOL = chat_result("tool", [{"role": "user", "content": "Weather in Paris?"}],
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "call_1", "type": "function",
                        "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]}, tools=TOOLS)
COMPLETION = BatchResult(index=1, custom_id="cmpl", endpoint=COMPLETIONS, model="m", request={"model": "m",
                         "prompt": "The sky is"}, response={"choices": [{"text": " blue", "index": 0}]}, error=None,
                         status_code=200)
RESPONSE = BatchResult(index=2, custom_id="resp", endpoint=RESPONSES, model="m",
                       request={"model": "m", "input": "Say hi", "instructions": "Be kind."},
                       response={"output_text": "Hi!"}, error=None, status_code=200)
FAILED = BatchResult(index=3, custom_id="failed", endpoint=CHAT, model="m",
                     request={"model": "m", "messages": [{"role": "user", "content": "x"}]}, response=None,
                     error=ResultError("context_length_exceeded", "too long", 400), status_code=400)


def everything(marks: dict[str, Mark] | None = None) -> list[tuple[BatchResult, Mark | None]]:
    marks = marks or {}
    return [(r, marks.get(r.custom_id)) for r in (SIMPLE, MULTI, TOOL, COMPLETION, RESPONSE, FAILED)]


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_openai_format_is_the_chat_fine_tuning_shape(tmp_path: Path) -> None:
    path = tmp_path / "ft.jsonl"
    assert write_export(path, "openai", everything(), Selection()) == 5  # the failure is left out
    simple, multi, tool, completion, response = read_lines(path)
    assert simple == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                                   {"role": "assistant", "content": "4"}]}  # vLLM's extra fields dropped
    assert multi["messages"][2]["content"][1] == {"type": "text", "text": "a colour"}  # parts kept as they are
    assert tool["tools"] == TOOLS
    assert tool["messages"][-1] == {"role": "assistant", "content": None, "tool_calls": TOOL.response["choices"][0][  # type: ignore[index]
        "message"]["tool_calls"]}
    assert completion["messages"] == [{"role": "user", "content": "The sky is"},
                                      {"role": "assistant", "content": " blue"}]
    assert response["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi"},
                                    {"role": "assistant", "content": "Hi!"}]


def test_datasets_loads_each_format_as_trainers_do(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    chats = [(SIMPLE, None), (MULTI, None), (COMPLETION, None)]
    for format, column in (("openai", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction")):
        path = tmp_path / f"{format}.jsonl"
        write_export(path, format, chats, Selection())
        rows = datasets.load_dataset("json", data_files=str(path), split="train")
        assert len(rows) == 3 and column in rows.column_names
    rows = datasets.load_dataset("json", data_files=str(tmp_path / "openai.jsonl"), split="train")
    # TRL's SFTTrainer reads a "messages" column of role/content turns as a conversational dataset.
    for row in rows:
        assert all(set(turn) >= {"role", "content"} for turn in row["messages"])
        assert row["messages"][-1]["role"] == "assistant"


def test_a_chat_template_renders_the_exported_conversations(tmp_path: Path) -> None:
    """What an SFT trainer does with each row: the model's chat template over the messages."""
    transformers = pytest.importorskip("transformers")
    from vllm_batch_server.settings import default_cache_dir

    folder = default_cache_dir() / "smollm2-135m-instruct"
    if not (folder / "tokenizer.json").exists():
        pytest.skip("the embedded chat model is not prepared (vllm-batch-server models prepare)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    path = tmp_path / "ft.jsonl"
    write_export(path, "openai", [(SIMPLE, None), (COMPLETION, None)], Selection())
    for row in read_lines(path):
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert row["messages"][-1]["content"] in text and "assistant" in text


def test_sharegpt_and_alpaca_shapes(tmp_path: Path) -> None:
    write_export(tmp_path / "s.jsonl", "sharegpt", [(SIMPLE, None), (MULTI, None), (TOOL, None)], Selection())
    simple, multi, tool = read_lines(tmp_path / "s.jsonl")
    assert simple["conversations"] == [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                                       {"from": "gpt", "value": "4"}]
    assert multi["conversations"][-2] == {"from": "human", "value": "Name a colour"}
    assert tool["conversations"][-1]["from"] == "function_call"
    assert json.loads(tool["conversations"][-1]["value"]) == [{"name": "weather", "arguments": "{\"city\": \"Paris\"}"}]
    assert json.loads(tool["tools"]) == TOOLS

    write_export(tmp_path / "a.jsonl", "alpaca", [(SIMPLE, None), (MULTI, None)], Selection())
    simple, multi = read_lines(tmp_path / "a.jsonl")
    assert simple == {"instruction": "2+2?", "input": "", "output": "4", "system": "Be brief."}
    assert multi == {"instruction": "Name a colour", "input": "", "output": "Blue", "history": [["Hi", "Hello!"]]}


def test_in_context_examples_file(tmp_path: Path) -> None:
    marks = {"simple": Mark("simple", "gold", 5.0)}
    assert write_export(tmp_path / "shots.json", "in-context", everything(marks), Selection(limit=2)) == 2
    shots = json.loads((tmp_path / "shots.json").read_text())
    assert shots["examples"][0] == {"custom_id": "simple", "input": "2+2?", "output": "4", "label": "gold",
                                    "score": 5.0}
    assert shots["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                                 {"role": "user", "content": "Name a colour"},
                                 {"role": "assistant", "content": "Blue"}]


def test_what_a_format_cannot_hold_is_refused_by_name(tmp_path: Path) -> None:
    image = chat_result("img", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                        {"role": "assistant", "content": "a cat"})
    with pytest.raises(ExportError, match=r"'img'.*image_url"):
        write_export(tmp_path / "x.jsonl", "sharegpt", [(image, None)], Selection())
    assert not (tmp_path / "x.jsonl").exists() and not list(tmp_path.iterdir())  # no half file left
    assert write_export(tmp_path / "ok.jsonl", "openai", [(image, None)], Selection()) == 1  # kept as parts
    embedding = BatchResult(index=0, custom_id="emb", endpoint=EMBEDDINGS, model="e", request={"input": "x"},
                            response={"data": []}, error=None, status_code=200)
    with pytest.raises(ExportError, match="no text answer"):
        conversation(embedding)
    with pytest.raises(ValueError, match="unknown export format"):
        write_export(tmp_path / "y", "csv", [], Selection())


def test_selection_by_marks_errors_and_predicate() -> None:
    gold, reject, scored = Mark("a", "gold"), Mark("b", "reject"), Mark("c", None, 0.2)
    assert Selection.of(labels="gold").keeps(SIMPLE, gold)
    assert not Selection.of(labels="gold").keeps(SIMPLE, None)
    assert not Selection.of(labels=["gold"]).keeps(FAILED, gold)  # a failure has no answer to train on
    assert Selection.of(errors=True).keeps(FAILED, None)
    assert not Selection.of(exclude_labels="reject").keeps(SIMPLE, reject)
    assert Selection.of(exclude_labels="reject").keeps(SIMPLE, None)
    assert not Selection.of(min_score=0.5).keeps(SIMPLE, scored) and Selection.of(min_score=0.1).keeps(SIMPLE, scored)
    assert not Selection.of(min_score=0.1).keeps(SIMPLE, None)
    assert Selection.of(where=lambda r, m: r.custom_id == "simple").keeps(SIMPLE, None)
    assert not Selection.of(where=lambda r, m: r.custom_id == "other").keeps(SIMPLE, None)
    with pytest.raises(ValueError):
        Selection.of(limit=0)


def test_label_studio_tasks_carry_ids_and_existing_marks(tmp_path: Path) -> None:
    marks = {"simple": Mark("simple", "gold", 4.0, "nice")}
    assert write_export(tmp_path / "t.json", "label-studio", everything(marks), Selection(errors=True)) == 6
    tasks = json.loads((tmp_path / "t.json").read_text())
    assert tasks[0]["data"] == {"custom_id": "simple", "batch_id": "batch_1", "model": "m", "ok": True,
                                "prompt": "system: Be brief.\n\nuser: 2+2?", "answer": "4",
                                "messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "2+2?"}]}
    result = tasks[0]["predictions"][0]["result"]
    assert [(r["from_name"], r["type"], r["value"]) for r in result] == [
        ("label", "choices", {"choices": ["gold"]}), ("score", "rating", {"rating": 4.0}),
        ("note", "textarea", {"text": ["nice"]})]
    assert tasks[5]["data"]["ok"] is False and "too long" in tasks[5]["data"]["answer"]
    config = label_studio_config()
    for name in ('name="label"', 'name="score"', 'name="note"', 'value="$prompt"', 'value="$answer"'):
        assert name in config


def test_reading_label_studio_json_and_json_min_exports(tmp_path: Path) -> None:
    full = [
        {"id": 1, "data": {"custom_id": "a", "batch_id": "batch_1"}, "annotations": [
            {"id": 10, "updated_at": "2026-01-01T10:00:00Z", "was_cancelled": False, "result": [
                {"type": "choices", "from_name": "label", "to_name": "answer", "value": {"choices": ["ok"]}}]},
            {"id": 11, "updated_at": "2026-01-02T10:00:00Z", "was_cancelled": False, "result": [
                {"type": "choices", "from_name": "label", "to_name": "answer", "value": {"choices": ["gold"]}},
                {"type": "rating", "from_name": "score", "to_name": "answer", "value": {"rating": 5}},
                {"type": "textarea", "from_name": "note", "to_name": "answer", "value": {"text": ["good", "short"]}}]},
            {"id": 12, "updated_at": "2026-01-03T10:00:00Z", "was_cancelled": True, "result": [
                {"type": "choices", "from_name": "label", "to_name": "answer", "value": {"choices": ["reject"]}}]}]},
        {"id": 2, "data": {"custom_id": "b"}, "annotations": []},  # not annotated yet: skipped
        {"id": 3, "data": {"custom_id": "c", "batch_id": "batch_2"}, "annotations": [{"result": [
            {"type": "number", "from_name": "score", "to_name": "answer", "value": {"number": 0.5}}]}]},
    ]
    (tmp_path / "full.json").write_text(json.dumps(full))
    found = list(read_annotations(tmp_path / "full.json"))
    assert [(a.batch_id, a.mark.custom_id, a.mark.label, a.mark.score, a.mark.note) for a in found] == [
        ("batch_1", "a", "gold", 5.0, "good\nshort"), ("batch_2", "c", None, 0.5, None)]

    # As Label Studio 1.23 writes it: a rating as a list of {"rating": n}.
    minimal = [{"id": 1, "custom_id": "a", "batch_id": "batch_1", "label": "reject", "annotator": 1},
               {"id": 2, "custom_id": "b", "batch_id": "batch_1", "score": [{"rating": 3}], "note": "meh"},
               {"id": 3, "custom_id": "c", "batch_id": "batch_1", "label": {"choices": ["gold", "ok"]}},
               {"id": 4, "custom_id": "d", "batch_id": "batch_1"}]
    (tmp_path / "min.json").write_text(json.dumps(minimal))
    found = list(read_annotations(tmp_path / "min.json"))
    assert [(a.mark.custom_id, a.mark.label, a.mark.score, a.mark.note) for a in found] == [
        ("a", "reject", None, None), ("b", None, 3.0, "meh"), ("c", "gold", None, None)]


@pytest.mark.parametrize("content,message", [
    ("{not json", "not JSON"), ('{"tasks": []}', "expected a JSON list"), ("[1]", "task 0 is not an object"),
    ('[{"data": {}, "annotations": [{"result": [{"type": "choices", "value": {"choices": ["x"]}}]}]}]',
     "no data.custom_id")])
def test_a_file_that_is_not_a_label_studio_export_is_refused(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(LabelStudioError, match=message):
        list(read_annotations(tmp_path / "bad.json"))
