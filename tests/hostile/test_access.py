"""With --api-key, every route but the probes (/health, /ready) and the dashboard's static files refuses a
missing or wrong key; ids never reach outside the data directory."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.routing import Route

from tests.conftest import chat_lines, jsonl, sdk, submit, wait_for
from tests.helpers.inprocess import InProcessServer, make_app
from tests.hostile.errors import assert_openai_error
from vllm_batch_server.api.auth import OPEN_PATHS, is_open
from vllm_batch_server.app import create_app
from vllm_batch_server.settings import Settings
from vllm_batch_server.store.blobs import Blobs

KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    app = make_app(tmp_path_factory.mktemp("access") / "data", api_key=KEY)
    yield app.start()
    app.stop()


def every_route() -> list[tuple[str, str]]:
    """(method, concrete path) for every route the app serves, read from the app so a new route is covered
    the day it is added."""
    app = create_app(Settings(engine="echo", models=["echo-model"], api_key=KEY))
    found = []
    for route in app.routes:
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: {"file_id": "file-abc", "batch_id": "batch_abc",
                                                       "asset": "index.html"}.get(m.group(1), "echo-model"),
                      route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            found.append((method, path))
    return found


ROUTES = every_route()
WRONG = {
    "missing": {},
    "wrong key": {"authorization": "Bearer sk-wrong"},
    "bare scheme": {"authorization": "Bearer"},
    "lower-case scheme": {"authorization": f"bearer {KEY}x"},
    "prefix of the key": {"authorization": f"Bearer {KEY[:-1]}"},
    "key plus more": {"authorization": f"Bearer {KEY}x"},
    "no scheme": {"authorization": KEY},
    "basic scheme": {"authorization": f"Basic {KEY}"},
    "key in another header": {"x-api-key": KEY},
}


def test_the_route_table_is_what_we_think() -> None:
    assert len(ROUTES) >= 10
    assert ("GET", "/health") in ROUTES and ("POST", "/v1/files") in ROUTES
    # What is open without a key: the probes and the dashboard's static files, nothing under /v1.
    assert {path for _, path in ROUTES if is_open(path)} == {"/health", "/ready", "/", "/ui", "/ui/index.html"}
    assert not any(is_open(path) for path in ("/v1/events", "/v1/events/stream", "/status", "/metrics", "/uix",
                                               "/v1/ui/", "/readyx", "/ready/"))


def test_only_the_probes_and_the_dashboard_page_are_open() -> None:
    assert set(OPEN_PATHS) == {"/health", "/ready", "/", "/ui"}


@pytest.mark.parametrize("method,path", [r for r in ROUTES if not is_open(r[1])])
@pytest.mark.parametrize("case", sorted(WRONG))
def test_every_route_refuses_a_missing_or_wrong_key(server: InProcessServer, method: str, path: str,
                                                    case: str) -> None:
    response = server.http.request(method, server.root_url + path, headers=WRONG[case], timeout=10)
    error = assert_openai_error(response, 401)
    assert error["code"] == "invalid_api_key"
    assert KEY not in response.text


def test_unknown_paths_are_refused_before_they_are_routed(server: InProcessServer) -> None:
    assert_openai_error(server.http.get(server.root_url + "/v1/nothing/here"), 401)


def test_probes_are_open_and_the_right_key_works(server: InProcessServer) -> None:
    assert server.http.get(server.root_url + "/health").status_code == 200
    assert server.http.get(server.root_url + "/ready").json() == {"ready": True, "reasons": []}
    client = sdk(server)
    batch = wait_for(client, submit(client, chat_lines(3)).id)
    assert batch.status == "completed"
    with pytest.raises(openai.AuthenticationError):
        sdk(server, api_key="sk-wrong").batches.retrieve(batch.id)
    # no key has been written anywhere into the data directory
    for path in server.data_dir.rglob("*"):
        if path.is_file() and not path.name.startswith("vllm-batch.sqlite3"):
            assert KEY.encode() not in path.read_bytes()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_no_string_names_a_path_outside_files_dir(value: str) -> None:
    blobs = Blobs(Path("/srv/data"))
    for resolve in (blobs.file_path, blobs.batch_dir):
        try:
            path = resolve(value)
        except ValueError:
            continue
        # accepted only when it is one of our ids: then it is a direct child of its directory
        assert path.parent in (blobs.files_dir, blobs.batches_dir)
        assert path.name == value and "/" not in value and value not in (".", "..")


@pytest.mark.parametrize("value", ["../x", "..", ".", "file-../x", "file-a/b", "batch_a/../b", "/etc/passwd",
                                   "file-a\x00", "file-" + "a" * 65, ""])
def test_path_like_ids_are_refused_by_storage(value: str) -> None:
    blobs = Blobs(Path("/srv/data"))
    with pytest.raises(ValueError):
        blobs.file_path(value)
    with pytest.raises(ValueError):
        blobs.batch_dir(value)


def test_a_file_uploaded_under_a_key_is_readable_only_with_it(server: InProcessServer) -> None:
    client = sdk(server)
    file_id = client.files.create(file=("in.jsonl", jsonl(chat_lines(1))), purpose="batch").id
    response = server.http.get(f"{server.base_url}/files/{file_id}/content")
    assert_openai_error(response, 401)
    assert client.files.content(file_id).content == jsonl(chat_lines(1))


# `/ui` is the one redirect there is, to the page at `/ui/`.
@pytest.mark.parametrize("method,path", [r for r in ROUTES if r[1] != "/ui"])
def test_no_route_answers_a_trailing_slash_with_a_redirect(server: InProcessServer, method: str, path: str) -> None:
    """Regression: `GET /v1/files/file-x/` was a 307 with an empty body."""
    response = server.http.request(method, server.root_url + path + "/", headers={"authorization": f"Bearer {KEY}"},
                             timeout=10, follow_redirects=False)
    error = assert_openai_error(response, 404)
    # Model ids and custom_ids may contain slashes (Hugging Face ids), so `/v1/models/x/` is a model that is
    # not served and `.../marks/x/` the mark of a custom_id `x/` (of a batch that does not exist here).
    expected = ("model_not_found" if path.startswith("/v1/models") else
                "batch_not_found" if "/marks/" in path else
                "not_found" if path.startswith("/ui/") else "unknown_url")  # a dashboard file of that name
    assert error["code"] == expected, error


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_auth_scheme_is_case_insensitive(server: InProcessServer, scheme: str) -> None:
    """RFC 7235: the scheme is a case-insensitive token (the key itself is compared exactly)."""
    response = server.http.get(server.base_url + "/models", headers={"authorization": f"{scheme} {KEY}"}, timeout=10)
    assert response.status_code == 200, response.text
    wrong_case_key = server.http.get(server.base_url + "/models", headers={"authorization": f"{scheme} {KEY.upper()}"},
                               timeout=10)
    assert_openai_error(wrong_case_key, 401)
