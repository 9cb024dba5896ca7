"""Backends that answer 200 with something that is no answer, or with odd usage counts, driven in one event loop:
HttpEngines on an in-memory transport behind the router. Only answers of the endpoint are successes; a backend's
garbage is tried elsewhere, counted against it, and takes it out; odd usage is 0, never an error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from vllm_batch_server.engines import base
from vllm_batch_server.engines.base import Usage, is_answer
from vllm_batch_server.engines.http import BackendSpec, HttpEngine
from vllm_batch_server.engines.router.dispatch import MemberState
from vllm_batch_server.engines.router.router import Router
from vllm_batch_server.settings import Settings

CHAT = "/v1/chat/completions"
MODEL = "echo-model"
Answer = Callable[[dict[str, Any]], httpx.Response]


def chat_answer(body: dict[str, Any], usage: Any = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": usage if usage is not None else {"prompt_tokens": 3, "completion_tokens": 1,
                                                      "total_tokens": 4}}


def healthy(body: dict[str, Any]) -> httpx.Response:
    return httpx.Response(200, json=chat_answer(body))


class Fake(HttpEngine):
    """An HttpEngine whose backend is `answer`, called in this process."""

    def __init__(self, name: str, answer: Answer, settings: Settings) -> None:
        super().__init__(BackendSpec(url=f"http://{name}/v1", name=name, window=4), settings)
        self.answer = answer
        self.calls = 0

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            async def handle(request: httpx.Request) -> httpx.Response:
                if request.url.path.endswith("/models"):
                    return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                self.calls += 1
                await asyncio.sleep(0.001)
                return self.answer(json.loads(request.content))
            self._client = httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url=self.spec.url)
        return self._client


def settings(**changes: Any) -> Settings:
    return Settings(engine="http", models=[MODEL], backend_probe_seconds=0.2, backend_wait_seconds=5, **changes)


def router_over(*answers: tuple[str, Answer]) -> tuple[Router, list[Fake]]:
    config = settings()
    fakes = [Fake(name, answer, config) for name, answer in answers]
    return Router([(f.name, "http", f) for f in fakes], config), fakes


async def run_all(router: Router, n: int) -> list[Any]:
    await router.start(MODEL)
    try:
        return await asyncio.wait_for(asyncio.gather(
            *(router.run(f"r{i}", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": f"m{i}"}]})
              for i in range(n))), 30)
    finally:
        await router.stop()


GARBAGE: list[Answer] = [
    lambda body: httpx.Response(200, text="<html>502 Bad Gateway</html>"),
    lambda body: httpx.Response(200, json={"error": {"message": "overloaded", "type": "server_error"}}),
    lambda body: httpx.Response(200, json={"object": "chat.completion", "id": "x"}),  # no choices
    lambda body: httpx.Response(200, json=[chat_answer(body)]),  # not an object
    lambda body: httpx.Response(200, content=json.dumps(chat_answer(body)).encode()[:40]),  # truncated
    lambda body: httpx.Response(200, json={"object": "list", "data": []}),  # an embeddings answer
]


@pytest.mark.parametrize("garbage", range(len(GARBAGE)))
def test_a_backend_answering_200_with_no_answer_is_never_a_success(garbage: int) -> None:
    router, (bad, good) = router_over(("bad", GARBAGE[garbage]), ("good", healthy))
    results = asyncio.run(run_all(router, 120))
    assert all(r.status_code == 200 and is_answer(CHAT, r.body) for r in results)
    member = router.members[0]
    assert member.bad_answers > 0 and member.failed_attempts >= member.bad_answers
    # It keeps answering garbage: taken out like a dead one, not fed the most work for answering fastest.
    assert member.taken_out >= 1
    assert bad.calls < good.calls
    assert router.snapshot()[0]["bad_answers"] == member.bad_answers


def test_when_every_backend_answers_garbage_the_line_is_a_502_bad_backend_response() -> None:
    router, _ = router_over(("bad1", GARBAGE[0]), ("bad2", GARBAGE[1]))
    results = asyncio.run(run_all(router, 6))
    for result in results:
        assert result.status_code == 502
        assert result.body["error"]["code"] == "bad_backend_response"
        assert result.body["error"]["type"] == "server_error"


def test_a_backend_with_occasional_garbage_stays_in_rotation() -> None:
    answers = iter(range(10**6))

    def rarely(body: dict[str, Any]) -> httpx.Response:
        return GARBAGE[0](body) if next(answers) % 25 == 0 else healthy(body)

    router, _ = router_over(("rare", rarely), ("good", healthy))
    results = asyncio.run(run_all(router, 200))
    assert all(r.ok for r in results)
    assert router.members[0].bad_answers > 0 and router.members[0].state is MemberState.IDLE  # (stopped)
    assert router.members[0].taken_out == 0


ODD = [float("nan"), "12", -4, None, 2**70, True, [1], {"n": 1}, float("inf"), 1.5]


@pytest.mark.parametrize("odd", ODD, ids=repr)
def test_odd_usage_counts_are_zero_and_counted_never_raised(odd: Any) -> None:
    before = base.odd_usage_fields
    usage = Usage.from_body({"usage": {"prompt_tokens": odd, "completion_tokens": 7,
                                       "prompt_tokens_details": {"cached_tokens": odd}}})
    assert usage == Usage(input_tokens=0, cached_tokens=0, output_tokens=7)
    assert base.odd_usage_fields == before + 2
    responses = Usage.from_body({"usage": {"input_tokens": 5, "output_tokens": odd}})
    assert responses == Usage(input_tokens=5, output_tokens=0)
    assert Usage.from_body({"usage": odd}) == Usage()


def test_good_usage_counts_are_kept_and_missing_ones_are_no_oddity() -> None:
    before = base.odd_usage_fields
    assert Usage.from_body({"usage": {"prompt_tokens": 3, "completion_tokens": 2.0,
                                      "prompt_tokens_details": None}}) == Usage(3, 0, 2)
    assert Usage.from_body({"usage": {"prompt_tokens": 3}}) == Usage(3, 0, 0)
    assert Usage.from_body({"id": "x"}) == Usage()
    assert base.odd_usage_fields == before


@pytest.mark.parametrize("usage", ['{"prompt_tokens": NaN, "completion_tokens": 1}',
                                   '{"prompt_tokens": "many", "completion_tokens": -1}',
                                   '{"prompt_tokens": null, "completion_tokens": Infinity}', '"lots"'])
def test_a_backend_with_odd_usage_never_fails_a_request(usage: str) -> None:
    def odd(body: dict[str, Any]) -> httpx.Response:
        text = json.dumps(chat_answer(body, usage={"placeholder": 0})).replace('{"placeholder": 0}', usage)
        return httpx.Response(200, content=text.encode(), headers={"content-type": "application/json"})

    router, _ = router_over(("odd", odd))
    results = asyncio.run(run_all(router, 10))
    assert all(r.ok and r.usage.input_tokens == 0 for r in results)
    json.dumps(results[0].body, allow_nan=False)  # written out as JSON that parses everywhere


@pytest.mark.parametrize(("url", "good", "bad"), [
    ("/v1/completions", {"choices": []}, {"data": []}),
    ("/v1/embeddings", {"data": [{"embedding": [0.1]}]}, {"choices": []}),
    ("/v1/score", {"data": [{"score": 0.5}]}, {"results": []}),
    ("/v1/rerank", {"results": [{"index": 0}]}, {"data": []}),
    ("/v1/responses", {"object": "response", "output": [], "error": None}, {"object": "response"}),
    ("/v1/chat/completions", {"choices": []}, {"choices": [], "error": {"message": "x"}}),
])
def test_each_endpoint_has_its_answer_shape(url: str, good: dict[str, Any], bad: dict[str, Any]) -> None:
    assert is_answer(url, good)
    assert not is_answer(url, bad)
    assert not is_answer(url, None) and not is_answer(url, [good])
