"""The engine that runs in this process (vLLM or echo), by kind.

A module of its own, not in engines/__init__.py: a Ray replica (ray.py) builds one, and the package's
`create_engine` builds the replicas, so living in the package would make ray.py and the package import each
other.
"""

from __future__ import annotations

from vllm_batch_server.engines.base import Engine
from vllm_batch_server.settings import Settings


def in_process_engine(settings: Settings, kind: str) -> Engine:
    if kind == "echo":
        from vllm_batch_server.engines.echo import EchoEngine

        return EchoEngine(settings)
    # Imported only here: vLLM takes seconds to import and is absent from client-only installs.
    from vllm_batch_server.engines.vllm import VLLMEngine

    return VLLMEngine(settings)
