"""Property-based fuzzing of the online endpoints against a real server whose engine has the model loaded
(`--online-model`), so bodies reach the engine rather than stopping at "model not loaded": near-valid and wild
bodies, streamed or not, for every online endpoint. Whatever arrives, the answer is a 200 (JSON, or
server-sent events) or a 4xx in OpenAI's error shape, never a 500; and every answer gives its admission slot
back before the caller sees its end (one slot: a leak would turn every later request into a 429)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.server import RunningServer, make_server
from tests.hostile.errors import assert_openai_error

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
MODEL = "echo-model"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = make_server(tmp_path_factory.mktemp("online-fuzz") / "data",
                          extra_args=["--online-model", MODEL, "--online-max-requests", "1"]).start()
    yield running
    running.kill()
    assert "unhandled error" not in running.log()


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield client


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10)
def mostly(good: st.SearchStrategy[Any], wild: st.SearchStrategy[Any] = json_values) -> st.SearchStrategy[Any]:
    """Valid values four times in five, so most requests reach the engine and some get an answer."""
    return st.integers(0, 4).flatmap(lambda kind: wild if kind == 0 else good)


texts = mostly(st.text(max_size=40) | st.lists(st.text(max_size=20), min_size=1, max_size=3),
               st.lists(st.text(max_size=20), max_size=3) | json_values)
message = st.fixed_dictionaries({"role": mostly(st.sampled_from(["user", "system", "assistant"]),
                                                st.sampled_from(["tool", "nobody"]) | json_values),
                                 "content": mostly(st.text(max_size=40), st.lists(st.fixed_dictionaries(
                                     {"type": st.just("text"), "text": json_values}), max_size=2) | json_values)})
common = {
    "model": st.sampled_from([MODEL, "echo-embed", "no-such-model", ""]) | json_values,
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": mostly(st.booleans())})),
    "priority": mostly(st.integers(min_value=-3, max_value=3), st.integers(min_value=-(2**70), max_value=2**70)
                       | json_values),
    "max_tokens": mostly(st.integers(min_value=0, max_value=50), st.integers(min_value=-5, max_value=2**70)
                         | json_values),
    "n": mostly(st.integers(min_value=1, max_value=3), st.integers(min_value=-2, max_value=4) | json_values),
    "extra": json_values,
}
BODIES = {
    "/chat/completions": {"messages": mostly(st.lists(message, min_size=1, max_size=3))},
    "/completions": {"prompt": mostly(st.text(max_size=40), texts)},
    "/embeddings": {"input": texts, "encoding_format": mostly(st.sampled_from(["float", "base64"]),
                                                              st.just("bytes") | json_values)},
    "/responses": {"input": mostly(st.text(max_size=40) | st.lists(message, min_size=1, max_size=2)),
                   "max_output_tokens": mostly(st.integers(1, 50), st.integers() | json_values),
                   "background": mostly(st.just(False), st.booleans())},
    "/score": {"queries": texts, "documents": texts},
    "/rerank": {"query": mostly(st.text(max_size=40), texts), "documents": texts,
                "top_n": mostly(st.integers(min_value=1, max_value=5), st.integers(min_value=-3, max_value=2**40)
                                | json_values)},
}


def bodies(path: str) -> st.SearchStrategy[Any]:
    # Mostly near-valid (the right model, some of the endpoint's fields) so the engine is reached; some wild.
    rest = {k: v for k, v in common.items() if k != "model"}
    shaped = st.fixed_dictionaries({"model": st.just(MODEL)}, optional={**rest, **BODIES[path]})
    wild = st.fixed_dictionaries({}, optional={**common, **BODIES[path]}) | json_values
    return st.integers(0, 3).flatmap(lambda kind: wild if kind == 0 else shaped)


def check(response: httpx.Response, body: bytes) -> None:
    assert response.status_code < 500, (response.status_code, body[:300])
    assert response.status_code != 429, "an earlier request kept its admission slot"
    if response.status_code >= 400:
        assert_openai_error(response)
        return
    assert response.status_code == 200, response.status_code
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [block for block in body.decode().split("\n\n") if block]
        assert events, "an empty event stream"
        for event in events:
            data = next(line for line in event.split("\n") if line.startswith("data: "))[6:]
            if data != "[DONE]":
                assert "error" not in json.loads(data), data  # the echo engine never fails mid-stream
    else:
        assert isinstance(json.loads(body), dict)


@FUZZ
@given(path=st.sampled_from(sorted(BODIES)), data=st.data(), raw=st.integers(0, 9), garbage=st.binary(max_size=100))
def test_any_online_request(http: httpx.Client, path: str, data: st.DataObject, raw: int, garbage: bytes) -> None:
    content = garbage if raw == 0 else json.dumps(data.draw(bodies(path))).encode()
    with http.stream("POST", path, content=content, headers={"content-type": "application/json"}) as response:
        check(response, response.read())


def test_server_survived(server: RunningServer, http: httpx.Client) -> None:
    answer = http.post("/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "ok"}]})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "ok"
    assert server.process is not None and server.process.poll() is None
