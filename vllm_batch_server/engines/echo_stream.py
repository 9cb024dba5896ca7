"""The echo engine's streaming: a finished answer cut into the server-sent events `vllm serve` sends.

Chat and completions stream `data: <chunk>` events (one per word here, one per token in vLLM) ending with
`data: [DONE]`; the Responses API streams typed events (`event: response.output_text.delta` ...) ending with
`response.completed` (`response.incomplete` when cut off by `max_output_tokens`). The shapes follow vLLM's (0.33
and later: `weight_versions` on the chunks that carry it, `response.incomplete`), so the official SDK's stream
parsers read both engines alike.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from vllm_batch_server.engines.base import CHAT, COMPLETIONS, RESPONSES


def _data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _event(obj: dict[str, Any]) -> bytes:
    return f"event: {obj['type']}\n".encode() + _data(obj)


def _pieces(text: str) -> list[str]:
    """The text in stream-sized pieces (words, each but the first with its leading space)."""
    words = text.split(" ")
    return [words[0], *(" " + w for w in words[1:])] if text else []


async def events(url: str, body: dict[str, Any], *, include_usage: bool) -> AsyncIterator[bytes]:
    if url == CHAT:
        chunks = _chat(body, include_usage)
    elif url == COMPLETIONS:
        chunks = _completion(body, include_usage)
    else:
        assert url == RESPONSES
        chunks = _responses(body)
    for chunk in chunks:
        yield chunk
        await asyncio.sleep(0)  # as a real engine would: other requests run between events
    if url != RESPONSES:
        yield b"data: [DONE]\n\n"


def _chat(body: dict[str, Any], include_usage: bool) -> list[bytes]:
    head = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"],
            "model": body["model"]}
    out: list[bytes] = []
    for choice in body["choices"]:
        index = choice["index"]

        def chunk(delta: dict[str, Any], index: int = index, **last: Any) -> bytes:
            return _data({**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                               "finish_reason": None, **last}]})

        out.append(chunk({"role": "assistant", "content": ""}))
        out.extend(chunk({"content": piece}) for piece in _pieces(choice["message"]["content"]))
        # vLLM sets weight_versions on each choice's last chunk only.
        out.append(chunk({}, finish_reason=choice["finish_reason"], weight_versions=None))
    if include_usage:
        out.append(_data({**head, "choices": [], "usage": body["usage"]}))
    return out


def _completion(body: dict[str, Any], include_usage: bool) -> list[bytes]:
    head = {"id": body["id"], "object": "text_completion", "created": body["created"], "model": body["model"]}
    out: list[bytes] = []
    for choice in body["choices"]:
        pieces = _pieces(choice["text"]) or [""]
        for n, piece in enumerate(pieces):
            finish = choice["finish_reason"] if n == len(pieces) - 1 else None
            out.append(_data({**head, "choices": [{"index": choice["index"], "text": piece, "logprobs": None,
                                                   "finish_reason": finish, "weight_versions": None}]}))
    if include_usage:
        out.append(_data({**head, "choices": [], "usage": body["usage"]}))
    return out


def _responses(body: dict[str, Any]) -> list[bytes]:
    message = body["output"][0]
    text = message["content"][0]["text"]
    in_progress = {**body, "status": "in_progress", "output": [], "usage": None}
    item = {**message, "status": "in_progress", "content": []}
    part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": None}
    where = {"item_id": message["id"], "output_index": 0}
    steps: list[dict[str, Any]] = [
        {"type": "response.created", "response": in_progress},
        {"type": "response.in_progress", "response": in_progress},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.content_part.added", **where, "content_index": 0, "part": part},
        *({"type": "response.output_text.delta", **where, "content_index": 0, "delta": piece, "logprobs": []}
          for piece in _pieces(text)),
        {"type": "response.output_text.done", **where, "content_index": 0, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "content_index": 0,
         "part": message["content"][0]},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed" if body["status"] == "completed" else "response.incomplete",
         "response": body},
    ]
    return [_event({**step, "sequence_number": n}) for n, step in enumerate(steps)]
