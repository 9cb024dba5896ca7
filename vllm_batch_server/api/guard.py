"""No target for web pages: what a browser may not make the server do on behalf of another site.

A server without `--api-key` on the operator's own machine is reachable by every page the operator's browser
opens. Three checks, before any route (docs/reliability.md, docs/deployment.md):

- **Host.** The `Host` header must be a name the server is reached by: the loopback names (`localhost`,
  `127.0.0.1`, `[::1]`), `--host` itself, and `--allowed-host` names. A page that rebinds its own DNS name
  to 127.0.0.1 sends its own name, so it can neither read nor change anything. The probes (/health, /ready)
  answer any Host: load balancers probe by address. Only requests that came over a socket are checked: an
  app called in the same process has no DNS to rebind. Bound to all interfaces
  (0.0.0.0, ::) without `--allowed-host`, the server cannot know its names and any Host is served.
- **Origin.** A request that may change state (any method but GET, HEAD, OPTIONS) sent by a browser from another
  origin is refused: `Sec-Fetch-Site` other than `same-origin` or `none`, or an `Origin` header naming another
  host than the request's own `Host` (or `null`). Programs (the openai SDK, curl, the client) send neither
  header; the dashboard is same-origin.
- **Content type** (api/params.py): JSON routes take JSON content types only (415 otherwise), so an HTML form
  cannot post one (`text/plain`, urlencoded); `/v1/files` takes multipart only.

Refusals are 403 in OpenAI's error shape, and the route never runs.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from vllm_batch_server.api.errors import error_response

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Answered whatever the Host: load balancers and orchestrators probe by address (they hold no data).
PROBES = frozenset({"/health", "/ready"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ALL_INTERFACES = frozenset({"0.0.0.0", "::", ""})
# Sec-Fetch-Site values of a request the browser did not send for another site.
TRUSTED_FETCH_SITES = frozenset({b"same-origin", b"none"})


def host_name(value: str) -> tuple[str, int | None]:
    """A Host header's (or an authority's) name, lower case without brackets, and its port if given."""
    try:
        parts = urlsplit("//" + value.strip())
        name, port = (parts.hostname or ""), parts.port
    except ValueError:
        return "", None
    return name.rstrip("."), port


def allowed_names(bind_host: str, extra: list[str]) -> frozenset[str] | None:
    """The host names the Host header may carry; None: any (bound to all interfaces without names given, or
    `*` among them)."""
    extra_names = {host_name(item)[0] or item.strip().lower() for item in extra}
    if "*" in extra_names or "*" in {item.strip() for item in extra}:
        return None
    bind = bind_host.strip().strip("[]").lower()
    if bind in ALL_INTERFACES and not extra_names:
        return None
    names = set(LOOPBACK_NAMES) | extra_names
    if bind not in ALL_INTERFACES:
        names.add(bind)
    with_loopback = set(names)
    for name in names:  # 127.0.0.2 and the like are loopback too
        try:
            if ipaddress.ip_address(name).is_loopback:
                with_loopback.add(name)
        except ValueError:
            pass
    return frozenset(with_loopback)


def _on_a_socket(scope: Scope) -> bool:
    """Whether the request came over a network socket (uvicorn puts the listening address, an IP, in `server`).
    An app called in the same process (an ASGI transport, Starlette's TestClient) has no socket and no DNS to
    rebind, and names a made-up host (`testserver`): its Host is not checked."""
    server = scope.get("server")
    if not server:
        return False
    try:
        ipaddress.ip_address(str(server[0]).strip("[]"))
    except ValueError:
        return False
    return True


def _is_loopback_address(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class WebGuard:
    def __init__(self, app: ASGIApp, bind_host: str, allowed_hosts: list[str]) -> None:
        self.app = app
        self._names = allowed_names(bind_host, allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        refusal = self._refusal(scope["method"], scope["path"] if _on_a_socket(scope) else "", host, headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        message, code = refusal
        response = error_response(403, message, type="invalid_request_error", code=code)
        await response(scope, receive, send)

    def _refusal(self, method: str, path: str, host: str, headers: dict[bytes, bytes]) -> tuple[str, str] | None:
        if host and self._names is not None and path and path not in PROBES:
            name, _ = host_name(host)
            if name not in self._names and not _is_loopback_address(name):
                return (f"The Host header names '{host[:100]}', which is not a name this server is reached by; "
                        "start it with --allowed-host NAME to accept it.", "host_not_allowed")
        if method in SAFE_METHODS:
            return None
        site = headers.get(b"sec-fetch-site")
        if site is not None and site.lower() not in TRUSTED_FETCH_SITES:
            return (f"Cross-site requests that change state are refused (Sec-Fetch-Site: "
                    f"{site.decode('latin-1')[:40]}).", "cross_origin_request")
        origin = headers.get(b"origin")
        if origin is not None:
            text = origin.decode("latin-1").strip()
            parts = urlsplit(text) if text != "null" else None
            own = host_name(host) if host else None
            if parts is None or not parts.netloc or own is None or host_name(parts.netloc) != own:
                return (f"Requests that change state from another origin are refused (Origin: {text[:100]}).",
                        "cross_origin_request")
        return None
