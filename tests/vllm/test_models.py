"""Model names → folders, and `vllm-batch-server models` (no engine started here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_batch_server.engines import model_files

pytestmark = pytest.mark.vllm


def test_embedded_models_resolve_to_prepared_local_folders(model_cache: Path) -> None:
    chat = model_files.resolve(model_files.SMOLLM2, model_cache)
    assert chat.local and chat.kind == "generate"
    assert (Path(chat.path) / "config.json").is_file() and (Path(chat.path) / "model.safetensors").is_file()
    embed = model_files.resolve(model_files.MINILM, model_cache)
    assert embed.local and embed.kind == "embed" and (Path(embed.path) / "config.json").is_file()


def test_unprepared_model_is_reported_with_the_command_that_fixes_it(tmp_path: Path) -> None:
    with pytest.raises(model_files.ModelNotAvailable, match="models prepare"):
        model_files.resolve(model_files.SMOLLM2, tmp_path / "empty-cache")


def test_other_names_are_local_folders_or_hub_ids(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    local = model_files.resolve(str(folder), tmp_path)
    assert local.local and local.path == str(folder.resolve()) and local.kind == "auto"
    hub = model_files.resolve("Qwen/Qwen2.5-0.5B-Instruct", tmp_path)
    assert not hub.local and hub.path == "Qwen/Qwen2.5-0.5B-Instruct"


def test_prepare_refuses_non_embedded_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an embedded model"):
        model_files.prepare("Qwen/Qwen2.5-0.5B-Instruct", tmp_path)


def test_models_cli_lists_configured_and_cached(model_cache: Path, tmp_path: Path) -> None:
    run = [sys.executable, "-m", "vllm_batch_server.cli", "models"]
    listed = subprocess.run([*run, "list", "--model-cache-dir", str(model_cache)], capture_output=True,
                            text=True, check=True).stdout
    status = {line.split()[0]: line.split()[1] for line in listed.splitlines() if line.startswith("  ")}
    assert status[model_files.SMOLLM2] == "ready" and status[model_files.MINILM] == "ready"
    empty = subprocess.run([*run, "--model-cache-dir", str(tmp_path)], capture_output=True, text=True,
                           check=True).stdout
    assert "not prepared" in empty
    # Preparing the package-backed model is instant and idempotent; it says where the model lives.
    prepared = subprocess.run([*run, "prepare", "--model", model_files.MINILM, "--model-cache-dir", str(tmp_path)],
                              capture_output=True, text=True, check=True).stdout
    assert "ready, used in place" in prepared


def test_models_cli_tells_whether_a_hub_id_is_in_the_hugging_face_cache(tmp_path: Path) -> None:
    import os

    # The Hugging Face cache layout: models--ORG--NAME/{refs/main, snapshots/<commit>/...}.
    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text("{}")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    listed = subprocess.run([sys.executable, "-m", "vllm_batch_server.cli", "models", "list", "--model",
                             "acme/tiny-chat", "--model", "acme/absent", "--model-cache-dir", str(tmp_path)],
                            capture_output=True, text=True, check=True, env=env).stdout
    status = {line.split()[0]: line for line in listed.splitlines() if line.startswith("  ")}
    assert "Hugging Face id, cached" in status["acme/tiny-chat"]
    assert "snapshots/0123abcd" in status["acme/tiny-chat"]
    assert "not in the Hugging Face cache" in status["acme/absent"]
