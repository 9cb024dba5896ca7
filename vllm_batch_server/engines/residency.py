"""How several resident models share the machine's memory (`--max-loaded-models N`), and whether they fit.

Each resident model has an engine of its own, and each vLLM engine sizes its memory as if it were alone, so
the server splits it:

- on CPU, the KV cache space: VLLM_CPU_KVCACHE_SPACE (GiB, the user's total) or our default, divided by N and
  given to each engine as `kv_cache_memory_bytes`;
- on a GPU, `gpu_memory_utilization` (vLLM's default 0.9), divided by N: vLLM takes it as this engine's
  fraction of the GPU, so N engines of 0.9/N each share one as one engine of 0.9 would.

A value given per engine with `--engine-arg` (kv_cache_memory_bytes, gpu_memory_utilization) is used as it
is. With one model (the default) nothing is split and nothing is checked here: vLLM sizes its one engine as
it always has.

`check_fit` refuses to start, naming the numbers, when the split cannot work: a model whose one longest
sequence needs more KV cache than its share, or weights and KV caches that need more memory than the machine
has available. The facts it checks against (`Machine`, `Footprint`) are read by `machine()` and
`footprint()`, and passed in, so the arithmetic is tested without a GPU.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vllm_batch_server.engines import model_files
from vllm_batch_server.settings import Settings, SettingsError

log = logging.getLogger(__name__)

GiB = 2**30
# vLLM's default KV cache on CPU is sized from total memory; a batch server on a shared machine takes a
# bounded slice unless told otherwise (GiB): all resident models together, with several.
CPU_KVCACHE_GIB_SMALL = 1  # machines under 12 GiB
CPU_KVCACHE_GIB = 2
# vLLM's own default for gpu_memory_utilization.
GPU_MEMORY_UTILIZATION = 0.9
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}


def default_cpu_kvcache_gib(total_bytes: int) -> int:
    return CPU_KVCACHE_GIB if total_bytes >= 12 * GiB else CPU_KVCACHE_GIB_SMALL


def cpu_kvcache_budget(total_bytes: int) -> int:
    """Bytes of KV cache for all resident models together on CPU: VLLM_CPU_KVCACHE_SPACE (GiB) if the user set
    it, else our default. Raises SettingsError for a value vLLM would not take."""
    raw = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
    if not raw:
        return default_cpu_kvcache_gib(total_bytes) * GiB
    try:
        gib = int(raw)
    except ValueError:
        raise SettingsError(f"VLLM_CPU_KVCACHE_SPACE={raw!r} is not a whole number of GiB") from None
    if gib <= 0:
        raise SettingsError(f"VLLM_CPU_KVCACHE_SPACE={raw!r}: the KV cache space must be at least 1 GiB")
    return gib * GiB


def cpu_kv_share(settings: Settings, total_bytes: int) -> int | None:
    """Each resident engine's KV cache on CPU, in bytes; None with one model, or when `--engine-arg
    kv_cache_memory_bytes=...` sets it per engine."""
    if settings.max_loaded_models <= 1 or "kv_cache_memory_bytes" in settings.engine_args:
        return None
    return cpu_kvcache_budget(total_bytes) // settings.max_loaded_models


def gpu_share(settings: Settings) -> float | None:
    """Each resident engine's gpu_memory_utilization; None with one model, or when `--engine-arg
    gpu_memory_utilization=...` sets it per engine."""
    if settings.max_loaded_models <= 1 or "gpu_memory_utilization" in settings.engine_args:
        return None
    return (settings.gpu_memory_utilization or GPU_MEMORY_UTILIZATION) / settings.max_loaded_models


@dataclass(frozen=True)
class Machine:
    cpu: bool  # vLLM runs on CPU (its KV cache in RAM) rather than on GPUs
    total_bytes: int  # RAM on CPU; one GPU's memory on a GPU
    available_bytes: int | None  # RAM available now on CPU (None: unknown); unused on a GPU


@dataclass(frozen=True)
class Footprint:
    """What one model needs, as far as its folder tells (None: unknown, not checked)."""

    name: str
    weights_bytes: int | None  # in memory, at the dtype it will run in
    kv_bytes_per_token: int | None  # None for models without a KV cache (encoder-only embedding models)
    max_len: int | None  # the longest sequence it will be given


def check_fit(settings: Settings, machine: Machine, models: list[Footprint]) -> None:
    """Raise SettingsError naming the numbers when `--max-loaded-models` models cannot share this machine."""
    n = settings.max_loaded_models
    if n <= 1:
        return
    largest = sorted((m for m in models if m.weights_bytes is not None), key=lambda m: m.weights_bytes or 0,
                     reverse=True)[:n]
    if machine.cpu:
        share = cpu_kv_share(settings, machine.total_bytes)
        given = _number(settings.engine_args.get("kv_cache_memory_bytes"))
        if share is None and given is None:
            return  # a form vLLM parses and we do not: vLLM checks it at load
        per_engine = share if share is not None else int(given or 0)
        source = (f"VLLM_CPU_KVCACHE_SPACE {cpu_kvcache_budget(machine.total_bytes) // GiB} GiB / {n}"
                  if share is not None else "--engine-arg kv_cache_memory_bytes")
        for model in models:
            if model.kv_bytes_per_token is None or model.max_len is None:
                continue
            needed = model.kv_bytes_per_token * model.max_len
            if needed > per_engine:
                raise SettingsError(
                    f"--max-loaded-models {n}: model {model.name!r} needs {_gib(needed)} of KV cache for one "
                    f"sequence of {model.max_len} tokens, but each engine gets {_gib(per_engine)} ({source}); "
                    "lower --max-loaded-models or --max-model-len, or raise VLLM_CPU_KVCACHE_SPACE")
        weights = sum(m.weights_bytes or 0 for m in largest)
        needed_total = n * per_engine + weights
        if machine.available_bytes is not None and needed_total > machine.available_bytes:
            raise SettingsError(
                f"--max-loaded-models {n} does not fit in memory: {n} KV caches of {_gib(per_engine)} and the "
                f"weights of the {len(largest)} largest models ({_gib(weights)}) need {_gib(needed_total)}, and "
                f"{_gib(machine.available_bytes)} of {_gib(machine.total_bytes)} is available (each engine "
                "process needs some more besides); lower --max-loaded-models or VLLM_CPU_KVCACHE_SPACE")
        return
    utilization = gpu_share(settings)
    if utilization is None:
        utilization = _number(settings.engine_args.get("gpu_memory_utilization"))
        if utilization is None:
            return
    gpus = (settings.tensor_parallel_size or 1) * (settings.pipeline_parallel_size or 1)
    room = utilization * machine.total_bytes
    for model in largest:
        assert model.weights_bytes is not None
        per_gpu = model.weights_bytes // gpus
        if per_gpu >= room:
            raise SettingsError(
                f"--max-loaded-models {n}: the weights of {model.name!r} ({_gib(per_gpu)} per GPU) do not fit in "
                f"its share of the GPU ({utilization:.2f} of {_gib(machine.total_bytes)} = {_gib(room)}), let "
                "alone its KV cache; lower --max-loaded-models, raise --gpu-memory-utilization or spread each "
                "model over more GPUs (--tensor-parallel-size)")


def _number(value: object) -> float | None:
    """A number given with --engine-arg (JSON), or None for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _gib(value: int | float) -> str:
    return f"{value / GiB:.2f} GiB"


def machine() -> Machine:
    """This machine as vLLM will use it. Imports vLLM's platform (seconds): only asked with several models."""
    from vllm_batch_server.engines.vllm_compat import load

    platform = load("current_platform")
    if platform.is_cpu():
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return Machine(cpu=True, total_bytes=total, available_bytes=_mem_available())
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return Machine(cpu=False, total_bytes=int(total), available_bytes=int(free))


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def footprint(name: str, settings: Settings, *, cpu: bool) -> Footprint:
    """What a configured model needs, read from its folder (a model not on this machine yet: unknown)."""
    try:
        resolved = model_files.resolve(name, settings.model_cache_dir)
    except model_files.ModelNotAvailable:
        return Footprint(name, None, None, None)
    if not resolved.local:
        return Footprint(name, None, None, None)
    folder = Path(resolved.path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    stored = _DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or ""))
    runs = _DTYPE_BYTES.get(settings.dtype or ("float32" if cpu else "")) or stored
    weights: int | None = sum(path.stat().st_size for path in folder.iterdir()
                              if path.is_file() and path.name.endswith(_WEIGHT_FILES))
    if weights == 0:
        weights = None
    elif weights is not None and stored and runs and not any(folder.glob("*.gguf")):
        weights = weights * runs // stored
    return Footprint(name, weights, _kv_bytes_per_token(resolved, config, runs or 2),
                     _max_len(settings, config))


def _kv_bytes_per_token(resolved: model_files.ResolvedModel, config: dict[str, object],
                        dtype_bytes: int) -> int | None:
    """Keys and values of every layer for one token; None for a model without a KV cache (or unknown)."""
    architectures = config.get("architectures")
    names = [str(a) for a in architectures] if isinstance(architectures, list) else []
    decoder = resolved.kind == "generate" or (resolved.kind == "auto" and any(
        a.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")) for a in names))
    if not decoder:
        return None
    layers, heads = config.get("num_hidden_layers"), config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    if not (isinstance(layers, int) and isinstance(heads, int) and heads > 0 and isinstance(hidden, int)):
        return None
    kv_heads = config.get("num_key_value_heads")
    kv_heads = kv_heads if isinstance(kv_heads, int) and kv_heads > 0 else heads
    head_dim = config.get("head_dim")
    head_dim = head_dim if isinstance(head_dim, int) and head_dim > 0 else hidden // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def _max_len(settings: Settings, config: dict[str, object]) -> int | None:
    limit = config.get("max_position_embeddings")
    declared = limit if isinstance(limit, int) and limit > 0 else None
    if settings.max_model_len is not None:
        return min(settings.max_model_len, declared) if declared else settings.max_model_len
    return declared


def check_settings(settings: Settings) -> None:
    """With several resident vLLM models: refuse to start, naming the numbers, when they cannot fit; with
    sleeping models, where vLLM has no sleep mode."""
    if settings.engine != "vllm" or settings.backends:
        return
    if settings.max_sleeping_models > 0:
        from vllm_batch_server.engines.vllm_compat import load

        platform = load("current_platform")
        if not platform.is_sleep_mode_available():
            raise SettingsError(f"--max-sleeping-models needs vLLM's sleep mode, which vLLM does not have on this "
                                f"platform ({'CPU' if platform.is_cpu() else platform.device_name}); it runs on "
                                "CUDA, ROCm and XPU GPUs")
    if settings.max_loaded_models <= 1:
        return
    facts = machine()
    check_fit(settings, facts, [footprint(name, settings, cpu=facts.cpu) for name in settings.models])
    if facts.cpu:
        share = cpu_kv_share(settings, facts.total_bytes)
        if share is not None:
            log.info("%d models may be loaded side by side, each with %s of KV cache", settings.max_loaded_models,
                     _gib(share))
    else:
        log.info("%d models may be loaded side by side, each with gpu_memory_utilization %.2f",
                 settings.max_loaded_models, gpu_share(settings) or 0)
