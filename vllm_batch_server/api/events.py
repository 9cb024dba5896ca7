"""GET /v1/events and GET /v1/events/stream: the lifecycle's event log over HTTP (our extension).

The list is for catching up: a page of events oldest first, `after` a `seq`. The stream is server-sent events,
one message per event with its `seq` as the message id, so a client that reconnects (a browser's EventSource,
or the dashboard's own reader, which needs fetch to send the API key as a header) resumes with
`Last-Event-ID` and misses nothing in between. The log is durable, so a resume works across server restarts.

A stream ends as soon as its client goes away or the server begins to shut down: an open dashboard must not
hold a restart for the whole graceful-shutdown timeout, nor a dead tab keep a task alive.
"""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from vllm_batch_server import ids
from vllm_batch_server.api.context import context
from vllm_batch_server.api.errors import bad_request
from vllm_batch_server.api.params import query_int
from vllm_batch_server.store.events import EventLog
from vllm_batch_server.store.lifecycle import Event
from vllm_batch_server.store.schemas import event_object

MAX_SEQ = 2**63 - 1
MAX_LIMIT = 1000
# A comment line this often when nothing happens: proxies keep the connection, and a vanished client that
# sent no FIN is found by the failing write.
HEARTBEAT_SECONDS = 15.0
# How long a browser's EventSource waits before reconnecting after the stream ends.
RECONNECT_MS = 2000


async def list_events(request: Request) -> Response:
    ctx = context(request)
    after = query_int(request, "after", 0, 0, MAX_SEQ)
    limit = query_int(request, "limit", 100, 1, MAX_LIMIT)
    batch_id = request.query_params.get("batch_id") or None
    if batch_id is not None and not ids.is_batch_id(batch_id):
        raise bad_request(f"Invalid 'batch_id' {batch_id[:100]!r}.", "batch_id")
    events = await ctx.events.after(after, limit + 1, batch_id)
    data = [event_object(event) for event in events[:limit]]
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": len(events) > limit})


async def stream_events(request: Request) -> Response:
    ctx = context(request)
    resume = request.headers.get("last-event-id")
    if resume is not None:
        if not resume.isdigit() or int(resume) > MAX_SEQ:
            raise bad_request(f"Invalid 'Last-Event-ID' header {resume[:50]!r}: expected an event's seq.",
                              "Last-Event-ID")
        after = int(resume)
    elif "after" in request.query_params:
        after = query_int(request, "after", 0, 0, MAX_SEQ)
    else:
        after = await ctx.events.last_seq()  # only what happens from now on
    return EventStream(ctx.events, after, ctx.closing)


def encode(event: Event) -> bytes:
    body = json.dumps(event_object(event), separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.type}\ndata: {body}\n\n".encode()


class EventStream(Response):
    """An ASGI response that sends the events after `after` as they are appended, until the client leaves
    or `closing` is set."""

    def __init__(self, log: EventLog, after: int, closing: asyncio.Event,
                 heartbeat: float = HEARTBEAT_SECONDS) -> None:
        # Not Response.__init__: there is no body to render, only the ASGI call below.
        self.background = None
        self._log = log
        self._after = after
        self._closing = closing
        self._heartbeat = heartbeat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # nginx: pass each message on at once
        ]})
        gone = asyncio.ensure_future(_disconnected(receive))
        closing = asyncio.ensure_future(self._closing.wait())
        position = self._after
        try:
            chunk = f"retry: {RECONNECT_MS}\n\n".encode()
            while True:
                if not await _sent(send, chunk):
                    return
                fetch = asyncio.ensure_future(self._log.wait_after(position, self._heartbeat))
                await asyncio.wait([fetch, gone, closing], return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    break
                events = fetch.result()
                if events:
                    position = events[-1].seq
                    chunk = b"".join(encode(event) for event in events)
                else:
                    chunk = b": keep-alive\n\n"
            if not gone.done():
                await _sent(send, b"", more=False)
        finally:
            gone.cancel()
            closing.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _sent(send: Send, chunk: bytes, *, more: bool = True) -> bool:
    """False when the client has gone (servers of ASGI 2.4 raise on a write to a closed connection)."""
    try:
        await send({"type": "http.response.body", "body": chunk, "more_body": more})
    except OSError:
        return False
    return True


routes = [
    Route("/v1/events", list_events, methods=["GET"]),
    Route("/v1/events/stream", stream_events, methods=["GET"]),
]
