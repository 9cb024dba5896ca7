"""The engine dies or hangs mid-batch: the server restarts it, resumes from the checkpoint, and after a
bounded number of attempts fails the batch with a clear error, keeping what was computed.

The faults are the echo engine's own (--echo-fault: it raises, hangs, or raises EMFILE, in the app's process), so
these run the app in-process; the one test of a malformed fault spec stopping `serve` at start keeps a process."""

from __future__ import annotations

import pytest

from tests.conftest import AppFactory, ServerFactory, chat_lines, sdk, submit, wait_for
from tests.faults.checks import assert_at_most_once, assert_echo_answers, assert_exactly_once

N = 120
IDS = {f"req-{i}" for i in range(N)}


def test_engine_crash_once_is_survived(app_factory: AppFactory) -> None:
    # The fault set through the environment, as a container would.
    server = app_factory(extra_args=["--window", "4", "--checkpoint-every", "5", "--echo-delay", "0.002"],
                            env={"BATCH_SERVER_ECHO_FAULT": "crash-after=40,times=1"})
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(N)).id, timeout=60)
    assert batch.status == "completed", batch
    assert batch.errors is None
    lines = assert_exactly_once(client, batch, IDS)
    assert_echo_answers(lines)
    assert batch.request_counts.completed == N
    assert "engine failed on batch" in server.log()


def test_engine_that_keeps_crashing_fails_the_batch_keeping_results(app_factory: AppFactory) -> None:
    server = app_factory(extra_args=["--echo-fault", "crash-after=10", "--engine-max-restarts", "2",
                                        "--window", "2", "--checkpoint-every", "1", "--echo-delay", "0.002"])
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(N)).id, timeout=60)
    assert batch.status == "failed", batch
    assert batch.errors is not None and batch.errors.data
    error = batch.errors.data[0]
    assert error.code == "engine_error"
    assert "3 times" in (error.message or "") and "echo engine crashed" in (error.message or "")
    # Three attempts of at most ten requests each: the partial results are kept, none twice.
    lines = assert_at_most_once(client, batch, IDS)
    assert 3 <= len(lines) <= 30, len(lines)
    assert_echo_answers(lines)
    # The server itself is fine: the next batch runs on a restarted engine (which crashes again after 10,
    # so keep it small).
    small = wait_for(client, submit(client, chat_lines(5, prefix="next")).id, timeout=30)
    assert small.status == "completed"
    assert server.http.get(server.root_url + "/health").json()["status"] == "ok"


def test_hung_engine_is_detected_restarted_and_resumed(app_factory: AppFactory) -> None:
    server = app_factory(extra_args=["--echo-fault", "hang-after=30,times=1", "--request-timeout", "1",
                                        "--window", "4", "--checkpoint-every", "5"])
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(N)).id, timeout=60)
    assert batch.status == "completed", batch
    assert_exactly_once(client, batch, IDS)
    assert "appears to hang" in server.log()


def test_engine_that_always_hangs_fails_the_batch_with_a_clear_error(app_factory: AppFactory) -> None:
    server = app_factory(extra_args=["--echo-fault", "hang-after=5", "--request-timeout", "0.5",
                                        "--engine-max-restarts", "1", "--window", "2",
                                        "--checkpoint-every", "1"])
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(40)).id, timeout=60)
    assert batch.status == "failed", batch
    assert batch.errors is not None
    message = batch.errors.data[0].message or ""
    assert batch.errors.data[0].code == "engine_error" and "hang" in message, message
    lines = assert_at_most_once(client, batch, {f"req-{i}" for i in range(40)})
    assert 2 <= len(lines) <= 10


def test_cancel_reaches_a_hung_engine(app_factory: AppFactory) -> None:
    # The hang would only be detected after ten minutes: a cancel must not wait for that.
    server = app_factory(extra_args=["--echo-fault", "hang-after=10", "--window", "2",
                                        "--checkpoint-every", "1"])
    client = sdk(server)
    batch_id = submit(client, chat_lines(50)).id
    wait_for(client, batch_id, until=lambda b: b.request_counts.completed >= 8)
    client.batches.cancel(batch_id)
    batch = wait_for(client, batch_id, timeout=10)
    assert batch.status == "cancelled"
    lines = assert_at_most_once(client, batch, {f"req-{i}" for i in range(50)})
    assert 8 <= len(lines) <= 10


def test_a_malformed_fault_spec_stops_the_server_at_start(server_factory: ServerFactory) -> None:
    with pytest.raises(RuntimeError, match="unknown key 'explode-after'"):
        server_factory(extra_args=["--echo-fault", "explode-after=3"])


def test_a_batch_whose_engine_died_resumes_before_a_newer_batch_of_another_model(
        app_factory: AppFactory) -> None:
    """Regression: the run loop had already picked the next batch (another model) and was waiting for the
    running one to end before switching; when that one ended in an engine failure, the loop loaded the newer
    batch's model instead of resuming the older batch: an extra model switch, and the queue out of order."""
    server = app_factory(models=["echo-model", "other-model"],
                            extra_args=["--window", "64", "--echo-delay", "0.05", "--request-timeout", "1",
                                        "--echo-fault", "hang-after=29,times=1"])
    client = sdk(server)
    # All 30 requests are handed out at once (window 64), so the loop moves on to the newer batch and waits
    # for this one to end; the 30th hangs, and a second later the engine is declared dead.
    older = submit(client, chat_lines(30))
    newer = submit(client, chat_lines(5, prefix="other", model="other-model"))
    older_done = wait_for(client, older.id, timeout=60)
    newer_done = wait_for(client, newer.id, timeout=60)
    assert older_done.status == "completed" and newer_done.status == "completed"
    log = server.log()
    assert "engine failed on batch" in log
    # The older batch's model is loaded twice (at first, and after the failure), the newer's once, last.
    assert log.count("loading model echo-model") == 2 and log.count("loading model other-model") == 1
    assert log.index("loading model other-model") > log.rindex("loading model echo-model")
    assert_exactly_once(client, older_done, {f"req-{i}" for i in range(30)})


def test_the_next_batch_is_not_charged_for_an_engine_that_died_before_it(app_factory: AppFactory) -> None:
    """Regression: after an engine failure the run loop gave the next queued batch to the dead engine before
    it was restarted, and that batch was charged a failure it did not cause (with --engine-max-restarts 0 it
    failed, 4 of 4 runs)."""
    server = app_factory(extra_args=["--engine-max-restarts", "0", "--window", "4", "--echo-delay", "0.005",
                                        "--echo-fault", "crash-after=40,times=1"])
    client = sdk(server)
    first = submit(client, chat_lines(100))
    second = submit(client, chat_lines(20, prefix="second"))
    first_done = wait_for(client, first.id, timeout=60)
    second_done = wait_for(client, second.id, timeout=60)
    assert first_done.status == "failed", first_done  # the batch the engine died under, with no restart left
    assert first_done.errors is not None and first_done.errors.data[0].code == "engine_error"
    assert second_done.status == "completed", second_done.errors
    assert_exactly_once(client, second_done, {f"second-{i}" for i in range(20)})


def test_a_batch_after_a_cancel_on_a_hung_engine_does_not_wait_for_the_request_timeout(
        app_factory: AppFactory) -> None:
    """Regression: a cancel ended the batch on a wedged engine, but the next batch was given to the same
    engine and waited until --request-timeout (600 s by default). Now the engine must answer a health check
    first, and is restarted when it does not."""
    server = app_factory(extra_args=["--echo-fault", "hang-after=10,times=1", "--window", "2",
                                        "--checkpoint-every", "1", "--health-timeout", "0.5"])
    client = sdk(server)
    batch_id = submit(client, chat_lines(50)).id
    wait_for(client, batch_id, until=lambda b: b.request_counts.completed >= 8)
    client.batches.cancel(batch_id)
    assert wait_for(client, batch_id, timeout=10).status == "cancelled"
    after = wait_for(client, submit(client, chat_lines(5, prefix="after")).id, timeout=15)
    assert after.status == "completed", after
    assert "failed a health check" in server.log()


def test_an_engine_failing_because_we_ran_out_of_descriptors_pauses_the_batch(
        app_factory: AppFactory) -> None:
    """Running out of our own resources is not an engine failure: the batch is paused and resumed on a
    restarted engine, never charged (with --engine-max-restarts 0 a charge would fail it)."""
    server = app_factory(extra_args=["--engine-max-restarts", "0", "--window", "4", "--echo-delay", "0.002",
                                        "--echo-fault", "exhaust-after=30,times=1"])
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(N)).id, timeout=60)
    assert batch.status == "completed", batch.errors
    assert_exactly_once(client, batch, IDS)
    assert "paused: out of file descriptors" in server.log()
