"""GET /v1/batches?status=...&model=...: our extension for the dashboard's filters, through the official SDK's
extra_query (OpenAI's list has no filters)."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import AppFactory, chat_lines, jsonl, request_line, sdk, submit, wait_for


def test_filters_by_status_and_model_and_pages_within_them(app_factory: AppFactory) -> None:
    server = app_factory()
    client = sdk(server)
    chats = [wait_for(client, submit(client, chat_lines(2, model="echo-model")).id) for _ in range(3)]
    embeds = [wait_for(client, submit(client, [request_line("e", url="/v1/embeddings", model="echo-embed")],
                                      endpoint="/v1/embeddings").id) for _ in range(2)]
    refused = wait_for(client, submit(client, b"not json\n").id)
    assert refused.status == "failed"

    def ids(**query: str) -> list[str]:
        return [b.id for b in client.batches.list(extra_query=query)]

    everything = ids()
    assert everything == [refused.id, *(b.id for b in reversed(embeds)), *(b.id for b in reversed(chats))]
    assert ids(status="completed") == [b.id for b in [*reversed(embeds), *reversed(chats)]]
    assert ids(status="failed") == [refused.id]
    assert ids(status="failed,completed") == everything
    assert ids(status="in_progress") == []
    assert ids(model="echo-embed") == [b.id for b in reversed(embeds)]
    assert ids(model="echo-model", status="completed") == [b.id for b in reversed(chats)]
    assert ids(model="no-such-model") == []

    # Paging stays inside the filter: the SDK's auto-pager follows `after` with the same query.
    first = client.batches.list(limit=2, extra_query={"model": "echo-model"})
    assert [b.id for b in first.data] == [chats[2].id, chats[1].id] and first.has_more
    assert [b.id for b in first] == [b.id for b in reversed(chats)]


@pytest.mark.parametrize("value", ["running", "completed,", "COMPLETED", "completed,bogus"])
def test_an_unknown_status_is_named(app_factory: AppFactory, value: str) -> None:
    client = sdk(app_factory())
    if value == "completed,":  # an empty item is ignored, as in "a,,b"
        assert client.batches.list(extra_query={"status": value}).data == []
        return
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.list(extra_query={"status": value})
    assert caught.value.body["param"] == "status"  # type: ignore[index]
    assert "in_progress" in caught.value.message


def test_a_status_filter_sees_live_changes(app_factory: AppFactory) -> None:
    server = app_factory(extra_args=["--echo-delay", "0.05", "--window", "1"])
    client = sdk(server)
    running = submit(client, jsonl(chat_lines(200)))
    wait_for(client, running.id, ("in_progress",))
    assert [b.id for b in client.batches.list(extra_query={"status": "in_progress"})] == [running.id]
    client.batches.cancel(running.id)
    wait_for(client, running.id)
    assert list(client.batches.list(extra_query={"status": "in_progress"})) == []
    assert [b.id for b in client.batches.list(extra_query={"status": "cancelled"})] == [running.id]
