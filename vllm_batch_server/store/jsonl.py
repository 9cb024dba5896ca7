"""The batch file format, both ways: request lines in (strict JSON, streamed) and result lines out.

Validation and the runner both read input through here, so a line the validator accepted is parsed the same
way when it runs. Result lines are made where results are written (`queue/checkpoint.result_line`: the
store knows no engine); resume reads a committed line's `custom_id` here without parsing the (often large)
body, relying on that writer putting it right after "id".
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vllm_batch_server import ids

BOM = b"\xef\xbb\xbf"


# Deeper than any real request nests, and shallow enough that every supported Python's parser follows it
# (3.10-3.11 stop near 1,000 levels, 3.12 near 5,000, 3.13 near 20,000): the same line is refused on all.
MAX_DEPTH = 500


class TooDeep(ValueError):
    """Valid JSON nested more than MAX_DEPTH levels."""

    def __init__(self) -> None:
        super().__init__(f"arrays and objects are nested more than {MAX_DEPTH} levels deep")


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def _check_depth(text: str) -> None:
    # Counting brackets is a fast C loop; only a line with more openings than the limit is walked.
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise TooDeep()
        else:
            depth -= 1


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # A literal like 1e999 is valid JSON syntax but overflows to inf, which would reach the engine and be
    # written back out as the non-JSON token `Infinity`: refuse it like NaN.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:50]} is too large")
    return value


# Built once: json.loads with hooks would build a new decoder for every line, a tenth of the runner's time.
_STRICT = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def loads(raw: bytes | str) -> Any:
    """Strict JSON: NaN and Infinity (spelled out or overflowing) are refused, as the JSON standard (and
    OpenAI) does. Bytes are decoded exactly as json.loads decodes them. Raises ValueError (TooDeep for
    nesting the parser cannot follow)."""
    text = raw if isinstance(raw, str) else raw.decode(json.detect_encoding(raw), "surrogatepass")
    _check_depth(text)
    try:
        return _STRICT.decode(text)
    except RecursionError:
        raise TooDeep() from None


# A \uD800-\uDFFF escape. Python's json decodes an unpaired one into a str that cannot be encoded as UTF-8,
# so the result line would fail to be written mid-run; only lines containing one pay for the full check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def has_lone_surrogate(raw: bytes, value: Any) -> bool:
    if not _SURROGATE_ESCAPE.search(raw):
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ---- request lines in ------------------------------------------------------------------------------------


def iter_raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, content) for every non-blank line, without BOM or line ending."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            raw = raw.strip()
            if raw:
                yield number, raw


def iter_requests(path: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, custom_id, body) of a file that passed validation."""
    return requests_in(iter_raw_lines(path))


def requests_in(lines: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, custom_id, body) of validated lines as `iter_raw_lines` gives them."""
    for number, raw in lines:
        line = loads(raw)
        yield number, line["custom_id"], line["body"]


# ---- result lines out ------------------------------------------------------------------------------------

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def error_line(custom_id: str, code: str, message: str) -> bytes:
    """A request that never reached the engine (e.g. `batch_expired`): OpenAI's top-level error."""
    line = {"id": ids.new_request_id(), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}
    return _dumps(line).encode() + b"\n"


def iter_custom_ids(path: Path, size: int) -> Iterator[str]:
    """The custom_ids of the whole result lines in the first `size` bytes of `path`, streamed."""
    if size <= 0 or not path.exists():
        return
    with open(path, "rb") as fh:
        remaining = size
        for raw in fh:
            if remaining <= 0:
                break
            remaining -= len(raw)
            if remaining < 0:  # a torn line past the committed size: not ours
                break
            yield custom_id_of(raw)


_CUSTOM_ID_KEY = b'"custom_id":'
_scan = json.JSONDecoder().raw_decode


def custom_id_of(raw: bytes) -> str:
    """The custom_id of one result line, without parsing its body (a real model's answer is most of the line,
    and resuming a big batch parses every committed line). Our own writer puts the key right after "id",
    whose value (`batch_req_...`) cannot contain it."""
    at = raw.find(_CUSTOM_ID_KEY, 0, 128)
    if at >= 0:
        start = at + len(_CUSTOM_ID_KEY)
        with contextlib.suppress(ValueError):  # cut inside a character or the id: parse the whole line
            value, _ = _scan(raw[start:start + 1024].decode())
            if isinstance(value, str):
                return value
    custom_id: str = json.loads(raw)["custom_id"]
    return custom_id
