"""Request lines: validation, endpoint inference, custom ids, and the on-disk spool they are written to.

Requests are validated when added (the error names the field), written straight to a JSONL spool, and
indexed by custom_id in a small SQLite file next to it. The index checks uniqueness and later lets results
be joined back to their requests in input order — all without holding a million requests in memory.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_batch._errors import BatchValidationError
from vllm_batch._providers import ENDPOINTS, Provider

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
# vLLM's scoring endpoints (`vllm serve`, `vllm run-batch`, and vllm-batch's server take them in batches).
SCORE = "/v1/score"
RERANK = "/v1/rerank"

_ALIASES = {
    "chat": CHAT,
    "chat/completions": CHAT,
    "completions": COMPLETIONS,
    "embeddings": EMBEDDINGS,
    "responses": RESPONSES,
    "score": SCORE,
    "rerank": RERANK,
}
# The field that tells a body's endpoint when none is given (`input` alone means embeddings).
_SHAPES = {"messages": CHAT, "prompt": COMPLETIONS, "input": EMBEDDINGS, "query": RERANK, "queries": SCORE,
           "text_1": SCORE, "data_1": SCORE}
# vLLM's score request pairs its two sides under one of these names.
_SCORE_PAIRS = (("queries", "documents"), ("queries", "items"), ("text_1", "text_2"), ("data_1", "data_2"))


# Strict: the request is written as given, so "0.5" or True must not pass as a number here and then reach
# the server as a string or a bool. Finite only: NaN is not even valid JSON.
Count = Annotated[int, Field(ge=1, strict=True)]
Temperature = Annotated[float, Field(ge=0, le=2, strict=True, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1, strict=True, allow_inf_nan=False)]


class _Body(BaseModel):
    # Unknown parameters pass through untouched: backends add their own (vLLM's `top_k`, `guided_json`, ...).
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, strict=True)
    # A batch cannot stream its answers; a backend would fail the line, so refuse it here instead.
    stream: Literal[False] | None = None


class _Sampling(_Body):
    max_tokens: Count | None = None
    n: Count | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


class EmbeddingBody(_Body):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Count | None = None


class ResponsesBody(_Body):
    input: str | list[dict[str, Any]]
    max_output_tokens: Count | None = None
    temperature: Temperature | None = None


_ScoreItem = str | dict[str, Any]


class ScoreBody(_Body):
    """One of vLLM's pairings: `queries` with `documents` (or `items`), `text_1` with `text_2`, `data_1` with
    `data_2`; each side a text (or content object) or a list of them."""

    @model_validator(mode="after")
    def _one_pair(self) -> ScoreBody:
        given = self.model_extra or {}
        for first, second in _SCORE_PAIRS:
            if first in given:
                for name in (first, second):
                    value = given.get(name)
                    items = value if isinstance(value, list) else [value]
                    if not items or not all(isinstance(x, (str, dict)) for x in items):
                        raise ValueError(f"'{name}' must be a text or a non-empty list of texts")
                return self
        raise ValueError("a score request pairs 'queries' with 'documents' (or 'text_1' with 'text_2')")


class RerankBody(_Body):
    query: _ScoreItem
    documents: list[_ScoreItem] = Field(min_length=1)
    top_n: int | None = Field(None, ge=0)


BODY_MODELS: dict[str, type[_Body]] = {
    CHAT: ChatBody,
    COMPLETIONS: CompletionBody,
    EMBEDDINGS: EmbeddingBody,
    RESPONSES: ResponsesBody,
    SCORE: ScoreBody,
    RERANK: RerankBody,
}


def normalize_endpoint(endpoint: str, index: int | None = None) -> str:
    key = endpoint.strip().lstrip("/")
    key = key[3:] if key.startswith("v1/") else key
    resolved = _ALIASES.get(key)
    if resolved is None:
        raise BatchValidationError(
            f"unknown endpoint {endpoint!r}; use one of {', '.join(ENDPOINTS)}", field="endpoint", index=index
        )
    return resolved


def infer_endpoint(body: Mapping[str, Any], endpoint: str | None = None, index: int | None = None) -> str:
    """The endpoint a request body is meant for: explicit, else from its shape."""
    if endpoint is not None:
        return normalize_endpoint(endpoint, index)
    shapes = [name for name in _SHAPES if name in body]
    if len({_SHAPES[name] for name in shapes}) > 1:
        raise BatchValidationError(
            f"ambiguous request: has {' and '.join(shapes)}; pass endpoint=", field=shapes[1], index=index
        )
    if not shapes:
        raise BatchValidationError(
            "cannot tell the endpoint: pass messages (chat), prompt (completions), input (embeddings), "
            "query and documents (rerank), queries and documents (score), or endpoint='/v1/responses' "
            "with input",
            field="messages",
            index=index,
        )
    return _SHAPES[shapes[0]]


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list", "dict"} or "[" in part


def validate_body(endpoint: str, body: Mapping[str, Any], index: int | None = None) -> None:
    try:
        BODY_MODELS[endpoint].model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        # For a union pydantic adds the member it tried ("prompt.str", "prompt.list[int]"); callers want
        # the path in their own request.
        parts = [str(p) for p in first["loc"] if isinstance(p, int) or not _is_type_tag(str(p))]
        field = ".".join(parts) or None
        raise BatchValidationError(first["msg"], field=field, index=index) from None


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _line(obj: Any, index: int) -> bytes:
    try:
        return dumps(obj)
    except (TypeError, ValueError) as exc:
        raise BatchValidationError(f"the request is not valid JSON: {exc}", field="body", index=index) from None


@dataclass
class SpoolStats:
    count: int = 0
    bytes: int = 0
    longest_line: int = 0


class RequestSpool:
    """An append-only JSONL file of request lines plus a SQLite index custom_id → (line, offset).

    `models` is the set of distinct model names seen (small in practice); `endpoint` the one endpoint a
    batch may use (the Batch API takes a single endpoint per batch).
    """

    def __init__(
        self, directory: Path, provider: Provider, *, compare_models: list[str] | None = None
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "requests.jsonl"
        self.provider = provider
        self.compare_models = compare_models
        self.endpoint: str | None = None
        self.models: list[str] = []
        self.stats = SpoolStats()
        self.db = open_index(directory / "index.sqlite3")
        # A workdir may be reused: start from an empty spool and index, never mix in an old batch's requests.
        self.db.execute("DELETE FROM requests")
        # A running hash of everything written: the submission journal recognises the same requests by it.
        self.digest = hashlib.sha256()
        self._fh = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._uncommitted = 0
        self.closed = False

    # -- adding ---------------------------------------------------------------------------------------

    def add(
        self,
        request: Mapping[str, Any],
        *,
        custom_id: str | None = None,
        endpoint: str | None = None,
        method: str = "POST",
        line: int | None = None,
    ) -> str:
        """Validate one request and append it. `line` is its line in a JSONL file, for error messages."""
        index = self.stats.count
        try:
            return self._add(request, custom_id, endpoint, method, index, line)
        except BatchValidationError as exc:
            if line is not None and exc.line is None:
                raise exc.at_line(line) from None
            raise

    def _add(
        self,
        request: Mapping[str, Any],
        custom_id: str | None,
        endpoint: str | None,
        method: str,
        index: int,
        line: int | None,
    ) -> str:
        body = dict(request)
        if "custom_id" in body:
            # Never let it leak into the body the model sees.
            custom_id = body.pop("custom_id") if custom_id is None else custom_id
        for key in ("endpoint", "url"):
            # Rows from from_requests/add_requests or a JSONL file may name their endpoint inside the body:
            # it says where the request goes, and is no parameter of the model.
            if key in body:
                named = body.pop(key)
                if not isinstance(named, str):
                    raise BatchValidationError(f"{key} must be a string", field=key, index=index)
                if endpoint is not None and normalize_endpoint(named, index) != normalize_endpoint(endpoint, index):
                    raise BatchValidationError(
                        f"{key} {named!r} contradicts endpoint {endpoint!r}", field=key, index=index
                    )
                endpoint = endpoint or named
        if self.compare_models:
            if "model" in body:
                raise BatchValidationError(
                    "with models=[...] the model is set per comparison; leave it out",
                    field="model",
                    index=index,
                )
            body["model"] = self.compare_models[0]
        if method.upper() != "POST":
            raise BatchValidationError(f"method must be POST, got {method!r}", field="method", index=index)
        url = self._check_endpoint(infer_endpoint(body, endpoint, index), index)
        if "model" not in body:
            raise BatchValidationError(
                "no model: name one in the request, or run the requests on several models with models=[...] "
                "(--models on the command line)",
                field="model",
                index=index,
            )
        validate_body(url, body, index)
        self._check_model(body["model"], index)
        if url == EMBEDDINGS and self.provider.base64_embeddings and body.get("encoding_format") is None:
            # base64 floats are ~4x smaller than JSON decimals; results() decodes them back.
            body["encoding_format"] = "base64"

        if custom_id is not None:
            if not isinstance(custom_id, str) or not custom_id:
                raise BatchValidationError(
                    "custom_id must be a non-empty string", field="custom_id", index=index
                )
            encoded = _line({"custom_id": custom_id, "method": "POST", "url": url, "body": body}, index)
            self._check_size(encoded, index)
            if (first := self._index(custom_id, index, line)) is not None:
                raise BatchValidationError(
                    f"duplicate custom_id {custom_id!r} (first used {first})",
                    field="custom_id",
                    index=index,
                )
        else:
            custom_id = f"request-{index}"
            suffix = 0
            # A user may already have taken "request-N" for an earlier line; pick the next free variant.
            while self._index(custom_id, index, line) is not None:
                suffix += 1
                custom_id = f"request-{index}.{suffix}"
            try:
                encoded = _line({"custom_id": custom_id, "method": "POST", "url": url, "body": body}, index)
            except BatchValidationError:
                self.db.execute("DELETE FROM requests WHERE custom_id = ?", (custom_id,))
                raise
            self._check_size(encoded, index, undo=custom_id)

        # Only now, with the request accepted, does it fix the batch's endpoint and models.
        self.endpoint = url
        if body["model"] not in self.models:
            self.models.append(body["model"])
        self._fh.write(encoded)
        self.digest.update(encoded)
        self.stats.count += 1
        self.stats.bytes += len(encoded)
        self.stats.longest_line = max(self.stats.longest_line, len(encoded))
        self._uncommitted += 1
        if self._uncommitted >= 20_000:
            self.db.commit()
            self._uncommitted = 0
        return custom_id

    def add_line(self, obj: Mapping[str, Any], line: int | None = None) -> str:
        """A line of a JSONL file: a full request line (`custom_id`, `url`, `body`) or a bare body (which may
        name its `endpoint` or `url` and `custom_id` among its keys)."""
        if isinstance(obj.get("body"), Mapping):
            return self.add(
                obj["body"],
                custom_id=obj.get("custom_id"),
                endpoint=obj.get("url"),
                method=str(obj.get("method", "POST")),
                line=line,
            )
        return self.add(obj, line=line)

    def _check_endpoint(self, url: str, index: int) -> str:
        if url not in self.provider.endpoints:
            raise BatchValidationError(
                f"{self.provider.name} does not offer {url} batches", field="endpoint", index=index
            )
        if self.endpoint is not None and url != self.endpoint:
            raise BatchValidationError(
                f"a batch has one endpoint: this batch is {self.endpoint}, this request is {url}",
                field="endpoint",
                index=index,
            )
        return url

    def _check_model(self, model: str, index: int) -> None:
        if model in self.models:
            return
        if self.models and not self.provider.mixed_models:
            raise BatchValidationError(
                f"{self.provider.name} takes one model per batch: this batch is {self.models[0]!r}, "
                f"this request is {model!r} (use models=[...] to run the same requests on several models)",
                field="model",
                index=index,
            )

    def _check_size(self, line: bytes, index: int, undo: str | None = None) -> None:
        # In a comparison the longest model name decides how big the line gets.
        extra = 0
        if self.compare_models:
            extra = max(len(m.encode()) for m in self.compare_models) - len(self.compare_models[0].encode())
        if len(line) + extra > self.provider.max_bytes:
            if undo is not None:
                self.db.execute("DELETE FROM requests WHERE custom_id = ?", (undo,))
            raise BatchValidationError(
                f"request is {len(line) + extra} bytes, over {self.provider.name}'s "
                f"{self.provider.max_bytes} "
                "byte limit for a whole batch file",
                field="body",
                index=index,
            )

    def _index(self, custom_id: str, index: int, line: int | None) -> str | None:
        """Claim `custom_id` for request `index`; if it is taken, where the request that has it came from."""
        try:
            self.db.execute("INSERT INTO requests (custom_id, idx, line) VALUES (?, ?, ?)", (custom_id, index, line))
        except sqlite3.IntegrityError:
            row = self.db.execute("SELECT idx, line FROM requests WHERE custom_id = ?", (custom_id,)).fetchone()
            return f"on line {row[1]}" if row[1] is not None else f"by the request at index {row[0]}"
        return None

    # -- reading back ---------------------------------------------------------------------------------

    def flush(self) -> None:
        if not self.closed:
            self._fh.flush()
        self.db.commit()
        self._uncommitted = 0

    def freeze(self) -> None:
        """No more requests: close the file (the index stays open for results)."""
        if not self.closed:
            self._fh.close()
            self.closed = True
        self.db.commit()

    def lines(self) -> Iterator[bytes]:
        self.flush()
        with open(self.path, "rb") as fh:
            yield from fh

    def close(self) -> None:
        self.freeze()
        self.db.close()


def open_index(path: Path) -> sqlite3.Connection:
    # A scratch index, rebuilt from the files if lost: no journal, no fsync. check_same_thread is off because
    # the async client reads results in a worker thread; it never uses the connection from two at once.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute(
        "CREATE TABLE IF NOT EXISTS requests (custom_id TEXT PRIMARY KEY, idx INTEGER NOT NULL, line INTEGER) "
        "WITHOUT ROWID"
    )
    return db
