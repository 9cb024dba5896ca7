"""Several resident models on a CPU each compute on cores of their own (engines/cpu_cores.py).

The arithmetic runs on described machines; the topology reader on a sysfs tree written here, and on this
machine's own. That the engines' workers really end up on separate cores is checked with real vLLM in
tests/vllm/test_crash.py (two resident models, their workers' thread affinities)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from vllm_batch_server.engines import cpu_cores, vllm_compat
from vllm_batch_server.engines import vllm as vllm_engine
from vllm_batch_server.engines.cpu_cores import CoreShares, Cpu, read_topology, split
from vllm_batch_server.settings import Settings


def cores(count: int, *, nodes: int = 1, smt: int = 1) -> list[Cpu]:
    """`count` physical cores spread evenly over `nodes`, each with `smt` logical CPUs numbered as Linux does
    (the siblings of core c are c, c + count, ...)."""
    per_node = count // nodes
    return [Cpu(core + thread * count, (0, core), core // per_node) for thread in range(smt) for core in range(count)]


def test_two_models_on_two_cores_get_one_core_each() -> None:
    assert split(cores(2), 2) == ["0", "1"]


def test_one_model_is_left_to_vllm() -> None:
    assert split(cores(16), 1) is None


def test_fewer_cores_than_models_is_left_to_vllm() -> None:
    assert split(cores(2), 3) is None
    assert split(cores(1), 2) is None


def test_a_core_is_kept_back_once_each_model_would_have_more_than_two() -> None:
    assert split(cores(4), 2) == ["0-1", "2-3"]  # 2 each: nothing kept back
    assert split(cores(16), 2) == ["0-7", "8-14"]  # core 15 for the frontend and the engine core processes
    assert split(cores(16), 3) == ["0-4", "5-9", "10-14"]


def test_one_logical_cpu_per_physical_core() -> None:
    # 8 cores with 2 hardware threads each (CPUs 0-7 and their siblings 8-15): the siblings are left out,
    # as vLLM's own binding leaves them.
    assert split(cores(8, smt=2), 2) == ["0-3", "4-6"]


def test_shares_follow_numa_nodes() -> None:
    # Two nodes whose CPUs interleave (even ids on node 0, odd on node 1): each model gets one node's cores.
    interleaved = [Cpu(i, (i % 2, i // 2), i % 2) for i in range(16)]
    assert split(interleaved, 2) == ["0,2,4,6,8,10,12,14", "1,3,5,7,9,11,13"]


def test_tensor_parallel_workers_get_a_list_each() -> None:
    assert split(cores(16), 2, ranks=2) == ["0-3|4-7", "8-11|12-14"]
    assert split(cores(2), 2, ranks=2) is None


def test_topology_is_read_from_sysfs(tmp_path: Path) -> None:
    for cpu, (package, core, node) in enumerate([(0, 0, 0), (0, 1, 0), (0, 0, 0), (1, 0, 1)]):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
        (tmp_path / f"cpu{cpu}" / f"node{node}").mkdir()
    (tmp_path / "cpu4").mkdir()  # nothing told: a core of its own on node 0
    read = read_topology({0, 1, 2, 3, 4}, sysfs=tmp_path)
    assert read == [Cpu(0, (0, 0), 0), Cpu(1, (0, 1), 0), Cpu(2, (0, 0), 0), Cpu(3, (1, 0), 1), Cpu(4, (-1, 4), 0)]
    # CPU 2 is CPU 0's sibling: three physical cores on node 0, one on node 1.
    assert split(read, 2) == ["0-1", "3-4"]


def test_this_machines_topology_covers_the_cpus_it_may_use() -> None:
    allowed = os.sched_getaffinity(0)
    read = read_topology()
    assert {cpu.id for cpu in read} == allowed


def test_a_share_is_held_until_given_back() -> None:
    shares = CoreShares(["0", "1"])
    first, second, third = object(), object(), object()
    assert shares.take(first) == "0"
    assert shares.take(first) == "0"  # taking again keeps the same
    assert shares.take(second) == "1"
    assert shares.take(third) is None  # all held: vLLM's own binding
    shares.give_back(first)
    assert shares.take(third) == "0"  # the unloaded model's cores go to the next


def test_shares_are_taken_once_under_concurrent_loads() -> None:
    shares = CoreShares([str(i) for i in range(8)])
    holders = [object() for _ in range(8)]
    got: list[str | None] = []
    threads = [threading.Thread(target=lambda h=h: got.append(shares.take(h))) for h in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(got, key=str) == [str(i) for i in range(8)]


@pytest.fixture
def fresh_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_engine, "_core_shares", {})
    monkeypatch.setattr(cpu_cores, "read_topology", lambda: cores(2))
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)


@pytest.mark.usefixtures("fresh_shares")
def test_the_engine_takes_a_share_only_with_several_resident_models(monkeypatch: pytest.MonkeyPatch) -> None:
    one, two, three = object(), object(), object()
    assert vllm_engine._cpu_share(one, Settings(max_loaded_models=1)) is None
    several = Settings(max_loaded_models=2)
    assert vllm_engine._cpu_share(one, several) == "0"
    assert vllm_engine._cpu_share(two, several) == "1"
    assert vllm_engine._cpu_share(three, several) is None


@pytest.mark.usefixtures("fresh_shares")
def test_a_binding_the_user_set_is_theirs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    assert vllm_engine._cpu_share(object(), Settings(max_loaded_models=2)) is None
    # vLLM's default said out loud: every engine binds as vLLM would alone (the way to opt out of the split).
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    assert vllm_engine._cpu_share(object(), Settings(max_loaded_models=2)) is None


@pytest.mark.usefixtures("fresh_shares")
def test_data_parallel_engines_are_left_to_vllm() -> None:
    assert vllm_engine._cpu_share(object(), Settings(max_loaded_models=2, data_parallel_size=2)) is None


def test_the_binding_is_in_the_environment_only_while_the_engine_is_spawned(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine core process inherits the environment it is spawned with, inside AsyncLLM.from_vllm_config;
    # the real spawn is checked in tests/vllm/test_crash.py. Here: set for the build, restored after it.
    seen: list[str | None] = []

    class Built:
        @staticmethod
        def from_vllm_config(**_: object) -> str:
            seen.append(os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
            return "engine"

    class Broken:
        @staticmethod
        def from_vllm_config(**_: object) -> str:
            raise RuntimeError("the engine core died")

    class Args:
        enable_log_requests = disable_log_stats = False

    usage = type("UsageContext", (), {"OPENAI_BATCH_RUNNER": "batch"})
    monkeypatch.setattr(vllm_engine.VLLMEngine, "_engine_config", staticmethod(lambda args: None))
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(vllm_compat, "load", lambda name: usage if name == "UsageContext" else Built)
    assert vllm_engine.VLLMEngine._create_llm(Args(), "1") == "engine"
    assert seen == ["1"] and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    monkeypatch.setattr(vllm_compat, "load", lambda name: usage if name == "UsageContext" else Broken)
    with pytest.raises(RuntimeError):
        vllm_engine.VLLMEngine._create_llm(Args(), "0")
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
