"""Result handlers on a real server (echo engine): run when a batch ends, fed from the event log, retried with
back-off, off the queue's path, durable across kill -9 (at least once), status per batch in the API."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AppFactory, Server, ServerFactory, chat_lines, read_jsonl, sdk, submit, wait_for
from tests.helpers.handlers import calls, env_with_path, handler_flags, run_of, runs, wait_until
from tests.hostile.errors import assert_openai_error

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "result_handler"


def test_directory_handler_copies_the_results_of_every_ended_batch(app_factory: AppFactory,
                                                                   tmp_path: Path) -> None:
    template = str(tmp_path / "archive" / "{status}" / "{metadata[project]}" / "{batch_id}")
    server = app_factory(extra_args=handler_flags(archive={"type": "directory", "path": template,
                                                              "files": ["output", "errors", "input", "batch"]}))
    client = sdk(server)
    lines = chat_lines(5)
    lines[2]["body"]["messages"] = []
    done = wait_for(client, submit(client, lines, metadata={"project": "../../escape"}).id)
    run = run_of(server, done.id, "archive", "succeeded")
    assert (run["attempts"], run["last_error"]) == (1, None)
    assert set(run) == {"name", "status", "attempts", "last_error", "updated_at"}
    target = tmp_path / "archive" / "completed" / "_._.._escape" / done.id  # no directory level added
    assert (target / "output.jsonl").read_bytes() == client.files.content(done.output_file_id).content  # type: ignore
    assert (target / "errors.jsonl").read_bytes() == client.files.content(done.error_file_id).content  # type: ignore
    assert (target / "input.jsonl").read_bytes() == client.files.content(done.input_file_id).content
    assert json.loads((target / "batch.json").read_text())["id"] == done.id
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_failing_handler_is_retried_with_backoff_then_succeeds_or_gives_up(app_factory: AppFactory,
                                                                               tmp_path: Path) -> None:
    flaky, hopeless = tmp_path / "flaky.jsonl", tmp_path / "hopeless.jsonl"
    server = app_factory(env=env_with_path(), extra_args=handler_flags(
        flaky={"type": "tests.helpers.handlers:JournalHandler", "journal": str(flaky), "fail_times": 2,
               "backoff_seconds": 0.3},
        hopeless={"type": "tests.helpers.handlers:JournalHandler", "journal": str(hopeless), "fail_times": 99,
                  "max_attempts": 3, "backoff_seconds": 0.1}))
    client = sdk(server)
    done = wait_for(client, submit(client, chat_lines(3)).id)
    retrying = run_of(server, done.id, "flaky", "retrying")
    assert "planned failure" in retrying["last_error"]
    ok = run_of(server, done.id, "flaky", "succeeded")
    assert (ok["attempts"], ok["last_error"]) == (3, None)
    attempts = calls(flaky)
    assert [c["attempt"] for c in attempts] == [1, 2, 3] and {c["results"] for c in attempts} == {3}
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6  # the wait doubles
    failed = run_of(server, done.id, "hopeless", "failed")
    assert failed["attempts"] == 3 and "planned failure 3" in failed["last_error"]
    time.sleep(0.5)
    assert len(calls(hopeless)) == 3  # given up: no fourth attempt


def test_a_slow_handler_never_holds_up_the_queue(server_factory: ServerFactory, tmp_path: Path) -> None:
    journal, async_journal = tmp_path / "slow.jsonl", tmp_path / "async.jsonl"
    server = server_factory(env=env_with_path(), extra_args=handler_flags(
        slow={"type": "tests.helpers.handlers:JournalHandler", "journal": str(journal), "sleep": 60,
              "sleep_on": [1, 2, 3, 4, 5, 6]},
        waits={"type": "tests.helpers.handlers:AsyncJournalHandler", "journal": str(async_journal), "sleep": 60}))
    client = sdk(server)
    started = time.monotonic()
    for _ in range(4):  # more ended batches than the handlers have threads
        assert wait_for(client, submit(client, chat_lines(20)).id, timeout=30).status == "completed"
    assert time.monotonic() - started < 20
    wait_until(lambda: len(calls(journal)) >= 2, what="two slow calls under way")
    assert all(r["status"] == "pending" for r in runs(server, client.batches.list(limit=1).data[0].id))
    assert server.http.get(f"{server.root_url}/health", timeout=5).status_code == 200


def test_timeout_counts_as_a_failed_attempt(app_factory: AppFactory, tmp_path: Path) -> None:
    journal = tmp_path / "calls.jsonl"
    server = app_factory(env=env_with_path(), extra_args=handler_flags(
        hangs={"type": "tests.helpers.handlers:AsyncJournalHandler", "journal": str(journal), "sleep": 30,
               "timeout_seconds": 0.3, "max_attempts": 2, "backoff_seconds": 0.1}))
    client = sdk(server)
    done = wait_for(client, submit(client, chat_lines(1)).id)
    failed = run_of(server, done.id, "hangs", "failed")
    assert failed["attempts"] == 2 and "no answer within 0.3s" in failed["last_error"]


def test_kill9_between_the_end_of_a_batch_and_delivery_delivers_after_restart(server_factory: ServerFactory,
                                                                              tmp_path: Path) -> None:
    """The batch ends, its handler run is under way (blocked), the server is killed: after the restart the run
    happens again, for the same event, and succeeds. At least once: never zero times."""
    journal = tmp_path / "calls.jsonl"
    flags = handler_flags(deliver={"type": "tests.helpers.handlers:JournalHandler", "journal": str(journal),
                                   "sleep": 3600, "sleep_on": [1]})
    server = server_factory(env=env_with_path(), extra_args=flags)
    client = sdk(server)
    done = wait_for(client, submit(client, chat_lines(7)).id)
    wait_until(lambda: calls(journal), what="the first attempt")
    assert runs(server, done.id)[0]["status"] == "pending"
    server.kill()
    server.start()
    ok = run_of(server, done.id, "deliver", "succeeded")
    assert ok["attempts"] == 2
    first, second = calls(journal)
    assert first["event_id"] == second["event_id"] and first["pid"] != second["pid"]
    assert second["results"] == 7


def test_kill9_before_the_handler_saw_the_event(server_factory: ServerFactory, tmp_path: Path) -> None:
    """Killed right as the batch ends, the handler may not have seen the event at all: its cursor was not acked,
    so the restarted server reads the event again."""
    journal = tmp_path / "calls.jsonl"
    flags = handler_flags(deliver={"type": "tests.helpers.handlers:JournalHandler", "journal": str(journal)})
    server = server_factory(env=env_with_path(), extra_args=flags)
    client = sdk(server)
    batch = submit(client, chat_lines(50))
    wait_for(client, batch.id, statuses=("completed",), timeout=30)
    server.kill()  # whatever the handler got done: each outcome is fine, losing it is not
    server.start()
    run = run_of(server, batch.id, "deliver", "succeeded")
    assert 1 <= run["attempts"] <= 2
    assert {c["batch_id"] for c in calls(journal)} == {batch.id}


def test_statuses_choose_which_endings_run_a_handler(app_factory: AppFactory, tmp_path: Path) -> None:
    journal = tmp_path / "calls.jsonl"
    server = app_factory(env=env_with_path(), extra_args=[
        "--echo-delay", "0.05", "--window", "1",
        *handler_flags(only_done={"type": "tests.helpers.handlers:JournalHandler", "journal": str(journal),
                                  "statuses": ["completed"]})])
    client = sdk(server)
    cancelled = submit(client, chat_lines(100))
    wait_for(client, cancelled.id, statuses=("in_progress",))
    client.batches.cancel(cancelled.id)
    assert wait_for(client, cancelled.id).status == "cancelled"
    done = wait_for(client, submit(client, chat_lines(1)).id)
    run_of(server, done.id, "only_done", "succeeded")
    assert runs(server, cancelled.id) == []
    assert [c["batch_id"] for c in calls(journal)] == [done.id]


def test_the_example_handler_as_a_module_and_as_an_entry_point(server_factory: ServerFactory,
                                                               tmp_path: Path) -> None:
    # An installed distribution's entry point, as pip would leave it: metadata in a .dist-info directory.
    site = tmp_path / "site"
    info = site / "vllm_batch_summary_handler-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-batch-summary-handler\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[vllm_batch.result_handlers]\nsummary = summary_handler:SummaryHandler\n")
    by_module, by_entry_point = tmp_path / "module.jsonl", tmp_path / "entry.jsonl"
    server = server_factory(env=env_with_path(EXAMPLE, site), extra_args=handler_flags(
        module={"type": "summary_handler:SummaryHandler", "path": str(by_module)},
        entry={"type": "summary", "path": str(by_entry_point)}))
    client = sdk(server)
    lines = chat_lines(4)
    lines[0]["body"]["messages"] = []
    done = wait_for(client, submit(client, lines, metadata={"team": "eval"}).id)
    run_of(server, done.id, "module", "succeeded")
    run_of(server, done.id, "entry", "succeeded")
    for path in (by_module, by_entry_point):
        [summary] = [json.loads(x) for x in path.read_text().splitlines()]
        assert summary["batch_id"] == done.id and summary["answered"] == 3 and summary["failed"] == 1
        assert summary["metadata"] == {"team": "eval"}
        assert summary["top_errors"] == {"invalid_request_error": 1} or len(summary["top_errors"]) == 1


@pytest.mark.parametrize("config,message", [
    ({"type": "no-such-type"}, "unknown result handler type 'no-such-type'"),
    ({"type": "directory"}, "result handler 'bad' (directory): bad options"),
    ({"type": "directory", "path": "/tmp/{nope}"}, "unknown placeholder {nope}"),
    ({"type": "directory", "path": "/tmp/x", "statuses": ["done"]}, "'statuses' must list some of"),
    ({"type": "postgres", "dsn_env": "VB_TEST_UNSET_DSN"}, "VB_TEST_UNSET_DSN, which is not set"),
    ({"type": "nosuchmodule:Thing"}, "cannot import 'nosuchmodule'"),
    ({"path": "/tmp"}, "expected a type name or an object with a \"type\""),
])
def test_a_bad_handler_configuration_stops_the_server_with_a_clear_message(tmp_path: Path, config: dict[str, Any],
                                                                          message: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCH_")}
    result = subprocess.run([sys.executable, "-m", "vllm_batch_server.cli", "serve", "--engine", "echo",
                             "--data-dir", str(tmp_path / "data"), "--port", "1",
                             *handler_flags(bad=config)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_environment_variable_configures_handlers(app_factory: AppFactory, tmp_path: Path) -> None:
    config = {"copy": {"type": "directory", "path": str(tmp_path / "out" / "{batch_id}"), "files": ["output"]}}
    server = app_factory(env={"BATCH_SERVER_RESULT_HANDLERS": json.dumps(config)})
    client = sdk(server)
    done = wait_for(client, submit(client, chat_lines(2)).id)
    run_of(server, done.id, "copy", "succeeded")
    assert len(read_jsonl(client, done.output_file_id)) == 2
    assert (tmp_path / "out" / done.id / "output.jsonl").exists()


def test_handler_status_of_unknown_and_unended_batches(shared_server: Server, client: Any) -> None:
    missing = shared_server.http.get(f"{shared_server.base_url}/batches/batch_nope/handlers")
    assert assert_openai_error(missing, 404)["code"] == "batch_not_found"
    done = wait_for(client, submit(client, chat_lines(1)).id)
    assert runs(shared_server, done.id) == []  # no handler configured on this server
