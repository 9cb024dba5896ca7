"""A front vllm-batch server over two vllm-batch servers as its backends, every one a real process (echo engine),
the backends started with no extra flags: a batch of each model they list completes on them, every custom_id
exactly once. A backend loads a model it lists for online requests as a batch of it would (api/online.py: 503
`model_not_loaded` with Retry-After meanwhile), and the front waits that out as it waits out a rate limit
(engines/http.py); docs/scale.md says why."""

from __future__ import annotations

import httpx

from tests.conftest import ServerFactory, chat_lines, request_line, sdk, submit, wait_for
from tests.faults.checks import assert_echo_answers, assert_exactly_once


def test_a_front_over_two_vllm_batch_servers_with_no_extra_flags(server_factory: ServerFactory) -> None:
    backends = [server_factory(f"backend{i}") for i in range(2)]  # as a user starts them: no --online-model
    front = server_factory("front", engine="http", extra_args=[
        "--backend-probe-seconds", "0.3", *(arg for b in backends for arg in ("--backend", b.base_url))])
    client = sdk(front)
    assert {m.id for m in client.models.list()} == {"echo-model", "echo-embed"}

    chat = submit(client, chat_lines(40))
    embed = submit(client, [request_line(f"e{i}", f"text {i}", model="echo-embed", url="/v1/embeddings")
                            for i in range(20)], endpoint="/v1/embeddings")
    done = wait_for(client, chat.id, timeout=90)
    assert done.status == "completed", done
    assert done.request_counts.completed == 40 and done.request_counts.failed == 0
    assert_echo_answers(assert_exactly_once(client, done, {f"req-{i}" for i in range(40)}))

    done = wait_for(client, embed.id, timeout=90)  # the backends switch to echo-embed for it
    assert done.status == "completed", done
    assert done.request_counts.completed == 20 and done.request_counts.failed == 0
    assert_exactly_once(client, done, {f"e{i}" for i in range(20)})
    # Both backends did work, and each loaded the models on its own.
    for backend in backends:
        assert httpx.get(backend.root_url + "/health").json()["loaded_model"] in ("echo-model", "echo-embed")
