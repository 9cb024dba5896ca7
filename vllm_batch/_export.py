"""Turning results into training and few-shot data, and into Label Studio tasks.

Each chat result becomes a conversation: the request's messages, then the answer (the first choice) as the
assistant's turn. A completion becomes the prompt as the user's turn and the text as the assistant's.
Embeddings have no text answer and cannot be exported.

    openai        OpenAI chat fine-tuning JSONL: {"messages": [...], "tools"?: [...]} per line (what TRL's
                  SFTTrainer and most trainers read as a conversational dataset)
    sharegpt      {"conversations": [{"from": "system"|"human"|"gpt"|..., "value": "..."}], "tools"?: "..."}
    alpaca        {"instruction", "input", "output", "system"?, "history"?: [[user, assistant], ...]}
    in-context    one JSON file: {"examples": [{"input", "output", ...}], "messages": [user, assistant, ...]},
                  ready to put in front of a new prompt as few-shot examples
    label-studio  Label Studio's task import format (a JSON list of {"data": ..., "predictions": ...}); see
                  _labelstudio.py for the labeling configuration and reading annotations back

Files are written next to their destination and renamed into place, so a failed export leaves no half file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from vllm_batch._curation import Mark, Selection
from vllm_batch._errors import VLLMBatchError
from vllm_batch._requests import CHAT, COMPLETIONS, RESPONSES
from vllm_batch._results import BatchResult

FORMATS = ("openai", "sharegpt", "alpaca", "in-context", "label-studio")
SHAREGPT_ROLES = {"system": "system", "developer": "system", "user": "human", "assistant": "gpt",
                  "tool": "observation", "function": "observation"}
# The fields of a message the fine-tuning format knows; anything a server added (vLLM's reasoning_content,
# refusal: null, ...) is left out.
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")


class ExportError(VLLMBatchError, ValueError):
    """A result cannot be written in the chosen format; the message names the request."""


def text_of(content: Any, custom_id: str) -> str:
    """The text of a message's content: a string, or a list of text parts (other parts cannot be exported as
    plain text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ExportError(f"request {custom_id!r}: a {kind!r} content part has no text form; only the "
                                  "openai format keeps it")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ExportError(f"request {custom_id!r}: unexpected message content {type(content).__name__}")


def _clean(message: dict[str, Any]) -> dict[str, Any]:
    return {k: message[k] for k in MESSAGE_FIELDS if message.get(k) is not None or (k == "content" and k in message)}


def conversation(result: BatchResult) -> list[dict[str, Any]]:
    """The request's messages and the answer as the assistant's turn (OpenAI's message shape)."""
    request, response = result.request, result.response or {}
    if result.endpoint == CHAT:
        messages = [_clean(m) for m in request.get("messages") or [] if isinstance(m, dict)]
        choices = response.get("choices") or []
        answer = dict((choices[0].get("message") or {}) if choices else {})
        answer["role"] = "assistant"
        answer.setdefault("content", None)
        return [*messages, _clean(answer)]
    if result.endpoint == COMPLETIONS:
        prompt = request.get("prompt")
        if not isinstance(prompt, str):
            raise ExportError(f"request {result.custom_id!r}: only a text prompt can be exported")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": result.text or ""}]
    if result.endpoint == RESPONSES:
        raw = request.get("input")
        turns = [{"role": "user", "content": raw}] if isinstance(raw, str) else [
            _clean(m) for m in raw or [] if isinstance(m, dict) and m.get("role")]
        instructions = request.get("instructions")
        system = [{"role": "system", "content": instructions}] if isinstance(instructions, str) else []
        return [*system, *turns, {"role": "assistant", "content": result.text or ""}]
    raise ExportError(f"request {result.custom_id!r}: {result.endpoint} results have no text answer to export")


# ---- one record per result -------------------------------------------------------------------------------


def openai_record(result: BatchResult) -> dict[str, Any]:
    record: dict[str, Any] = {"messages": conversation(result)}
    if result.request.get("tools"):
        record["tools"] = result.request["tools"]
    return record


def sharegpt_record(result: BatchResult) -> dict[str, Any]:
    turns = []
    for message in conversation(result):
        role = SHAREGPT_ROLES.get(message["role"])
        if role is None:
            raise ExportError(f"request {result.custom_id!r}: the role {message['role']!r} has no ShareGPT name")
        if message.get("tool_calls"):
            role = "function_call"
            value = json.dumps([call.get("function", call) for call in message["tool_calls"]], ensure_ascii=False)
        else:
            value = text_of(message.get("content"), result.custom_id)
        turns.append({"from": role, "value": value})
    record: dict[str, Any] = {"conversations": turns}
    if result.request.get("tools"):
        record["tools"] = json.dumps(result.request["tools"], ensure_ascii=False)
    return record


def alpaca_record(result: BatchResult) -> dict[str, Any]:
    messages = conversation(result)
    system = [text_of(m.get("content"), result.custom_id) for m in messages if m["role"] in ("system", "developer")]
    turns = [m for m in messages if m["role"] not in ("system", "developer")]
    *earlier, last_user, answer = turns
    if last_user["role"] != "user":
        raise ExportError(f"request {result.custom_id!r}: Alpaca needs the last message to be the user's")
    history = []
    for question, reply in zip(earlier[0::2], earlier[1::2], strict=False):
        if (question["role"], reply["role"]) != ("user", "assistant"):
            raise ExportError(f"request {result.custom_id!r}: Alpaca history needs user/assistant pairs")
        history.append([text_of(question.get("content"), result.custom_id),
                        text_of(reply.get("content"), result.custom_id)])
    if len(earlier) % 2:
        raise ExportError(f"request {result.custom_id!r}: Alpaca history needs user/assistant pairs")
    record: dict[str, Any] = {"instruction": text_of(last_user.get("content"), result.custom_id), "input": "",
                              "output": text_of(answer.get("content"), result.custom_id)}
    if system:
        record["system"] = "\n\n".join(system)
    if history:
        record["history"] = history
    return record


def label_studio_task(result: BatchResult, mark: Mark | None) -> dict[str, Any]:
    data: dict[str, Any] = {"custom_id": result.custom_id, "batch_id": result.batch_id, "model": result.model,
                            "ok": result.ok}
    try:
        messages = conversation(result)
    except ExportError:
        messages = []
    prompt_turns = messages[:-1] if result.ok else messages
    data["prompt"] = "\n\n".join(f"{m['role']}: {_plain(m.get('content'))}" for m in prompt_turns)
    data["answer"] = (result.text or "") if result.ok else f"[error] {result.error.message if result.error else ''}"
    data["messages"] = prompt_turns
    task: dict[str, Any] = {"data": data}
    if mark is not None:
        prediction: list[dict[str, Any]] = []
        if mark.label is not None:
            prediction.append({"from_name": "label", "to_name": "answer", "type": "choices",
                               "value": {"choices": [mark.label]}})
        if mark.score is not None:
            prediction.append({"from_name": "score", "to_name": "answer", "type": "rating",
                               "value": {"rating": mark.score}})
        if mark.note is not None:
            prediction.append({"from_name": "note", "to_name": "answer", "type": "textarea",
                               "value": {"text": [mark.note]}})
        task["predictions"] = [{"model_version": "vllm-batch marks", "result": prediction}]
    return task


def _plain(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else json.dumps(content)


# ---- files -------------------------------------------------------------------------------------------------


def write_export(path: str | Path, format: str, items: Iterable[tuple[BatchResult, Mark | None]],
                 selection: Selection) -> int:
    """Write the selected results to `path` in `format`; returns how many were written."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if selection.errors and format != "label-studio":
        raise ValueError("errors=True: only the label-studio format can show failed results")
    target = Path(path)
    tmp = target.with_name(f".{target.name}.part")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            count = _write(out, format, _selected(items, selection))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def _selected(items: Iterable[tuple[BatchResult, Mark | None]],
              selection: Selection) -> Iterable[tuple[BatchResult, Mark | None]]:
    count = 0
    for result, mark in items:
        if selection.limit is not None and count >= selection.limit:
            return
        if selection.keeps(result, mark):
            count += 1
            yield result, mark


def _dumps(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False)


def _write(out: IO[str], format: str, items: Iterable[tuple[BatchResult, Mark | None]]) -> int:
    count = 0
    if format == "label-studio":  # one JSON array, streamed
        out.write("[")
        for result, mark in items:
            out.write(("\n" if count == 0 else ",\n") + _dumps(label_studio_task(result, mark)))
            count += 1
        out.write("\n]\n")
        return count
    if format == "in-context":  # small by nature: one JSON object
        examples, messages = [], []
        for result, mark in items:
            turns = [m for m in conversation(result) if m["role"] not in ("system", "developer")]
            question, answer = turns[-2], turns[-1]
            text_in = text_of(question.get("content"), result.custom_id)
            text_out = text_of(answer.get("content"), result.custom_id)
            example: dict[str, Any] = {"custom_id": result.custom_id, "input": text_in, "output": text_out}
            if mark is not None:
                example.update({"label": mark.label, "score": mark.score})
            examples.append(example)
            messages += [{"role": "user", "content": text_in}, {"role": "assistant", "content": text_out}]
            count += 1
        out.write(json.dumps({"examples": examples, "messages": messages}, ensure_ascii=False, indent=1) + "\n")
        return count
    record = {"openai": openai_record, "sharegpt": sharegpt_record, "alpaca": alpaca_record}[format]
    for result, _ in items:
        out.write(_dumps(record(result)) + "\n")
        count += 1
    return count
