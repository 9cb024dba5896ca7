"""The dashboard on the real engine: the session's back-to-back batches (chat with real failures, completions,
embeddings) as the queue and the batch page show them, in Chromium."""

from __future__ import annotations

import re

from playwright.sync_api import Browser, expect

from tests.ui.conftest import browser, new_tab, playwright  # noqa: F401 - the browser fixtures
from tests.vllm.conftest import CHAT_MODEL, EMBED_MODEL, BackToBack


def test_the_dashboard_shows_real_batches(back_to_back: BackToBack, browser: Browser) -> None:  # noqa: F811
    server, chat, embed = back_to_back.server, back_to_back.chat, back_to_back.embed
    tab = new_tab(browser, viewport={"width": 1280, "height": 900})
    try:
        page = tab.open(server)
        chat_row = page.locator(f"tr[data-id='{chat.id}']")
        expect(chat_row.locator(".badge")).to_have_text("completed")
        expect(chat_row.locator(".model")).to_have_text(CHAT_MODEL)
        expect(page.locator(f"tr[data-id='{embed.id}'] .model")).to_have_text(EMBED_MODEL)
        expect(page.locator("#server [data-stat=engine] .value")).to_contain_text("vllm")

        page.click(f"tr[data-id='{chat.id}'] .job a")
        assert chat.request_counts is not None and chat.usage is not None
        done, failed, total = (chat.request_counts.completed, chat.request_counts.failed,
                               chat.request_counts.total)
        expect(page.locator("#counts")).to_have_text(f"{done} done · {failed} failed · {total} total")
        expect(page.locator("[data-fact=output-tokens] .value")).to_have_text(f"{chat.usage.output_tokens:,}")
        # vLLM's own refusals (a prompt longer than the context, a field it cannot honour), line by line.
        errors = page.locator("#request-errors tbody tr")
        expect(errors).to_have_count(failed)
        ids = {re.split(r"\t", row)[1].strip() for row in errors.all_inner_texts()}
        assert {"too-long", "unsupported"} <= ids
        with page.expect_download() as caught:
            page.click("[data-download=output]")
        assert caught.value.suggested_filename
    finally:
        tab.context.close()
    assert tab.errors == []
