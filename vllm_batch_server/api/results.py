"""GET /v1/batches/{id}/output and /errors: a batch's committed result lines, while it runs and after it ended
(an extension of OpenAI's API; see partial.py and docs/results.md).

`after_line=N` skips the first N lines, `limit=M` returns at most M more; the JSONL body is streamed and the
`x-next-line` header says where to continue. `x-batch-status` is the batch's status when the committed size was
read: once it is terminal, the lines up to `x-next-line` are all there will ever be below it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from vllm_batch_server import ids
from vllm_batch_server.api.context import context
from vllm_batch_server.api.errors import APIError, not_found
from vllm_batch_server.api.params import checked_id, query_int
from vllm_batch_server.results.partial import Kind, LineRange, ResultsGone, TryAgain

DEFAULT_LIMIT = 1000
MAX_LIMIT = 100_000
MAX_LINE = 10**12
MEDIA_TYPE = "application/jsonl"


async def _stream(lines: LineRange) -> AsyncIterator[bytes]:
    chunks = lines.chunks()
    try:
        while True:
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                return
            yield chunk
    finally:
        lines.close()


async def _committed(request: Request, kind: Kind) -> Response:
    ctx = context(request)
    raw = request.path_params["batch_id"]
    batch_id = checked_id(raw, ids.is_batch_id(raw), "Batch")
    after_line = query_int(request, "after_line", 0, 0, MAX_LINE)
    limit = query_int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    results = ctx.results
    try:
        fd, size, status = await results.open(batch_id, kind)
    except KeyError:
        raise not_found("Batch", batch_id) from None
    except ResultsGone as exc:
        raise APIError(404, f"The {'output' if kind == 'output' else 'error'} file {exc.file_id} of batch "
                       f"{batch_id} was deleted.", param="batch_id", code="file_not_found") from None
    except TryAgain:
        raise APIError(503, "The batch's results are being moved; retry in a moment.", type="server_error",
                       code="try_again") from None
    lines = await asyncio.to_thread(results.locate, batch_id, kind, fd, size, status, after_line, limit)
    headers = {"x-next-line": str(lines.next_line), "x-batch-status": lines.status.value,
               "cache-control": "no-store"}
    return StreamingResponse(_stream(lines), media_type=MEDIA_TYPE, headers=headers)


async def batch_output(request: Request) -> Response:
    return await _committed(request, "output")


async def batch_errors(request: Request) -> Response:
    return await _committed(request, "errors")


routes = [
    Route("/v1/batches/{batch_id:str}/output", batch_output, methods=["GET"]),
    Route("/v1/batches/{batch_id:str}/errors", batch_errors, methods=["GET"]),
]
