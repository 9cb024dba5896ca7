"""The dashboard in a real browser: Playwright for Python driving the system's Chromium (Debian's `chromium`
package; Playwright's own browser download is not used), headless, against real servers (echo engine).

Skips with the reason when no Chromium is installed (fails in CI); set BATCH_TEST_CHROMIUM to use another binary.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

from tests.helpers.server import RunningServer
from tests.helpers.tools import missing_tool

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions"]


def chromium_path() -> str | None:
    wanted = os.environ.get("BATCH_TEST_CHROMIUM")
    if wanted:
        return wanted if os.path.exists(wanted) else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Module scope, not session: Playwright's sync API keeps an asyncio loop running in this thread while it is
# started, and every later test that calls asyncio.run() would fail.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    path = chromium_path()
    if path is None:
        missing_tool("no Chromium: install Debian's `chromium` package (apt-get install chromium) or set "
                    "BATCH_TEST_CHROMIUM to a Chromium binary")
    launched = playwright.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
    yield launched
    launched.close()


@dataclass
class Tab:
    """A page plus what it did: uncaught errors and every request it sent."""

    page: Page
    context: BrowserContext
    errors: list[str] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)

    def open(self, server: RunningServer, route: str = "") -> Page:
        self.page.goto(server.root_url + "/" + route)
        return self.page

    def api_calls(self, path: str) -> list[Any]:
        return [r for r in self.requests if r.url.split("?")[0].endswith(path)]


def new_tab(browser: Browser, **options: Any) -> Tab:
    context = browser.new_context(accept_downloads=True, **options)
    context.set_default_timeout(15_000)
    page = context.new_page()
    tab = Tab(page, context)
    page.on("pageerror", lambda error: tab.errors.append(str(error)))
    page.on("request", lambda request: tab.requests.append(request))
    return tab


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    opened = new_tab(browser, viewport={"width": 1280, "height": 900})
    yield opened
    opened.context.close()
    assert opened.errors == [], f"uncaught errors in the page: {opened.errors}"


def drop_file(page: Page, selector: str, name: str, content: bytes) -> None:
    """Drag and drop a file onto an element, as a user does from a file manager."""
    transfer = page.evaluate_handle(
        """([name, text]) => { const dt = new DataTransfer();
             dt.items.add(new File([text], name, {type: "application/jsonl"})); return dt; }""",
        [name, content.decode()])
    page.dispatch_event(selector, "dragenter", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})
