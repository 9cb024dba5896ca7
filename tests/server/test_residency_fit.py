"""How several resident models split the memory, and the check at start that refuses what cannot fit
(engines/residency.py): the arithmetic, on facts given in, so the GPU side is tested without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_batch_server.engines import residency
from vllm_batch_server.engines.residency import Footprint, GiB, Machine, check_fit
from vllm_batch_server.settings import Settings, SettingsError

SMALL_CHAT = Footprint("chat", weights_bytes=540 * 2**20, kv_bytes_per_token=46_080, max_len=1024)
EMBEDDINGS = Footprint("embed", weights_bytes=90 * 2**20, kv_bytes_per_token=None, max_len=256)
CPU = Machine(cpu=True, total_bytes=24 * GiB, available_bytes=16 * GiB)


@pytest.fixture(autouse=True)
def no_kv_space(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)


def test_one_model_splits_nothing_and_checks_nothing() -> None:
    settings = Settings()
    assert residency.cpu_kv_share(settings, 24 * GiB) is None and residency.gpu_share(settings) is None
    check_fit(settings, Machine(cpu=True, total_bytes=GiB, available_bytes=0), [SMALL_CHAT])


def test_the_cpu_kv_cache_space_is_split(monkeypatch: pytest.MonkeyPatch) -> None:
    two = Settings(max_loaded_models=2)
    assert residency.cpu_kv_share(two, 24 * GiB) == GiB  # the 2 GiB default, halved
    assert residency.cpu_kv_share(two, 8 * GiB) == GiB // 2  # 1 GiB on a small machine
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "6")
    assert residency.cpu_kv_share(Settings(max_loaded_models=3), 24 * GiB) == 2 * GiB
    assert residency.cpu_kv_share(Settings(max_loaded_models=2, engine_args={"kv_cache_memory_bytes": 5}),
                                  24 * GiB) is None  # set per engine by hand
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "lots")
    with pytest.raises(SettingsError, match="VLLM_CPU_KVCACHE_SPACE='lots'"):
        residency.cpu_kv_share(two, 24 * GiB)


def test_the_gpu_memory_utilization_is_split() -> None:
    assert residency.gpu_share(Settings(max_loaded_models=2)) == pytest.approx(0.45)
    assert residency.gpu_share(Settings(max_loaded_models=4, gpu_memory_utilization=0.8)) == pytest.approx(0.2)
    assert residency.gpu_share(Settings(max_loaded_models=2, engine_args={"gpu_memory_utilization": 0.3})) is None


def test_two_small_models_fit_on_this_kind_of_machine() -> None:
    check_fit(Settings(max_loaded_models=2), CPU, [SMALL_CHAT, EMBEDDINGS])


def test_a_sequence_longer_than_an_engines_kv_share_is_refused() -> None:
    long = Footprint("chat", 540 * 2**20, 46_080, max_len=32_768)  # 1.41 GiB for one sequence
    with pytest.raises(SettingsError) as refused:
        check_fit(Settings(max_loaded_models=2), CPU, [long, EMBEDDINGS])
    assert str(refused.value) == (
        "--max-loaded-models 2: model 'chat' needs 1.41 GiB of KV cache for one sequence of 32768 tokens, but "
        "each engine gets 1.00 GiB (VLLM_CPU_KVCACHE_SPACE 2 GiB / 2); lower --max-loaded-models or "
        "--max-model-len, or raise VLLM_CPU_KVCACHE_SPACE")


def test_caches_and_weights_beyond_the_available_memory_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "12")
    big = Footprint("big", 5 * GiB, 46_080, 1024)
    with pytest.raises(SettingsError, match=r"--max-loaded-models 2 does not fit in memory: 2 KV caches of 6\.00 "
                       r"GiB and the weights of the 2 largest models \(5\.53 GiB\) need 17\.53 GiB, and 16\.00 GiB "
                       r"of 24\.00 GiB is available"):
        check_fit(Settings(max_loaded_models=2), CPU, [big, SMALL_CHAT, EMBEDDINGS])


def test_weights_beyond_a_models_share_of_the_gpu_are_refused() -> None:
    gpu = Machine(cpu=False, total_bytes=24 * GiB, available_bytes=None)
    eight_b = Footprint("8b", 16 * GiB, None, None)
    check_fit(Settings(max_loaded_models=2), Machine(cpu=False, total_bytes=80 * GiB, available_bytes=None),
              [eight_b, SMALL_CHAT])
    with pytest.raises(SettingsError, match=r"the weights of '8b' \(16\.00 GiB per GPU\) do not fit in its share "
                       r"of the GPU \(0\.45 of 24\.00 GiB = 10\.80 GiB\)"):
        check_fit(Settings(max_loaded_models=2), gpu, [eight_b, SMALL_CHAT])
    # Split over two GPUs each, it fits.
    check_fit(Settings(max_loaded_models=2, tensor_parallel_size=2), gpu, [eight_b, SMALL_CHAT])


def test_a_models_footprint_is_read_from_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "hidden_size": 576, "head_dim": 64, "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    (folder / "tokenizer.json").write_bytes(b"{}" * 100)  # not weights
    settings = Settings(models=[str(folder)], max_model_len=2048, model_cache_dir=tmp_path)
    on_cpu = residency.footprint(str(folder), settings, cpu=True)
    # float32 on CPU: bf16 weights take twice their file; keys and values of 30 layers x 3 heads x 64, 4 bytes.
    assert on_cpu == Footprint(str(folder), 2000, 2 * 30 * 3 * 64 * 4, 2048)
    on_gpu = residency.footprint(str(folder), settings, cpu=False)
    assert on_gpu == Footprint(str(folder), 1000, 2 * 30 * 3 * 64 * 2, 2048)
    # Not on this machine (a hub id not downloaded): nothing known, nothing checked.
    assert residency.footprint("org/not-here", settings, cpu=True) == Footprint("org/not-here", None, None, None)
