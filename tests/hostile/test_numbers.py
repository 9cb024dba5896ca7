"""Every numeric parameter parses safely: booleans, fractions, infinities, NaN, numbers too large for any bound
and text are a 400 naming the parameter (or, for what JSON itself does not allow, a 400 saying the body is not
valid JSON), never a 500. Regression: `output_expires_after.seconds` of 1e999 or Infinity was an OverflowError
answered 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Server, chat_lines, jsonl, sdk, upload
from tests.hostile.errors import assert_openai_error
from vllm_batch_server.api.errors import APIError
from vllm_batch_server.api.params import integer


@pytest.fixture(scope="module")
def input_file(shared_server: Server) -> str:
    return upload(sdk(shared_server), jsonl(chat_lines(1)))


def create_batch(server: Server, raw: bytes) -> httpx.Response:
    return server.http.post(server.base_url + "/batches", content=raw, headers={"content-type": "application/json"},
                      timeout=10)


def body(file_id: str, seconds: str) -> bytes:
    return (f'{{"input_file_id": "{file_id}", "endpoint": "/v1/chat/completions", "completion_window": "24h", '
            f'"output_expires_after": {{"anchor": "created_at", "seconds": {seconds}}}}}').encode()


@pytest.mark.parametrize("seconds", ["1e999", "-1e999", "Infinity", "-Infinity", "NaN", "1" + "0" * 5000])
def test_json_numbers_json_does_not_allow_are_refused_as_invalid_json(shared_server: Server,
                                                                      input_file: str, seconds: str) -> None:
    error = assert_openai_error(create_batch(shared_server, body(input_file, seconds)), 400)
    assert error["code"] == "invalid_json"


@pytest.mark.parametrize("seconds", ["1e300", "1" + "0" * 40, "-5", "0", "3599", "2592001", "3600.5", "true",
                                     "false", "null", '"soon"', '"1e999"', '"inf"', '"NaN"', "[]", "{}"])
def test_output_expires_after_seconds_out_of_range_or_mistyped_names_the_parameter(
        shared_server: Server, input_file: str, seconds: str) -> None:
    error = assert_openai_error(create_batch(shared_server, body(input_file, seconds)), 400)
    assert error["param"] == "output_expires_after.seconds", error


@pytest.mark.parametrize("seconds", ["3600", "3600.0", "2592000", '"86400"'])
def test_output_expires_after_seconds_in_range_is_accepted(shared_server: Server, input_file: str,
                                                            seconds: str) -> None:
    response = create_batch(shared_server, body(input_file, seconds))
    assert response.status_code == 200, response.text


def upload_with_expiry(server: Server, seconds: str) -> httpx.Response:
    files = {"file": ("in.jsonl", jsonl(chat_lines(1)))}
    data = {"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": seconds}
    return server.http.post(server.base_url + "/files", files=files, data=data, timeout=10)


@pytest.mark.parametrize("seconds", ["1e999", "inf", "-inf", "Infinity", "NaN", "9" * 5000, "1" + "0" * 40, "-1",
                                     "3600.5", "3600.0", "", " ", "true", "0x10", "١٢٣٤", "3599", "2592001"])
def test_files_expires_after_seconds_names_the_parameter(shared_server: Server, seconds: str) -> None:
    error = assert_openai_error(upload_with_expiry(shared_server, seconds), 400)
    assert error["param"] == "expires_after.seconds", error


def test_files_expires_after_seconds_in_range_is_accepted(shared_server: Server) -> None:
    response = upload_with_expiry(shared_server, "7200")
    assert response.status_code == 200, response.text
    assert response.json()["expires_at"] - response.json()["created_at"] == 7200


@pytest.mark.parametrize("path", ["/files", "/batches"])
@pytest.mark.parametrize("limit", ["1e999", "inf", "NaN", "9" * 5000, "1" * 40, "-1", "0", "2.5", "true", ""])
def test_list_limit_names_the_parameter(shared_server: Server, path: str, limit: str) -> None:
    response = shared_server.http.get(shared_server.base_url + path, params={"limit": limit}, timeout=10)
    assert assert_openai_error(response, 400)["param"] == "limit"


@pytest.mark.parametrize("value", [True, False, None, float("inf"), float("-inf"), float("nan"), 1e300, 10**400,
                                   -(10**400), 2.5, "1e999", "inf", "9" * 5000, "", [], {}, object()])
def test_integer_never_raises_anything_but_a_400(value: Any) -> None:
    with pytest.raises(APIError) as caught:
        integer(value, "p", 1, 100)
    assert caught.value.status == 400 and caught.value.param == "p"


@pytest.mark.parametrize("value,expected", [(5, 5), (5.0, 5), ("5", 5), (" 7 ", 7), ("+8", 8), ("0009", 9)])
def test_integer_accepts_integers_written_plainly(value: Any, expected: int) -> None:
    assert integer(value, "p", 1, 100) == expected
