"""How several resident models share a CPU's cores (`--max-loaded-models N` on the CPU build of vLLM).

vLLM's CPU worker pins its OpenMP threads to cores it picks itself (`VLLM_CPU_OMP_THREADS_BIND=auto`): every
physical core of the first NUMA node but one, which it leaves to the engine core process and the frontend.
Each engine picks the same way, so N engines in one server all pin their threads to the *same* cores, and two
models running at once take turns on them while the others idle. Measured on 2 cores (SmolLM2 chats and MiniLM
embeddings, each alone 68 s and 32 s): side by side on the same core they took 108 s and 67 s, and loading each
took 34 s instead of 20; on a core each, 71 s and 33 s, and 21 s and 18 s to load. With many cores it is
worse: N OpenMP teams pinned to the same cores spin against each other at every barrier.

So with N > 1 resident models on CPU, the server gives each engine a share of its own: the physical cores the
process may use (one logical CPU per core, as vLLM picks on x86), in the order of their NUMA node, split into N
contiguous shares, with one core kept back for the frontend and the engine core processes once there are more
than two per model. Each engine takes the lowest share no other resident engine holds, for as long as it is
loaded. The price: one model running alone computes on its share only (on 2 cores nothing is lost: vLLM's own
choice there is one core too). A `VLLM_CPU_OMP_THREADS_BIND` the user set is theirs and is used as it is for
every engine (`auto`: each binds as vLLM would alone, for machines that mostly run one model at a time); one
model at a time is left to vLLM, and so is a machine with fewer cores than models (nothing to split).

The topology is read from sysfs and passed in, so the arithmetic is tested on any machine.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

SYSFS_CPUS = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class Cpu:
    """One logical CPU the process may run on."""

    id: int
    core: tuple[int, int]  # (package, core id): logical CPUs sharing it are SMT siblings
    node: int  # NUMA node


def read_topology(allowed: set[int] | None = None, sysfs: Path = SYSFS_CPUS) -> list[Cpu]:
    """The logical CPUs in `allowed` (default: this process's affinity), with their physical core and NUMA
    node as sysfs tells; what it does not tell counts as a core of its own on node 0."""
    ids = sorted(allowed if allowed is not None else os.sched_getaffinity(0))
    cpus = []
    for cpu in ids:
        folder = sysfs / f"cpu{cpu}"
        package = _read_int(folder / "topology" / "physical_package_id")
        core = _read_int(folder / "topology" / "core_id")
        nodes = sorted(int(p.name[4:]) for p in folder.glob("node*") if p.name[4:].isdigit())
        physical = (package, core) if package is not None and core is not None else (-1, cpu)
        cpus.append(Cpu(cpu, physical, nodes[0] if nodes else 0))
    return cpus


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def split(cpus: list[Cpu], engines: int, ranks: int = 1) -> list[str] | None:
    """A `VLLM_CPU_OMP_THREADS_BIND` value for each of `engines` resident engines of `ranks` workers each
    (tensor × pipeline parallel: one CPU list per worker, joined by "|"), or None when there is nothing to
    split (one engine, or fewer physical cores than workers)."""
    if engines <= 1:
        return None
    by_core: dict[tuple[int, int], Cpu] = {}
    for cpu in sorted(cpus, key=lambda c: c.id):
        by_core.setdefault(cpu.core, cpu)  # the first logical CPU of each physical core
    cores = sorted(by_core.values(), key=lambda c: (c.node, c.id))
    workers = engines * ranks
    if len(cores) > 2 * workers:
        cores = cores[:-1]  # one kept back for the frontend and the engine core processes
    if len(cores) < workers:
        return None
    shares = _contiguous([c.id for c in cores], workers)
    return ["|".join(_ids(sorted(share)) for share in shares[e * ranks:(e + 1) * ranks]) for e in range(engines)]


def _contiguous(items: list[int], parts: int) -> list[list[int]]:
    size, extra = divmod(len(items), parts)
    out, at = [], 0
    for part in range(parts):
        take = size + (1 if part < extra else 0)
        out.append(items[at:at + take])
        at += take
    return out


def _ids(ids: list[int]) -> str:
    """"0-3,8" for [0, 1, 2, 3, 8]: the form vLLM parses."""
    runs: list[list[int]] = []
    for cpu in ids:
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


class CoreShares:
    """Which resident engine holds which share. Engines load one at a time (the engine owner's lock), and an
    engine's share is given back when it stops, so a switch hands the unloaded model's cores to the next."""

    def __init__(self, binds: list[str]) -> None:
        self.binds = binds
        self._held: dict[int, object] = {}
        self._lock = threading.Lock()

    def take(self, holder: object) -> str | None:
        """The lowest share nobody holds (the one `holder` holds already, if any); None when all are held."""
        with self._lock:
            for index, held_by in self._held.items():
                if held_by is holder:
                    return self.binds[index]
            for index, bind in enumerate(self.binds):
                if index not in self._held:
                    self._held[index] = holder
                    return bind
            return None

    def give_back(self, holder: object) -> None:
        with self._lock:
            for index in [i for i, held_by in self._held.items() if held_by is holder]:
                del self._held[index]
