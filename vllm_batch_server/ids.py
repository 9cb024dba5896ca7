"""Object ids, shaped like OpenAI's, and the patterns that guard every id arriving from outside.

An id from a URL is matched against these before it goes anywhere near the database or the disk, so a
path-like id (`../x`) can never name a file outside the data directory.
"""

from __future__ import annotations

import re
import secrets

FILE_ID = re.compile(r"file-[A-Za-z0-9]{1,64}")
BATCH_ID = re.compile(r"batch_[A-Za-z0-9]{1,64}")


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def new_request_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def is_file_id(value: str) -> bool:
    return FILE_ID.fullmatch(value) is not None


def is_batch_id(value: str) -> bool:
    return BATCH_ID.fullmatch(value) is not None
