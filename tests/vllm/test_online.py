"""Online requests on the real vLLM engine, through the official openai SDK, on the session's shared server:
bodies as `vllm serve` computes them, streaming, the loaded model only, priority over batch work (vLLM's
priority scheduling on the CPU build), and batches of vLLM's score and rerank endpoints.

Runs after the other modules on the shared server; it switches models only through batches, as users do."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time

import httpx
import openai
import pytest

from tests.conftest import read_jsonl, sdk, submit, wait_for
from tests.faults.checks import assert_exactly_once
from tests.helpers.server import RunningServer
from tests.vllm.conftest import BATCH_TIMEOUT, CHAT_MODEL, EMBED_MODEL, EMBED_TEXTS, chat_line, embed_line

pytestmark = pytest.mark.vllm

GREEDY = {"temperature": 0, "max_tokens": 12}


def _loaded(server: RunningServer) -> str | None:
    # A long timeout: the answer waits while a model loads (its imports, in a thread, hold the GIL).
    return httpx.get(server.root_url + "/health", timeout=60).json()["loaded_model"]  # type: ignore[no-any-return]


def _ensure_loaded(server: RunningServer, model: str) -> None:
    """Online requests never switch the model: a small batch for `model` does, as it would for a user."""
    if _loaded(server) == model:
        return
    client = sdk(server, timeout=60)
    line = (chat_line("load", "Hi", max_tokens=1) if model == CHAT_MODEL else embed_line("load", "hi"))
    endpoint = "/v1/chat/completions" if model == CHAT_MODEL else "/v1/embeddings"
    batch = wait_for(client, submit(client, [line], endpoint=endpoint).id, timeout=BATCH_TIMEOUT)
    assert batch.status == "completed" and _loaded(server) == model, batch


@pytest.fixture
def embed_server(vllm_server: RunningServer) -> RunningServer:
    _ensure_loaded(vllm_server, EMBED_MODEL)
    return vllm_server


@pytest.fixture
def chat_server(vllm_server: RunningServer) -> RunningServer:
    _ensure_loaded(vllm_server, CHAT_MODEL)
    return vllm_server


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_online_embeddings_score_and_rerank_on_minilm(embed_server: RunningServer) -> None:
    client = sdk(embed_server, timeout=120)
    answer = client.embeddings.create(model=EMBED_MODEL, input=EMBED_TEXTS[:3])
    assert answer.model == EMBED_MODEL and [d.index for d in answer.data] == [0, 1, 2]
    vectors = [d.embedding for d in answer.data]
    assert all(len(v) == 384 and math.isclose(math.sqrt(sum(x * x for x in v)), 1, abs_tol=1e-4) for v in vectors)
    assert answer.usage.prompt_tokens > 0

    # vLLM scores with the embedding model itself (bi-encoder): a score is the cosine of the two embeddings.
    score = httpx.post(embed_server.base_url + "/score", timeout=120, json={
        "model": EMBED_MODEL, "queries": EMBED_TEXTS[0], "documents": EMBED_TEXTS[1:3]}).json()
    assert score["object"] == "list" and score["model"] == EMBED_MODEL, score
    assert [d["index"] for d in score["data"]] == [0, 1]
    for item, vector in zip(score["data"], vectors[1:3], strict=True):
        assert item["score"] == pytest.approx(_cosine(vectors[0], vector), abs=1e-3)

    rerank = httpx.post(embed_server.base_url + "/rerank", timeout=120, json={
        "model": EMBED_MODEL, "query": "a pet on a rug", "documents": ["Stock prices fell.", EMBED_TEXTS[0]],
        "top_n": 1}).json()
    assert rerank["id"].startswith("score-") and rerank["model"] == EMBED_MODEL, rerank
    assert [r["index"] for r in rerank["results"]] == [1]
    assert rerank["results"][0]["document"]["text"] == EMBED_TEXTS[0]
    assert rerank["usage"]["total_tokens"] > 0



def test_score_and_rerank_batches_match_online_answers(embed_server: RunningServer) -> None:
    client = sdk(embed_server, timeout=120)
    score_body = {"model": EMBED_MODEL, "queries": EMBED_TEXTS[0], "documents": EMBED_TEXTS[1:]}
    rerank_body = {"model": EMBED_MODEL, "query": EMBED_TEXTS[0], "documents": EMBED_TEXTS[1:], "top_n": 2}
    batches = {
        "/v1/score": [{"custom_id": "s", "method": "POST", "url": "/v1/score", "body": score_body},
                      {"custom_id": "s-bad", "method": "POST", "url": "/v1/score",
                       "body": {"model": EMBED_MODEL, "queries": "x"}}],
        "/v1/rerank": [{"custom_id": "r", "method": "POST", "url": "/v1/rerank", "body": rerank_body}],
    }
    for endpoint, lines in batches.items():
        batch = wait_for(client, submit(client, lines, endpoint=endpoint).id, timeout=BATCH_TIMEOUT)
        assert batch.status == "completed", batch
        body = read_jsonl(client, batch.output_file_id)[0]["response"]["body"]
        online = httpx.post(embed_server.base_url + endpoint.removeprefix("/v1"), timeout=120,
                            json=lines[0]["body"]).json()
        assert set(body) == set(online)  # the same object as `vllm serve` answers, in a batch
        if endpoint == "/v1/score":
            assert [d["score"] for d in body["data"]] == pytest.approx([d["score"] for d in online["data"]],
                                                                       abs=1e-4)
            # A line vLLM cannot take fails alone, with vLLM's message naming what is missing.
            [error] = read_jsonl(client, batch.error_file_id)
            assert error["custom_id"] == "s-bad" and error["response"]["status_code"] == 400
            assert "documents" in error["response"]["body"]["error"]["message"]
        else:
            assert [r["index"] for r in body["results"]] == [r["index"] for r in online["results"]]
    assert _loaded(embed_server) == EMBED_MODEL


def test_a_model_only_online_requests_ask_for_is_loaded_once_the_loaded_one_is_quiet(
        embed_server: RunningServer) -> None:
    """After the embedding tests (so the switch it causes disturbs none of them, and the chat tests after it find
    their model loaded): an online request for a served model that is not loaded is told to come back (503),
    naming the loaded one, and nothing switches under it; once the loaded model has had no online traffic for a
    few seconds and no batch needs the engine, the model asked for is loaded (queue/online.py)."""
    client = sdk(embed_server, timeout=120)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"]
    assert refused.value.code == "model_not_loaded" and EMBED_MODEL in refused.value.message
    assert _loaded(embed_server) == EMBED_MODEL  # not at once: a request never switches the engine under another
    deadline = time.monotonic() + BATCH_TIMEOUT
    while _loaded(embed_server) != CHAT_MODEL:
        assert time.monotonic() < deadline, "the model online requests asked for was never loaded"
        time.sleep(1)
    answer = client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}], **GREEDY)
    assert answer.choices[0].message.content


def test_online_chat_completions_and_responses_through_the_sdk(chat_server: RunningServer) -> None:
    client = sdk(chat_server, timeout=120)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=CHAT_MODEL, messages=messages, **GREEDY)  # type: ignore[arg-type]
    assert whole.object == "chat.completion" and whole.model == CHAT_MODEL and re.match(r"chatcmpl-\w+", whole.id)
    text = whole.choices[0].message.content
    assert text and whole.usage is not None and 1 <= whole.usage.completion_tokens <= 12

    # Streamed, greedy: the same text, in chunks, with usage at the end when asked for.
    chunks = list(client.chat.completions.create(model=CHAT_MODEL, messages=messages, stream=True,  # type: ignore
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    # The same request in a batch gets the same body shape and the same greedy answer.
    batch = wait_for(client, submit(client, [chat_line("same", messages[0]["content"], **GREEDY)]).id,
                     timeout=BATCH_TIMEOUT)
    batched = read_jsonl(client, batch.output_file_id)[0]["response"]["body"]
    assert set(batched) == set(whole.model_dump(exclude_unset=True))
    assert batched["choices"][0]["message"]["content"] == text

    completion = client.completions.create(model=CHAT_MODEL, prompt="One, two, three,", **GREEDY)  # type: ignore
    streamed = list(client.completions.create(model=CHAT_MODEL, prompt="One, two, three,", stream=True,
                                              **GREEDY))  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text

    response = client.responses.create(model=CHAT_MODEL, input="Say hello.", max_output_tokens=12,
                                       temperature=0)
    assert response.object == "response" and response.status in ("completed", "incomplete")
    assert response.output_text and response.usage is not None and response.usage.output_tokens <= 12
    with client.responses.stream(model=CHAT_MODEL, input="Say hello.", max_output_tokens=12,
                                 temperature=0) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    assert final.output_text == response.output_text

    # A /v1/responses batch answers as the online endpoint does; the SDK's own type reads it.
    line = {"custom_id": "resp", "method": "POST", "url": "/v1/responses",
            "body": {"model": CHAT_MODEL, "input": "Say hello.", "max_output_tokens": 12, "temperature": 0}}
    batch = wait_for(client, submit(client, [line], endpoint="/v1/responses").id, timeout=BATCH_TIMEOUT)
    assert batch.status == "completed", batch
    body = read_jsonl(client, batch.output_file_id)[0]["response"]["body"]
    from openai.types.responses import Response

    assert Response.model_validate(body).output_text == response.output_text
    assert set(body) == set(response.model_dump(exclude_unset=True))


def test_async_sdk_and_disconnects(chat_server: RunningServer) -> None:
    async def scenario() -> None:
        client = openai.AsyncOpenAI(base_url=chat_server.base_url, api_key="unused", max_retries=0, timeout=120)
        answers = await asyncio.gather(*(client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": f"Name a number bigger than {i}."}],
            **GREEDY) for i in range(6)))  # type: ignore[call-overload]
        assert all(a.choices[0].message.content for a in answers)
        # Streamed through the async client to its end: the same greedy text as the same request whole (each
        # alone in the engine, so both see the same batch shapes).
        question = [{"role": "user", "content": "Name a number bigger than 0."}]
        whole = await client.chat.completions.create(model=CHAT_MODEL, messages=question,
                                                     **GREEDY)  # type: ignore[call-overload]
        streamed = await client.chat.completions.create(
            model=CHAT_MODEL, messages=question, stream=True, stream_options={"include_usage": True},
            **GREEDY)  # type: ignore[call-overload]
        chunks = [chunk async for chunk in streamed]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            whole.choices[0].message.content
        assert chunks[-1].usage is not None and whole.usage is not None
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        stream = await client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Count to twenty."}], stream=True,
            max_tokens=200, temperature=0, extra_body={"ignore_eos": True})
        async for _ in stream:
            break  # leave after the first chunk: the server aborts the rest in vLLM
        await stream.close()
        await client.close()

    asyncio.run(scenario())
    # Nothing left behind: a request sent now is answered promptly.
    began = time.monotonic()
    sdk(chat_server, timeout=120).chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert time.monotonic() - began < 30


def _max_num_seqs(server: RunningServer) -> int:
    found = re.findall(rf"vLLM loaded {CHAT_MODEL} in [\d.]+ s \(max_num_seqs=(\d+)", server.log_path.read_text())
    assert found, "the engine's max_num_seqs is not in the log"
    return int(found[-1])


def test_online_request_finishes_before_batch_requests_queued_earlier(chat_server: RunningServer) -> None:
    """The batch fills vLLM: max_num_seqs requests running and as many waiting (the runner's window), all of
    the same length. First come, first served, the online request would start after every waiting one, when
    the whole batch is nearly done; with priority it takes the first free slot, right after the first wave."""
    client = sdk(chat_server, timeout=120)
    seqs = _max_num_seqs(chat_server)
    lines = [chat_line(f"wave-{i}", f"Count from {i}.", max_tokens=24, ignore_eos=True) for i in range(2 * seqs)]
    batch = submit(client, lines)
    wait_for(client, batch.id, statuses=("in_progress",), timeout=BATCH_TIMEOUT)
    time.sleep(2)  # the runner hands vLLM its whole window (both waves) at once
    assert client.batches.retrieve(batch.id).request_counts.completed == 0  # the first wave is still running
    answer = client.chat.completions.create(model=CHAT_MODEL, max_tokens=4, temperature=0,
                                            messages=[{"role": "user", "content": "Hi"}])
    during = client.batches.retrieve(batch.id)
    assert answer.choices[0].message.content is not None
    assert during.status == "in_progress", during
    assert during.request_counts.completed <= seqs + seqs // 4, (during.request_counts, seqs)

    done = wait_for(client, batch.id, timeout=BATCH_TIMEOUT)
    assert done.status == "completed", done
    results = assert_exactly_once(client, done, {f"wave-{i}" for i in range(2 * seqs)})
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 24 for r in results)
    assert re.search(rf"vLLM loaded {CHAT_MODEL} .*scheduling=priority", chat_server.log_path.read_text())


def test_online_errors_are_openai_shaped_on_vllm(chat_server: RunningServer) -> None:
    url = chat_server.base_url + "/chat/completions"
    too_long = httpx.post(url, timeout=60, json={"model": CHAT_MODEL, "messages": [
        {"role": "user", "content": "hello " * 1200}]})
    assert too_long.status_code == 400, too_long.text
    error = too_long.json()["error"]
    assert "maximum context length" in error["message"] and {"message", "type", "param", "code"} <= set(error)
    unknown = httpx.post(url, timeout=60, json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}],
                                                "prediction": {"type": "content", "content": "x"}})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "prediction"
    streamed_error = httpx.post(url, timeout=60, json={"model": CHAT_MODEL, "stream": True, "messages": [
        {"role": "user", "content": "hello " * 1200}]})
    assert streamed_error.status_code == 400  # refused before the first event: JSON, as `vllm serve` does
    assert json.loads(streamed_error.text)["error"]["message"]


def test_requests_vllm_refuses_in_its_validators_fail_alone_with_a_400(chat_server: RunningServer) -> None:
    """vLLM's request models raise its own VLLMValidationError (not a ValueError) for some values: answered
    400 naming the parameter, online and in a batch, where only that line fails (it used to stop the batch)."""
    bad = {"/v1/chat/completions": {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                    "tool_choice": "required", "max_tokens": 2},
           "/v1/completions": {"model": CHAT_MODEL, "prompt": "", "max_tokens": 2}}
    for url, body in bad.items():
        answer = httpx.post(chat_server.root_url + url, json=body, timeout=60)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] in ("tool_choice", "prompt")

    client = sdk(chat_server, timeout=120)
    lines = [{"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
              "body": bad["/v1/chat/completions"]}, chat_line("good", "Hi", max_tokens=2)]
    batch = wait_for(client, submit(client, lines).id, timeout=BATCH_TIMEOUT)
    assert batch.status == "completed" and batch.request_counts is not None, batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    [error_line] = read_jsonl(client, batch.error_file_id)
    assert error_line["custom_id"] == "bad" and error_line["response"]["status_code"] == 400
    assert "tools" in error_line["response"]["body"]["error"]["message"]
