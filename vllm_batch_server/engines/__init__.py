"""Engines compute requests; the scheduler picks one by name (see base.py for the contract)."""

from __future__ import annotations

from vllm_batch_server.engines.base import Engine, EngineError, Result, Usage
from vllm_batch_server.settings import Settings

__all__ = ["Engine", "EngineError", "Result", "Usage", "create_engine"]


def create_engine(settings: Settings) -> Engine:
    if settings.engine == "echo":
        from vllm_batch_server.engines.echo import EchoEngine

        return EchoEngine(settings)
    if settings.engine == "vllm":
        # Imported only here: vLLM takes seconds to import and is absent from client-only installs.
        from vllm_batch_server.engines.vllm import VLLMEngine

        return VLLMEngine(settings)
    raise ValueError(f"unknown engine {settings.engine!r}; expected 'vllm' or 'echo'")
