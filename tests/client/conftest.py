"""A stateful fake Batch API on respx, and sleep patched out so retries and polling cost no time.

The fake keeps files and batches in dicts and serves OpenAI's shapes. Each retrieve moves a batch one step
(validating → in_progress → completed); on completion it answers every request line through `responder`
and writes the output and error files in *reverse* order, so tests see that results() restores input order.
Each route is a respx route, so tests assert what was really called and how often.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import respx

import vllm_batch._async
import vllm_batch._sync

BASE = "http://batch.test/v1"

Responder = Callable[[dict[str, Any]], tuple[int, dict[str, Any]] | dict[str, Any]]


def echo_responder(line: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    body = line["body"]
    if line["url"] == "/v1/embeddings":
        return 200, {"object": "list", "model": body["model"],
                     "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}]}
    text = body["messages"][-1]["content"] if "messages" in body else str(body.get("prompt"))
    if line["url"] == "/v1/chat/completions":
        return 200, {"id": "c", "object": "chat.completion", "model": body["model"], "created": 0,
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": f"{body['model']}:{text}"}}]}
    return 200, {"id": "c", "object": "text_completion", "model": body["model"], "created": 0,
                 "choices": [{"index": 0, "text": f"{body['model']}:{text}", "finish_reason": "stop"}]}


def parse_multipart(request: httpx.Request) -> tuple[str, bytes]:
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    for part in request.read().split(b"--" + boundary):
        head, _, body = part.partition(b"\r\n\r\n")
        if b'name="file"' in head:
            filename = head.split(b'filename="')[1].split(b'"')[0].decode()
            return filename, body[: -len(b"\r\n")] if body.endswith(b"\r\n") else body
    raise AssertionError("no file part in upload")


class FakeBatchAPI:
    def __init__(self, router: respx.MockRouter, base: str = BASE) -> None:
        self.base = base
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.responder: Responder = echo_responder
        self.steps = ["validating", "in_progress", "completed"]
        self.reverse_output = True
        self.drop: set[str] = set()  # custom_ids that get no result line at all
        self.max_page = 100  # the most batches one listing page returns, whatever limit was asked
        # Idempotency-Key as vllm-batch-server honours it (same key + same body: the same object again; same
        # key + another body: 409). Off by default: OpenAI-like providers ignore the header.
        self.honour_idempotency = False
        self._keys: dict[tuple[str, str], tuple[bytes, httpx.Response]] = {}
        # What GET /health answers: None is a 404 (not a vllm-batch-server).
        self.server_health: dict[str, Any] | None = None
        self._ids = itertools.count(1)
        self.upload = router.post(f"{base}/files").mock(side_effect=self._upload)
        self.create = router.post(f"{base}/batches").mock(side_effect=self._create)
        self.listing = router.get(f"{base}/batches").mock(side_effect=self._list)
        self.cancel = router.post(url__regex=rf"{base}/batches/(?P<bid>[^/]+)/cancel").mock(side_effect=self._cancel)
        self.retrieve = router.get(url__regex=rf"{base}/batches/(?P<bid>[^/]+)$").mock(side_effect=self._retrieve)
        self.content = router.get(url__regex=rf"{base}/files/(?P<fid>[^/]+)/content").mock(side_effect=self._content)
        self.health = router.get(base.removesuffix("/v1") + "/health").mock(side_effect=self._health)

    def _health(self, request: httpx.Request) -> httpx.Response:
        if self.server_health is None:
            return httpx.Response(404, json={"detail": "Not Found"})
        return httpx.Response(200, json=self.server_health)

    def _idempotent(self, kind: str, request: httpx.Request, body: bytes,
                    make: Callable[[], httpx.Response]) -> httpx.Response:
        key = request.headers.get("idempotency-key")
        if not self.honour_idempotency or key is None:
            return make()
        if (kind, key) in self._keys:
            seen, response = self._keys[(kind, key)]
            if seen != body:
                return httpx.Response(409, json={"error": {"message": "Idempotency-Key reused with another body",
                                                           "type": "invalid_request_error", "param": None,
                                                           "code": "idempotency_key_reused"}})
            return httpx.Response(response.status_code, content=response.content, headers=response.headers)
        response = make()
        if response.status_code == 200:
            self._keys[(kind, key)] = (body, response)
        return response

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):04d}"

    def _upload(self, request: httpx.Request) -> httpx.Response:
        _, data = parse_multipart(request)
        return self._idempotent("file", request, data, lambda: self._store_file(data))

    def _store_file(self, data: bytes) -> httpx.Response:
        fid = self.new_id("file")
        self.files[fid] = data
        return httpx.Response(200, json={"id": fid, "object": "file", "bytes": len(data), "created_at": 0,
                                         "filename": "x.jsonl", "purpose": "batch", "status": "processed"})

    def _create(self, request: httpx.Request) -> httpx.Response:
        raw = request.read()
        return self._idempotent("batch", request, raw, lambda: self._store_batch(json.loads(raw)))

    def _store_batch(self, body: dict[str, Any]) -> httpx.Response:
        bid = self.new_id("batch")
        lines = [json.loads(x) for x in self.files[body["input_file_id"]].splitlines() if x.strip()]
        self.batches[bid] = {
            "id": bid, "object": "batch", "endpoint": body["endpoint"], "input_file_id": body["input_file_id"],
            "completion_window": body["completion_window"], "status": "validating", "created_at": len(self.batches),
            "metadata": body.get("metadata"), "output_file_id": None, "error_file_id": None, "errors": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
        }
        return httpx.Response(200, json=self.batches[bid])

    def _list(self, request: httpx.Request) -> httpx.Response:
        limit = min(int(request.url.params.get("limit", 20)), self.max_page)
        after = request.url.params.get("after")
        ordered = sorted(self.batches.values(), key=lambda b: b["created_at"], reverse=True)
        if after:
            ordered = ordered[[b["id"] for b in ordered].index(after) + 1:]
        page = ordered[:limit]
        return httpx.Response(200, json={"object": "list", "data": page, "has_more": len(ordered) > limit,
                                         "first_id": page[0]["id"] if page else None,
                                         "last_id": page[-1]["id"] if page else None})

    def _retrieve(self, request: httpx.Request, bid: str) -> httpx.Response:
        batch = self.batches.get(bid)
        if batch is None:
            return httpx.Response(404, json={"error": {"message": f"No batch {bid}", "type": "invalid_request_error",
                                                       "code": "not_found", "param": None}})
        if batch["status"] in self.steps[:-1]:
            self.advance(bid)
        return httpx.Response(200, json=batch)

    def advance(self, bid: str) -> None:
        batch = self.batches[bid]
        batch["status"] = self.steps[self.steps.index(batch["status"]) + 1]
        if batch["status"] == "completed":
            self.finish(bid)
        elif batch["status"] == "failed":
            batch["errors"] = {"object": "list", "data": [{"code": "invalid_request", "line": 2,
                                                           "message": "bad line", "param": "body"}]}

    def finish(self, bid: str, only: int | None = None) -> None:
        """Answer the batch's lines (the first `only` of them, if given) and attach the files."""
        batch = self.batches[bid]
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]].splitlines() if x.strip()]
        out, err = [], []
        for n, line in enumerate(lines):
            if line["custom_id"] in self.drop or (only is not None and n >= only):
                continue
            answer = self.responder(line)
            if isinstance(answer, dict):  # a whole `error` line (e.g. batch_expired)
                err.append({"id": f"r{n}", "custom_id": line["custom_id"], "response": None, "error": answer})
                continue
            status, body = answer
            record = {"id": f"r{n}", "custom_id": line["custom_id"],
                      "response": {"status_code": status, "request_id": f"req{n}", "body": body}, "error": None}
            (out if status == 200 else err).append(record)
        if self.reverse_output:
            out.reverse()
            err.reverse()
        for key, records in (("output_file_id", out), ("error_file_id", err)):
            if records:
                fid = self.new_id("file")
                self.files[fid] = b"".join(json.dumps(r).encode() + b"\n" for r in records)
                batch[key] = fid
        batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}

    def _cancel(self, request: httpx.Request, bid: str) -> httpx.Response:
        batch = self.batches[bid]
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return httpx.Response(409, json={"error": {"message": f"Cannot cancel a batch with status "
                                                                  f"{batch['status']}.", "code": None,
                                                       "type": "invalid_request_error", "param": None}})
        batch["status"] = "cancelled"
        self.finish(bid, only=1)
        return httpx.Response(200, json=batch)

    def _content(self, request: httpx.Request, fid: str) -> httpx.Response:
        return httpx.Response(200, content=self.files[fid])

    def input_lines(self, bid: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.files[self.batches[bid]["input_file_id"]].splitlines()]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every sleep the clients would have done (retry backoff and polling), recorded instead of slept."""
    recorded: list[float] = []

    def fake_sleep(seconds: float) -> None:
        recorded.append(seconds)

    async def fake_async_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(vllm_batch._sync, "_sleep", fake_sleep)
    monkeypatch.setattr(vllm_batch._async, "_sleep", fake_async_sleep)
    return recorded


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BATCH_BASE_URL", "BATCH_API_KEY", "BATCH_PROVIDER", "OPENAI_API_KEY", "PARASAIL_API_KEY",
                 "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_CUSTOM_HEADERS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def api(sleeps: list[float]) -> Iterator[FakeBatchAPI]:
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as router:
        yield FakeBatchAPI(router)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def chat(text: str, model: str = "m1", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}
