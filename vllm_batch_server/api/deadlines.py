"""The body idle deadline: a request body that sends nothing for `body_idle_timeout` seconds while its handler
waits for it ends the request.

The clock runs only while the handler is waiting for the client (inside `receive`), and restarts with every
piece of body that arrives, so an upload that keeps making progress, however slowly, is never cut off, and a
handler busy writing to a slow disk is never mistaken for a silent client. When the deadline passes, the handler
is told the client disconnected (so an upload drops its partial file, exactly as for a real disconnect), its own
answer to that is dropped, and the client gets a 408 in OpenAI's error shape, sent once the handler has cleaned
up, with `connection: close`.

Connection-level deadlines (headers, keep-alive, the connection cap) are in connections.py.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_batch_server.api.errors import error_response


class BodyIdleTimeout:
    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = answered = timed_out = False

        async def receive_before_deadline() -> Message:
            nonlocal body_done, timed_out
            if body_done or answered or timed_out:
                # After the body (or once answering) a handler only listens for a disconnect: no deadline.
                return await receive()
            # Not asyncio.wait_for: before Python 3.12 it can swallow a cancel of the handler (a shutdown) that
            # lands just as a piece of body arrives.
            receiving = asyncio.ensure_future(receive())
            try:
                done, _ = await asyncio.wait([receiving], timeout=self.seconds)
            finally:
                if not receiving.done():
                    receiving.cancel()
            if not done:
                timed_out = True
                return {"type": "http.disconnect"}
            message = receiving.result()
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def send_unless_timed_out(message: Message) -> None:
            nonlocal answered
            if timed_out:
                return  # the handler's answer to what it took for a disconnect: the 408 below replaces it
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_before_deadline, send_unless_timed_out)
        except Exception:
            if not timed_out:
                raise
            # A handler that lets the "disconnect" escape (rather than refusing the request) ends the same way.
        if timed_out and not answered:
            response = error_response(
                408, f"The request body sent nothing for {self.seconds:g} seconds; the request was dropped and "
                "nothing of it was stored.", type="invalid_request_error", code="request_timeout",
                headers={"connection": "close"})
            await response(scope, receive, send)
