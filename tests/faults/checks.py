"""Assertions shared by the fault tests: the durability contract, checked from the outside."""

from __future__ import annotations

from collections import Counter
from typing import Any

import openai

from tests.conftest import read_jsonl


def results_by_id(client: openai.OpenAI, batch: Any) -> tuple[Counter[str], list[dict[str, Any]]]:
    """How often each custom_id appears across the batch's output and error files, and all the lines."""
    lines = read_jsonl(client, batch.output_file_id) + read_jsonl(client, batch.error_file_id)
    return Counter(line["custom_id"] for line in lines), lines


def assert_exactly_once(client: openai.OpenAI, batch: Any, expected: set[str]) -> list[dict[str, Any]]:
    """Every expected custom_id has exactly one result line, and there is no other line."""
    seen, lines = results_by_id(client, batch)
    duplicated = sorted(cid for cid, n in seen.items() if n > 1)
    lost = sorted(expected - set(seen))
    unknown = sorted(set(seen) - expected)
    assert not duplicated, f"duplicated results: {duplicated[:10]}"
    assert not lost, f"lost results: {lost[:10]} ({len(lost)} in all)"
    assert not unknown, f"results for ids never submitted: {unknown[:10]}"
    counts = batch.request_counts
    assert counts.completed + counts.failed == len(lines) == counts.total, counts
    return lines


def assert_at_most_once(client: openai.OpenAI, batch: Any, expected: set[str]) -> list[dict[str, Any]]:
    """For batches that end early (cancelled, failed): partial results, but none twice and none invented;
    request_counts agree with the files."""
    seen, lines = results_by_id(client, batch)
    assert all(n == 1 for n in seen.values()), f"duplicated: {[c for c, n in seen.items() if n > 1][:10]}"
    assert set(seen) <= expected
    counts = batch.request_counts
    assert counts.completed + counts.failed == len(lines), (counts, len(lines))
    return lines


def assert_echo_answers(lines: list[dict[str, Any]]) -> None:
    """Each successful line answers its own request (chat_lines: `req-i` asked "message number i")."""
    for line in lines:
        if line["response"] and line["response"]["status_code"] == 200:
            number = line["custom_id"].rsplit("-", 1)[1]
            content = line["response"]["body"]["choices"][0]["message"]["content"]
            assert content == f"message number {number}", line


def assert_cancel_left_no_failure(client: openai.OpenAI, done: Any, at_least: int, total: int) -> list[dict[str, Any]]:
    """A batch cancelled mid-run: what the cancel stopped has no line (neither an error line nor a failure in
    the counts), and the output holds exactly the completed answers, at least `at_least` of `total`."""
    assert done.status == "cancelled"
    assert done.request_counts is not None
    assert done.request_counts.failed == 0, read_jsonl(client, done.error_file_id)[:3]
    assert done.error_file_id is None
    output = read_jsonl(client, done.output_file_id)
    assert at_least <= len(output) == done.request_counts.completed < total
    assert all(line["response"]["status_code"] == 200 for line in output)
    return output
