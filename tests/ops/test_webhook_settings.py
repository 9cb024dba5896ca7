"""Webhook settings (several endpoints, each with a secret and an event filter, through one setting), the hosts
a batch's own URL may name, and recording deliveries exactly once when the event log is read twice."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from vllm_batch_server import cli
from vllm_batch_server.observers import webhooks
from vllm_batch_server.settings import Settings, SettingsError
from vllm_batch_server.statuses import BatchStatus
from vllm_batch_server.store.database import BatchRow, Database
from vllm_batch_server.store.events import EventLog
from vllm_batch_server.store.lifecycle import Lifecycle
from vllm_batch_server.webhook_targets import DEFAULT_EVENTS, WebhookEndpoint, host_allowed

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


def test_endpoints_from_flags_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = cli.build_parser().parse_args([
        "serve", "--webhook", f"https://a.example/hook?token=x secret={SECRET} events=batch.completed,batch.failed",
        "--webhook", "https://b.example/hook", "--webhook-secret", SECRET])
    settings = cli.settings_from_args(args)
    first, second = settings.webhooks
    assert first == WebhookEndpoint("https://a.example/hook?token=x", SECRET, ("batch.completed", "batch.failed"))
    assert second.secret is None and second.events == DEFAULT_EVENTS
    assert SECRET not in repr(settings.webhooks)  # never in a log line

    monkeypatch.setenv("BATCH_SERVER_WEBHOOKS", json.dumps([
        {"url": "https://c.example/h", "secret": SECRET, "events": ["*"]}, "https://d.example/h events=batch.created"]))
    from_env = Settings().webhooks
    assert from_env[0].url == "https://c.example/h" and "batch.created" in from_env[0].events
    assert from_env[1].events == ("batch.created",)
    monkeypatch.setenv("BATCH_SERVER_WEBHOOKS", f"https://e.example/h secret={SECRET}")
    assert Settings().webhooks == [WebhookEndpoint("https://e.example/h", SECRET)]


@pytest.mark.parametrize("spec,message", [
    ("ftp://a.example/x", "not an http(s) URL"),
    ("https://user:pw@a.example/x", "credentials"),
    ("https://a.example/x secret=nope", "starts with 'whsec_'"),
    ("https://a.example/x secret=whsec_!!!", "not valid base64"),
    ("https://a.example/x secret=whsec_c2hvcnQ=", "at least 16"),
    ("https://a.example/x events=batch.done", "unknown event 'batch.done'"),
    ("https://a.example/x colour=red", "unexpected 'colour=red'"),
])
def test_a_bad_endpoint_is_refused_naming_what_is_wrong(spec: str, message: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--webhook", spec])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_environment_form_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_SERVER_WEBHOOKS", '[{"url": "https://a.example/x", "events": "batch.completed"}]')
    with pytest.raises(SettingsError, match="BATCH_SERVER_WEBHOOKS"):
        Settings()


@pytest.mark.parametrize("args,message", [
    (["--webhook", "https://a.example/x"], "has no secret"),
    (["--webhook-allowed-host", "hooks.example"], "set it"),
    (["--webhook-secret", "whsec_"], "at least 16"),
])
def test_settings_that_could_not_sign_refuse_to_start(args: list[str], message: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--engine", "echo", *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("url,allowed,ok", [
    ("https://hooks.example.com/x", ["hooks.example.com"], True),
    ("https://HOOKS.example.com:8443/x", ["hooks.example.com"], True),
    ("https://hooks.example.com:8443/x", ["hooks.example.com:443"], False),
    ("https://hooks.example.com/x", ["hooks.example.com:443"], True),
    ("http://127.0.0.1:9000/x", ["127.0.0.1:9000"], True),
    ("http://127.0.0.1:9001/x", ["127.0.0.1:9000"], False),
    ("http://[::1]:9000/x", ["[::1]:9000"], True),
    ("http://[::1]:9000/x", ["::1"], True),
    ("https://a.hooks.example.com/x", ["*.hooks.example.com"], True),
    ("https://hooks.example.com/x", ["*.hooks.example.com"], False),
    ("https://evilhooks.example.com/x", ["*.hooks.example.com"], False),
    ("https://hooks.example.com.evil.net/x", ["hooks.example.com"], False),
    ("https://hooks.example.com@evil.net/x", ["hooks.example.com"], False),
    ("file:///etc/passwd", ["localhost"], False),
    ("https://hooks.example.com/x", [], False),
])
def test_allowed_hosts(url: str, allowed: list[str], ok: bool) -> None:
    assert host_allowed(url, allowed) is ok


def test_an_event_read_twice_is_recorded_once(tmp_path: Path) -> None:
    """The webhooks reader crashing between recording deliveries and its ack reads the same events again."""

    async def scenario() -> None:
        db = await Database.open(tmp_path / "db.sqlite3")
        try:
            lifecycle = Lifecycle(db)
            events = EventLog(db, lifecycle)
            settings = Settings(engine="echo", models=["m"], data_dir=tmp_path, webhooks=[
                WebhookEndpoint("https://a.example/x", SECRET), WebhookEndpoint("https://b.example/x", SECRET,
                                                                                 ("batch.created",))])
            first = webhooks.Webhooks(db, events, settings)
            reader = first._reader
            await reader.position()  # starts at the end of the log, before the batch exists
            await lifecycle.create(BatchRow(id="batch_a", endpoint="/v1/chat/completions", input_file_id="file-a",
                                            completion_window="24h", status=BatchStatus.VALIDATING, created_at=1))
            await lifecycle.move("batch_a", BatchStatus.FAILED, only_from=[BatchStatus.VALIDATING])
            seen = await reader.next(timeout=1)
            assert [e.type for e in seen] == ["batch.created", "batch.failed"]
            assert await first.record(seen) == 2  # b wants batch.created, a wants batch.failed
            # ... crash before the ack: a new reader under the same name reads the same events again
            second = webhooks.Webhooks(db, events, settings)
            again = await second._reader.next(timeout=1)
            assert [e.id for e in again] == [e.id for e in seen]
            await second.record(again)
            rows = await db.deliveries_of("batch_a")
            assert sorted((r["event_type"], r["url"]) for r in rows) == [
                ("batch.created", "https://b.example/x"), ("batch.failed", "https://a.example/x")]
        finally:
            await db.close()

    asyncio.run(scenario())


def test_new_secret_makes_a_secret_both_the_server_and_the_sdk_accept(capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["webhooks", "new-secret"])
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:], validate=True)) == 32
    webhooks.check_settings(Settings(engine="echo", webhook_secret=secret))
    cli.main(["webhooks", "new-secret"])
    assert capsys.readouterr().out.strip() != secret


def test_the_readers_place_their_cursor_before_the_scheduler_starts(tmp_path: Path) -> None:
    """A first start: events appended by the scheduler's recovery, right after the readers start, must reach
    them (a cursor placed lazily, at the first read, would land after those events)."""
    from vllm_batch_server.observers.metrics import LifecycleMetrics

    async def scenario() -> None:
        db = await Database.open(tmp_path / "db.sqlite3")
        try:
            lifecycle = Lifecycle(db)
            events = EventLog(db, lifecycle)
            settings = Settings(engine="echo", models=["m"], data_dir=tmp_path,
                                webhooks=[WebhookEndpoint("http://127.0.0.1:9/x", SECRET, ("batch.created",))])
            hooks = webhooks.Webhooks(db, events, settings)
            lifecycle_metrics = LifecycleMetrics(db, events)
            await lifecycle_metrics.start()
            await hooks.start()
            assert await db.cursor_of(webhooks.READER) == 0 and await db.cursor_of(LifecycleMetrics.READER) == 0
            # what recovery would do, before the readers' tasks ever ran
            await lifecycle.create(BatchRow(id="batch_r", endpoint="/v1/chat/completions", input_file_id="file-a",
                                            completion_window="24h", status=BatchStatus.VALIDATING, created_at=1))
            for _ in range(50):
                if await db.deliveries_of("batch_r"):
                    break
                await asyncio.sleep(0.05)
            assert [row["event_type"] for row in await db.deliveries_of("batch_r")] == ["batch.created"]
            await hooks.stop()
            await lifecycle_metrics.stop()
        finally:
            await db.close()

    asyncio.run(scenario())
