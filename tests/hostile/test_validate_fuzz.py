"""The JSONL validator against hostile input: whatever the bytes, a per-line error or a clean pass, never an
exception. Then the same files through a real server: a failed batch with `errors.data[]`, never a 500."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import AppFactory, chat_lines, jsonl, request_line, sdk, submit, wait_for
from vllm_batch_server.queue.validate import Report, validate_input
from vllm_batch_server.store.jsonl import MAX_DEPTH, iter_requests

CHAT = "/v1/chat/completions"
MODELS = ["echo-model", "echo-embed"]
CODES = {"invalid_json_line", "missing_required_parameter", "invalid_custom_id", "duplicate_custom_id",
         "invalid_method", "invalid_url", "invalid_type", "model_not_found", "mismatched_model",
         "too_many_requests", "empty_file"}


def validate(data: bytes, max_lines: int = 1000) -> Report:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_bytes(data)
        report = validate_input(path, endpoint=CHAT, served_models=MODELS, max_lines=max_lines)
        if report.ok:
            # what passed must be runnable: the runner's reader takes every line, ids unique
            requests = list(iter_requests(path))
            assert len(requests) == report.total
            assert len({custom_id for _, custom_id, _ in requests}) == report.total
    for error in report.errors:
        assert error.code in CODES, error
        assert error.line is None or 1 <= error.line <= data.count(b"\n") + 1
        assert len(error.message) < 2000
    return report


def line(**changes: Any) -> dict[str, Any]:
    value = request_line("a")
    for key, item in changes.items():
        if key.startswith("body."):
            value["body"][key[5:]] = item
        else:
            value[key] = item
    return value


def test_friendly_framing_is_accepted() -> None:
    body = jsonl(chat_lines(3))
    crlf = body.replace(b"\n", b"\r\n")
    report = validate(b"\xef\xbb\xbf" + b"\n\n  \n" + crlf + b"\r\n\t\n")
    assert report.ok and report.total == 3 and report.model == "echo-model"
    assert validate(body.rstrip(b"\n")).ok  # no final newline


def test_ten_megabyte_line_is_accepted() -> None:
    big = line(**{"body.messages": [{"role": "user", "content": "x" * 10_000_000}]})
    report = validate(jsonl([big]))
    assert report.ok and report.total == 1


HOSTILE_LINES = {
    "invalid utf-8": b'{"custom_id": "\xff\xfe", "method": "POST"}',
    "truncated": b'{"custom_id": "a", "method": "PO',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "NaN": json.dumps(line(**{"body.temperature": float("nan")})).encode(),
    "Infinity": json.dumps(line(**{"body.temperature": float("inf")})).encode(),
    "-Infinity": json.dumps(line(**{"body.temperature": float("-inf")})).encode(),
    "overflowing float": json.dumps(line()).encode().replace(b'"POST"', b'"POST", "n": 1e999'),
    "huge integer": json.dumps(line()).encode().replace(b'"POST"', b'"POST", "n": ' + b"9" * 5000),
    "not an object": b"[1, 2, 3]",
    "a string": b'"hello"',
    "null": b"null",
    "NUL bytes": b"\x00\x00\x00",
    "lone surrogate escape": json.dumps(line(custom_id="\ud800")).encode(),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LINES))
def test_hostile_line_is_a_per_line_error(case: str) -> None:
    report = validate(jsonl(chat_lines(2)) + HOSTILE_LINES[case] + b"\n" + jsonl(chat_lines(1, prefix="z")))
    assert not report.ok, case
    assert report.errors[0].line == 3, report.errors


def test_surrogate_pairs_are_fine_and_lone_ones_anywhere_are_refused() -> None:
    pair = json.dumps(line(**{"body.messages": [{"role": "user", "content": "\U0001F600"}]})).encode()
    assert b"\\ud83d\\ude00" in pair
    assert validate(pair + b"\n").ok
    assert validate(b'{"custom_id": "a\\\\ud800", "method": "POST", "url": "/v1/chat/completions", '
                    b'"body": {"model": "echo-model"}}\n').ok  # an escaped backslash, not an escape
    lone = json.dumps(line(**{"body.messages": [{"role": "user", "content": "a\udc00b"}]})).encode()
    assert [e.code for e in validate(lone + b"\n").errors] == ["invalid_json_line"]


def test_duplicate_keys_do_not_crash_and_duplicate_custom_ids_are_refused() -> None:
    raw = b'{"custom_id": "a", "custom_id": "b", "method": "POST", "url": "/v1/chat/completions", ' \
          b'"body": {"model": "echo-model", "messages": []}}'
    validate(raw + b"\n")
    report = validate(jsonl([line(custom_id="same"), line(custom_id="same")]))
    assert [e.code for e in report.errors] == ["duplicate_custom_id"]


WRONG_VALUES: list[Any] = [None, 0, 1.5, True, "", "x", [], ["x"], {}, {"a": 1}]
FIELDS = ["custom_id", "method", "url", "body", "body.model"]


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", WRONG_VALUES, ids=repr)
def test_wrong_type_in_every_field(field: str, value: Any) -> None:
    report = validate(jsonl([line(**{field: value})]))
    if field == "custom_id" and isinstance(value, str) and value:
        assert report.ok  # any non-empty string is a fine custom_id
        return
    assert not report.ok
    assert report.errors[0].line == 1
    assert report.errors[0].param is not None and report.errors[0].param.startswith(field.split(".")[0])


def test_error_list_is_bounded() -> None:
    report = validate(b"nope\n" * 5000, max_lines=10_000)
    assert len(report.errors) == 100 and report.truncated


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children,
                                                                        max_size=4),
    max_leaves=20)
fields = st.fixed_dictionaries({}, optional={
    "custom_id": st.one_of(st.text(max_size=8), json_values),
    "method": st.sampled_from(["POST", "GET", "post"]) | json_values,
    "url": st.sampled_from([CHAT, "/v1/embeddings", "../x"]) | json_values,
    "body": st.fixed_dictionaries({}, optional={
        "model": st.sampled_from([*MODELS, "other"]) | json_values,
        "messages": json_values,
    }) | json_values,
})
raw_line = st.one_of(
    fields.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.builds(lambda v, cut: json.dumps(v).encode()[:cut], fields, st.integers(0, 200)),
)
endings = st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\r"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(raw_line, endings), max_size=12), st.booleans())
def test_validator_never_raises(lines: list[tuple[bytes, bytes]], bom: bool) -> None:
    data = (b"\xef\xbb\xbf" if bom else b"") + b"".join(raw + end for raw, end in lines)
    validate(data)


def test_hostile_files_through_the_server(app_factory: AppFactory) -> None:
    server = app_factory()
    client = sdk(server)
    ids = []
    for case, raw in sorted(HOSTILE_LINES.items()):
        data = jsonl(chat_lines(1)) + raw + b"\n"
        ids.append((case, submit(client, data).id))
    friendly = submit(client, b"\xef\xbb\xbf" + jsonl(chat_lines(4)).replace(b"\n", b"\r\n\r\n")).id
    for case, batch_id in ids:
        batch = wait_for(client, batch_id, timeout=30)
        assert batch.status == "failed", case
        assert batch.errors is not None and batch.errors.data[0].line == 2, (case, batch.errors)
    done = wait_for(client, friendly, timeout=30)
    assert done.status == "completed" and done.request_counts.completed == 4
    assert server.http.get(server.root_url + "/health").status_code == 200
    assert "Traceback" not in server.log()


def test_a_valid_but_deeply_nested_line_is_reported_as_too_deep_not_as_invalid() -> None:
    """Regression: a valid line nested 1,000 levels deep was reported as "not valid JSON" on Python 3.10-3.11
    and accepted on 3.12-3.13 (whose parsers follow deeper). The limit is now ours and the same everywhere:
    nested(n) below wraps its array in the line's object, so it is n + 1 levels deep."""
    def nested(levels: int) -> bytes:
        return json.dumps(line()).encode().replace(b'"POST"', b'"POST", "x": ' + b"[" * levels + b"]" * levels)

    for levels in (MAX_DEPTH, 1_000, 5_000, 100_000):
        report = validate(jsonl(chat_lines(1)) + nested(levels) + b"\n")
        assert [(e.line, e.code) for e in report.errors] == [(2, "invalid_json_line")], levels
        message = report.errors[0].message
        assert "valid JSON" in message and "nested" in message and "not valid JSON" not in message
        assert str(MAX_DEPTH) in message
    assert validate(nested(MAX_DEPTH - 1) + b"\n").ok
    # Brackets inside strings are text, not nesting.
    assert validate(json.dumps(line()).encode().replace(b'"POST"', b'"POST", "x": "' + b"[" * 5_000 + b'"')
                    + b"\n").ok
