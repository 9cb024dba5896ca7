"""Optional Bearer-token check on every route but the probes (/health, /ready) and the dashboard's static
files, compared in constant time. The dashboard's page is public (it holds no data); every call it makes
for data carries the key."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from vllm_batch_server.api.errors import error_response
from vllm_batch_server.settings import OPEN_PATHS, OPEN_PREFIXES


def is_open(path: str, also: tuple[str, ...] = ()) -> bool:
    return path in OPEN_PATHS or path in also or path.startswith(OPEN_PREFIXES)


def bearer_token(header: bytes) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, or None for another scheme or none. The scheme
    is case-insensitive (RFC 7235 §2.1: `bearer`, `BEARER` are the same scheme); the token is not."""
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.lstrip(b" ")


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str, open_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self._expected = api_key.encode()
        self._open = open_paths  # opened by a setting, beyond the always open ones (/metrics, say)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"], self._open):
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        token = bearer_token(given)
        # compare_digest's time depends on the lengths only, never on where the token and the key differ.
        if token is not None and hmac.compare_digest(token, self._expected):
            await self.app(scope, receive, send)
            return
        message = ("Incorrect API key provided." if given else
                   "You didn't provide an API key. Send it as a Bearer token in the Authorization header.")
        response = error_response(401, message, type="invalid_request_error", code="invalid_api_key",
                                  headers={"www-authenticate": "Bearer"})
        await response(scope, receive, send)
