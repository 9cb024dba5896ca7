"""Result lines: parse the output and error files, join them to their requests, restore input order.

Results arrive in any order, split over output and error files and over shards. They are indexed by
(target, custom_id) → (file, byte offset) in the same SQLite scratch file that indexes the requests; then
the requests are read in input order and each one's result line is fetched by seeking. Memory stays flat
however many results there are: only one request and one result are decoded at a time.
"""

from __future__ import annotations

import array
import base64
import json
import sqlite3
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vllm_batch._requests import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES

MISSING = "missing_result"


@dataclass(frozen=True)
class ResultError:
    """Why a request has no answer: the server's `code` and `message`, and the HTTP status if it had one."""

    code: str | None
    message: str
    status_code: int | None = None
    param: str | None = None


@dataclass(frozen=True)
class BatchResult:
    """One request joined to its result. Exactly one of `response` and `error` is set.

    `index` is the request's position in the input, `model` the model it was sent to (in a comparison, one
    of `models`). Embeddings sent as base64 are already decoded to floats in `response`.
    """

    index: int
    custom_id: str
    endpoint: str
    model: str
    request: dict[str, Any]
    response: dict[str, Any] | None
    error: ResultError | None
    status_code: int | None = None
    batch_id: str | None = None
    request_id: str | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str | None:
        """The generated text of a chat, completion or responses answer (the first choice)."""
        body = self.response
        if not body:
            return None
        if self.endpoint == CHAT:
            choices = body.get("choices") or []
            return (choices[0].get("message") or {}).get("content") if choices else None
        if self.endpoint == COMPLETIONS:
            choices = body.get("choices") or []
            return choices[0].get("text") if choices else None
        if self.endpoint == RESPONSES:
            if isinstance(body.get("output_text"), str):
                return str(body["output_text"])
            parts = [
                c.get("text", "")
                for item in body.get("output") or []
                if item.get("type") == "message"
                for c in item.get("content") or []
                if c.get("type") == "output_text"
            ]
            return "".join(parts) if parts else None
        return None

    @property
    def embeddings(self) -> list[list[float]] | None:
        if not self.response or self.endpoint != EMBEDDINGS:
            return None
        data = sorted(self.response.get("data") or [], key=lambda d: d.get("index", 0))
        return [d["embedding"] for d in data]

    @property
    def embedding(self) -> list[float] | None:
        """The first (usually only) embedding of this request."""
        all_ = self.embeddings
        return all_[0] if all_ else None

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.response.get("usage") if self.response else None

    def parsed(self) -> Any:
        """The response as the openai SDK's own type (ChatCompletion, Completion, CreateEmbeddingResponse,
        Response), for code that already works with those. The SDK has no type for vLLM's score and rerank
        answers: those come back as the dict they are."""
        if self.response is None:
            return None
        from openai.types import Completion, CreateEmbeddingResponse
        from openai.types.chat import ChatCompletion
        from openai.types.responses import Response

        cls: Any = {
            CHAT: ChatCompletion,
            COMPLETIONS: Completion,
            EMBEDDINGS: CreateEmbeddingResponse,
            RESPONSES: Response,
        }.get(self.endpoint)
        if cls is None:
            return self.response
        return (
            cls.construct(**self.response)
            if self.endpoint == EMBEDDINGS
            else cls.model_validate(self.response)
        )


@dataclass(frozen=True)
class Comparison:
    """The same request answered by several models, keyed by model name in `models` order."""

    index: int
    custom_id: str
    request: dict[str, Any]
    results: dict[str, BatchResult]


def decode_embedding(value: Any) -> Any:
    """base64 little-endian float32 → list of floats (anything else is returned unchanged)."""
    if not isinstance(value, str):
        return value
    floats = array.array("f")
    floats.frombytes(base64.b64decode(value))
    if sys.byteorder == "big":
        floats.byteswap()
    return floats.tolist()


def parse_result_line(
    line: dict[str, Any],
) -> tuple[dict[str, Any] | None, ResultError | None, int | None, str | None]:
    """(response body, error, status code, request id) of one output/error line, whatever file it was in."""
    response = line.get("response")
    error = line.get("error")
    if isinstance(response, dict):
        status = response.get("status_code")
        body = response.get("body")
        request_id = response.get("request_id")
        if status == 200 and isinstance(body, dict) and not error:
            return _decode_body(body), None, 200, request_id
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            err = error if isinstance(error, dict) else {"message": json.dumps(body) if body else "no body"}
        return (
            None,
            ResultError(
                code=error_code(err),
                message=str(err.get("message")),
                status_code=status,
                param=err.get("param"),
            ),
            status,
            request_id,
        )
    if isinstance(error, dict):
        return None, ResultError(code=error_code(error), message=str(error.get("message"))), None, None
    return (
        None,
        ResultError(code="invalid_result", message=f"unrecognised result line: {line!r}"[:500]),
        None,
        None,
    )


def error_code(err: dict[str, Any]) -> str | None:
    """An error's code as a string: its `code` when that is a string (`context_length_exceeded`), else its
    `type` (vLLM puts the HTTP status in `code`, 400, and the kind in `type`, `BadRequestError`), else the
    code written out."""
    code, kind = err.get("code"), err.get("type")
    if isinstance(code, str) and code:
        return code
    if isinstance(kind, str) and kind:
        return kind
    return None if code is None or code == "" else str(code)


def _decode_body(body: dict[str, Any]) -> dict[str, Any]:
    data = body.get("data")
    if body.get("object") == "list" and isinstance(data, list):
        for item in data:
            if isinstance(item, dict) and isinstance(item.get("embedding"), str):
                item["embedding"] = decode_embedding(item["embedding"])
    return body


class ResultIndex:
    """(target, custom_id) → where its result line is, over every downloaded output and error file."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.files: list[Path] = []
        db.execute("DROP TABLE IF EXISTS results")
        db.execute(
            "CREATE TABLE results (target INTEGER NOT NULL, custom_id TEXT NOT NULL, "
            "file_no INTEGER NOT NULL, offset INTEGER NOT NULL, batch_id TEXT, "
            "PRIMARY KEY (target, custom_id)) WITHOUT ROWID"
        )

    def add_file(self, path: Path, target: int, batch_id: str | None = None) -> int:
        """Index one results file; returns its line count. If a custom_id appears twice, the first wins."""
        file_no = len(self.files)
        self.files.append(path)
        rows: list[tuple[int, str, int, int, str | None]] = []
        count = 0
        offset = 0
        with open(path, "rb") as fh:
            for raw in fh:
                if raw.strip():
                    custom_id = json.loads(raw).get("custom_id")
                    if isinstance(custom_id, str):
                        rows.append((target, custom_id, file_no, offset, batch_id))
                        count += 1
                offset += len(raw)
                if len(rows) >= 10_000:
                    self._insert(rows)
        self._insert(rows)
        return count

    def _insert(self, rows: list[tuple[int, str, int, int, str | None]]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?)", rows)
        rows.clear()

    def iterate(
        self, requests: Iterable[bytes], models: list[str], compare: bool, missing_reason: dict[int, str]
    ) -> Iterator[list[BatchResult]]:
        """For each request line in input order: its results, one per target (model)."""
        self.db.commit()
        handles: dict[int, IO[bytes]] = {}
        try:
            for index, raw in enumerate(requests):
                line = json.loads(raw)
                out = []
                for target in range(len(models) if compare else 1):
                    body = line["body"]
                    if compare:
                        body = {**body, "model": models[target]}
                    out.append(self._one(index, line, body, target, handles, missing_reason))
                yield out
        finally:
            for fh in handles.values():
                fh.close()

    def _one(
        self,
        index: int,
        line: dict[str, Any],
        body: dict[str, Any],
        target: int,
        handles: dict[int, IO[bytes]],
        missing_reason: dict[int, str],
    ) -> BatchResult:
        custom_id = line["custom_id"]
        row = self.db.execute(
            "SELECT file_no, offset, batch_id FROM results WHERE target = ? AND custom_id = ?",
            (target, custom_id),
        ).fetchone()
        common = {
            "index": index,
            "custom_id": custom_id,
            "endpoint": line["url"],
            "model": body.get("model", ""),
            "request": body,
        }
        if row is None:
            reason = missing_reason.get(target, "the batch has not produced it")
            return BatchResult(
                **common,
                response=None,
                error=ResultError(code=MISSING, message=f"no result for this request: {reason}"),
            )
        file_no, offset, batch_id = row
        fh = handles.get(file_no)
        if fh is None:
            fh = handles[file_no] = open(self.files[file_no], "rb")  # noqa: SIM115 - closed in iterate()
        fh.seek(offset)
        response, error, status, request_id = parse_result_line(json.loads(fh.readline()))
        return BatchResult(
            **common,
            response=response,
            error=error,
            status_code=status,
            batch_id=batch_id,
            request_id=request_id,
        )
