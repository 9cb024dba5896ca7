"""Malformed requests, unknown and path-like ids, wrong purposes, oversize metadata and files: each is a 4xx
in OpenAI's error shape, and none leaves anything on disk."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerFactory, chat_lines, jsonl, sdk, upload
from tests.helpers.inprocess import InProcessServer, make_app
from tests.hostile.errors import assert_openai_error

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    app = make_app(tmp_path_factory.mktemp("bad-input") / "data", extra_args=["--max-file-bytes", str(LIMIT)])
    yield app.start()
    app.stop()
    assert "unhandled error" not in app.log()


@pytest.fixture
def http(server: InProcessServer) -> Iterator[httpx.Client]:
    with server.http_client() as client:
        yield client


def multipart(*parts: str | bytes, boundary: str = "b0undary", close: bool = True) -> tuple[bytes, dict[str, str]]:
    body = b"".join(f"--{boundary}\r\n".encode() + (p.encode() if isinstance(p, str) else p) + b"\r\n"
                    for p in parts)
    if close:
        body += f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


PURPOSE = 'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch'
FILE = 'Content-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{"x": 1}'

MALFORMED = {
    "json instead of multipart": (b'{"purpose": "batch"}', {"content-type": "application/json"}),
    "no boundary": (b"--x\r\n", {"content-type": "multipart/form-data"}),
    # python-multipart refuses boundaries over 256 bytes in its constructor (was a 500)
    "boundary too long": multipart(PURPOSE, FILE, boundary="b" * 300),
    "no content type": (b"hello", {}),
    "unterminated": multipart(PURPOSE, FILE, close=False),
    "garbage between boundaries": (b"--b0undary\r\n\x00\xff garbage \r\n\r\n", {
        "content-type": "multipart/form-data; boundary=b0undary"}),
    "part without disposition": multipart("Content-Type: text/plain\r\n\r\nhi", PURPOSE),
    "part without a name": multipart("Content-Disposition: form-data\r\n\r\nhi", PURPOSE),
    "two files": multipart(PURPOSE, FILE, FILE.replace("a.jsonl", "b.jsonl")),
    "missing purpose": multipart(FILE),
    "missing file": multipart(PURPOSE),
    "unknown purpose": multipart(PURPOSE.replace("batch", "bogus"), FILE),
    "batch_output purpose": multipart(PURPOSE.replace("batch", "batch_output"), FILE),
    "field not utf-8": multipart(b'Content-Disposition: form-data; name="purpose"\r\n\r\n\xff\xfe', FILE),
    "huge field": multipart('Content-Disposition: form-data; name="purpose"\r\n\r\n' + "x" * 70_000, FILE),
    "too many fields": multipart(*[f'Content-Disposition: form-data; name="f{i}"\r\n\r\nv' for i in range(40)],
                                 PURPOSE, FILE),
    "bad expiry anchor": multipart(PURPOSE, 'Content-Disposition: form-data; name="expires_after[anchor]"'
                                   "\r\n\r\nnow", FILE),
    "bad expiry seconds": multipart(PURPOSE, 'Content-Disposition: form-data; name="expires_after[anchor]"'
                                    '\r\n\r\ncreated_at', 'Content-Disposition: form-data; '
                                    'name="expires_after[seconds]"\r\n\r\n1e9', FILE),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_upload_is_a_400_and_stores_nothing(server: InProcessServer, http: httpx.Client,
                                                      case: str) -> None:
    before = set((server.data_dir / "files").iterdir())
    body, headers = MALFORMED[case]
    response = http.post("/v1/files", content=body, headers=headers)
    assert_openai_error(response, 415 if case in ("json instead of multipart", "no content type") else 400)
    assert set((server.data_dir / "files").iterdir()) == before
    assert list((server.data_dir / "tmp").iterdir()) == []


def test_oversize_file_is_a_413_declared_or_streamed(server: InProcessServer, http: httpx.Client) -> None:
    data = b"x" * (LIMIT + 1)
    client = sdk(server)
    with pytest.raises(Exception) as caught:  # the SDK's own upload, Content-Length declared
        upload(client, data)
    assert getattr(caught.value, "status_code", None) == 413
    # Chunked: no Content-Length, so the limit is enforced on the bytes as they arrive.
    head, _ = multipart(PURPOSE, 'Content-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n',
                        close=False)

    def stream() -> Iterator[bytes]:
        yield head[:-2]
        for _ in range(LIMIT // 4096 + 2):
            yield b"y" * 4096
        yield b"\r\n--b0undary--\r\n"

    response = http.post("/v1/files", content=stream(),
                         headers={"content-type": "multipart/form-data; boundary=b0undary"})
    error = assert_openai_error(response, 413)
    assert error["code"] == "file_too_large" and str(LIMIT) in error["message"]
    assert list((server.data_dir / "tmp").iterdir()) == []
    # exactly at the limit is fine
    assert upload(client, b"z" * LIMIT, purpose="user_data")


UNKNOWN_IDS = ["file-doesnotexist", "batch_doesnotexist", "nope", "..", "../x", "..%2fx", "%2e%2e%2fx",
               "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "file-..", "file-a%00b", "file-" + "a" * 65, "%00", "file-%2e"]


@pytest.mark.parametrize("raw_id", UNKNOWN_IDS)
@pytest.mark.parametrize("method,template", [
    ("GET", "/v1/files/{}"), ("GET", "/v1/files/{}/content"), ("DELETE", "/v1/files/{}"),
    ("GET", "/v1/batches/{}"), ("POST", "/v1/batches/{}/cancel"),
])
def test_unknown_and_path_like_ids_are_404(http: httpx.Client, method: str, template: str, raw_id: str) -> None:
    # Sent byte for byte: httpx would otherwise normalise the dots away before they reach the server.
    url = httpx.URL(http.base_url.join("/"), raw_path=template.format(raw_id).encode())
    response = http.request(method, url)
    assert_openai_error(response, 404)


@pytest.mark.parametrize("param", ["../x", "%2e%2e%2fx", "file-nope", "/etc/passwd", "", "file-" + "a" * 65])
def test_unknown_cursor_and_input_file_are_4xx(http: httpx.Client, param: str) -> None:
    if param:  # an empty cursor means "from the start"
        assert_openai_error(http.get("/v1/files", params={"after": param}), 400)
        assert_openai_error(http.get("/v1/batches", params={"after": param}), 400)
    response = http.post("/v1/batches", json={"input_file_id": param, "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h"})
    assert response.status_code in (400, 404)
    assert_openai_error(response)


def test_batch_from_a_file_of_the_wrong_purpose(server: InProcessServer, http: httpx.Client) -> None:
    file_id = upload(sdk(server), jsonl(chat_lines(2)), purpose="user_data")
    response = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h"})
    assert assert_openai_error(response, 400)["code"] == "invalid_file_purpose"


@pytest.mark.parametrize("metadata", [
    {f"k{i}": "v" for i in range(17)},
    {"k" * 65: "v"},
    {"k": "v" * 513},
    {"k": 1},
    {"k": None},
    {"k": ["v"]},
    ["k", "v"],
    "k=v",
])
def test_oversize_or_mistyped_metadata_is_a_400(server: InProcessServer, http: httpx.Client,
                                                metadata: object) -> None:
    file_id = upload(sdk(server), jsonl(chat_lines(1)))
    response = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h", "metadata": metadata})
    assert assert_openai_error(response, 400)["param"].startswith("metadata")


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[]", b"null", b"1e999", b'{"a":' * 10_000, b"\xff\xfe", b'"string"',
    b'{"input_file_id": 1, "endpoint": "/v1/chat/completions", "completion_window": "24h"}',
    b'{"input_file_id": "file-x", "endpoint": ["/v1/chat/completions"], "completion_window": "24h"}',
    b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": 24}',
    b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "0h"}',
    b'{"input_file_id": "file-x", "endpoint": "/v1/images", "completion_window": "24h"}',
    b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h", "x": 1}',
    b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h", '
    b'"output_expires_after": {"anchor": "created_at", "seconds": true}}',
    b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h", '
    b'"output_expires_after": "soon"}',
])
def test_malformed_batch_create_is_a_4xx(http: httpx.Client, body: bytes) -> None:
    response = http.post("/v1/batches", content=body, headers={"content-type": "application/json"})
    assert_openai_error(response)


@pytest.mark.parametrize("query", ["limit=0", "limit=-1", "limit=abc", "limit=100000000000000000000000",
                                   "order=sideways", "limit=1e3"])
def test_bad_list_parameters_are_a_400(http: httpx.Client, query: str) -> None:
    assert_openai_error(http.get("/v1/files?" + query), 400)
    if not query.startswith("order"):
        assert_openai_error(http.get("/v1/batches?" + query), 400)


def test_unknown_route_and_method_are_4xx_in_openai_shape(http: httpx.Client) -> None:
    assert assert_openai_error(http.get("/v1/nothing"), 404)["code"] == "unknown_url"
    assert assert_openai_error(http.put("/v1/files"), 405)["code"] == "method_not_allowed"
    assert_openai_error(http.get("/v1/models/not-served"), 404)


def test_hostile_filename_is_only_metadata(server: InProcessServer, http: httpx.Client, tmp_path: Path) -> None:
    name = "../../../../tmp/evil\r\nX-Injected: 1.jsonl"
    response = http.post("/v1/files", files={"file": (name, jsonl(chat_lines(1)))}, data={"purpose": "batch"})
    assert response.status_code == 200, response.text
    file_id = response.json()["id"]
    assert not Path("/tmp/evil").exists()
    assert {p.name for p in (server.data_dir / "files").iterdir()} >= {file_id}
    assert all(p.name.startswith("file-") for p in (server.data_dir / "files").iterdir())
    content = http.get(f"/v1/files/{file_id}/content")
    assert content.status_code == 200
    assert "x-injected" not in content.headers


def test_client_that_disconnects_mid_upload_leaves_nothing(server_factory: ServerFactory) -> None:
    server = server_factory()
    head = (b"--bb\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            b"--bb\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=bb\r\n"
                     b"Content-Length: 10000000\r\n\r\n" + head + b"x" * 200_000)
        tmp_dir = server.data_dir / "tmp"
        deadline = time.monotonic() + 10
        while not any(p.stat().st_size for p in tmp_dir.iterdir()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while list(tmp_dir.iterdir()):
        assert time.monotonic() < deadline, "the partial upload was not removed"
        time.sleep(0.02)
    assert list((server.data_dir / "files").iterdir()) == []
    assert sdk(server).files.list().data == []
    assert "unhandled error" not in server.log()
