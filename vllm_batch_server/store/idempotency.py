"""Idempotent creates: a client that retries `POST /v1/files` or `POST /v1/batches` after losing the response
sends the same `Idempotency-Key` and gets the object it created the first time, not a second one.

A key is stored in the same transaction as the object it created, with a fingerprint of the request's
content: the same key with the same content replays the object; with different content it is refused (409),
since the client has reused a key by mistake. Keys are kept for `KEEP_SECONDS`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

HEADER = "idempotency-key"
MAX_KEY_LENGTH = 255
# Long enough for a client to come back from a crash or a lost connection the next working day.
KEEP_SECONDS = 7 * 86400


@dataclass(frozen=True)
class IdempotencyKey:
    route: str  # "files" or "batches": the same key may be used once on each
    key: str
    fingerprint: str


class KeyReused(Exception):
    def __init__(self, key: IdempotencyKey) -> None:
        super().__init__(f"The Idempotency-Key {key.key[:100]!r} was already used with a different request; "
                         "send a new key for a new request.")


def valid_key(value: str) -> bool:
    return 0 < len(value) <= MAX_KEY_LENGTH and value.isascii() and value.isprintable()


def fingerprint(*parts: Any) -> str:
    """A digest of a request's content, independent of key order and of multipart boundaries."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class KeyLookup(Protocol):
    """What `replayed` needs of the database (Database has it). A protocol, not the class: the database
    stores keys of this module's type, so importing it here would make the two modules import each other."""

    async def idempotent_object(self, route: str, key: str) -> tuple[str, str] | None: ...


async def replayed(db: KeyLookup, key: IdempotencyKey) -> str | None:
    """The id of the object an earlier request with this key created, if any. Raises KeyReused when that
    request's content differed."""
    found = await db.idempotent_object(key.route, key.key)
    if found is None:
        return None
    stored_fingerprint, object_id = found
    if stored_fingerprint != key.fingerprint:
        raise KeyReused(key)
    return object_id
