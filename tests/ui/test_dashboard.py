"""The dashboard end to end in Chromium against real servers: create by drag and drop, watch progress live,
cancel, download, retry failed lines, sign in with a key, the server panel, phone widths, keyboard use and
contrast."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect

from tests.conftest import ServerFactory, chat_lines, jsonl, read_jsonl, request_line, sdk, submit, wait_for
from tests.helpers.server import RunningServer
from tests.ui.conftest import Tab, drop_file, new_tab

KEY = "sk-dashboard-0123456789"


def failing_lines(good: int, bad: int) -> list[dict[str, Any]]:
    """Lines the validator accepts but the echo engine answers 400 (an empty conversation)."""
    return chat_lines(good) + [request_line(f"bad-{i}", messages=[]) for i in range(bad)]


def batch_url(page: Page) -> str:
    match = re.search(r"#/batches/(batch_[A-Za-z0-9]+)$", page.url)
    assert match, page.url
    return match.group(1)


def counts(page: Page) -> tuple[int, int, int]:
    text = page.locator("#counts").inner_text()
    done, failed, total = (int(n.replace(",", "")) for n in re.findall(r"[\d,]+", text))
    return done, failed, total


# ---- create and watch --------------------------------------------------------------------------------------


def test_create_by_drag_and_drop_then_watch_it_run_live(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.03", "--window", "2"])
    page = tab.open(server, "#/new")
    page.evaluate("window.notReloaded = true")
    drop_file(page, "#drop", "prompts.jsonl", jsonl(chat_lines(120)))
    expect(page.locator("#file-info")).to_contain_text("prompts.jsonl")
    page.fill("#job-name", "nightly-eval")
    page.click("#add-metadata")
    page.locator(".meta-key").fill("owner")
    page.locator(".meta-value").fill("ana")
    page.fill("#window", "2h")
    page.click("#create")

    page.wait_for_url(re.compile(r"#/batches/batch_"))
    batch_id = batch_url(page)
    expect(page.locator("h1")).to_have_text("nightly-eval")
    # Progress moves on screen, then the batch completes, all without a reload.
    page.wait_for_function("() => { const t = document.querySelector('#counts'); "
                           "const n = t && parseInt(t.textContent.replace(/,/g, '')); return n > 0 && n < 120; }")
    mid = counts(page)
    assert 0 < mid[0] < 120 and mid[2] == 120
    expect(page.locator("[data-fact=rps] .value")).not_to_have_text("—")
    expect(page.locator("[data-fact=eta] .value")).to_have_text(re.compile(r"\d+s|\dm"))
    expect(page.locator(".badge")).to_have_text("completed", timeout=30_000)
    assert counts(page) == (120, 0, 120)
    expect(page.locator("[data-step='completed']")).to_have_attribute("data-state", "done")
    for step in ("created", "validating", "in progress", "finalizing"):
        expect(page.locator(f"[data-step='{step}'] time")).to_have_count(1)
    assert page.evaluate("window.notReloaded") is True

    batch = sdk(server).batches.retrieve(batch_id)
    assert batch.metadata == {"name": "nightly-eval", "owner": "ana"}
    assert batch.endpoint == "/v1/chat/completions" and batch.completion_window == "2h"

    page.click("text=← Queue")
    row = page.locator(f"tr[data-id='{batch_id}']")
    expect(row.locator(".job a")).to_have_text("nightly-eval")
    expect(row.locator(".badge")).to_have_text("completed")
    expect(row.locator(".counts")).to_contain_text("120 done")


def test_the_endpoint_is_taken_from_the_file(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory()
    page = tab.open(server, "#/new")
    lines = [request_line(f"e{i}", f"text {i}", url="/v1/embeddings", model="echo-embed") for i in range(3)]
    page.set_input_files("#file", files=[{"name": "embed.jsonl", "mimeType": "application/jsonl",
                                          "buffer": jsonl(lines)}])
    expect(page.locator("#endpoint")).to_have_value("/v1/embeddings")
    page.click("#create")
    page.wait_for_url(re.compile(r"#/batches/batch_"))
    expect(page.locator(".badge")).to_have_text("completed")
    assert sdk(server).batches.retrieve(batch_url(page)).endpoint == "/v1/embeddings"


def test_validation_errors_are_listed_by_line_before_anything_runs(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory()
    page = tab.open(server, "#/new")
    good = json.dumps(request_line("ok"))
    bad = b"\n".join([good.encode(), b"{not json", json.dumps(request_line("ok")).encode(),
                      json.dumps(request_line("x", model="no-such-model")).encode()]) + b"\n"
    drop_file(page, "#drop", "broken.jsonl", bad)
    page.click("#create")
    table = page.locator("#create-validation-errors")
    expect(table).to_be_visible()
    rows = table.locator("tbody tr")
    cells = [[c.strip() for c in row.split("\t")] for row in rows.all_inner_texts()]
    assert [(c[0], c[2]) for c in cells] == [("2", "invalid_json_line"), ("3", "duplicate_custom_id"),
                                            ("4", "model_not_found")]
    assert page.url.endswith("#/new")  # still here, to pick a fixed file
    expect(page.locator("#create")).to_be_enabled()
    # The refused batch's own page lists the same errors.
    page.click("text=The refused batch")
    expect(page.locator("#validation-errors tbody tr")).to_have_count(3)
    expect(page.locator("[data-step='failed']")).to_have_attribute("data-state", "bad")
    expect(page.locator("[data-step='in progress']")).to_have_attribute("data-state", "skipped")


def test_create_refusals_are_shown(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory()
    page = tab.open(server, "#/new")
    page.click("#create")
    expect(page.locator("#create-errors")).to_contain_text("Choose a JSONL file first.")
    drop_file(page, "#drop", "in.jsonl", jsonl(chat_lines(1)))
    page.fill("#window", "forever")
    page.click("#create")
    expect(page.locator("#create-errors")).to_contain_text("completion window")
    page.fill("#window", "31d")  # well-formed, but the server's limit is 30 days: its own message is shown
    page.click("#create")
    expect(page.locator("#create-errors")).to_contain_text("completion_window")
    assert list(sdk(server).batches.list()) == []


# ---- the queue ---------------------------------------------------------------------------------------------


def test_the_queue_updates_live_and_filters(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.05", "--window", "1"])
    client = sdk(server)
    done = wait_for(client, submit(client, chat_lines(2), metadata={"name": "first"}).id)
    page = tab.open(server)
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator("tbody tr")).to_have_count(1)
    page.evaluate("window.notReloaded = true")
    embed = wait_for(client, submit(client, [request_line("e", url="/v1/embeddings", model="echo-embed")],
                                     endpoint="/v1/embeddings").id)
    expect(page.locator("tbody tr")).to_have_count(2)  # appeared without a reload

    running = submit(client, chat_lines(400), metadata={"name": "slow one"})  # about 20 s at this pace
    row = page.locator(f"tr[data-id='{running.id}']")
    expect(row.locator(".badge")).to_have_text("in progress")
    expect(row.locator(".rps")).to_have_text(re.compile(r"^\d"))
    expect(row.locator(".eta")).to_have_text(re.compile(r"\d+(s|m)"))
    expect(row.locator(".model")).to_have_text("echo-model")
    expect(row.locator(".endpoint")).to_have_text("/v1/chat/completions")
    first = row.locator(".counts").inner_text()
    expect(row.locator(".counts")).not_to_have_text(first)  # progress moves on its own
    assert page.locator("tbody tr").evaluate_all("rows => rows.map(r => r.dataset.id)") == [
        running.id, embed.id, done.id]

    page.select_option("#filter-status", "completed")
    expect(page.locator("tbody tr")).to_have_count(2)
    assert "status=completed" in page.url
    page.select_option("#filter-model", "echo-embed")
    expect(page.locator("tbody tr")).to_have_count(1)
    expect(page.locator(f"tr[data-id='{embed.id}']")).to_be_visible()
    page.select_option("#filter-status", "validating,in_progress,finalizing,cancelling")
    page.select_option("#filter-model", "")
    expect(page.locator("tbody tr")).to_have_count(1)
    expect(page.locator(f"tr[data-id='{running.id}']")).to_be_visible()
    page.select_option("#filter-status", "failed")
    expect(page.locator("#queue-summary")).to_have_text("No batch matches these filters.")
    assert page.evaluate("window.notReloaded") is True
    client.batches.cancel(running.id)


def test_a_slow_answer_for_an_old_filter_never_replaces_the_new_one(server_factory: ServerFactory,
                                                                   tab: Tab) -> None:
    """Regression: a poll still loading when the filter changed used to swallow the filtered load and then
    show its own, unfiltered, page."""
    server = server_factory()
    client = sdk(server)
    chat = wait_for(client, submit(client, chat_lines(1)).id)
    embed = wait_for(client, submit(client, [request_line("e", url="/v1/embeddings", model="echo-embed")],
                                    endpoint="/v1/embeddings").id)
    page = tab.open(server)
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator("tbody tr")).to_have_count(2)
    held: list[Any] = []
    page.route("**/v1/batches?*", lambda route: held.append(route) if "model=" not in route.request.url
               else route.continue_())
    wait_for(client, submit(client, chat_lines(1)).id)  # its events make the page load the queue again
    for _ in range(50):
        if held:
            break
        page.wait_for_timeout(100)
    assert held, "the page did not reload the queue after the events"
    page.select_option("#filter-model", "echo-embed")
    expect(page.locator("tbody tr")).to_have_count(1)
    for route in held:  # the old, unfiltered answer arrives late
        try:
            route.continue_()
        except Exception:
            pass  # the page cancelled it
    page.wait_for_timeout(1500)
    assert page.locator("tbody tr").evaluate_all("rows => rows.map(r => r.dataset.id)") == [embed.id]
    page.select_option("#filter-model", "echo-model")
    expect(page.locator(f"tr[data-id='{chat.id}']")).to_be_visible()


def test_live_updates_survive_a_server_restart(server_factory: ServerFactory, tab: Tab) -> None:
    """The stream ends when the server stops; the page says so, reconnects when it is back, resumes after the
    last event it saw (Last-Event-ID) and goes on updating without a reload."""
    server = server_factory()
    client = sdk(server)
    page = tab.open(server)
    expect(page.locator("#live")).to_have_text("live")
    page.evaluate("window.notReloaded = true")
    first = wait_for(client, submit(client, chat_lines(1)).id)
    expect(page.locator(f"tr[data-id='{first.id}'] .badge")).to_have_text("completed")
    last_seq = max(int(e["seq"]) for e in httpx.get(server.base_url + "/events").json()["data"])

    server.stop()
    expect(page.locator("#live")).to_have_text("reconnecting…")
    server.start()
    expect(page.locator("#live")).to_have_text("live")
    second = wait_for(client, submit(client, chat_lines(1)).id)
    expect(page.locator(f"tr[data-id='{second.id}'] .badge")).to_have_text("completed")
    assert page.evaluate("window.notReloaded") is True
    resumed = [r for r in tab.api_calls("/v1/events/stream") if r.headers.get("last-event-id")]
    assert resumed and resumed[-1].headers["last-event-id"] == str(last_seq)


def test_the_queue_pages_newest_first(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory()
    client = sdk(server)
    made = [submit(client, chat_lines(1)).id for _ in range(27)]
    wait_for(client, made[-1])
    page = tab.open(server)
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(25)
    assert rows.first.get_attribute("data-id") == made[-1]
    expect(page.locator("text=Previous")).to_be_disabled()
    page.click("text=Next")
    expect(rows).to_have_count(2)
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.id)") == [made[1], made[0]]
    expect(page.locator("text=Next")).to_be_disabled()
    page.click("text=Previous")
    expect(rows).to_have_count(25)


def test_the_page_polls_at_most_once_a_second(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.05", "--window", "1"])
    client = sdk(server)
    running = submit(client, chat_lines(400))
    page = tab.open(server)
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator(f"tr[data-id='{running.id}'] .badge")).to_have_text("in progress")
    before = len(tab.api_calls("/v1/batches"))
    page.wait_for_timeout(5000)  # (not time.sleep: Playwright reports requests only while it is called)
    while_running = len(tab.api_calls("/v1/batches")) - before
    assert 3 <= while_running <= 6  # it moves, so about one a second; never more
    client.batches.cancel(running.id)
    wait_for(client, running.id)
    expect(page.locator(f"tr[data-id='{running.id}'] .badge")).to_have_text("cancelled")
    page.wait_for_timeout(1000)
    before = len(tab.api_calls("/v1/batches"))
    page.wait_for_timeout(4000)
    assert len(tab.api_calls("/v1/batches")) - before <= 1  # nothing moves and events are live: quiet


# ---- a batch: cancel, download, retry ------------------------------------------------------------------------


def test_cancel_a_running_batch(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.2", "--window", "1"])
    client = sdk(server)
    other = submit(client, chat_lines(200), metadata={"name": "keep running"})
    victim = submit(client, chat_lines(200), metadata={"name": "cancel me"})
    page = tab.open(server, f"#/batches/{victim.id}")
    expect(page.locator("#cancel")).to_be_visible()
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel")
    expect(page.locator(".badge")).to_have_text("cancelled")
    expect(page.locator("#cancel")).to_have_count(0)
    expect(page.locator("[data-step='cancelled']")).to_have_attribute("data-state", "bad")
    assert client.batches.retrieve(victim.id).status == "cancelled"
    assert client.batches.retrieve(other.id).status in ("validating", "in_progress")

    # Declining the confirmation changes nothing.
    page.goto(f"{server.root_url}/#/batches/{other.id}")
    expect(page.locator("#cancel")).to_be_visible()
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click("#cancel")
    page.wait_for_timeout(500)
    assert client.batches.retrieve(other.id).status in ("validating", "in_progress")
    client.batches.cancel(other.id)


def test_download_input_output_and_errors(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory()
    client = sdk(server)
    batch = wait_for(client, submit(client, failing_lines(5, 2)).id)
    page = tab.open(server, f"#/batches/{batch.id}")
    expect(page.locator(".badge")).to_have_text("completed")
    for kind, file_id in (("input", batch.input_file_id), ("output", batch.output_file_id),
                          ("errors", batch.error_file_id)):
        with page.expect_download() as caught:
            page.click(f"[data-download={kind}]")
        download = caught.value
        assert Path(download.path()).read_bytes() == client.files.content(file_id).content
        assert download.suggested_filename == client.files.retrieve(file_id).filename
    assert len(read_jsonl(client, batch.output_file_id)) == 5


def test_the_first_error_lines_are_shown(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory()
    client = sdk(server)
    batch = wait_for(client, submit(client, failing_lines(3, 25)).id)
    page = tab.open(server, f"#/batches/{batch.id}")
    table = page.locator("#request-errors")
    expect(table.locator("tbody tr")).to_have_count(20)
    first = [c.strip() for c in table.locator("tbody tr").first.inner_text().split("\t")]
    errors = read_jsonl(client, batch.error_file_id)
    assert first[:3] == ["1", errors[0]["custom_id"], "400"]
    assert "messages" in first[4]
    expect(page.locator("h2", has_text="Failed requests")).to_have_text("Failed requests (25)")


def test_error_lines_show_while_the_batch_runs(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.05", "--window", "1"])
    client = sdk(server)
    lines = failing_lines(0, 3) + chat_lines(300)
    running = submit(client, lines)
    page = tab.open(server, f"#/batches/{running.id}")
    expect(page.locator("#request-errors tbody tr")).to_have_count(3)
    expect(page.locator(".badge")).to_have_text("in progress")
    assert [c.strip() for c in page.locator("#request-errors tbody tr").first.inner_text().split("\t")][:3] == [
        "1", "bad-0", "400"]
    client.batches.cancel(running.id)


def test_an_engine_error_code_shows_as_a_word(server_factory: ServerFactory, tab: Tab) -> None:
    """vLLM's error body carries the HTTP status as `code` (400) and the kind as `type`: the Code column shows
    the kind, not the number."""
    server = server_factory()
    client = sdk(server)
    batch = wait_for(client, submit(client, failing_lines(1, 2)).id)
    vllm_line = {"id": "batch_req_1", "custom_id": "bad-0", "error": None,
                 "response": {"status_code": 400, "request_id": "r1", "body": {"error": {
                     "message": "too long", "type": "BadRequestError", "param": None, "code": 400}}}}
    plain_line = {"id": "batch_req_2", "custom_id": "bad-1", "error": {"code": 500, "message": "no"}, "response": None}
    tab.page.route(f"**/v1/files/{batch.error_file_id}/content", lambda route: route.fulfill(
        status=200, content_type="application/jsonl", body=jsonl([vllm_line, plain_line]).decode()))
    page = tab.open(server, f"#/batches/{batch.id}")
    rows = page.locator("#request-errors tbody tr")
    expect(rows).to_have_count(2)
    assert [c.strip() for c in rows.nth(0).inner_text().split("\t")][:4] == ["1", "bad-0", "400", "BadRequestError"]
    assert [c.strip() for c in rows.nth(1).inner_text().split("\t")][:4] == ["2", "bad-1", "—", "500"]


def test_a_batch_refused_by_validation_does_not_wait_for_a_model(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory()
    client = sdk(server)
    refused = wait_for(client, submit(client, [request_line("x", model="no-such-model")]).id)
    assert refused.status == "failed"
    page = tab.open(server, f"#/batches/{refused.id}")
    expect(page.locator(".badge")).to_have_text("failed")
    status_line = page.locator("#validation-errors")
    expect(status_line).to_be_visible()
    text = page.locator("main").inner_text()
    assert "model not known yet" not in text
    assert "no model (it never ran)" in text


def test_a_batch_waiting_behind_another_says_so(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.1", "--window", "1"])
    client = sdk(server)
    running = submit(client, chat_lines(300, "ahead"))
    wait_for(client, running.id, until=lambda b: b.request_counts is not None and b.request_counts.completed > 0)
    waiting = submit(client, chat_lines(5, "behind"))
    wait_for(client, waiting.id, statuses=("in_progress",))
    try:
        page = tab.open(server, f"#/batches/{waiting.id}")
        expect(page.locator("#queued-behind")).to_have_text(f"queued behind {running.id}")
        expect(page.locator("[data-fact=rps] .value")).to_have_text("— (queued)")
        page = tab.open(server, "#/")
        row = page.locator(f"tr[data-id='{waiting.id}']")
        expect(row.locator(".rps")).to_have_text("queued")
        assert row.locator(".rps").get_attribute("title") == f"queued behind {running.id}"
        expect(page.locator(f"tr[data-id='{running.id}'] .rps")).not_to_have_text("queued")
        # The running one's page says nothing of the kind.
        page = tab.open(server, f"#/batches/{running.id}")
        expect(page.locator(".badge")).to_have_text("in progress")
        expect(page.locator("#queued-behind")).to_have_count(0)
    finally:
        client.batches.cancel(running.id)
        client.batches.cancel(waiting.id)


def test_retry_failed_requests(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory()
    client = sdk(server)
    original = wait_for(client, submit(client, failing_lines(4, 3), metadata={"name": "flaky"}).id)
    assert original.request_counts is not None and original.request_counts.failed == 3
    page = tab.open(server, f"#/batches/{original.id}")
    expect(page.locator("#retry")).to_have_text("Retry 3 failed requests")
    page.click("#retry")
    page.wait_for_url(re.compile(r"#/batches/batch_"))
    expect(page.locator("#retry-of")).to_have_text(original.id)
    retry_id = batch_url(page)
    assert retry_id != original.id
    retried = wait_for(client, retry_id)
    assert retried.metadata is not None and retried.metadata["retry_of"] == original.id
    assert retried.request_counts is not None and retried.request_counts.total == 3
    page.click("#retry-of")
    expect(page.locator("h1")).to_have_text("flaky")


def test_an_unknown_batch(server_factory: ServerFactory, tab: Tab) -> None:
    page = tab.open(server_factory(), "#/batches/batch_doesnotexist")
    expect(page.locator("h1")).to_have_text("No such batch")


# ---- the server panel --------------------------------------------------------------------------------------


def test_the_server_panel_shows_status(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory()
    client = sdk(server)
    wait_for(client, submit(client, chat_lines(3)).id)
    page = tab.open(server)
    panel = page.locator("#server")
    expect(panel.locator("[data-stat=model] .value")).to_have_text("echo-model")
    expect(panel.locator("[data-stat=engine] .value")).to_contain_text("echo")
    expect(panel.locator("[data-stat=engine] .value")).to_contain_text("ready")
    expect(panel.locator("[data-stat=queue] .value")).to_contain_text("0 active")
    expect(panel.locator("[data-stat=throughput] .value")).to_contain_text("req/s")
    expect(panel.locator("[data-stat=disk] .value")).to_contain_text(re.compile(r"\d.* of .*\d"))


def test_the_server_panel_shows_every_resident_model(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory(extra_args=["--max-loaded-models", "2"])
    client = sdk(server)
    wait_for(client, submit(client, chat_lines(2)).id)
    embeddings = [request_line(f"e{i}", "text", model="echo-embed", url="/v1/embeddings") for i in range(2)]
    wait_for(client, submit(client, embeddings, endpoint="/v1/embeddings").id)
    page = tab.open(server)
    models = page.locator("#server [data-stat=models]")
    expect(models.locator(".label")).to_have_text("Models (up to 2 loaded)")
    expect(models.locator(".value")).to_have_text("echo-model · echo-embed")  # least recently used first


def test_the_server_panel_without_status(server_factory: ServerFactory, tab: Tab) -> None:
    """Against a server without GET /status (another OpenAI-compatible server, an older release) the panel
    says so and shows what the public /health gives. Our server has /status, so the browser is made to see
    the 404 such a server answers."""
    server = server_factory()
    client = sdk(server)
    wait_for(client, submit(client, chat_lines(1)).id)
    status_calls: list[str] = []

    def no_status(route: Route) -> None:
        status_calls.append(route.request.url)
        route.fulfill(status=404, content_type="application/json", body=json.dumps(
            {"error": {"message": "Not Found", "type": "invalid_request_error", "param": None, "code": None}}))

    tab.page.route(re.compile(r"/status$"), no_status)
    page = tab.open(server)
    panel = page.locator("#server")
    expect(panel.locator("[data-stat=unavailable]")).to_contain_text("status unavailable")
    expect(panel.locator("[data-stat=engine] .value")).to_have_text("echo")
    expect(panel.locator("[data-stat=model] .value")).to_have_text("echo-model")
    assert status_calls, "the panel never asked for /status"


# ---- access ------------------------------------------------------------------------------------------------


def test_sign_in_with_a_key(server_factory: ServerFactory, browser: Browser) -> None:
    server = server_factory(api_key=KEY)
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(2), metadata={"name": "secret job"}).id)
    tab = new_tab(browser)
    try:
        page = tab.open(server)
        expect(page.locator("#sign-in-form")).to_be_visible()
        expect(page.locator("#access")).to_have_text("This server needs an API key")
        expect(page.locator("tbody tr")).to_have_count(0)

        page.fill("#api-key", "sk-wrong")
        page.click("#sign-in")
        expect(page.locator("#sign-in-error")).to_have_text("That key was not accepted.")

        page.fill("#api-key", KEY)
        page.keyboard.press("Enter")
        expect(page.locator(f"tr[data-id='{batch.id}'] .job a")).to_have_text("secret job")
        expect(page.locator("#live")).to_have_text("live")
        assert page.evaluate("sessionStorage.getItem('vllm-batch.api-key')") == KEY
        assert page.evaluate("document.cookie") == "" and tab.context.cookies() == []

        # The batch page and a download work with the key (the download goes through fetch + a blob).
        page.click(f"tr[data-id='{batch.id}'] .job a")
        with page.expect_download() as caught:
            page.click("[data-download=output]")
        assert Path(caught.value.path()).read_bytes() == client.files.content(batch.output_file_id).content

        # A reload keeps the tab signed in; a new tab (a new session) is asked again.
        page.reload()
        expect(page.locator("h1")).to_have_text("secret job")
        other = new_tab(browser)
        try:
            expect(other.open(server).locator("#sign-in-form")).to_be_visible()
        finally:
            other.context.close()

        page.click("#sign-out")
        expect(page.locator("#sign-in-form")).to_be_visible()
        assert page.evaluate("sessionStorage.length") == 0

        # The key went only in Authorization headers: never in a URL, and with every data call.
        assert not [r.url for r in tab.requests if KEY in r.url]
        data_calls = [r for r in tab.requests if "/v1/" in r.url and r.headers.get("authorization")]
        assert data_calls and all(r.headers["authorization"] in (f"Bearer {KEY}", "Bearer sk-wrong")
                                  for r in data_calls)
        assert any("/v1/events/stream" in r.url for r in data_calls)
    finally:
        tab.context.close()
    assert tab.errors == []


def test_a_key_that_stops_working_asks_again(server_factory: ServerFactory, browser: Browser) -> None:
    server = server_factory(api_key=KEY)
    tab = new_tab(browser)
    try:
        page = tab.open(server)
        # Once the first load has settled (asking for a key): a boot still running would read the stored key
        # set below, find it refused and clear it before the reload.
        expect(page.locator("#sign-in-form")).to_be_visible()
        page.evaluate("sessionStorage.setItem('vllm-batch.api-key', 'sk-old')")
        page.reload()
        expect(page.locator("#sign-in-error")).to_contain_text("not accepted")
        assert page.evaluate("sessionStorage.length") == 0
    finally:
        tab.context.close()


def test_an_open_server_says_so(server_factory: ServerFactory, tab: Tab) -> None:
    page = tab.open(server_factory())
    expect(page.locator("#open-server")).to_have_text("Open server: no API key needed")
    expect(page.locator("#sign-out")).to_be_hidden()
    expect(page.locator("#queue-summary")).to_have_text("No batches yet. Create one with New batch.")


# ---- usable at any width, by keyboard, with readable contrast ------------------------------------------------


def fits(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def mixed_queue(server: RunningServer) -> dict[str, str]:
    """Batches in many statuses, to look at."""
    client = sdk(server)
    made = {
        "completed": wait_for(client, submit(client, failing_lines(6, 2), metadata={"name": "done"}).id).id,
        "failed": wait_for(client, submit(client, b"nope\n").id).id,
    }
    cancelled = submit(client, chat_lines(300), metadata={"name": "stopped"})
    client.batches.cancel(cancelled.id)
    made["cancelled"] = wait_for(client, cancelled.id).id
    made["in_progress"] = submit(client, chat_lines(2000), metadata={"name": "a long job name that goes on"}).id
    wait_for(client, made["in_progress"], ("in_progress",))
    return made


def test_phone_width(server_factory: ServerFactory, browser: Browser) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.05", "--window", "1"])
    made = mixed_queue(server)
    tab = new_tab(browser, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    try:
        page = tab.open(server)
        expect(page.locator("tbody tr")).to_have_count(4)
        # The table becomes one card per batch, each cell labelled.
        assert page.locator("thead").is_hidden()
        expect(page.locator(f"tr[data-id='{made['in_progress']}'] td.eta")).to_have_attribute("data-label", "ETA")
        assert fits(page)
        for route in (f"#/batches/{made['completed']}", f"#/batches/{made['failed']}", "#/new"):
            page.goto(f"{server.root_url}/{route}")
            expect(page.locator("#create-form, [data-download=input]")).to_be_visible()
            assert fits(page), route
    finally:
        tab.context.close()
        sdk(server).batches.cancel(made["in_progress"])
    assert tab.errors == []


def test_everything_is_reachable_by_keyboard(server_factory: ServerFactory, tab: Tab) -> None:
    server = server_factory()
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(2), metadata={"name": "by keyboard"}).id)
    page = tab.open(server)
    expect(page.locator("tbody tr")).to_have_count(1)

    def tab_to(text: str, limit: int = 40) -> None:
        """Press Tab until the focused element's text starts with `text`."""
        for _ in range(limit):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.textContent.trim()").startswith(text):
                return
        raise AssertionError(f"Tab never reached {text!r}")

    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    tab_to("by keyboard")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/#/batches/{batch.id}")
    expect(page.locator(".badge")).to_have_text("completed")
    tab_to("Download output")
    with page.expect_download() as caught:
        page.keyboard.press("Enter")
    assert Path(caught.value.path()).read_bytes() == client.files.content(batch.output_file_id).content
    # The create form by keyboard alone: focus the file control, then the fields and the button.
    page.goto(f"{server.root_url}/#/new")
    page.focus("#file")
    page.set_input_files("#file", files=[{"name": "k.jsonl", "mimeType": "application/jsonl",
                                          "buffer": jsonl(chat_lines(2))}])
    tab_to("Add a key")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.className") == "meta-key"
    page.keyboard.type("team")
    page.keyboard.press("Tab")
    page.keyboard.type("blue")
    tab_to("Upload and create batch")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"#/batches/batch_"))
    assert client.batches.retrieve(batch_url(page)).metadata == {"team": "blue"}


# WCAG 2 contrast of every visible piece of text against the background it is drawn on (in the page).
CONTRAST = (Path(__file__).parent / "contrast.js").read_text()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_text_contrast_meets_wcag_aa(server_factory: ServerFactory, browser: Browser, scheme: str) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.05", "--window", "1"], api_key=KEY)
    made = mixed_queue(server)
    tab = new_tab(browser, color_scheme=scheme)
    try:
        page = tab.open(server)
        expect(page.locator("#sign-in-form")).to_be_visible()
        page.fill("#api-key", "wrong")
        page.click("#sign-in")
        expect(page.locator("#sign-in-error")).to_be_visible()
        views = {"sign-in": page.evaluate(CONTRAST)}
        page.fill("#api-key", KEY)
        page.click("#sign-in")
        expect(page.locator("tbody tr")).to_have_count(4)
        views["queue"] = page.evaluate(CONTRAST)
        for status, batch_id in made.items():
            page.goto(f"{server.root_url}/#/batches/{batch_id}")
            expect(page.locator(".badge")).to_have_attribute("data-status", re.compile(status + "|cancelling"))
            expect(page.locator("[data-download=input]")).to_be_visible()  # rendered to the end
            if status == "completed":
                expect(page.locator("#request-errors")).to_be_visible()
            views[status] = page.evaluate(CONTRAST)
        page.goto(f"{server.root_url}/#/new")
        page.click("#create")
        expect(page.locator("#create-errors .error")).to_be_visible()
        views["create"] = page.evaluate(CONTRAST)
    finally:
        tab.context.close()
        httpx.post(f"{server.base_url}/batches/{made['in_progress']}/cancel",
                   headers={"authorization": f"Bearer {KEY}"})
    assert all(isinstance(failures, list) for failures in views.values())
    assert {view: failures for view, failures in views.items() if failures} == {}
