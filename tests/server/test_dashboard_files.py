"""The dashboard's static files: served at / and /ui/, public, self-contained (nothing from another host),
locked down by a Content-Security-Policy, unable to reach any other file, and shipped in the wheel."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest

from tests.conftest import AppFactory
from tests.helpers.inprocess import InProcessServer, make_app
from vllm_batch_server.api.ui import UI_DIR

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> InProcessServer:
    server = make_app(tmp_path_factory.mktemp("ui") / "data", api_key="sk-dashboard-secret").start()
    yield server  # type: ignore[misc]
    server.stop()


def test_the_page_is_at_the_root_and_under_ui(keyed: InProcessServer) -> None:
    root = keyed.http.get(keyed.root_url + "/")
    stable = keyed.http.get(keyed.root_url + "/ui/")
    assert root.status_code == stable.status_code == 200
    assert root.text == stable.text == (UI_DIR / "index.html").read_text()
    assert root.headers["content-type"] == "text/html; charset=utf-8"
    moved = keyed.http.get(keyed.root_url + "/ui")
    assert moved.status_code == 307 and moved.headers["location"].endswith("/ui/")


def test_the_page_is_public_but_the_data_is_not(keyed: InProcessServer) -> None:
    """No key for the page and its files (they hold no data); every data call still needs it."""
    page = keyed.http.get(keyed.root_url + "/")
    assert page.status_code == 200 and "sk-dashboard-secret" not in page.text
    for path in ("/v1/batches", "/v1/events", "/v1/files", "/v1/models", "/openapi.json"):
        assert keyed.http.get(keyed.root_url + path).status_code == 401, path
    assert "set-cookie" not in page.headers


def test_headers_forbid_inline_script_and_other_origins(keyed: InProcessServer) -> None:
    headers = keyed.http.get(keyed.root_url + "/").headers
    policy = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"


def every_file() -> list[str]:
    return sorted(p.relative_to(UI_DIR).as_posix() for p in UI_DIR.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", every_file())
def test_every_file_is_served_with_its_type(keyed: InProcessServer, name: str) -> None:
    response = keyed.http.get(f"{keyed.root_url}/ui/{name}")
    assert response.status_code == 200
    assert response.content == (UI_DIR / name).read_bytes()
    expected = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}[Path(name).suffix]
    assert response.headers["content-type"].split(";")[0] == expected
    again = keyed.http.get(f"{keyed.root_url}/ui/{name}", headers={"if-none-match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_nothing_is_loaded_from_another_host() -> None:
    """No CDN, no fonts, no analytics: every reference in the HTML, CSS and JavaScript is to this server, and
    every module imported exists."""
    for path in UI_DIR.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path
        assert "@import" not in text and "url(" not in text, path
        for module in re.findall(r"""from\s+["'](\.[^"']+)["']""", text):
            assert (path.parent / module).resolve().is_file(), (path, module)
    index = (UI_DIR / "index.html").read_text()
    for ref in re.findall(r"""(?:src|href)="(/ui/[^"]+)\"""", index):
        assert (UI_DIR / ref.removeprefix("/ui/")).is_file(), ref
    assert "<script>" not in index and " style=" not in index  # nothing inline: the CSP would refuse it
    # Every module is preloaded, so a cold load fetches them in parallel rather than level by level.
    modules = {p.relative_to(UI_DIR).as_posix() for p in (UI_DIR / "js").glob("*.js")} - {"js/app.js"}
    assert set(re.findall(r'<link rel="modulepreload" href="/ui/([^"]+)">', index)) == modules


@pytest.mark.parametrize("path", [
    "/ui/../vllm_batch_server/app.py", "/ui/%2e%2e/api/ui.py", "/ui/js/..%2f..%2fapi%2fui.py", "/ui/..%2f__init__.py",
    "/ui/js/", "/ui/nothing.js", "/ui/index.html/", "/ui//etc/passwd", "/ui/%2fetc%2fpasswd", "/ui/js/app.js%00.py",
])
def test_no_path_reaches_another_file(keyed: InProcessServer, path: str) -> None:
    response = keyed.http.get(keyed.root_url + path)
    assert response.status_code in (401, 404)  # a path normalized out of /ui/ is not open: it needs the key
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "import" not in response.text and "root:" not in response.text


def test_the_wheel_ships_the_dashboard(tmp_path: Path) -> None:
    hatchling = pytest.importorskip("hatchling.builders.wheel", reason="hatchling (a dev dependency) builds the wheel")
    wheel = next(iter(hatchling.WheelBuilder(str(REPO)).build(directory=str(tmp_path), versions=["standard"])))
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name.removeprefix("vllm_batch_server/ui/") for name in archive.namelist()
                   if name.startswith("vllm_batch_server/ui/")}
    assert shipped == set(every_file())


def test_an_open_server_serves_the_same_page(app_factory: AppFactory) -> None:
    server = app_factory()
    assert server.http.get(server.root_url + "/").text == (UI_DIR / "index.html").read_text()
    assert server.http.get(server.root_url + "/v1/events").status_code == 200
