"""The dashboard: static files from vllm_batch_server/ui/, at `/` and under `/ui/`.

Plain HTML, CSS and JavaScript modules shipped in the package: no build step, nothing fetched from another
host. The files are public (they hold no data); the page reads everything through the same JSON API as any
client, sending the key the user signs in with, so it can show nothing the API would not.

Only the files that exist in the package at start-up are served, looked up by exact name, so no path a
client sends can reach anything else. A strict Content-Security-Policy forbids inline script and any other
origin: even a batch's metadata written to trick the page cannot run code or send the key anywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from vllm_batch_server.api.errors import APIError

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
INDEX = "index.html"

MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}

HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: "
                               "blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Revalidated on every load (an upgraded server serves new files at once), answered 304 when unchanged.
    "cache-control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def assets() -> dict[str, Asset]:
    found = {}
    for path in sorted(UI_DIR.rglob("*")):
        media_type = MEDIA_TYPES.get(path.suffix)
        if path.is_file() and media_type:
            body = path.read_bytes()
            found[path.relative_to(UI_DIR).as_posix()] = Asset(body, media_type,
                                                               '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return found


def _serve(request: Request, name: str) -> Response:
    asset = assets().get(name)
    if asset is None:
        raise APIError(404, f"No such dashboard file: '{name[:100]}'", param="asset", code="not_found")
    headers = {**HEADERS, "etag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


async def page(request: Request) -> Response:
    return _serve(request, INDEX)


async def asset(request: Request) -> Response:
    return _serve(request, request.path_params["asset"] or INDEX)


async def moved(request: Request) -> Response:
    # The one redirect the server makes: the page's relative links need the trailing slash.
    return RedirectResponse("/ui/", status_code=307)


routes = [
    Route("/", page, methods=["GET"]),
    Route("/ui", moved, methods=["GET"]),
    Route("/ui/{asset:path}", asset, methods=["GET"]),
]
