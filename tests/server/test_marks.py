"""Curation marks: PUT/DELETE /v1/batches/{id}/marks/{custom_id} and GET /v1/batches/{id}/marks, on a real
server (echo engine)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import Server, ServerFactory, chat_lines, request_line, sdk, submit, wait_for
from tests.hostile.errors import assert_openai_error

MARK_FIELDS = {"object", "batch_id", "custom_id", "label", "score", "note", "updated_at"}


def mark_url(batch_id: str, custom_id: str) -> str:
    return f"/v1/batches/{batch_id}/marks/{quote(custom_id, safe='')}"


@pytest.fixture
def http(shared_server: Server) -> httpx.Client:
    return shared_server.http_client(timeout=30)


def test_set_change_list_and_delete_marks(client: Any, http: httpx.Client) -> None:
    lines = chat_lines(8)
    lines[5]["custom_id"] = "docs/intro ü?#%"  # anything goes in a custom_id; the URL carries it escaped
    done = wait_for(client, submit(client, lines).id)

    first = http.put(mark_url(done.id, "req-6"), json={"label": "gold", "score": 4, "note": "crisp"})
    assert first.status_code == 200, first.text
    mark = first.json()
    assert set(mark) == MARK_FIELDS
    assert (mark["object"], mark["batch_id"], mark["custom_id"]) == ("batch.mark", done.id, "req-6")
    assert (mark["label"], mark["score"], mark["note"]) == ("gold", 4.0, "crisp")
    assert isinstance(mark["updated_at"], int)

    odd = http.put(mark_url(done.id, "docs/intro ü?#%"), json={"label": "reject"})
    assert odd.status_code == 200 and odd.json()["custom_id"] == "docs/intro ü?#%"
    assert odd.json()["score"] is None and odd.json()["note"] is None
    http.put(mark_url(done.id, "req-1"), json={"score": 0.25})
    # A second PUT replaces the whole mark.
    replaced = http.put(mark_url(done.id, "req-6"), json={"label": "reject"}).json()
    assert (replaced["label"], replaced["score"], replaced["note"]) == ("reject", None, None)

    listing = http.get(f"/v1/batches/{done.id}/marks").json()
    assert listing["object"] == "list" and listing["has_more"] is False
    assert [m["custom_id"] for m in listing["data"]] == ["req-1", "docs/intro ü?#%", "req-6"]  # input order
    assert (listing["first_id"], listing["last_id"]) == ("req-1", "req-6")
    page = http.get(f"/v1/batches/{done.id}/marks", params={"limit": 1, "after": "req-1"}).json()
    assert [m["custom_id"] for m in page["data"]] == ["docs/intro ü?#%"] and page["has_more"] is True
    rejects = http.get(f"/v1/batches/{done.id}/marks", params={"label": "reject"}).json()
    assert [m["custom_id"] for m in rejects["data"]] == ["docs/intro ü?#%", "req-6"]

    deleted = http.delete(mark_url(done.id, "req-6"))
    assert deleted.status_code == 200
    assert deleted.json() == {"object": "batch.mark", "batch_id": done.id, "custom_id": "req-6", "deleted": True}
    assert assert_openai_error(http.delete(mark_url(done.id, "req-6")), 404)["code"] == "mark_not_found"
    remaining = http.get(f"/v1/batches/{done.id}/marks").json()["data"]
    assert [m["custom_id"] for m in remaining] == ["req-1", "docs/intro ü?#%"]


@pytest.mark.parametrize("body,param", [
    ({"label": "gold", "stars": 5}, "stars"),
    ({"label": ""}, "label"),
    ({"label": "x" * 65}, "label"),
    ({"label": 3}, "label"),
    ({"score": "high"}, "score"),
    ({"score": True}, "score"),
    ({"note": ["a"]}, "note"),
    ({"note": "n" * 4097}, "note"),
    ({}, "label"),
    ({"label": None, "score": None, "note": None}, "label"),
])
def test_bad_marks_are_refused_by_name(client: Any, http: httpx.Client, body: dict[str, Any], param: str) -> None:
    done = wait_for(client, submit(client, chat_lines(1)).id)
    error = assert_openai_error(http.put(mark_url(done.id, "req-0"), json=body), 400)
    assert error["param"] == param


def test_a_non_finite_score_and_a_non_object_body_are_refused(client: Any, http: httpx.Client) -> None:
    done = wait_for(client, submit(client, chat_lines(1)).id)
    nan = http.put(mark_url(done.id, "req-0"), content=b'{"score": NaN}', headers={"content-type": "application/json"})
    assert assert_openai_error(nan, 400)["code"] == "invalid_json"  # NaN is not JSON: refused by the parser
    wordy = http.put(mark_url(done.id, "req-0"), json={"score": "high"})
    assert assert_openai_error(wordy, 400)["param"] == "score"
    assert assert_openai_error(http.put(mark_url(done.id, "req-0"), json=["gold"]), 400)["code"] == "invalid_json"


def test_marks_only_for_requests_of_the_batch(client: Any, http: httpx.Client) -> None:
    done = wait_for(client, submit(client, chat_lines(2)).id)
    unknown = assert_openai_error(http.put(mark_url(done.id, "req-9"), json={"label": "gold"}), 404)
    assert (unknown["code"], unknown["param"]) == ("custom_id_not_found", "custom_id")
    assert assert_openai_error(http.put(mark_url("batch_nope", "req-0"), json={"label": "g"}), 404)["code"] == \
        "batch_not_found"
    invalid = wait_for(client, submit(client, [request_line("a", model="unserved")]).id)
    assert assert_openai_error(http.put(mark_url(invalid.id, "a"), json={"label": "g"}), 409)["code"] == \
        "batch_not_ready"
    bad_after = http.get(f"/v1/batches/{done.id}/marks", params={"after": "nope"})
    assert assert_openai_error(bad_after, 400)["param"] == "after"
    # Before anything was marked there is no index yet, and the list is simply empty.
    assert http.get(f"/v1/batches/{done.id}/marks").json()["data"] == []


def test_a_running_batch_can_be_marked_and_marks_survive_kill9(server_factory: ServerFactory) -> None:
    server = server_factory(extra_args=["--echo-delay", "0.05", "--window", "2"])
    client = sdk(server)
    batch = submit(client, chat_lines(60))
    wait_for(client, batch.id, statuses=("in_progress",))
    with server.http_client(timeout=30) as http, ThreadPoolExecutor(8) as pool:
        # Many at once on a batch not yet indexed: the index is built once, every mark lands.
        answers = list(pool.map(lambda i: http.put(mark_url(batch.id, f"req-{i}"), json={"score": i}), range(40)))
        assert [a.status_code for a in answers] == [200] * 40
        assert client.batches.retrieve(batch.id).status == "in_progress"
    server.kill()
    server.start()
    with server.http_client(timeout=30) as http:
        marks = http.get(f"/v1/batches/{batch.id}/marks", params={"limit": 1000}).json()["data"]
        assert [(m["custom_id"], m["score"]) for m in marks] == [(f"req-{i}", float(i)) for i in range(40)]


def test_marking_needs_the_input_file(client: Any, http: httpx.Client) -> None:
    done = wait_for(client, submit(client, chat_lines(2)).id)
    client.files.delete(done.input_file_id)
    error = assert_openai_error(http.put(mark_url(done.id, "req-0"), json={"label": "gold"}), 409)
    assert error["code"] == "input_file_deleted"
    # Once indexed, a batch stays markable after its input is deleted.
    other = wait_for(client, submit(client, chat_lines(2)).id)
    assert http.put(mark_url(other.id, "req-0"), json={"label": "gold"}).status_code == 200
    client.files.delete(other.input_file_id)
    assert http.put(mark_url(other.id, "req-1"), json={"label": "gold"}).status_code == 200
