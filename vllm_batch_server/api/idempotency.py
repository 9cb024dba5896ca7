"""The `Idempotency-Key` header on creates (see vllm_batch_server/idempotency.py for the rules)."""

from __future__ import annotations

from starlette.requests import Request

from vllm_batch_server.api.errors import APIError, bad_request
from vllm_batch_server.store.idempotency import HEADER, MAX_KEY_LENGTH, KeyReused, valid_key


def key_header(request: Request) -> str | None:
    value = request.headers.get(HEADER)
    if value is None:
        return None
    if not valid_key(value):
        raise bad_request(f"Invalid 'Idempotency-Key' header: expected 1 to {MAX_KEY_LENGTH} printable ASCII "
                          "characters.", "Idempotency-Key", "invalid_idempotency_key")
    return value


def key_reused(exc: KeyReused) -> APIError:
    return APIError(409, str(exc), param="Idempotency-Key", code="idempotency_key_reused")
