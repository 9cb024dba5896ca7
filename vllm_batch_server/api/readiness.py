"""What GET /ready and GET /status answer.

/health says the process is up. /ready says it can do its job: the data directory takes writes, the engine
is loaded or can be loaded (with several engines or backends, at least one is in rotation), and no batch is
paused because a resource of ours ran out. Readiness is about the server, never about one batch's input: a
batch that fails validation or a request vLLM rejects leaves it ready.

What "the engine can be loaded" means, since models load lazily (when the first batch for them runs): every
configured model resolves to weights on this machine (an embedded model that was never prepared does not), and
the last load did not fail. With `--preload`, the server starts serving only once a model is loaded, so
systemd's `Type=notify` start-up (and /ready) waits for it; a model that fails to load then makes /ready false
with the reason, and the server still serves the API.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_batch_server import __version__
from vllm_batch_server.engines import model_files
from vllm_batch_server.engines.router.router import Router
from vllm_batch_server.observers.metrics import checkpoint_lag, vllm_kv_cache_usage
from vllm_batch_server.queue.engine_owner import EngineState
from vllm_batch_server.statuses import BatchStatus

if TYPE_CHECKING:
    from vllm_batch_server.api.context import Context

PROBE_NAME = ".ready-probe"


def _write_probe(data_dir: Path) -> None:
    """Create, write and remove a small file where uploads are received: fails on a read-only, full or
    vanished data directory."""
    probe = data_dir / "tmp" / PROBE_NAME
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def _unloadable(ctx: Context) -> list[str]:
    if ctx.settings.engine != "vllm":
        return []
    reasons = []
    for name in ctx.settings.models:
        try:
            model_files.resolve(name, ctx.settings.model_cache_dir)
        except model_files.ModelNotAvailable as exc:
            reasons.append(str(exc))
    return reasons


async def readiness(ctx: Context) -> list[str]:
    """Why the server is not ready; empty when it is."""
    reasons: list[str] = []
    try:
        await asyncio.to_thread(_write_probe, ctx.settings.data_dir)
    except OSError as exc:
        reasons.append(f"the data directory {ctx.settings.data_dir} does not take writes: {exc.strerror or exc}")
    scheduler = ctx.scheduler
    if scheduler.engine_owner.load_error is not None:
        reasons.append(scheduler.engine_owner.load_error)
    if isinstance(scheduler.engine, Router) and (down := scheduler.engine.not_ready()) is not None:
        reasons.append(down)  # every backend is out of rotation: batches wait, online requests fail
    reasons.extend(await asyncio.to_thread(_unloadable, ctx))
    paused: dict[str, int] = {}
    for pause in list(scheduler.paused.values()):
        paused[pause.reason.value] = paused.get(pause.reason.value, 0) + 1
    for reason, count in sorted(paused.items()):
        reasons.append(f"{count} batch{'es' if count > 1 else ''} paused: {reason}")
    return reasons


async def status(ctx: Context) -> dict[str, Any]:
    """The server at a glance (the dashboard's data; the shape is a contract, see docs/operations.md)."""
    scheduler = ctx.scheduler
    snapshot = await ctx.monitor.snapshot()
    requests_per_second, tokens_per_second = ctx.monitor.throughput()
    ready = scheduler.engine_owner.state is EngineState.READY
    try:
        disk = shutil.disk_usage(ctx.settings.data_dir)
        free, total = disk.free, disk.total
    except OSError:
        free = total = 0
    lag, uncommitted = checkpoint_lag(scheduler)
    vllm = ctx.settings.engine == "vllm"
    owner = scheduler.engine_owner
    primary = owner.engine.model if ready else None
    running_on: dict[int, list[str]] = {}
    for batch_id, slot in list(scheduler.runner_slots.items()):
        running_on.setdefault(id(slot), []).append(batch_id)
    loaded = [{
        "model": slot.loading_model if slot.state is EngineState.LOADING else slot.model,
        "state": slot.state.value,
        "running": running_on.get(id(slot), []),
        "kv_cache_usage": (vllm_kv_cache_usage(slot.model) if vllm and slot.state is EngineState.READY
                           else None),
        # The cores its worker is pinned to when several resident models split a CPU (engines/cpu_cores.py).
        "cpu_cores": getattr(slot.engine, "cpu_cores", None),
    } for slot in owner.resident()]
    return {
        "object": "server.status",
        "version": __version__,
        "engine": {
            "kind": ctx.settings.engine,
            "state": owner.state.value,
            "model": primary,
            "kv_cache_usage": vllm_kv_cache_usage(primary) if ready and vllm else None,
            # Beyond the contract's fields (additions only): every model an engine holds, with
            # --max-loaded-models several, least recently used first (the next to be unloaded).
            "max_loaded_models": owner.max_loaded,
            "loaded_models": loaded,
        },
        "queue": {
            "validating": snapshot.batch_counts.get(BatchStatus.VALIDATING.value, 0),
            "in_progress": snapshot.batch_counts.get(BatchStatus.IN_PROGRESS.value, 0),
            "paused": [{"id": batch_id, "reason": pause.reason.value}
                       for batch_id, pause in list(scheduler.paused.items())],
        },
        "throughput": {"requests_per_second": round(requests_per_second, 3),
                       "output_tokens_per_second": round(tokens_per_second, 3)},
        "disk": {"free_bytes": free, "total_bytes": total},
        # Beyond the contract's fields (additions only): how far durable state trails the running batches.
        "checkpoint": {"lag_seconds": round(lag, 3), "uncommitted_results": uncommitted},
        # The batches the engine is running now, oldest first: an in_progress batch not among them waits behind
        # them (the dashboard says so).
        "running": list(scheduler.runners),
    }
