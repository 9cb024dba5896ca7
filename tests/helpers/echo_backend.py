"""A stand-in OpenAI-compatible backend for the router's tests and benchmarks: our EchoEngine behind
/v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models, as a separate process.

    python -m tests.helpers.echo_backend --port 8001 --model echo-model --delay 0.05 --journal j.jsonl

Until the server's own online endpoints exist (`vllm-batch-server serve --engine echo` will then be the echo
backend), this is the smallest real HTTP server that answers like one. Fault injection for the tests:
`--api-key` (require that Bearer token), `--hang-after N` (requests after the N-th never answer while
/v1/models still does: a wedged engine behind a live API server), `--overload-first N` (answer the first N
requests 429 with Retry-After). The journal gets one JSON line when a request starts and one when it is
answered: `{"event": "start"|"done", "id": X-Request-Id, "auth": bool}` (written with O_APPEND, so a kill -9
loses none).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vllm_batch_server.engines.echo import EchoEngine
from vllm_batch_server.settings import Settings


async def sse(answer: dict[str, Any], pause: float) -> AsyncIterator[bytes]:
    """A finished chat or completion answer as server-sent events, a word per event, as `vllm serve` streams."""
    head = {key: answer[key] for key in ("id", "created", "model")}
    chat = answer["object"] == "chat.completion"
    choice = answer["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    words = text.split(" ")
    for n, word in enumerate(words):
        piece = word if n == 0 else " " + word
        finish = choice["finish_reason"] if n == len(words) - 1 else None
        event = ({**head, "object": "chat.completion.chunk",
                  "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": finish}]} if chat else
                 {**head, "object": "text_completion", "choices": [{"index": 0, "text": piece,
                                                                    "finish_reason": finish}]})
        yield b"data: " + json.dumps(event).encode() + b"\n\n"
        await asyncio.sleep(pause)
    yield b"data: [DONE]\n\n"


def build_app(args: argparse.Namespace) -> Starlette:
    engines: dict[str, EchoEngine] = {}
    for model in args.model:
        engine = EchoEngine(Settings(engine="echo", models=[model], echo_delay=args.delay))
        asyncio.run(engine.start(model))  # sets the model; no I/O
        engines[model] = engine
    journal = os.open(args.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if args.journal else None
    counter = {"requests": 0}

    def note(event: str, request_id: str, auth: bool) -> None:
        if journal is not None:
            os.write(journal, (json.dumps({"event": event, "id": request_id, "auth": auth,
                                           "pid": os.getpid()}) + "\n").encode())

    def authorized(request: Request) -> bool:
        return args.api_key is None or request.headers.get("authorization") == f"Bearer {args.api_key}"

    def refused() -> Response:
        return JSONResponse({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                       "param": None, "code": "invalid_api_key"}}, status_code=401)

    async def models(request: Request) -> Response:
        if not authorized(request):
            return refused()
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "echo-backend"} for name in engines]})

    async def compute(request: Request) -> Response:
        if not authorized(request):
            return refused()
        request_id = request.headers.get("x-request-id") or f"anon-{counter['requests']}"
        auth = "authorization" in request.headers
        counter["requests"] += 1
        number = counter["requests"]
        if args.overload_first and number <= args.overload_first:
            return JSONResponse({"error": {"message": "busy", "type": "server_error", "param": None,
                                           "code": None}}, status_code=429, headers={"Retry-After": "0.2"})
        body: Any = await request.json()
        note("start", request_id, auth)
        if args.hang_after is not None and number > args.hang_after:
            await asyncio.Event().wait()
        engine = engines.get(body.get("model")) if isinstance(body, dict) else None
        if engine is None:
            return JSONResponse({"error": {"message": f"The model {body.get('model')!r} does not exist.",
                                           "type": "NotFoundError", "param": "model", "code": 404}},
                                status_code=404)
        # The whole answer first (the engine's own `run` refuses "stream"), then cut into events below with
        # this backend's pace between them.
        whole = {key: value for key, value in body.items() if key not in ("stream", "stream_options")}
        result = await engine.run(request_id, request.url.path, whole)
        note("done", request_id, auth)
        if body.get("stream") and result.ok:
            return StreamingResponse(sse(result.body, args.delay), media_type="text/event-stream")
        return JSONResponse(result.body, status_code=result.status_code)

    routes = [Route("/v1/models", models, methods=["GET"])]
    routes += [Route(path, compute, methods=["POST"])
               for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")]
    return Starlette(routes=routes)


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--journal", default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--hang-after", type=int, default=None)
    parser.add_argument("--overload-first", type=int, default=0)
    args = parser.parse_args(argv)
    args.model = args.model or ["echo-model", "echo-embed"]
    uvicorn.run(build_app(args), host=args.host, port=args.port, log_level="warning", backlog=4096)


if __name__ == "__main__":
    main()
