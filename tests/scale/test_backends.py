"""Batches across several OpenAI-compatible backends (echo backends, each its own process): one dies or hangs
mid-batch and the batch completes on the others with every custom_id exactly once; keys, models, overload and
request errors as a backend reports them."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import ServerFactory, chat_lines, read_jsonl, request_line, sdk, submit, wait_for
from tests.faults.checks import assert_at_most_once, assert_echo_answers, assert_exactly_once
from tests.helpers.server import RunningServer
from tests.ops.test_metrics import scrape
from tests.scale.conftest import BackendFactory, backend_args

WINDOW = 8


def full_log(server: RunningServer) -> str:
    """The whole server log (`log()` is its tail, where the batch's polling can hide what matters)."""
    return server.log_path.read_text(errors="replace")


def recomputed(killed_started: set[str], others_done: set[str], killed_done: set[str]) -> set[str]:
    """Requests the killed backend had started but not answered, that another backend then computed."""
    return (killed_started - killed_done) & others_done


def test_batch_completes_when_one_of_three_backends_is_killed_mid_batch(
        server_factory: ServerFactory, echo_backend: BackendFactory) -> None:
    backends = [echo_backend(f"b{i}", "--delay", "0.05") for i in range(3)]
    server = server_factory(engine="http", extra_args=backend_args(*backends, window=WINDOW))
    client = sdk(server)
    n = 900  # about 2 s at 3 x 8 in flight
    batch_id = submit(client, chat_lines(n)).id
    wait_for(client, batch_id, until=lambda b: b.request_counts.completed >= 150)
    killed, survivors = backends[0], backends[1:]
    killed.kill()
    assert client.batches.retrieve(batch_id).status == "in_progress"  # killed mid-batch
    batch = wait_for(client, batch_id, timeout=60)

    assert batch.status == "completed", batch
    lines = assert_exactly_once(client, batch, {f"req-{i}" for i in range(n)})
    assert_echo_answers(lines)
    assert batch.request_counts.completed == n
    # The survivors computed the rest; the dead one's death cost only what it had in flight.
    done_elsewhere = set().union(*(set(b.done_ids()) for b in survivors))
    killed_done = set(killed.done_ids())
    assert killed_done and len(killed_done) < n / 2
    assert all(len(b.done_ids()) > n / 4 for b in survivors)
    request_ids = {event_id for b in backends for event_id in b.started_ids()}
    assert len(request_ids) == n  # every request reached a backend, under one id (batch-line id)
    lost_work = recomputed(killed.started_ids(), done_elsewhere, killed_done)
    assert len(lost_work) <= WINDOW, lost_work
    assert "is out of rotation" in full_log(server)
    # The server says where each model is served: the backends' own lists.
    assert {m.id for m in client.models.list()} == {"echo-model", "echo-embed"}
    # GET /metrics tells the same story per backend.
    samples = scrape(server)
    member = {b.name: (("kind", "http"), ("member", b.url)) for b in backends}
    assert samples["vllm_batch_router_member_up"][member[killed.name]] == 0
    assert all(samples["vllm_batch_router_member_up"][member[b.name]] == 1 for b in survivors)
    assert samples["vllm_batch_router_member_taken_out_total"][member[killed.name]] >= 1
    # Its in-flight requests failed on it or were moved off it when it was taken out: at most its window.
    moved = samples["vllm_batch_router_member_moved_requests_total"][member[killed.name]]
    assert moved <= WINDOW
    assert moved + samples["vllm_batch_router_member_failed_attempts_total"][member[killed.name]] >= 1
    answered = samples["vllm_batch_router_member_requests_total"]
    assert sum(answered[member[b.name]] for b in backends) == n  # each request answered once, somewhere
    assert answered[member[killed.name]] <= len(killed_done)  # an answer it wrote as it died may be lost


def test_a_backend_that_comes_back_rejoins_the_rotation(server_factory: ServerFactory,
                                                        echo_backend: BackendFactory) -> None:
    first, second = echo_backend("first", "--delay", "0.03"), echo_backend("second", "--delay", "0.03")
    server = server_factory(engine="http", extra_args=backend_args(first, second, window=4, probe=0.2))
    client = sdk(server)
    batch_id = submit(client, chat_lines(300)).id
    wait_for(client, batch_id, until=lambda b: b.request_counts.completed >= 50)
    first.kill()
    assert wait_for(client, batch_id, timeout=60).status == "completed"
    before = len(first.done_ids())

    first.start()  # the same port: the same backend, restarted
    deadline = time.monotonic() + 20
    while "is in rotation" not in full_log(server).split("is out of rotation")[-1] and time.monotonic() < deadline:
        time.sleep(0.1)
    batch = wait_for(client, submit(client, chat_lines(300, prefix="again")).id, timeout=60)
    assert batch.status == "completed"
    assert_exactly_once(client, batch, {f"again-{i}" for i in range(300)})
    assert len(first.done_ids()) > before  # it took work again


def test_a_hung_backend_is_timed_out_and_its_requests_go_elsewhere(server_factory: ServerFactory,
                                                                   echo_backend: BackendFactory) -> None:
    # Its /v1/models still answers (an engine wedged behind a live API server): only the request timeout tells.
    hung = echo_backend("hung", "--hang-after", "20")
    healthy = echo_backend("healthy", "--delay", "0.005")
    server = server_factory(engine="http", extra_args=backend_args(hung, healthy, window=4, extra=(
        "--backend-timeout", "1")))
    client = sdk(server)
    n = 400
    batch = wait_for(client, submit(client, chat_lines(n)).id, timeout=90)
    assert batch.status == "completed", batch
    lines = assert_exactly_once(client, batch, {f"req-{i}" for i in range(n)})
    assert_echo_answers(lines)
    assert batch.request_counts.failed == 0  # a timeout is tried elsewhere, not charged as the request's error
    assert len(hung.done_ids()) == 20
    timed_out = hung.started_ids() - set(hung.done_ids())
    assert timed_out and timed_out <= set(healthy.done_ids())  # what hung was computed by the other one
    assert "no answer within 1s; trying" in full_log(server)


def test_when_the_only_backend_comes_back_in_time_the_batch_resumes(server_factory: ServerFactory,
                                                                     echo_backend: BackendFactory) -> None:
    only = echo_backend("only", "--delay", "0.05")
    server = server_factory(engine="http", extra_args=backend_args(only, window=4, probe=0.2, extra=(
        "--backend-wait-seconds", "30")))
    client = sdk(server)
    batch_id = submit(client, chat_lines(300)).id
    wait_for(client, batch_id, until=lambda b: b.request_counts.completed >= 40)
    assert httpx.get(server.root_url + "/ready").status_code == 200
    only.kill()
    time.sleep(1.0)
    assert client.batches.retrieve(batch_id).status == "in_progress"  # waiting for it, not failed
    # Not ready while no backend can take the work: a load balancer sends it elsewhere meanwhile.
    down = httpx.get(server.root_url + "/ready")
    assert down.status_code == 503, down.text
    assert any("no engine or backend is in rotation" in reason and only.url in reason
               for reason in down.json()["reasons"]), down.json()
    only.start()
    batch = wait_for(client, batch_id, timeout=60)
    assert batch.status == "completed", batch
    assert httpx.get(server.root_url + "/ready").status_code == 200
    assert_exactly_once(client, batch, {f"req-{i}" for i in range(300)})
    assert "engine failed on batch" not in full_log(server)  # one backend down for a second is no engine failure


def test_when_every_backend_is_gone_the_batch_fails_keeping_its_results(server_factory: ServerFactory,
                                                                         echo_backend: BackendFactory) -> None:
    only = echo_backend("only", "--delay", "0.05")
    server = server_factory(engine="http", extra_args=backend_args(only, window=4, probe=0.2, extra=(
        "--backend-wait-seconds", "1", "--engine-max-restarts", "1", "--checkpoint-every", "5")))
    client = sdk(server)
    batch_id = submit(client, chat_lines(300)).id
    wait_for(client, batch_id, until=lambda b: b.request_counts.completed >= 40)
    only.kill()
    batch = wait_for(client, batch_id, timeout=30)
    assert batch.status == "failed", batch
    assert batch.errors is not None
    message = batch.errors.data[0].message or ""
    assert only.url in message, message  # names the backend and what is wrong with it
    lines = assert_at_most_once(client, batch, {f"req-{i}" for i in range(300)})
    assert len(lines) >= 40
    assert "engine failed on batch" in full_log(server)


def test_models_are_discovered_from_each_backend(server_factory: ServerFactory,
                                                 echo_backend: BackendFactory) -> None:
    only_a = echo_backend("a", "--model", "model-a", "--model", "shared")
    only_b = echo_backend("b", "--model", "model-b", "--model", "shared")
    server = server_factory(engine="http", extra_args=backend_args(only_a, only_b))
    client = sdk(server)
    # The listing is what each backend's /v1/models answered within --backend-probe-seconds (0.3 s here): on a
    # loaded machine a backend may miss the first ask, and is asked again on the next listing.
    deadline = time.monotonic() + 30
    while (listed := {m.id for m in client.models.list()}) != {"model-a", "model-b", "shared"}:
        assert time.monotonic() < deadline and listed <= {"model-a", "model-b", "shared"}, listed
        time.sleep(0.3)
    assert client.models.retrieve("model-b").id == "model-b"

    batch = wait_for(client, submit(client, chat_lines(40, model="model-b")).id)
    assert batch.status == "completed"
    assert len(only_b.done_ids()) == 40 and not only_a.done_ids()  # only where the model is
    shared = wait_for(client, submit(client, chat_lines(200, prefix="s", model="shared")).id)
    assert shared.status == "completed"
    assert only_a.done_ids() and len(only_b.done_ids()) > 40  # both serve it

    unknown = wait_for(client, submit(client, chat_lines(3, model="model-c")).id)
    assert unknown.status == "failed"
    assert unknown.errors is not None and unknown.errors.data[0].code == "model_not_found"


def test_a_batch_waits_to_validate_until_a_backend_has_listed_its_models(server_factory: ServerFactory,
                                                                           echo_backend: BackendFactory) -> None:
    # Regression: a backend that had not yet answered /v1/models (starting, or slower than a health check on a
    # loaded machine) made every batch fail validation with model_not_found.
    late = echo_backend("late")
    late.kill()  # its address is known; it starts after the batch is accepted
    server = server_factory(engine="http", extra_args=backend_args(late, extra=("--backend-wait-seconds", "60")))
    client = sdk(server)
    batch_id = submit(client, chat_lines(20)).id
    time.sleep(2.5)  # several validation attempts, each finding no model list
    assert client.batches.retrieve(batch_id).status == "validating"
    assert "has not yet listed its models" in full_log(server)
    late.start()
    batch = wait_for(client, batch_id, timeout=60)
    assert batch.status == "completed", batch
    assert_exactly_once(client, batch, {f"req-{i}" for i in range(20)})


def test_a_model_no_backend_lists_fails_once_they_never_answered_for_the_wait(
        server_factory: ServerFactory, echo_backend: BackendFactory) -> None:
    gone = echo_backend("gone")
    gone.kill()
    server = server_factory(engine="http", extra_args=backend_args(gone, extra=("--backend-wait-seconds", "1")))
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(3)).id, timeout=30)
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data[0].code == "model_not_found"
    assert "never answered /v1/models" in full_log(server)


def test_each_backend_gets_only_its_own_key(server_factory: ServerFactory, echo_backend: BackendFactory) -> None:
    key_a, key_b = "sk-backend-a-0123456789", "sk-backend-b-9876543210"
    with_a = echo_backend("a", "--api-key", key_a, "--delay", "0.005")
    with_b = echo_backend("b", "--api-key", key_b, "--delay", "0.005")
    open_one = echo_backend("open", "--delay", "0.005")
    args = ["--backend-probe-seconds", "0.3",
            "--backend", f"{with_a.url},key=env:KEY_A,window=4",
            "--backend", f"{with_b.url},key=env:KEY_B,window=4",
            "--backend", f"{open_one.url},window=4"]
    server = server_factory(engine="http", extra_args=args, env={"KEY_A": key_a, "KEY_B": key_b})
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(300)).id, timeout=60)
    assert batch.status == "completed"
    assert_exactly_once(client, batch, {f"req-{i}" for i in range(300)})
    # A wrong key would have been refused (401) and that backend taken out: all three took work.
    assert all(b.done_ids() for b in (with_a, with_b, open_one))
    assert all(event["auth"] for b in (with_a, with_b) for event in b.events())
    assert not any(event["auth"] for event in open_one.events())  # no key where none was given
    log = full_log(server)
    assert key_a not in log and key_b not in log
    assert "is out of rotation" not in log


@pytest.mark.parametrize(("args", "message"), [
    (["--engine", "http"], "--engine http needs at least one --backend"),
    (["--engine", "http", "--backend", "http://127.0.0.1:9/v1,key=sk-literal"], "key=env:VARIABLE"),
    (["--engine", "http", "--backend", "http://127.0.0.1:9/v1,key=env:NOT_SET_ANYWHERE"], "NOT_SET_ANYWHERE"),
    (["--engine", "http", "--backend", "127.0.0.1:9"], "expected an http:// or https:// URL"),
    (["--engine", "http", "--backend", "http://127.0.0.1:9/v1,window=0"], "window must be"),
    (["--engine", "http", "--backend", "http://127.0.0.1:9/v1,colour=red"], "unknown option 'colour'"),
])
def test_bad_backend_settings_stop_the_server_at_start(server_factory: ServerFactory, args: list[str],
                                                       message: str) -> None:
    with pytest.raises(RuntimeError, match="exited") as raised:
        server_factory(extra_args=args)
    assert message in str(raised.value)
    assert "sk-literal" not in str(raised.value)  # not even in the error about it


def test_an_overloaded_backend_is_waited_for_not_charged(server_factory: ServerFactory,
                                                         echo_backend: BackendFactory) -> None:
    busy = echo_backend("busy", "--overload-first", "30", "--delay", "0.005")
    server = server_factory(engine="http", extra_args=backend_args(busy, window=4))
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(60)).id, timeout=60)
    assert batch.status == "completed"
    assert batch.request_counts.failed == 0
    assert_exactly_once(client, batch, {f"req-{i}" for i in range(60)})


def test_a_request_the_backend_refuses_gets_its_answer_as_is(server_factory: ServerFactory,
                                                             echo_backend: BackendFactory) -> None:
    backend = echo_backend("b")
    server = server_factory(engine="http", extra_args=backend_args(backend))
    client = sdk(server)
    lines = [*chat_lines(5), request_line("bad", "x", messages=[])]
    batch = wait_for(client, submit(client, lines).id)
    assert batch.status == "completed"
    assert batch.request_counts.failed == 1
    [error] = read_jsonl(client, batch.error_file_id)
    assert error["custom_id"] == "bad"
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"] == {"error": {"message": "'messages' must be a non-empty list.",
                                                   "type": "invalid_request_error", "param": "messages",
                                                   "code": None}}
    assert backend.done_ids()[f"{batch.id}-6"] == 1  # asked once: a 400 is the request's, not retried


def test_the_in_process_engine_works_beside_backends(server_factory: ServerFactory,
                                                     echo_backend: BackendFactory) -> None:
    backend = echo_backend("b", "--delay", "0.01")
    server = server_factory(engine="echo", extra_args=["--echo-delay", "0.01",
                                                       *backend_args(backend, window=4)])
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(400)).id, timeout=60)
    assert batch.status == "completed"
    assert_exactly_once(client, batch, {f"req-{i}" for i in range(400)})
    assert 0 < len(backend.done_ids()) < 400  # shared with the in-process engine
    assert httpx.get(server.root_url + "/health").json()["status"] == "ok"
