"""Every knob of the server in one object, filled from CLI flags, then `BATCH_SERVER_*` env vars, then defaults.

The env prefix is deliberately not `VLLM_`: vLLM warns about every unknown `VLLM_*` variable it sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "BATCH_SERVER_"

# Served when no --model is given: the two small real models that PyPI packages carry (see models.py).
DEFAULT_MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vllm-batch"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vllm-batch"


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 4080
    data_dir: Path = field(default_factory=default_data_dir)
    engine: str = "vllm"
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    api_key: str | None = None

    # Limits, as OpenAI's where OpenAI has one.
    max_file_bytes: int = 512 * 1024 * 1024
    max_batch_lines: int = 50_000
    max_errors_reported: int = 100

    # Durability: results are fsynced and committed every N results or T seconds, whichever comes first.
    checkpoint_every: int = 500
    checkpoint_seconds: float = 1.0
    checkpointing: bool = True  # off only for benchmarks that measure what checkpointing costs

    # How many requests the runner keeps in flight; None sizes it from the engine.
    window: int | None = None
    # Requests sharing a long prompt prefix are run together within this many input lines (0: file order).
    prefix_lookahead: int = 1024
    # Engine failures tolerated per batch before it is failed (its committed results are kept).
    engine_max_restarts: int = 3
    # A single request taking longer than this is treated as an engine hang.
    request_timeout: float = 600.0

    # Echo engine.
    echo_delay: float = 0.0
    # Opt-in fault injection for reliability tests, e.g. "crash-after=20" or "hang-after=5,times=1"
    # (see engines/echo.py). Never set in production.
    echo_fault: str | None = None

    # vLLM engine.
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int | None = None
    max_num_seqs: int | None = None
    dtype: str | None = None
    enable_prefix_caching: bool = True
    engine_args: dict[str, Any] = field(default_factory=dict)
    model_cache_dir: Path = field(default_factory=default_cache_dir)

    # How often the scheduler looks for expired batches and files.
    sweep_seconds: float = 1.0

    @property
    def db_path(self) -> Path:
        return self.data_dir / "vllm-batch.sqlite3"
