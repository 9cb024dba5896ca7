"""A web page from another origin (another loopback port, as any site the operator visits could be) tries to
drive a keyless server in a real Chromium: `fetch()` without a preflight (a text/plain JSON body, a multipart
upload) and HTML form posts. Every attempt is refused with a 403 and nothing is created (api/guard.py)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import ServerFactory, chat_lines, jsonl, sdk, upload
from tests.helpers.server import RunningServer, free_port
from tests.ui.conftest import Tab

PAGE = """<!doctype html><html><body>
<iframe name="sink"></iframe>
<form id="batch" method="POST" enctype="text/plain" target="sink" action="{api}/batches">
  <input name='{{"input_file_id": "{file_id}", "endpoint": "/v1/chat/completions", "completion_window": "24h", "x": "'
         value='"}}'>
</form>
<form id="upload" method="POST" enctype="multipart/form-data" target="sink" action="{api}/files">
  <input name="purpose" value="batch"><textarea name="file">{line}</textarea>
</form>
</body></html>"""


@pytest.fixture
def attacker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A static site on another loopback port: (its URL, its folder)."""
    folder = tmp_path / "site"
    folder.mkdir()
    port = free_port()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", folder
    site.shutdown()
    site.server_close()


def api_responses(tab: Tab, server: RunningServer) -> list[tuple[str, str, int]]:
    return [(r.method, r.url, r.response().status) for r in tab.requests
            if r.url.startswith(server.base_url) and r.response() is not None]


def test_a_page_from_another_origin_can_create_nothing(server_factory: ServerFactory, tab: Tab,
                                                       attacker: tuple[str, Path]) -> None:
    server = server_factory(extra_args=["--online-model", "echo-model"])
    client = sdk(server)
    file_id = upload(client, jsonl(chat_lines(1)))
    files_before = {f.id for f in client.files.list().data}
    site, folder = attacker
    line = jsonl(chat_lines(1)).decode().strip().replace("<", "&lt;")
    (folder / "index.html").write_text(PAGE.format(api=server.base_url, file_id=file_id, line=line))

    page = tab.page
    page.goto(site + "/index.html")
    outcomes = page.evaluate("""async ([api, fileId]) => {
        const tries = [
          fetch(api + "/batches", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                body: JSON.stringify({input_file_id: fileId, endpoint: "/v1/chat/completions",
                                      completion_window: "24h"})}),
          fetch(api + "/chat/completions", {method: "POST", mode: "no-cors", body: JSON.stringify(
                {model: "echo-model", messages: [{role: "user", content: "hi"}]})}),
          (() => { const form = new FormData(); form.append("purpose", "batch");
                   form.append("file", new Blob(['{"custom_id": "a"}\\n']), "x.jsonl");
                   return fetch(api + "/files", {method: "POST", mode: "no-cors", body: form}); })(),
          // With a JSON type the browser asks first (a preflight), and the server grants nothing.
          fetch(api + "/batches", {method: "POST", headers: {"Content-Type": "application/json"},
                body: JSON.stringify({input_file_id: fileId})}),
        ];
        return (await Promise.allSettled(tries)).map(t => t.status);
    }""", [server.base_url, file_id])
    assert outcomes[:3] == ["fulfilled"] * 3  # sent (opaque answers)
    assert outcomes[3] == "rejected"  # the preflight was not granted: never sent
    for form in ("batch", "upload"):
        with page.expect_response(lambda r: r.url.startswith(server.base_url) and r.request.method == "POST"):
            page.evaluate(f"document.getElementById('{form}').submit()")

    posts = [(method, url, status) for method, url, status in api_responses(tab, server) if method == "POST"]
    assert len(posts) == 5, posts  # three fetches and two forms reached the server ...
    assert all(status == 403 for _, _, status in posts), posts  # ... and were refused
    assert client.batches.list().data == []  # nothing was created
    assert {f.id for f in client.files.list().data} == files_before
