"""The vLLM release check (`nox -s vllm-compat -- VERSION`): runs only when asked for.

It needs a vLLM release installed and imports no device, so the nox session runs it in a throwaway venv with the
CUDA build of the release under test. The normal suites do not collect it (the real-engine tests cover the CPU
build already); run it by hand in any environment with vLLM with `VLLM_BATCH_COMPAT_CHECK=1 pytest
tests/vllm_compat`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("VLLM_BATCH_COMPAT_CHECK") != "1":
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def _every_test_is_a_vllm_test(request: pytest.FixtureRequest) -> None:
    request.applymarker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Where the embedded SmolLM2 folder is prepared (the server's default cache, or
    VLLM_BATCH_COMPAT_MODEL_CACHE): converted once if missing, about 30 s."""
    from vllm_batch_server.engines import model_files
    from vllm_batch_server.settings import default_cache_dir

    cache = Path(os.environ.get("VLLM_BATCH_COMPAT_MODEL_CACHE") or default_cache_dir())
    for name in (model_files.SMOLLM2, model_files.MINILM):
        model_files.prepare(name, cache)
    return cache
