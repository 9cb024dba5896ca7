"""Every module of both packages imports on this Python.

CI runs each fast test on one of the two Pythons it checks (3.10 and 3.13, halves split by time): this test
runs on both, so a module that only one of them can import (new syntax, a standard-library name that moved)
fails on that one even when no test of that module landed in its half.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import vllm_batch
import vllm_batch_server

# vLLM, Ray and psycopg are imported where they are used, so these import without the optional extras too.
MODULES = sorted(
    info.name
    for package in (vllm_batch, vllm_batch_server)
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.")
)


def test_both_packages_have_their_modules() -> None:
    assert "vllm_batch._core" in MODULES and "vllm_batch_server.app" in MODULES
    assert "vllm_batch_server.engines.vllm" in MODULES and "vllm_batch_server.store.database" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name: str) -> None:
    importlib.import_module(name)
