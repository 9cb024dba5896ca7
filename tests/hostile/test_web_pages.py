"""No target for web pages (api/guard.py), against a real server: a request a browser sends for another site
that would change state is refused (Origin, Sec-Fetch-Site), JSON routes take JSON content types only and
/v1/files multipart only (so an HTML form cannot post to them), and the Host header must be a name the server is
reached by (DNS rebinding). Programs that send none of those headers (the SDK, curl) are unaffected; the real
browser is in tests/ui/test_cross_site.py."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import ServerFactory, chat_lines, jsonl, sdk, upload
from tests.helpers.server import RunningServer
from tests.hostile.errors import assert_openai_error
from vllm_batch_server.api.guard import allowed_names

CHAT = {"model": "echo-model", "messages": [{"role": "user", "content": "hi"}]}


def counts(client: openai.OpenAI) -> tuple[int, int]:
    return len(client.files.list().data), len(client.batches.list(limit=100).data)


@pytest.fixture
def server(server_factory: ServerFactory) -> RunningServer:
    return server_factory(extra_args=["--online-model", "echo-model"])


@pytest.mark.parametrize("headers", [
    {"origin": "http://127.0.0.1:1"},
    {"origin": "http://evil.example"},
    {"origin": "null"},
    {"sec-fetch-site": "cross-site"},
    {"sec-fetch-site": "same-site"},  # another port of the same host is another origin
    {"sec-fetch-site": "same-site", "origin": "http://localhost:1"},
])
def test_state_changing_requests_from_another_origin_are_refused(server: RunningServer,
                                                                 headers: dict[str, str]) -> None:
    client = sdk(server)
    file_id = upload(client, jsonl(chat_lines(1)))
    before = counts(client)
    with httpx.Client(base_url=server.base_url, timeout=30, headers=headers) as http:
        attempts = [
            http.post("/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                        "completion_window": "24h"}),
            http.post("/files", data={"purpose": "batch"}, files={"file": ("x.jsonl", jsonl(chat_lines(1)))}),
            http.post("/chat/completions", json=CHAT),
            http.post("/batches/batch_x/cancel"),
            http.delete(f"/files/{file_id}"),
        ]
        for response in attempts:
            error = assert_openai_error(response, 403)
            assert error["code"] == "cross_origin_request", error
        assert http.get("/batches").status_code == 200  # reading is not refused: the browser keeps it from a page
    assert counts(client) == before


def test_same_origin_requests_and_programs_work(server: RunningServer) -> None:
    origin = server.root_url
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        same = {"origin": origin, "sec-fetch-site": "same-origin"}
        assert http.post("/chat/completions", json=CHAT, headers=same).status_code == 200
        assert http.post("/chat/completions", json=CHAT, headers={"sec-fetch-site": "none"}).status_code == 200
        assert http.post("/chat/completions", json=CHAT).status_code == 200  # curl, the SDK: no such headers
        as_curl = http.post("/chat/completions", content=json.dumps(CHAT),
                            headers={"content-type": "application/json; charset=utf-8"})
        assert as_curl.status_code == 200
    assert sdk(server).chat.completions.create(model="echo-model", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "text/html"])
def test_json_routes_take_only_json(server: RunningServer, content_type: str) -> None:
    client = sdk(server)
    file_id = upload(client, jsonl(chat_lines(1)))
    before = counts(client)
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        for path, body in (("/chat/completions", CHAT),
                           ("/batches", {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h"})):
            response = http.post(path, content=json.dumps(body), headers={"content-type": content_type})
            assert assert_openai_error(response, 415)["code"] == "unsupported_media_type"
    assert counts(client) == before


def test_uploads_take_only_multipart(server: RunningServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        for content_type in ("text/plain", "application/json", "application/x-www-form-urlencoded"):
            response = http.post("/files", content=b"purpose=batch", headers={"content-type": content_type})
            assert assert_openai_error(response, 415)["code"] == "unsupported_media_type"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:4080", "127.0.0.1.nip.io", "10.0.0.1"])
def test_a_host_the_server_is_not_reached_by_is_refused_even_for_reads(server: RunningServer, host: str) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30, headers={"host": host}) as http:
        for response in (http.get("/batches"), http.get("/files"), http.get("/models")):
            assert assert_openai_error(response, 403)["code"] == "host_not_allowed"


def test_loopback_names_and_allowed_hosts_are_served(server_factory: ServerFactory) -> None:
    server = server_factory(extra_args=["--allowed-host", "batch.internal", "--allowed-host", "api.example:443"])
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        for host in ("127.0.0.1", f"127.0.0.1:{server.port}", f"localhost:{server.port}", "[::1]", "LOCALHOST",
                     "batch.internal", "batch.internal:8443", "api.example"):
            assert http.get("/models", headers={"host": host}).status_code == 200, host
        assert http.get("/models", headers={"host": "other.internal"}).status_code == 403


def test_the_names_a_server_accepts_follow_its_bind_address() -> None:
    assert allowed_names("127.0.0.1", []) == {"localhost", "127.0.0.1", "::1"}
    assert allowed_names("::1", []) == {"localhost", "127.0.0.1", "::1"}
    assert allowed_names("10.1.2.3", []) == {"localhost", "127.0.0.1", "::1", "10.1.2.3"}
    assert allowed_names("0.0.0.0", []) is None  # its names are unknown: any Host (docs/deployment.md)
    assert allowed_names("::", []) is None
    assert allowed_names("0.0.0.0", ["batch.example.com"]) == {"localhost", "127.0.0.1", "::1",
                                                                 "batch.example.com"}
    assert allowed_names("127.0.0.1", ["*"]) is None
