"""The batch input file: validated once, line by line, before a batch is accepted for running.

Both validation and the runner stream the file, so a batch's memory does not grow with its size: custom_ids are
checked for duplicates through `custom_ids.DuplicateFinder` (hashes on a temporary file), not a set of them
all. Errors name the 1-based line, the offending parameter and a code, as OpenAI's `errors.data[]` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_batch_server.queue.custom_ids import DuplicateFinder
from vllm_batch_server.store.jsonl import TooDeep, has_lone_surrogate, iter_raw_lines, loads


@dataclass
class LineError:
    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "line": self.line, "message": self.message, "param": self.param}


@dataclass
class Report:
    total: int = 0
    model: str | None = None
    errors: list[LineError] = field(default_factory=list)
    truncated: bool = False  # more errors existed than were kept

    @property
    def ok(self) -> bool:
        return not self.errors


class _Validator:
    def __init__(self, endpoint: str, served_models: list[str], max_lines: int, max_errors: int,
                 ids: DuplicateFinder) -> None:
        self.endpoint = endpoint
        self.served = set(served_models)
        self.max_lines = max_lines
        self.max_errors = max_errors
        self.report = Report()
        self.ids = ids  # duplicates are found once the whole file is read, and merged in by line

    def error(self, code: str, message: str, line: int | None = None, param: str | None = None) -> None:
        if len(self.report.errors) < self.max_errors:
            self.report.errors.append(LineError(code, message, line, param))
        else:
            self.report.truncated = True

    def check(self, number: int, raw: bytes) -> None:
        try:
            line = loads(raw)
        except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError and TooDeep are ValueErrors
            if isinstance(exc, UnicodeDecodeError):
                reason = "is not valid UTF-8"
            elif isinstance(exc, TooDeep):
                reason = f"is valid JSON, but its {exc}, which this server does not accept"
            else:
                reason = "is not valid JSON"
            self.error("invalid_json_line", f"Line {number} {reason}.", number)
            return
        if not isinstance(line, dict):
            self.error("invalid_json_line", f"Line {number} is not a JSON object.", number)
            return
        if has_lone_surrogate(raw, line):
            self.error("invalid_json_line", f"Line {number} contains an unpaired UTF-16 surrogate escape "
                       "(\\uD800-\\uDFFF), which is not valid Unicode.", number)
            return

        custom_id = line.get("custom_id")
        if custom_id is None:
            self.error("missing_required_parameter", "Missing required parameter: 'custom_id'.", number,
                       "custom_id")
        elif not isinstance(custom_id, str) or not custom_id:
            self.error("invalid_custom_id", "'custom_id' must be a non-empty string.", number, "custom_id")
        else:
            self.ids.add(custom_id, number)

        method = line.get("method")
        if method is None:
            self.error("missing_required_parameter", "Missing required parameter: 'method'.", number, "method")
        elif method != "POST":
            self.error("invalid_method", f"Invalid method {str(method)[:20]!r}: only 'POST' is supported.",
                       number, "method")

        url = line.get("url")
        if url is None:
            self.error("missing_required_parameter", "Missing required parameter: 'url'.", number, "url")
        elif url != self.endpoint:
            self.error("invalid_url", f"The url {str(url)[:200]!r} does not match the batch's endpoint "
                       f"{self.endpoint!r}.", number, "url")

        body = line.get("body")
        if body is None:
            self.error("missing_required_parameter", "Missing required parameter: 'body'.", number, "body")
            return
        if not isinstance(body, dict):
            self.error("invalid_type", "'body' must be a JSON object.", number, "body")
            return
        if "priority" in body:
            # vLLM's own request field; here the server sets it (priority.py), so a line cannot jump the queue
            # ahead of online requests or of batches due sooner.
            self.error("unsupported_parameter", "'body.priority' is set by the server: a batch's requests run "
                       "behind online requests and in the order of their batches' completion_window. Remove "
                       "it (a shorter completion_window runs a batch sooner).", number, "body.priority")
        model = body.get("model")
        if model is None:
            self.error("missing_required_parameter", "Missing required parameter: 'body.model'.", number,
                       "body.model")
        elif not isinstance(model, str) or model not in self.served:
            served = ", ".join(sorted(self.served)) or "none"
            self.error("model_not_found", f"The model {str(model)[:200]!r} is not served here (served: "
                       f"{served}).", number, "body.model")
        elif self.report.model is None:
            self.report.model = model
        elif model != self.report.model:
            self.error("mismatched_model", f"The model {model!r} differs from {self.report.model!r} on earlier "
                       "lines; all requests in a batch must use the same model.", number, "body.model")


def validate_input(path: Path, *, endpoint: str, served_models: list[str], max_lines: int,
                   max_errors: int = 100, scratch: Path | None = None) -> Report:
    """`scratch`: where the custom_ids' hashes may go on disk (a temporary file without a name)."""
    with DuplicateFinder(path.stat().st_size, scratch) as ids:
        validator = _Validator(endpoint, served_models, max_lines, max_errors, ids)
        report = validator.report
        for number, raw in iter_raw_lines(path):
            report.total += 1
            if report.total > max_lines:
                validator.error("too_many_requests", f"The input file has more than the {max_lines} requests "
                                "allowed in one batch; split it into several batches.", number)
                break
            validator.check(number, raw)
        if report.total == 0:
            validator.error("empty_file", "The input file contains no requests.")
        # One more than can be listed: then the list is known to be cut.
        duplicates = [
            LineError("duplicate_custom_id", f"The custom_id '{d.custom_id[:200]}' on line {d.line} is already "
                      f"used on line {d.first}; each request in a batch needs a unique custom_id.", d.line,
                      "custom_id")
            for d in ids.duplicates(path, max_errors + 1)]
    if duplicates:
        # In line order, as if found while reading: on its line, the custom_id's error comes before the others
        # (the checks after it), and a stable sort keeps those in their order.
        merged = sorted(report.errors + duplicates,
                        key=lambda e: (e.line or 0, e.code != "duplicate_custom_id"))
        report.truncated = report.truncated or len(merged) > max_errors
        report.errors = merged[:max_errors]
    return report
