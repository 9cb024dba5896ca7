"""Label Studio, both ways: a labeling configuration for the tasks `export(format="label-studio")` writes, and
reading Label Studio's annotation export back as marks.

Tasks carry `data.custom_id` and `data.batch_id`, so each annotation finds its result again. Of an annotation's
regions, a `choices` region becomes the mark's label (its first choice), a `rating` or `number` region its score,
and a `textarea` region its note (lines joined). Both of Label Studio's JSON exports are read: "JSON" (tasks
with their `annotations`; the newest annotation that was not cancelled wins) and "JSON-MIN" (one flat object per
annotation, control names as keys).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_batch._curation import Mark
from vllm_batch._errors import VLLMBatchError

LABELING_CONFIG = """<View>
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Answer"/>
  <Text name="answer" value="$answer"/>
  <Choices name="label" toName="answer" choice="single" showInline="true">
    <Choice value="gold"/>
    <Choice value="ok"/>
    <Choice value="reject"/>
  </Choices>
  <Rating name="score" toName="answer" maxRating="5"/>
  <TextArea name="note" toName="answer" editable="true" maxSubmissions="1" placeholder="note"/>
</View>
"""


class LabelStudioError(VLLMBatchError, ValueError):
    """The file is not a Label Studio export this can read; the message says where."""


@dataclass(frozen=True)
class Annotation:
    """One task's annotation as a mark, with the batch it belongs to (None: the task did not say)."""

    batch_id: str | None
    mark: Mark


def label_studio_config() -> str:
    """A labeling configuration (XML) for the exported tasks: label gold/ok/reject, a 1-5 score, a note."""
    return LABELING_CONFIG


def read_annotations(path: str | Path) -> Iterator[Annotation]:
    """Marks from a Label Studio JSON or JSON-MIN export. Tasks without annotations are skipped."""
    try:
        with open(path, encoding="utf-8") as fh:
            tasks = json.load(fh)
    except json.JSONDecodeError as exc:
        raise LabelStudioError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(tasks, list):
        raise LabelStudioError(f"{path}: expected a JSON list of tasks, as Label Studio exports")
    for number, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise LabelStudioError(f"{path}: task {number} is not an object")
        annotation = _from_full(task) if "annotations" in task or "data" in task else _from_min(task)
        if annotation is None:
            continue
        if not annotation.mark.custom_id:
            raise LabelStudioError(f"{path}: task {number} has no data.custom_id; was it exported by vllm-batch?")
        yield annotation


def _from_full(task: dict[str, Any]) -> Annotation | None:
    data = task.get("data") or {}
    live = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not live:
        return None
    newest = max(live, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))
    label = score = note = None
    for region in newest.get("result") or []:
        value = region.get("value") or {}
        kind = region.get("type")
        if kind == "choices" and value.get("choices") and label is None:
            label = str(value["choices"][0])
        elif kind in ("rating", "number") and score is None:
            raw = value.get(kind)
            score = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None
        elif kind == "textarea" and note is None:
            text = value.get("text")
            note = "\n".join(map(str, text)) if isinstance(text, list) else (str(text) if text else None)
    return _annotation(data, label, score, note)


def _from_min(task: dict[str, Any]) -> Annotation | None:
    # JSON-MIN puts each control's value under its name, shaped by the control: a choice as a string (or
    # {"choices": [...]} when several are allowed), a rating as [{"rating": 4}], a text area as a string.
    label = _unwrap(task.get("label"), "choices")
    score = _unwrap(task.get("score"), "rating", "number")
    note = _unwrap(task.get("note"), "text")
    return _annotation(task, label if isinstance(label, str) else None,
                       float(score) if isinstance(score, int | float) and not isinstance(score, bool) else None,
                       note if isinstance(note, str) else None)


def _unwrap(value: Any, *keys: str) -> Any:
    """The plain value inside JSON-MIN's wrappers: the first of a list, the entry of a dict under one of `keys`."""
    for _ in range(4):
        if isinstance(value, list):
            value = value[0] if value else None
        elif isinstance(value, dict):
            value = next((value[k] for k in keys if k in value), None)
        else:
            break
    return value


def _annotation(data: dict[str, Any], label: str | None, score: float | None, note: str | None) -> Annotation | None:
    if label is None and score is None and note is None:
        return None
    batch_id = data.get("batch_id")
    return Annotation(batch_id if isinstance(batch_id, str) else None,
                      Mark(custom_id=str(data.get("custom_id") or ""), label=label, score=score, note=note,
                           batch_id=batch_id if isinstance(batch_id, str) else None))
