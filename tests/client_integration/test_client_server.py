"""The sync and async clients against the server (echo engine). Most run the app in this process, reached through
the client's public `http_client=` argument (the one users give for a proxy or their own transport); a client in
another process (a resume from a subprocess, the CLI) talks to a real server over loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import openai
import pytest

from tests.client_integration.conftest import CHAT_MODEL, EMBED_MODEL, ask
from tests.conftest import AppFactory, sdk
from tests.helpers.inprocess import InProcessServer
from tests.helpers.server import RunningServer
from vllm_batch import (
    APITimeoutError,
    AsyncVLLMBatch,
    AuthenticationError,
    BatchFailedError,
    RetryPolicy,
    VLLMBatch,
)

REPO = Path(__file__).resolve().parents[2]


def test_chat_round_trip_in_input_order(app: InProcessServer, tmp_path: Path) -> None:
    prompts = [f"prompt number {i}" for i in range(25)]
    with VLLMBatch(base_url=app.base_url, http_client=app.http_client(), output_dir=tmp_path) as batch:
        ids = [batch.add_to_batch(custom_id=f"p{i}", **ask(p)) for i, p in enumerate(prompts)]
        status, out, err = batch.submit_wait_download(metadata={"suite": "integration"}, poll_interval=0.5,
                                                      progress=False, timeout=60)
        assert status.status == "completed" and status.request_counts.completed == 25
        assert status.metadata["suite"] == "integration"
        assert out is not None and err is None
        assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == sorted(ids)
        results = list(batch.results())
    assert [r.custom_id for r in results] == ids
    assert [r.text for r in results] == prompts  # the echo engine answers with the prompt
    assert all(r.ok and r.status_code == 200 and r.usage for r in results)
    assert results[0].parsed().choices[0].message.content == prompts[0]


def test_completions_and_base64_embeddings(app: InProcessServer, tmp_path: Path) -> None:
    with VLLMBatch(base_url=app.base_url, http_client=app.http_client(), output_dir=tmp_path) as batch:
        batch.add_to_batch(model=CHAT_MODEL, prompt="complete me", max_tokens=8)
        batch.submit_wait_download(poll_interval=0.5, progress=False, timeout=60)
        [result] = batch.results()
    assert result.endpoint == "/v1/completions" and result.text == "complete me"

    with VLLMBatch(base_url=app.base_url, http_client=app.http_client(), output_dir=tmp_path) as batch:
        batch.add_to_batch(model=EMBED_MODEL, input="embed me")
        batch.add_to_batch(model=EMBED_MODEL, input="embed me", encoding_format="float")
        _, out, _ = batch.submit_wait_download(poll_interval=0.5, progress=False, timeout=60)
        raw = [json.loads(x) for x in out.read_text().splitlines()]
        as_base64, as_floats = list(batch.results())
    encodings = {r["custom_id"]: type(r["response"]["body"]["data"][0]["embedding"]) for r in raw}
    assert encodings == {as_base64.custom_id: str, as_floats.custom_id: list}
    assert len(as_base64.embedding) == 384
    # Decoded float32 equals the float answer to float32 precision.
    assert as_base64.embedding == pytest.approx(as_floats.embedding, abs=1e-6)


def test_sharded_batch_against_a_server_with_a_low_line_limit(app_factory: AppFactory, tmp_path: Path) -> None:
    server = app_factory(extra_args=["--max-batch-lines", "4"])
    # Without sharding the server refuses the file, with its own reason.
    with VLLMBatch(base_url=server.base_url, http_client=server.http_client()) as batch:
        for i in range(10):
            batch.add_to_batch(**ask(f"q{i}"))
        batch.submit()
        with pytest.raises(BatchFailedError, match="4 requests"):
            batch.wait(poll_interval=0.2, progress=False, timeout=60)
    with VLLMBatch(base_url=server.base_url, http_client=server.http_client(), max_requests=4,
                   output_dir=tmp_path) as batch:
        ids = [batch.add_to_batch(**ask(f"q{i}")) for i in range(10)]
        status, out, _ = batch.submit_wait_download(poll_interval=0.2, progress=False, timeout=60)
        assert len(batch.batch_ids) == 3 and len(status.batches) == 3
        assert status.request_counts.total == 10 and status.request_counts.completed == 10
        assert len(out.read_text().splitlines()) == 10
        results = list(batch.results())
    assert [r.custom_id for r in results] == ids
    assert [r.text for r in results] == [f"q{i}" for i in range(10)]


def test_cancel_keeps_partial_results(app_factory: AppFactory, tmp_path: Path) -> None:
    # 8 at a time, 0.2 s each: about 5 s of work, so the cancel lands mid-batch even on a loaded machine (with
    # the echo engine's default window all 200 ran at once and could finish before the cancel arrived).
    server = app_factory(extra_args=["--echo-delay", "0.2", "--window", "8"])
    with VLLMBatch(base_url=server.base_url, http_client=server.http_client(), output_dir=tmp_path) as batch:
        for i in range(200):
            batch.add_to_batch(**ask(f"q{i}"))
        batch.submit()
        status = batch.cancel()
        assert status.status in ("cancelling", "cancelled")
        final = batch.wait(poll_interval=0.2, progress=False, timeout=60)
        assert final.status == "cancelled"
        results = list(batch.results())
    assert len(results) == 200
    done = [r for r in results if r.ok]
    assert len(done) < 200
    # What the cancel stopped has no result line (never a "Client disconnected" failure): missing_result.
    assert {r.error.code for r in results if r.error is not None} == {"missing_result"}
    assert final.request_counts.failed == 0
    assert [r.index for r in results] == list(range(200))


def test_the_bar_shows_rates_and_an_eta_once_the_batch_ahead_is_done(server_factory, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's bar went from `0/36 [00:45, in_progress]` to `36/36 completed`: while a batch waits (a model
    loading, a batch ahead) polls backed off to poll_interval, and a short batch ran between two polls. Here
    ~14 s of work ahead of a ~3 s batch, waited on with poll_interval=60: the bar shows its rates and ETA."""
    server = server_factory(extra_args=["--echo-delay", "0.1", "--window", "2", "--checkpoint-seconds", "0.1"])
    with VLLMBatch(base_url=server.base_url, workdir=tmp_path / "ahead") as ahead, \
            VLLMBatch(base_url=server.base_url, workdir=tmp_path / "ours") as ours:
        for i in range(280):
            ahead.add_to_batch(**ask(f"ahead {i}"))
        ahead.submit()
        for i in range(60):
            ours.add_to_batch(**ask(f"ours {i}"))
        ours.submit()
        capsys.readouterr()
        status = ours.wait(poll_interval=60, progress=True, timeout=120)
    err = capsys.readouterr().err
    assert status.status == "completed"
    running = [part for part in err.replace("\n", "\r").split("\r") if "in_progress" in part]
    assert any("req/s" in part and "ETA" in part for part in running), err[-3000:]


def test_comparison_of_two_models(app: InProcessServer) -> None:
    with VLLMBatch(base_url=app.base_url, http_client=app.http_client(), models=[CHAT_MODEL, "echo-embed"]) as batch:
        for i in range(3):
            batch.add_to_batch(custom_id=f"c{i}", messages=[{"role": "user", "content": f"same {i}"}])
        batch.submit()
        batch.wait(poll_interval=0.2, progress=False, timeout=60)
        rows = list(batch.compare())
    assert [r.custom_id for r in rows] == ["c0", "c1", "c2"]
    assert {m: r.text for m, r in rows[1].results.items()} == {CHAT_MODEL: "same 1", "echo-embed": "same 1"}


def test_unknown_model_fails_with_the_servers_reason(app: InProcessServer) -> None:
    with VLLMBatch(base_url=app.base_url, http_client=app.http_client()) as batch:
        batch.add_to_batch(**ask("x", model="no-such-model"))
        batch.submit()
        with pytest.raises(BatchFailedError, match="no-such-model") as info:
            batch.wait(poll_interval=0.2, progress=False, timeout=60)
    assert info.value.errors[0]["code"] == "model_not_found"


def test_responses_score_and_rerank_batches_round_trip(app: InProcessServer, tmp_path: Path) -> None:
    with VLLMBatch(base_url=app.base_url, http_client=app.http_client(), output_dir=tmp_path) as batch:
        batch.add_to_batch(endpoint="/v1/responses", model=CHAT_MODEL, input="respond to me")
        batch.submit_wait_download(poll_interval=0.3, progress=False, timeout=60)
        [answer] = batch.results()
    assert answer.endpoint == "/v1/responses" and answer.text == "respond to me"
    assert answer.parsed().output_text == "respond to me"

    with VLLMBatch(base_url=app.base_url, http_client=app.http_client(), output_dir=tmp_path) as batch:
        batch.add_to_batch(model=EMBED_MODEL, query="cat", documents=["a dog", "cat"], top_n=1)
        batch.submit_wait_download(poll_interval=0.3, progress=False, timeout=60)
        [ranked] = batch.results()
    assert ranked.endpoint == "/v1/rerank" and ranked.ok
    assert [r["index"] for r in ranked.parsed()["results"]] == [1]

    with VLLMBatch(base_url=app.base_url, http_client=app.http_client(), output_dir=tmp_path) as batch:
        batch.add_to_batch(model=EMBED_MODEL, queries="cat", documents=["cat", "a dog"])
        batch.submit_wait_download(poll_interval=0.3, progress=False, timeout=60)
        [scored] = batch.results()
    assert scored.endpoint == "/v1/score"
    assert [d["index"] for d in scored.response["data"]] == [0, 1]


def test_api_key_from_the_environment(app_factory: AppFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    server = app_factory(api_key="s3cret")
    monkeypatch.setenv("BATCH_BASE_URL", server.base_url)
    monkeypatch.setenv("BATCH_API_KEY", "s3cret")
    with VLLMBatch(http_client=server.http_client()) as batch:
        batch.add_to_batch(**ask("with key"))
        batch.submit()
        assert batch.wait(poll_interval=0.2, progress=False, timeout=60).status == "completed"
    monkeypatch.setenv("BATCH_API_KEY", "wrong")
    with VLLMBatch(http_client=server.http_client()) as batch:
        batch.add_to_batch(**ask("x"))
        with pytest.raises(AuthenticationError) as info:
            batch.submit()
    assert info.value.status_code == 401


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, check=False)


def test_resume_from_another_process(server_factory, tmp_path: Path) -> None:
    server = server_factory(extra_args=["--max-batch-lines", "3"])
    env = {"BATCH_BASE_URL": server.base_url}
    submitter = _python(f"""
        from vllm_batch import VLLMBatch
        batch = VLLMBatch(max_requests=3)
        for i in range(7):
            batch.add_to_batch(custom_id=f"r{{i}}", model="{CHAT_MODEL}",
                               messages=[{{"role": "user", "content": f"from process one {{i}}"}}])
        print(batch.submit())
        # Exit without waiting or closing: the batch lives on the server.
    """, env)
    assert submitter.returncode == 0, submitter.stderr
    batch_id = submitter.stdout.strip()

    reader = _python(f"""
        import json
        from vllm_batch import VLLMBatch
        with VLLMBatch.resume("{batch_id}") as batch:
            batch.wait(poll_interval=0.2, progress=False, timeout=60)
            print(json.dumps([[r.custom_id, r.text, r.ok] for r in batch.results()]))
            print(json.dumps(batch.batch_ids))
    """, env)
    assert reader.returncode == 0, reader.stderr
    results_line, ids_line = reader.stdout.strip().splitlines()
    assert json.loads(results_line) == [[f"r{i}", f"from process one {i}", True] for i in range(7)]
    assert len(json.loads(ids_line)) == 3 and json.loads(ids_line)[0] == batch_id


@pytest.mark.anyio
async def test_async_client(app: InProcessServer, tmp_path: Path) -> None:
    async with AsyncVLLMBatch(base_url=app.base_url, http_client=app.async_http_client(), output_dir=tmp_path,
                              max_requests=5) as batch:
        ids = [batch.add_to_batch(**ask(f"async {i}")) for i in range(12)]
        status, out, _ = await batch.submit_wait_download(poll_interval=0.2, progress=False, timeout=60)
        assert status.status == "completed" and len(batch.batch_ids) == 3
        assert out is not None and len(out.read_text().splitlines()) == 12
        results = [r async for r in batch.results()]
        bid = batch.id
    assert [r.custom_id for r in results] == ids
    assert [r.text for r in results] == [f"async {i}" for i in range(12)]
    again = await AsyncVLLMBatch.resume(bid, base_url=app.base_url, http_client=app.async_http_client())
    async with again:
        assert (await again.status()).status == "completed"
        assert again.batch_ids == batch.batch_ids
        listed = await again.list_batches(limit=50)
    assert set(batch.batch_ids) <= {b.id for b in listed}


@pytest.mark.anyio
async def test_async_cancel(app_factory: AppFactory) -> None:
    server = app_factory(extra_args=["--echo-delay", "0.2"])
    async with AsyncVLLMBatch(base_url=server.base_url, http_client=server.async_http_client()) as batch:
        for i in range(100):
            batch.add_to_batch(**ask(f"{i}"))
        await batch.submit()
        await batch.cancel()
        assert (await batch.wait(poll_interval=0.2, progress=False, timeout=60)).status == "cancelled"


def test_cli_against_the_server(server: RunningServer, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alpha\nbeta\ngamma\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "BATCH_BASE_URL": server.base_url}
    cli = [sys.executable, "-m", "vllm_batch._cli"]
    created = subprocess.run([*cli, "create", str(prompts), "--model", CHAT_MODEL, "-o", str(tmp_path / "r.jsonl")],
                             capture_output=True, text=True, env=env, timeout=60, check=True)
    assert "3 requests" in created.stderr
    run = subprocess.run([*cli, "submit", str(tmp_path / "r.jsonl"), "--wait", "-o", "-", "--poll-interval", "0.5",
                          "--no-progress"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    lines = {json.loads(x)["custom_id"]: json.loads(x) for x in run.stdout.splitlines()}
    assert sorted(lines) == ["line-1", "line-2", "line-3"]
    assert lines["line-2"]["response"]["body"]["choices"][0]["message"]["content"] == "beta"
    listing = subprocess.run([*cli, "list"], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert "completed" in listing.stdout


class LoseFirstCreateAnswer(httpx.BaseTransport):
    """Forwards to the server, but drops the answer to the first batch create after the server acted."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.lost = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST" and request.url.path == "/v1/batches" and not self.lost:
            self.lost = True
            response.read()
            raise httpx.ReadTimeout("the answer was lost on the way back", request=request)
        return response


def test_a_lost_create_answer_leaves_one_batch_on_the_server(app: InProcessServer, tmp_path: Path) -> None:
    transport = LoseFirstCreateAnswer(app.transport)
    with httpx.Client(transport=transport) as http, VLLMBatch(
        base_url=app.base_url, http_client=http, workdir=tmp_path / "work",
        retry=RetryPolicy(max_attempts=1),
    ) as batch:
        batch.add_to_batch(**ask("only once"))
        with pytest.raises(APITimeoutError):
            batch.submit(metadata={"case": "lost-create"})
        batch_id = batch.submit()
        assert batch.provider.name == "local"  # recognised as a vllm-batch-server at an unknown URL
    client = sdk(app)
    tagged = [b for b in client.batches.list(limit=100).data if (b.metadata or {}).get("case") == "lost-create"]
    assert [b.id for b in tagged] == [batch_id]


def test_the_server_honours_idempotency_keys(app: InProcessServer, tmp_path: Path) -> None:
    """The contract the client builds on (OpenAI's SDK sends the header as any extra header)."""
    client = sdk(app)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                               "body": ask("keyed")}) + "\n")
    upload_key = {"Idempotency-Key": f"upload-{tmp_path.name}"}
    first_file = client.files.create(file=src.open("rb"), purpose="batch", extra_headers=upload_key)
    again_file = client.files.create(file=src.open("rb"), purpose="batch", extra_headers=upload_key)
    assert again_file.id == first_file.id
    key = {"Idempotency-Key": f"create-{tmp_path.name}"}
    create = {"input_file_id": first_file.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    first = client.batches.create(**create, extra_headers=key)
    again = client.batches.create(**create, extra_headers=key)
    assert again.id == first.id
    with pytest.raises(openai.ConflictError) as info:
        client.batches.create(**{**create, "metadata": {"other": "body"}}, extra_headers=key)
    assert info.value.code == "idempotency_key_reused"
