"""Requests sharing a long prompt prefix run together (so vLLM's prefix cache keeps serving them), within a
bounded look-ahead, and everything else keeps the file's order."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TERMINAL, read_jsonl, request_line, sdk, submit, wait_for
from vllm_batch_server.queue.grouping import (
    MIN_SHARED_CHARS,
    group_by_prefix,
    prompt_parts,
    prompt_reader,
    shared_at_least,
)


def grouped(prompts: list[str | None], lookahead: int = 1024, min_shared: int = 4) -> list[int]:
    """The positions of `prompts` (one-part prompts; None: no prompt) in the order they are handed out."""
    items = list(enumerate(prompts))
    out = group_by_prefix(items, lambda item: None if item[1] is None else (item[1],), lookahead, min_shared)
    return [index for index, _ in out]


def handed_out(prompts: list[str | None], lookahead: int = 1024, min_shared: int = 4) -> list[str | None]:
    return [prompts[index] for index in grouped(prompts, lookahead, min_shared)]


@pytest.mark.parametrize(("prompts", "lookahead", "expected"), [
    # each group where its first member is, in sorted order
    ("AAAA1 BBBB1 CCCC1 AAAA2 BBBB2 CCCC2", 6, "AAAA1 AAAA2 BBBB1 BBBB2 CCCC1 CCCC2"),
    ("AAAA1 BBBB1 CCCC1 AAAA2 BBBB2 CCCC2", 3, "AAAA1 BBBB1 CCCC1 AAAA2 BBBB2 CCCC2"),  # never across a chunk
    ("AAAA1 BBBB1 CCCC1 AAAA2 BBBB2 CCCC2 AAAA3 BBBB3", 4,
     "AAAA1 AAAA2 BBBB1 CCCC1 BBBB2 BBBB3 CCCC2 AAAA3"),  # chunks of four
    ("AAAA2 x AAAA1 y z", 8, "AAAA1 AAAA2 x y z"),  # sorted within the group; the rest keeps its place
    ("AAA1 AAA2 AAA3", 8, "AAA1 AAA2 AAA3"),  # sharing fewer than min_shared characters: file order
    ("AAAA3 AAAA1 AAAA2", 0, "AAAA3 AAAA1 AAAA2"),  # off
    ("AAAA3 AAAA1 AAAA2", 1, "AAAA3 AAAA1 AAAA2"),
    ("", 8, ""),
])
def test_group_by_prefix(prompts: str, lookahead: int, expected: str) -> None:
    assert " ".join(handed_out(prompts.split(), lookahead)) == expected  # type: ignore[arg-type]


def test_requests_without_a_prompt_keep_their_place() -> None:
    assert handed_out(["AAAA2", None, "BBBB1", "AAAA1", None, "BBBB0"]) == [
        "AAAA1", "AAAA2", None, "BBBB0", "BBBB1", None]


def test_equal_prompts_keep_the_file_order() -> None:
    assert grouped(["same prompt", "other", "same prompt", "same prompt"]) == [0, 2, 3, 1]


def test_nested_prefixes_system_prompt_then_document_then_question() -> None:
    """The hole of a fixed-length key: behind one long system prompt, every request had the same key, and the
    documents behind it were not grouped at all. Grouping by the longest shared prefix runs them by document,
    and within a document by question."""
    system = "S" * 40
    lines = [f"{system}|doc{d}|q{q}" for q in range(3) for d in (2, 0, 1)]  # interleaved question by question
    assert handed_out([*lines, "short"], min_shared=20) == [
        f"{system}|doc{d}|q{q}" for d in range(3) for q in range(3)] + ["short"]


def test_two_system_prompts_each_with_documents_behind_it() -> None:
    rng = random.Random(7)
    lines = [(s, d, q) for s in range(3) for d in range(5) for q in range(4)]
    rng.shuffle(lines)
    noise = [f"unrelated {i}" for i in range(10)]
    prompts: list[str | None] = [f"system {s} " * 8 + f"| document {d} " * 4 + f"| question {q}"
                                 for s, d, q in lines]
    for index, line in enumerate(noise):
        prompts.insert(index * 7, line)
    out = handed_out(prompts, min_shared=40)
    assert sorted(out, key=str) == sorted(prompts, key=str)  # every request exactly once
    for s in range(3):
        assert_contiguous(out, f"system {s} " * 8)
        for d in range(5):
            assert_contiguous(out, f"system {s} " * 8 + f"| document {d} " * 4)
    assert [line for line in out if line in noise] == noise  # the rest keeps the file's order


def assert_contiguous(out: list[str | None], prefix: str) -> None:
    positions = [i for i, line in enumerate(out) if line is not None and line.startswith(prefix)]
    assert positions and positions == list(range(positions[0], positions[-1] + 1)), prefix


@pytest.mark.parametrize("seed", range(20))
def test_every_run_sharing_a_prefix_is_contiguous_and_nothing_else_moves(seed: int) -> None:
    """Random prompts over a tiny alphabet (so that they share prefixes of every length): every request is
    handed out exactly once; within each chunk, the requests that share any prefix of at least min_shared
    characters are contiguous; a request that shares fewer than that with all others keeps its order."""
    rng = random.Random(seed)
    prompts: list[str | None] = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 9)))
                                 for _ in range(rng.randint(1, 200))]
    lookahead, min_shared = rng.choice([2, 7, 50, 1000]), rng.randint(1, 6)
    order = grouped(prompts, lookahead, min_shared)
    assert sorted(order) == list(range(len(prompts)))
    for begin in range(0, len(prompts), lookahead):
        chunk = order[begin:begin + lookahead]
        assert sorted(chunk) == list(range(begin, min(begin + lookahead, len(prompts))))  # no crossing
        out = [prompts[i] for i in chunk]
        for prefix in {p[:n] for p in out if p for n in range(min_shared, len(p) + 1)}:
            if sum(1 for p in out if p and p.startswith(prefix)) > 1:
                assert_contiguous(out, prefix)
        alone = [i for i in chunk if not any(
            j != i and shared_at_least([prompts[i]], [prompts[j]], min_shared)  # type: ignore[list-item]
            for j in chunk)]
        assert alone == sorted(alone)


def test_grouping_reads_no_further_than_its_lookahead() -> None:
    read = []

    def source() -> Any:
        for i in range(100):
            read.append(i)
            yield i

    out = group_by_prefix(source(), lambda i: ("same prompt",), 10, min_shared=4)
    assert next(out) == 0
    assert len(read) == 10


@pytest.mark.parametrize(("a", "b", "chars", "expected"), [
    (["abcdef"], ["abcxyz"], 3, True),
    (["abcdef"], ["abcxyz"], 4, False),
    (["ab", "cd"], ["ab", "ce"], 4, True),  # a, b, the boundary, c
    (["ab", "cd"], ["ab", "ce"], 5, False),
    (["ab"], ["ab", "cd"], 2, True),
    (["ab"], ["ab", "cd"], 3, False),  # the boundary is only in one of them
    (["ab", ""], ["ab", "cd"], 3, True),  # both go on: the boundary is shared
    (["ab"], ["abc"], 3, False),
    ([], ["abc"], 1, False),
])
def test_shared_at_least(a: list[str], b: list[str], chars: int, expected: bool) -> None:
    assert shared_at_least(a, b, chars) is expected
    assert shared_at_least(b, a, chars) is expected


def test_prompt_parts() -> None:
    document = "word " * (MIN_SHARED_CHARS // 4)
    chat = {"model": "m", "messages": [{"role": "system", "content": "Answer from the document."},
                                       {"role": "user", "content": document + "Question 1?"}]}
    assert prompt_parts(chat) == ("Answer from the document.", document + "Question 1?")
    assert prompt_parts({"model": "m", "prompt": document}) == (document,)
    text_parts = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": document}]}]}
    assert prompt_parts(text_parts) == (document,)  # renders as the same text as a string content
    tool_call = {"model": "m", "messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": None, "tool_calls": []},
                                            {"role": "assistant"}]}
    assert prompt_parts(tool_call) == ("hi", "", "")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with_image = prompt_parts({"model": "m", "messages": [{"role": "user", "content": [image]}]})
    assert with_image is not None and "AAAA" in with_image[0]  # other parts compare as written
    tokens = prompt_parts({"model": "m", "prompt": [1, 2, 3]})
    assert tokens == ("[1, 2, 3]",)
    assert prompt_parts({"model": "m", "input": document}) is None  # embeddings: no prefix cache to keep warm
    assert prompt_parts({"model": "m", "messages": "not a list"}) is None
    assert prompt_parts({"model": "m", "messages": {"content": "a dict"}}) is None
    assert prompt_parts({"model": "m", "messages": ["not a dict"]}) == ("not a dict",)
    assert prompt_parts({"model": "m", "messages": []}) == ()


@pytest.mark.parametrize(("contents", "expected"), [
    # The check that every part is a string stops at an empty part: what follows it is still made text.
    (["", ["x"]], ("", '["x"]')),
    (["", "", None], ("", "", "")),
    (["a", "", [{"type": "text", "text": "b"}]], ("a", "", "b")),
])
def test_prompt_parts_behind_an_empty_part(contents: list[Any], expected: tuple[str, ...]) -> None:
    assert prompt_parts({"model": "m", "messages": [{"role": "user", "content": c} for c in contents]}) == expected


def test_prompt_reader_makes_a_repeated_system_prompt_one_string() -> None:
    system = "Answer from the document only. " * 40
    bodies = [{"model": "m", "messages": [{"role": "system", "content": "".join(list(system))},
                                          {"role": "user", "content": f"question {i}"}]} for i in range(4)]
    bodies.insert(2, {"model": "m", "messages": [{"role": "system", "content": "another system prompt"},
                                                 {"role": "user", "content": "q"}]})
    before = copy.deepcopy(bodies)
    read = prompt_reader(lambda body: body)
    prompts = [read(body) for body in bodies]
    assert prompts == [prompt_parts(body) for body in before]  # the same prompts as without the reader
    assert bodies == before  # every body still equal to what was read from the file
    firsts = [body["messages"][0]["content"] for body in bodies]
    assert firsts[0] is firsts[1] and firsts[3] is not firsts[1]  # one string until another system prompt
    assert firsts[3] is firsts[4] and firsts[2] == "another system prompt"
    assert all(p is not None and p[0] is f for p, f in zip(prompts, firsts, strict=True))
    # Bodies it cannot read as chat messages are left as they are.
    odd = [{"model": "m", "messages": "x"}, {"model": "m", "messages": ["a", "b"]},
           {"model": "m", "messages": [{"role": "system", "content": None}, {"role": "user", "content": "q"}]},
           {"model": "m", "prompt": system}]
    read_odd = copy.deepcopy(odd)
    assert [read(body) for body in read_odd] == [prompt_parts(body) for body in odd]
    assert read_odd == odd


def test_chat_requests_are_grouped_by_document_behind_a_long_system_prompt() -> None:
    """The runner's key on real request bodies: a long system prompt, then documents, interleaved."""
    system = "You answer questions about the document below. " * 30
    documents = [f"Document {d}. " + f"text of document {d} " * 40 for d in range(4)]
    bodies = [{"model": "m", "messages": [{"role": "system", "content": system},
                                          {"role": "user", "content": f"{documents[d]}\nQuestion {q}?"}]}
              for q in range(3) for d in (3, 1, 0, 2)]
    bodies.insert(5, {"model": "m", "messages": [{"role": "user", "content": "unrelated"}]})
    out = list(group_by_prefix(bodies, prompt_parts, 1024))
    documents_in_order = [body["messages"][-1]["content"][:11] for body in out if len(body["messages"]) == 2]
    assert documents_in_order == [f"Document {d}." for d in range(4) for _ in range(3)]
    assert out[-1]["messages"][0]["content"] == "unrelated"  # behind the group, which began at line 0
    # A short system prompt (shorter than MIN_SHARED_CHARS) shared by all, documents in the user turn: each
    # document is its own group, placed where it first appears.
    short = [{"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": f"{documents[d]}\nQuestion {q}?"}]}
             for q in range(2) for d in (1, 0)]
    assert [body["messages"][1]["content"][:11] for body in group_by_prefix(short, prompt_parts, 8)] == [
        "Document 1.", "Document 1.", "Document 0.", "Document 0."]


def interleaved(documents: int, questions: int, system: str | None = None) -> list[dict[str, Any]]:
    """Question q of every document, then question q + 1 of every document: how such files are often built."""
    texts = [f"Document {d}: " + f"sentence {d} " * (MIN_SHARED_CHARS // 10) for d in range(documents)]
    lines = []
    for q in range(questions):
        for d in range(documents):
            line = request_line(f"d{d}-q{q}", f"{texts[d]}\nQuestion {q}: what is it about?")
            if system is not None:
                line["body"]["messages"].insert(0, {"role": "system", "content": system})
            lines.append(line)
    return lines


def engine_order(journal: Path, batch_id: str, lines: list[dict[str, Any]]) -> list[str]:
    """custom_ids in the order the engine started them (the echo engine journals `<batch>-<line>`)."""
    started = [row.rsplit("-", 1) for row in journal.read_text().split()]
    numbers = [int(line_no) for batch, line_no in started if batch == batch_id]
    first = min(numbers)  # line numbers count from 0 or 1: only their order matters here
    return [lines[n - first]["custom_id"] for n in numbers]


BY_DOCUMENT = ["d0-q0", "d0-q1", "d0-q2", "d1-q0", "d1-q1", "d1-q2", "d2-q0", "d2-q1", "d2-q2"]


@pytest.mark.parametrize(("lookahead", "system", "expected"), [
    (None, None, [*BY_DOCUMENT[:3], "short", *BY_DOCUMENT[3:]]),  # each document where it first appears
    # Behind one long system prompt (the hole of the former 1,024-character key, which put every line in
    # one group and kept the file's order within it): still by document.
    (None, "Answer from the document. " * 40, [*BY_DOCUMENT, "short"]),
    (0, None, None),  # off: the file's order
])
def test_the_engine_gets_requests_grouped_by_prefix(app_factory: Any, tmp_path: Path, lookahead: int | None,
                                                    system: str | None, expected: list[str] | None) -> None:
    journal = tmp_path / "journal"
    extra = ["--window", "1", "--echo-fault", f"journal={journal}"]  # one at a time: the order is visible
    if lookahead is not None:
        extra += ["--prefix-lookahead", str(lookahead)]
    client = sdk(app_factory(extra_args=extra))
    lines = interleaved(documents=3, questions=3, system=system)
    lines.insert(1, request_line("short", "no long prefix here"))
    batch = wait_for(client, submit(client, lines).id, TERMINAL)
    assert batch.status == "completed"
    assert sorted(line["custom_id"] for line in read_jsonl(client, batch.output_file_id)) == sorted(
        line["custom_id"] for line in lines)
    order = engine_order(journal, batch.id, lines)
    assert order == (expected or [line["custom_id"] for line in lines])
