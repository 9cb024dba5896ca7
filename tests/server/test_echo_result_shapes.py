"""The shape of a result line's body we promise, as the echo engine answers it: vLLM 0.33 and later's.

vLLM 0.33 added `weight_versions` to every choice (null unless the request sets `return_weight_versions`) and
ends a Responses reply cut off by `max_output_tokens` as `incomplete`: the message item too, and in a stream
with a `response.incomplete` event instead of `response.completed`. docs/engines.md lists what each supported
vLLM release answers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from vllm_batch_server.engines.base import CHAT, COMPLETIONS, RESPONSES, Result
from vllm_batch_server.engines.echo import EchoEngine
from vllm_batch_server.settings import Settings

MODEL = "echo-model"


def _run(url: str, body: dict[str, Any]) -> Result:
    async def go() -> Result:
        engine = EchoEngine(Settings())
        await engine.start(MODEL)
        return await engine.run("req-1", url, {"model": MODEL, **body})

    return asyncio.run(go())


def _events(url: str, body: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    async def go() -> list[bytes]:
        engine = EchoEngine(Settings())
        await engine.start(MODEL)
        stream = await engine.stream("req-1", url, {"model": MODEL, "stream": True, **body})
        assert not isinstance(stream, Result), stream.body
        return [chunk async for chunk in stream]

    out: list[tuple[str | None, dict[str, Any]]] = []
    for chunk in asyncio.run(go()):
        lines = chunk.decode().strip().split("\n")
        event = lines[0].removeprefix("event: ") if lines[0].startswith("event: ") else None
        data = lines[-1].removeprefix("data: ")
        if data != "[DONE]":
            out.append((event, json.loads(data)))
    return out


def test_every_chat_and_completion_choice_carries_weight_versions_null() -> None:
    chat = _run(CHAT, {"messages": [{"role": "user", "content": "one two three"}], "n": 2, "max_tokens": 2})
    assert chat.body["choices"] == [
        {"index": i, "message": {"role": "assistant", "content": "one two"}, "logprobs": None,
         "finish_reason": "length", "weight_versions": None} for i in range(2)]
    completion = _run(COMPLETIONS, {"prompt": "one two"})
    assert completion.body["choices"] == [
        {"index": 0, "text": "one two", "logprobs": None, "finish_reason": "stop", "weight_versions": None}]


def test_streams_carry_weight_versions_where_vllm_sets_it() -> None:
    chat = [data for _, data in _events(CHAT, {"messages": [{"role": "user", "content": "a b"}]})]
    # On each choice's last chunk only (with its finish_reason).
    assert [("weight_versions" in c["choices"][0], c["choices"][0]["finish_reason"]) for c in chat] == [
        (False, None), (False, None), (False, None), (True, "stop")]
    assert chat[-1]["choices"][0]["weight_versions"] is None
    completion = [data for _, data in _events(COMPLETIONS, {"prompt": "a b"})]
    assert all(c["choices"][0]["weight_versions"] is None for c in completion) and len(completion) == 2


def test_a_response_cut_off_by_max_output_tokens_is_incomplete() -> None:
    cut = _run(RESPONSES, {"input": "one two three", "max_output_tokens": 2}).body
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["output"][0]["status"] == "incomplete" and cut["output"][0]["content"][0]["text"] == "one two"
    whole = _run(RESPONSES, {"input": "one two three"}).body
    assert whole["status"] == "completed" and whole["incomplete_details"] is None
    assert whole["output"][0]["status"] == "completed"


def test_a_streamed_response_cut_off_ends_with_response_incomplete() -> None:
    cut = _events(RESPONSES, {"input": "one two three", "max_output_tokens": 2})
    assert [event for event, _ in cut][-2:] == ["response.output_item.done", "response.incomplete"]
    assert cut[-2][1]["item"]["status"] == "incomplete"
    assert cut[-1][1]["response"]["status"] == "incomplete"
    assert [data["sequence_number"] for _, data in cut] == list(range(len(cut)))
    whole = _events(RESPONSES, {"input": "one two three"})
    assert whole[-1][0] == "response.completed" and whole[-1][1]["response"]["status"] == "completed"
