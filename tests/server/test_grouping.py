"""Requests sharing a long prompt prefix run together (so vLLM's prefix cache keeps serving them), within a
bounded look-ahead, and everything else keeps the file's order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TERMINAL, read_jsonl, request_line, sdk, submit, wait_for
from vllm_batch_server.grouping import KEY_CHARS, group_by_prefix, prefix_key


def keyed(keys: str, lookahead: int) -> str:
    """Group the letters of `keys` ('.' means no key) and return them in the order handed out."""
    items = list(enumerate(keys))
    out = group_by_prefix(items, lambda item: None if item[1] == "." else item[1], lookahead)
    return "".join(letter for _, letter in out)


@pytest.mark.parametrize(("keys", "lookahead", "expected"), [
    ("ABCABC", 6, "AABBCC"),  # each behind its first occurrence
    ("ABCABC", 3, "ABCABC"),  # never across a chunk
    ("ABCABCAB", 4, "AABCBBCA"),  # chunks ABCA and BCAB
    ("A..A.B.B", 8, "AA...BB."),  # no key: stays where it is relative to the groups' first members
    ("ABAB", 0, "ABAB"),  # off
    ("ABAB", 1, "ABAB"),
    ("", 8, ""),
])
def test_group_by_prefix(keys: str, lookahead: int, expected: str) -> None:
    assert keyed(keys, lookahead) == expected


def test_grouping_hands_out_every_item_once_and_keeps_order_within_a_group() -> None:
    items = [(i, "XYZ"[i % 3] if i % 5 else None) for i in range(1000)]
    out = list(group_by_prefix(items, lambda item: item[1], 64))
    assert sorted(out) == items
    for group in "XYZ":
        members = [i for i, key in out if key == group]
        assert members == sorted(members)


def test_grouping_reads_no_further_than_its_lookahead() -> None:
    read = []

    def source() -> Any:
        for i in range(100):
            read.append(i)
            yield i

    out = group_by_prefix(source(), lambda i: "same", 10)
    assert next(out) == 0
    assert len(read) == 10


def test_prefix_key() -> None:
    document = "word " * (KEY_CHARS // 4)
    chat = {"model": "m", "messages": [{"role": "system", "content": "Answer from the document."},
                                       {"role": "user", "content": document + "Question 1?"}]}
    other_question = {**chat, "messages": [chat["messages"][0],
                                           {"role": "user", "content": document + "Question 2?"}]}
    assert prefix_key(chat) is not None and prefix_key(chat) == prefix_key(other_question)
    assert prefix_key({**chat, "model": "n"}) != prefix_key(chat)  # another model shares no cache
    assert prefix_key({"model": "m", "messages": [{"role": "user", "content": "short"}]}) is None
    assert prefix_key({"model": "m", "prompt": document}) is not None
    assert prefix_key({"model": "m", "prompt": [[1, 2, 3] * KEY_CHARS]}) is not None
    parts = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": document}]}]}
    assert prefix_key(parts) is not None
    assert prefix_key({"model": "m", "input": document}) is None  # embeddings: no prefix cache to keep warm
    assert prefix_key({"model": "m", "messages": "not a list"}) is None


def interleaved(documents: int, questions: int) -> list[dict[str, Any]]:
    """Question q of every document, then question q + 1 of every document: how such files are often built."""
    texts = [f"Document {d}: " + f"sentence {d} " * (KEY_CHARS // 10) for d in range(documents)]
    return [request_line(f"d{d}-q{q}", f"{texts[d]}\nQuestion {q}: what is it about?")
            for q in range(questions) for d in range(documents)]


def engine_order(journal: Path, batch_id: str, lines: list[dict[str, Any]]) -> list[str]:
    """custom_ids in the order the engine started them (the echo engine journals `<batch>-<line>`)."""
    started = [row.rsplit("-", 1) for row in journal.read_text().split()]
    numbers = [int(line_no) for batch, line_no in started if batch == batch_id]
    first = min(numbers)  # line numbers count from 0 or 1: only their order matters here
    return [lines[n - first]["custom_id"] for n in numbers]


@pytest.mark.parametrize("lookahead", [None, 0])
def test_the_engine_gets_requests_grouped_by_prefix(server_factory: Any, tmp_path: Path,
                                                    lookahead: int | None) -> None:
    journal = tmp_path / f"journal-{lookahead}"
    extra = ["--window", "1", "--echo-fault", f"journal={journal}"]  # one at a time: the order is visible
    if lookahead is not None:
        extra += ["--prefix-lookahead", str(lookahead)]
    client = sdk(server_factory(extra_args=extra))
    lines = [*interleaved(documents=3, questions=3), request_line("short", "no long prefix here")]
    batch = wait_for(client, submit(client, lines).id, TERMINAL)
    assert batch.status == "completed"
    assert sorted(line["custom_id"] for line in read_jsonl(client, batch.output_file_id)) == sorted(
        line["custom_id"] for line in lines)
    order = engine_order(journal, batch.id, lines)
    if lookahead == 0:
        assert order == [line["custom_id"] for line in lines]
    else:
        assert order == ["d0-q0", "d0-q1", "d0-q2", "d1-q0", "d1-q1", "d1-q2", "d2-q0", "d2-q1", "d2-q2",
                         "short"]
