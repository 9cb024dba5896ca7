"""Object ids, shaped like OpenAI's, and the patterns that guard every id arriving from outside.

An id from a URL is matched against these before it goes anywhere near the database or the disk, so a
path-like id (`../x`) can never name a file outside the data directory.
"""

from __future__ import annotations

import itertools
import re
import secrets

FILE_ID = re.compile(r"file-[A-Za-z0-9]{1,64}")
BATCH_ID = re.compile(r"batch_[A-Za-z0-9]{1,64}")


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


# Result lines need two ids each: a random per-process prefix and a counter keep them unique without
# asking the OS for randomness twice per result (a measurable share of the runner's time).
_REQUEST_PREFIX = secrets.token_hex(6)
_request_counter = itertools.count()


def new_request_id() -> str:
    return f"batch_req_{_REQUEST_PREFIX}{next(_request_counter):012x}"


def is_file_id(value: str) -> bool:
    return FILE_ID.fullmatch(value) is not None


def is_batch_id(value: str) -> bool:
    return BATCH_ID.fullmatch(value) is not None
