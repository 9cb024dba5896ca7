"""Several models resident (`--max-loaded-models N`), on the echo engine: a queue that alternates between them
switches nothing, their batches run at the same time, a model not loaded replaces the least recently used
idle one (and loads ahead of its turn while another engine runs), online requests reach each model's engine,
/status, /health and /metrics show every one, and kill -9 with two running loses and repeats nothing.

The in-process tier for everything but the kill (a server process). The engine owner's order of operations
under vLLM's sleep mode, which needs a GPU, is checked here on echo engines (test_sleep_*).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import AppFactory, Server, chat_lines, read_jsonl, request_line, sdk, submit, wait_for
from tests.faults.checks import assert_exactly_once
from tests.helpers.server import make_server
from tests.ops.test_metrics import scrape, value
from vllm_batch_server.engines import check_settings
from vllm_batch_server.engines.base import EngineError
from vllm_batch_server.engines.echo import EchoEngine
from vllm_batch_server.queue.engine_owner import EngineOwner, EngineState, RetryAlone
from vllm_batch_server.queue.online import OnlineTraffic
from vllm_batch_server.settings import Settings, SettingsError

TWO = ["--max-loaded-models", "2"]


def embed_lines(n: int, prefix: str = "emb") -> list[dict[str, Any]]:
    return [request_line(f"{prefix}-{i}", f"text {i}", model="echo-embed", url="/v1/embeddings") for i in range(n)]


def health(server: Server) -> dict[str, Any]:
    body: dict[str, Any] = server.http.get(server.root_url + "/health").json()
    return body


def status(server: Server) -> dict[str, Any]:
    body: dict[str, Any] = server.http.get(server.root_url + "/status").json()
    return body


def run(client: openai.OpenAI, lines: list[dict[str, Any]], **kwargs: Any) -> Any:
    done = wait_for(client, submit(client, lines, **kwargs).id)
    assert done.status == "completed", done
    return done


def test_a_queue_alternating_between_two_resident_models_switches_nothing(app_factory: AppFactory) -> None:
    server = app_factory(extra_args=TWO)
    client = sdk(server)
    batches = [submit(client, chat_lines(30, f"chat{i}")) if i % 2 == 0 else
               submit(client, embed_lines(30, f"emb{i}"), endpoint="/v1/embeddings") for i in range(6)]
    for i, batch in enumerate(batches):
        done = wait_for(client, batch.id)
        assert done.status == "completed" and done.model == ("echo-model" if i % 2 == 0 else "echo-embed")
        assert_exactly_once(client, done, {f"{'chat' if i % 2 == 0 else 'emb'}{i}-{n}" for n in range(30)})
    samples = scrape(server)
    # Each model loaded once, into an engine of its own; nothing unloaded.
    assert value(samples, "vllm_batch_model_load_seconds_count", model="echo-model") == 1
    assert value(samples, "vllm_batch_model_load_seconds_count", model="echo-embed") == 1
    assert value(samples, "vllm_batch_model_switches_total") == 0
    assert value(samples, "vllm_batch_loaded_model", model="echo-model") == 1
    assert value(samples, "vllm_batch_loaded_model", model="echo-embed") == 1
    assert value(samples, "vllm_batch_model_state", model="echo-embed", state="ready") == 1
    assert value(samples, "vllm_batch_max_loaded_models") == 2
    assert sorted(health(server)["loaded_models"]) == ["echo-embed", "echo-model"]


def test_with_one_model_loaded_the_same_queue_switches_at_every_change(app_factory: AppFactory) -> None:
    """The default, unchanged: one engine, one model at a time."""
    server = app_factory()
    client = sdk(server)
    for i in range(4):
        if i % 2 == 0:
            run(client, chat_lines(5, f"c{i}"))
        else:
            run(client, embed_lines(5, f"e{i}"), endpoint="/v1/embeddings")
    samples = scrape(server)
    assert value(samples, "vllm_batch_model_switches_total") == 3
    assert value(samples, "vllm_batch_max_loaded_models") == 1
    assert health(server)["loaded_models"] == ["echo-embed"]
    assert status(server)["engine"]["max_loaded_models"] == 1


def test_batches_of_two_resident_models_run_at_the_same_time(app_factory: AppFactory) -> None:
    # Each batch takes about 2 s (400 requests, 4 in flight, 20 ms each): long enough to be seen side by side.
    server = app_factory(extra_args=[*TWO, "--echo-delay", "0.02", "--window", "4"])
    client = sdk(server)
    chat = submit(client, chat_lines(400))
    embed = submit(client, embed_lines(400), endpoint="/v1/embeddings")
    together = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and together is None:
        now = status(server)
        if sorted(now["running"]) == sorted([chat.id, embed.id]):
            together = now
        elif client.batches.retrieve(embed.id).status == "completed":
            break
        time.sleep(0.05)
    assert together is not None, "the two batches never ran at the same time"
    running = {entry["model"]: entry for entry in together["engine"]["loaded_models"]}
    assert running["echo-model"]["running"] == [chat.id] and running["echo-embed"]["running"] == [embed.id]
    assert running["echo-model"]["state"] == running["echo-embed"]["state"] == "ready"
    for batch, prefix in ((chat, "req"), (embed, "emb")):
        done = wait_for(client, batch.id)
        assert done.status == "completed"
        assert_exactly_once(client, done, {f"{prefix}-{n}" for n in range(400)})


def test_a_third_model_replaces_the_least_recently_used_idle_one(app_factory: AppFactory) -> None:
    server = app_factory(models=["echo-a", "echo-b", "echo-c"], extra_args=TWO)
    client = sdk(server)

    def chats(model: str) -> Any:
        return run(client, chat_lines(5, model, model=model))

    chats("echo-a")
    chats("echo-b")
    assert sorted(health(server)["loaded_models"]) == ["echo-a", "echo-b"]
    chats("echo-c")  # echo-a was used least recently
    assert sorted(health(server)["loaded_models"]) == ["echo-b", "echo-c"]
    chats("echo-b")  # resident: no load
    chats("echo-a")  # now echo-c is the least recently used
    assert sorted(health(server)["loaded_models"]) == ["echo-a", "echo-b"]
    samples = scrape(server)
    assert value(samples, "vllm_batch_model_load_seconds_count", model="echo-b") == 1
    assert value(samples, "vllm_batch_model_load_seconds_count", model="echo-a") == 2
    assert value(samples, "vllm_batch_model_switches_total") == 2
    # /status lists them least recently used first: the next to be unloaded.
    assert [entry["model"] for entry in status(server)["engine"]["loaded_models"]] == ["echo-b", "echo-a"]


def test_the_next_model_loads_while_the_previous_batch_runs_and_the_queue_keeps_its_order(
        app_factory: AppFactory) -> None:
    """Chats, more chats, embeddings: the embedding model loads into the free engine while the first chats run
    (not after them), and the embeddings still start only once the second chats have started."""
    server = app_factory(extra_args=[*TWO, "--echo-delay", "0.02", "--window", "4"])
    client = sdk(server)
    first = submit(client, chat_lines(300, "first"))
    second = submit(client, chat_lines(40, "second"))
    embed = submit(client, embed_lines(40), endpoint="/v1/embeddings")
    loaded_early = False
    samples: list[dict[str, Any]] = []
    while client.batches.retrieve(embed.id).status != "completed":
        now = status(server)
        samples.append(now)
        models = {entry["model"]: entry["state"] for entry in now["engine"]["loaded_models"]}
        if now["running"] == [first.id] and models.get("echo-embed") == "ready":
            loaded_early = True
        time.sleep(0.05)
    assert loaded_early, "the embedding model was not loaded while the first batch ran alone"
    # First in, first out: the embeddings never ran before the second chats had started.
    started: list[str] = []
    for now in samples:
        started += [batch_id for batch_id in now["running"] if batch_id not in started]
    assert started.index(second.id) < started.index(embed.id) if embed.id in started else True
    for batch in (first, second, embed):
        assert wait_for(client, batch.id).status == "completed"
    assert value(scrape(server), "vllm_batch_model_switches_total") == 0


def test_online_requests_reach_each_resident_models_engine(app_factory: AppFactory) -> None:
    server = app_factory(extra_args=TWO)
    client = sdk(server)
    run(client, chat_lines(3))
    # The embedding model is not loaded yet: the request is told to come back, and it is loaded beside the
    # chat model, which stays.
    with pytest.raises(openai.APIStatusError) as refused:
        client.embeddings.create(model="echo-embed", input="hello")
    assert refused.value.status_code == 503
    deadline = time.monotonic() + 10
    while sorted(health(server)["loaded_models"]) != ["echo-embed", "echo-model"]:
        assert time.monotonic() < deadline, health(server)
        time.sleep(0.05)
    embedding = client.embeddings.create(model="echo-embed", input="hello")
    chat = client.chat.completions.create(model="echo-model", messages=[{"role": "user", "content": "hi there"}])
    assert embedding.model == "echo-embed" and len(embedding.data[0].embedding) == 384
    assert chat.model == "echo-model" and chat.choices[0].message.content == "hi there"
    assert value(scrape(server), "vllm_batch_model_switches_total") == 0


def test_an_engine_failure_restarts_that_engine_only(app_factory: AppFactory) -> None:
    # Each engine crashes once, after 30 requests: both batches still complete, each request once.
    server = app_factory(extra_args=[*TWO, "--echo-delay", "0.005", "--window", "4", "--checkpoint-every", "5",
                                     "--echo-fault", "crash-after=30,times=1"])
    client = sdk(server)
    chat = submit(client, chat_lines(120))
    embed = submit(client, embed_lines(120), endpoint="/v1/embeddings")
    for batch, prefix in ((chat, "req"), (embed, "emb")):
        done = wait_for(client, batch.id)
        assert done.status == "completed", done
        assert_exactly_once(client, done, {f"{prefix}-{n}" for n in range(120)})
    samples = scrape(server)
    assert value(samples, "vllm_batch_engine_restarts_total") == 2
    assert value(samples, "vllm_batch_model_switches_total") == 0


def test_kill_9_with_two_resident_models_running_then_each_request_exactly_once(tmp_path: Path) -> None:
    server = make_server(tmp_path / "data", extra_args=[
        *TWO, "--echo-delay", "0.02", "--window", "4", "--checkpoint-every", "8", "--checkpoint-seconds", "0.2"])
    server.start()
    try:
        client = sdk(server)
        chat = submit(client, chat_lines(300))
        embed = submit(client, embed_lines(300), endpoint="/v1/embeddings")
        for batch in (chat, embed):
            progress = wait_for(client, batch.id, timeout=60, until=lambda b: b.request_counts.completed >= 40)
            assert progress.status == "in_progress", "killed mid-batch, not after it"
        server.kill()
        server.start()
        for batch, prefix in ((chat, "req"), (embed, "emb")):
            done = wait_for(client, batch.id, timeout=60)
            assert done.status == "completed", done
            lines = assert_exactly_once(client, done, {f"{prefix}-{n}" for n in range(300)})
            assert all(line["response"]["status_code"] == 200 for line in lines)
        assert sorted(health(server)["loaded_models"]) == ["echo-embed", "echo-model"]
        assert read_jsonl(client, client.batches.retrieve(embed.id).output_file_id)[0]["response"]["body"]["model"] \
            == "echo-embed"
    finally:
        server.kill()


# ---- settings -------------------------------------------------------------------------------------------------


def test_settings_refuse_what_cannot_work() -> None:
    with pytest.raises(SettingsError, match="--max-loaded-models"):
        Settings(max_loaded_models=0)
    with pytest.raises(SettingsError, match="--max-sleeping-models"):
        Settings(max_sleeping_models=-1)
    with pytest.raises(SettingsError, match="--max-loaded-models keeps models loaded in this process"):
        check_settings(Settings(engine="echo", max_loaded_models=2, backends=["http://127.0.0.1:9/v1"]))
    with pytest.raises(SettingsError, match="--max-sleeping-models"):
        check_settings(Settings(engine="http", max_sleeping_models=1, backends=["http://127.0.0.1:9/v1"]))


# ---- the engine owner with vLLM's sleep mode, on echo engines -------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def model_loaded(self, model: str, seconds: float, *, switched: bool, restarted: bool) -> None:
        self.events.append(f"loaded {model}" + (" (switched)" if switched else ""))

    def model_slept(self, model: str) -> None:
        self.events.append(f"slept {model}")

    def model_woken(self, model: str, seconds: float) -> None:
        self.events.append(f"woken {model}")


def owner_with_sleep(tmp_path: Path, **settings: Any) -> tuple[EngineOwner, Recorder, list[EchoEngine]]:
    config = Settings(data_dir=tmp_path, engine="echo", models=["a", "b", "c"], **settings)
    engines = [EchoEngine(config)]

    def make() -> EchoEngine:
        engines.append(EchoEngine(config))
        return engines[-1]

    recorder = Recorder()
    return EngineOwner(engines[0], config, OnlineTraffic(config), recorder, make), recorder, engines


async def bring(owner: EngineOwner, model: str) -> None:
    claim = owner.claim(model, lambda slot: False)
    assert claim is not None
    await owner.bring(claim)


def states(owner: EngineOwner) -> dict[str, str]:
    return {str(slot.model): slot.state.value for slot in owner.slots if slot.state is not EngineState.IDLE}


def test_sleep_evicted_models_sleep_and_wake_in_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        owner, recorder, engines = owner_with_sleep(tmp_path, max_loaded_models=1, max_sleeping_models=1)
        await bring(owner, "a")
        await bring(owner, "b")  # a sleeps before b starts, in an engine of its own
        assert states(owner) == {"a": "asleep", "b": "ready"}
        await bring(owner, "a")  # b sleeps, a wakes: no load
        assert states(owner) == {"a": "ready", "b": "asleep"}
        await bring(owner, "c")  # a sleeps; one may sleep, so b is unloaded and c starts in its engine
        assert states(owner) == {"a": "asleep", "c": "ready"}
        assert recorder.events == ["loaded a", "slept a", "loaded b", "slept b", "woken a", "slept a",
                                   "loaded c (switched)"]
        assert list(engines[0].calls) == ["stop", "start a", "sleep", "wake_up", "sleep"]
        assert list(engines[1].calls) == ["stop", "start b", "sleep", "stop", "start c"]
        assert len(engines) == 2  # one awake, one asleep: never more engines than that

    asyncio.run(scenario())


def test_sleep_an_engine_that_cannot_sleep_is_unloaded_instead(tmp_path: Path) -> None:
    async def scenario() -> None:
        owner, recorder, engines = owner_with_sleep(tmp_path, max_loaded_models=1, max_sleeping_models=1)
        await bring(owner, "a")

        async def refuse() -> None:
            raise EngineError("no sleep mode here")

        engines[0].sleep = refuse  # type: ignore[method-assign]
        await bring(owner, "b")
        assert states(owner) == {"b": "ready"}
        assert "stop" in list(engines[0].calls)[-1:] and engines[0].model is None
        await bring(owner, "a")  # not asleep: loaded again
        assert recorder.events[-1].startswith("loaded a")

    asyncio.run(scenario())


def test_sleep_is_off_by_default_and_an_evicted_model_is_unloaded(tmp_path: Path) -> None:
    async def scenario() -> None:
        owner, recorder, engines = owner_with_sleep(tmp_path, max_loaded_models=2)
        for model in ("a", "b", "c"):
            await bring(owner, model)
        assert states(owner) == {"b": "ready", "c": "ready"}
        assert recorder.events == ["loaded a", "loaded b", "loaded c (switched)"]
        assert "sleep" not in engines[0].calls and len(engines) == 2

    asyncio.run(scenario())


def refusing_beside_others(engines: list[EchoEngine], model: str, *, even_alone: bool = False) -> Any:
    """EchoEngine.start, except that `model` fails to load while another engine holds a model (as a model too
    large for its share of the memory would), or always (`even_alone`)."""
    real_start = EchoEngine.start

    async def start(self: EchoEngine, name: str) -> None:
        others = [engine.model for engine in engines if engine is not self and engine.model is not None]
        if name == model and (others or even_alone):
            raise EngineError(f"{name} does not fit beside {others}")
        await real_start(self, name)

    return start


def test_a_model_that_cannot_load_beside_the_others_is_loaded_alone_next(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        owner, recorder, engines = owner_with_sleep(tmp_path, max_loaded_models=2)
        monkeypatch.setattr(EchoEngine, "start", refusing_beside_others(engines, "b"))
        await bring(owner, "a")
        with pytest.raises(RetryAlone):  # not the batch's failure yet
            await bring(owner, "b")
        assert states(owner) == {"a": "ready"} and owner.load_error is None
        await bring(owner, "b")  # alone this time: "a" is unloaded first
        assert states(owner) == {"b": "ready"}
        assert recorder.events == ["loaded a", "loaded b"]
        await bring(owner, "a")  # "a" itself loads beside others as before
        assert states(owner) == {"a": "ready", "b": "ready"}

    asyncio.run(scenario())


def test_a_model_that_cannot_load_even_alone_fails_with_the_reason(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        owner, _, engines = owner_with_sleep(tmp_path, max_loaded_models=2)
        monkeypatch.setattr(EchoEngine, "start", refusing_beside_others(engines, "b", even_alone=True))
        await bring(owner, "a")
        with pytest.raises(RetryAlone):
            await bring(owner, "b")
        with pytest.raises(EngineError, match="b does not fit"):
            await bring(owner, "b")
        assert states(owner) == {}  # "a" was unloaded for the attempt alone
        assert owner.load_error is not None and "model 'b' could not be loaded" in owner.load_error

    asyncio.run(scenario())


def test_a_batch_of_a_model_that_fits_only_alone_completes(app_factory: AppFactory,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the scheduler: the first attempt beside the other model is retried alone, and the batch never
    sees the failure."""
    made: list[EchoEngine] = []
    real_init = EchoEngine.__init__

    def init(self: EchoEngine, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(EchoEngine, "__init__", init)
    monkeypatch.setattr(EchoEngine, "start", refusing_beside_others(made, "echo-embed"))
    server = app_factory(extra_args=TWO)
    client = sdk(server)
    run(client, chat_lines(5))
    done = run(client, embed_lines(5), endpoint="/v1/embeddings")
    assert_exactly_once(client, done, {f"emb-{n}" for n in range(5)})
    assert health(server)["loaded_models"] == ["echo-embed"]  # loaded alone: the chat model was unloaded
    assert "could not be loaded beside" in server.log()


def test_sleep_through_the_server_shows_in_status_and_metrics(app_factory: AppFactory) -> None:
    server = app_factory(extra_args=["--max-sleeping-models", "1"])
    client = sdk(server)
    run(client, chat_lines(3, "one"))
    run(client, embed_lines(3, "two"), endpoint="/v1/embeddings")
    assert {entry["model"]: entry["state"] for entry in status(server)["engine"]["loaded_models"]} == {
        "echo-model": "asleep", "echo-embed": "ready"}
    run(client, chat_lines(3, "three"))
    samples = scrape(server)
    assert value(samples, "vllm_batch_model_sleeps_total", model="echo-model") == 1
    assert value(samples, "vllm_batch_model_sleeps_total", model="echo-embed") == 1
    assert value(samples, "vllm_batch_model_wake_seconds_count", model="echo-model") == 1
    assert value(samples, "vllm_batch_model_load_seconds_count", model="echo-model") == 1  # woken, not loaded
    assert value(samples, "vllm_batch_model_state", model="echo-embed", state="asleep") == 1
    assert health(server)["loaded_models"] == ["echo-model"]


def test_every_loaded_vllm_engines_own_metrics_are_scraped() -> None:
    """vLLM takes every `vllm:` collector out of the process's registry when an engine starts; each engine keeps
    the ones it registered, and the scrape merges them by family (here with stand-ins, as vLLM registers them)."""
    import prometheus_client
    from prometheus_client import Gauge

    from vllm_batch_server.engines import vllm_metrics

    def start(engine: object, model: str) -> Gauge:
        for collector in vllm_metrics._registered():  # what vLLM's unregister_vllm_metrics does
            prometheus_client.REGISTRY.unregister(collector)
        gauge = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage.", ["model_name", "engine"])
        gauge.labels(model, "0").set(0.25 if model == "chat" else 0.0)
        vllm_metrics.adopt(engine)
        return gauge

    first, second = object(), object()
    try:
        start(first, "chat")
        latest = start(second, "embed")
        families = [f for f in vllm_metrics.Registry().collect() if f.name == "vllm:kv_cache_usage_perc"]
        assert len(families) == 1  # one family, both engines' samples
        assert sorted((s.labels["model_name"], s.value) for s in families[0].samples) == [("chat", 0.25),
                                                                                          ("embed", 0.0)]
        from vllm_batch_server.observers.metrics import vllm_kv_cache_usage

        assert vllm_kv_cache_usage("chat") == 0.25 and vllm_kv_cache_usage("embed") == 0.0
        vllm_metrics.release(first)  # unloaded: its metrics go
        assert [s.labels["model_name"] for f in vllm_metrics.collect() for s in f.samples] == ["embed"]
    finally:
        vllm_metrics.release(first)
        vllm_metrics.release(second)
        prometheus_client.REGISTRY.unregister(latest)
