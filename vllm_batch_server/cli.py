"""`vllm-batch-server serve | models`.

Every flag also reads an environment variable (named in --help), so a service manager or container can
configure the server without a command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_batch_server.settings import DEFAULT_MODELS, ENV_PREFIX, Settings, default_cache_dir, default_data_dir


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(ENV_PREFIX + name, default)


def _flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, env: str, help: str,
          **kwargs: Any) -> None:
    default = kwargs.pop("default", None)
    conv = kwargs.get("type", str)
    raw = _env(env)
    if raw is not None:
        if kwargs.get("action") == "append":
            default = [m.strip() for m in raw.split(",") if m.strip()]
        elif kwargs.get("action") == argparse.BooleanOptionalAction:
            default = raw.strip().lower() in ("1", "true", "yes", "on")
        else:
            default = conv(raw)
    shown = f" (env {ENV_PREFIX}{env}"
    shown += f"; default {default!r})" if default not in (None, []) else ")"
    parser.add_argument(flag, default=default, help=help + shown, **kwargs)


def _engine_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-batch-server",
        description="Self-hosted, OpenAI-compatible Batch API on vLLM: durable, resumable batches.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server and the batch scheduler")
    _flag(serve, "--host", "HOST", "address to listen on", default="127.0.0.1")
    _flag(serve, "--port", "PORT", "port to listen on", type=int, default=4080)
    _flag(serve, "--data-dir", "DATA_DIR", "where the database, uploads and results live", type=Path,
          default=default_data_dir())
    _flag(serve, "--engine", "ENGINE", "what computes requests: vllm (the product) or echo (deterministic "
          "answers for dry runs and tests)", choices=["vllm", "echo"], default="vllm")
    _flag(serve, "--model", "MODELS", "a model to serve: an embedded default name, a Hugging Face id or a local "
          f"folder; repeat for several (env: comma-separated; default: {', '.join(DEFAULT_MODELS)})",
          dest="models", action="append")
    _flag(serve, "--api-key", "API_KEY", "require this Bearer token on every route but /health")
    _flag(serve, "--max-file-bytes", "MAX_FILE_BYTES", "largest accepted upload", type=int,
          default=512 * 1024 * 1024)
    _flag(serve, "--max-batch-lines", "MAX_BATCH_LINES", "most requests in one batch", type=int,
          default=50_000)
    _flag(serve, "--checkpoint-every", "CHECKPOINT_EVERY",
          "commit results durably every N results (at most 20 times a second)", type=int, default=500)
    _flag(serve, "--checkpoint-seconds", "CHECKPOINT_SECONDS", "... or every T seconds, whichever first",
          type=float, default=1.0)
    _flag(serve, "--checkpointing", "CHECKPOINTING", "fsync and commit results as they come (turn off only to "
          "measure what durability costs: a crash then loses the running batch's progress)", default=True,
          action=argparse.BooleanOptionalAction)
    _flag(serve, "--window", "WINDOW", "requests kept in flight (default: sized from the engine)", type=int)
    _flag(serve, "--prefix-lookahead", "PREFIX_LOOKAHEAD", "run requests that share a long prompt prefix "
          "together, looking this many input lines ahead, so the prefix cache keeps serving them (0: the "
          "file's order)", type=int, default=1024)
    _flag(serve, "--echo-delay", "ECHO_DELAY", "seconds the echo engine takes per request", type=float,
          default=0.0)
    _flag(serve, "--echo-fault", "ECHO_FAULT", "fault injection for reliability tests: comma-separated "
          "crash-after=N, hang-after=N (per engine start), times=K (faults in all), journal=PATH")
    _flag(serve, "--request-timeout", "REQUEST_TIMEOUT", "a request running longer than this many seconds "
          "counts as an engine hang", type=float, default=600.0)
    _flag(serve, "--engine-max-restarts", "ENGINE_MAX_RESTARTS", "engine failures tolerated per batch before "
          "it is failed (its committed results are kept)", type=int, default=3)
    engine = serve.add_argument_group("vLLM engine")
    _flag(engine, "--max-model-len", "MAX_MODEL_LEN", "context length", type=int)
    _flag(engine, "--gpu-memory-utilization", "GPU_MEMORY_UTILIZATION", "fraction of GPU memory for vLLM",
          type=float)
    _flag(engine, "--tensor-parallel-size", "TENSOR_PARALLEL_SIZE", "GPUs per model", type=int)
    _flag(engine, "--max-num-seqs", "MAX_NUM_SEQS", "sequences vLLM batches at once", type=int)
    _flag(engine, "--dtype", "DTYPE", "weights dtype (default: auto; float32 on CPU)")
    _flag(engine, "--prefix-caching", "PREFIX_CACHING", "vLLM prefix caching", default=True,
          action=argparse.BooleanOptionalAction)
    engine.add_argument("--engine-arg", dest="engine_args", action="append", type=_engine_arg, default=[],
                        metavar="KEY=VALUE", help="any other vllm AsyncEngineArgs field (repeatable)")
    _flag(engine, "--model-cache-dir", "MODEL_CACHE_DIR", "where embedded models are prepared", type=Path,
          default=default_cache_dir())

    models = sub.add_parser("models", help="list configured models and what is cached; prepare the defaults")
    models.add_argument("action", nargs="?", choices=["list", "prepare"], default="list")
    models.add_argument("--model", dest="models", action="append", help="a model name (repeatable)")
    models.add_argument("--model-cache-dir", type=Path,
                        default=Path(_env("MODEL_CACHE_DIR") or default_cache_dir()))
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir),
        engine=args.engine,
        models=list(args.models or DEFAULT_MODELS),
        api_key=args.api_key or None,
        max_file_bytes=args.max_file_bytes,
        max_batch_lines=args.max_batch_lines,
        checkpoint_every=args.checkpoint_every,
        checkpoint_seconds=args.checkpoint_seconds,
        checkpointing=args.checkpointing,
        window=args.window,
        prefix_lookahead=args.prefix_lookahead,
        echo_delay=args.echo_delay,
        echo_fault=args.echo_fault or None,
        request_timeout=args.request_timeout,
        engine_max_restarts=args.engine_max_restarts,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_seqs=args.max_num_seqs,
        dtype=args.dtype,
        enable_prefix_caching=args.prefix_caching,
        engine_args=dict(args.engine_args),
        model_cache_dir=Path(args.model_cache_dir),
    )


def serve(settings: Settings) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from vllm_batch_server.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=5)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve(settings_from_args(args))
    elif args.command == "models":
        from vllm_batch_server import models

        sys.exit(models.main(args.action, list(args.models or DEFAULT_MODELS), Path(args.model_cache_dir)))


if __name__ == "__main__":
    main()
