"""Engines compute requests; the scheduler sees one (see base.py for the contract).

That one is the in-process engine itself, or a router (router.py) over several: the in-process engine, Ray
replicas (`--engine ray --replicas N`) and OpenAI-compatible backends (`--backend URL`, repeatable).
"""

from __future__ import annotations

from vllm_batch_server.engines.base import Engine, EngineError, Result, Usage
from vllm_batch_server.engines.in_process import in_process_engine
from vllm_batch_server.settings import Settings, SettingsError

__all__ = ["Engine", "EngineError", "Result", "Usage", "check_settings", "create_engine", "served_models",
           "unlisted_backends"]


def check_settings(settings: Settings) -> None:
    """Raise SettingsError naming the setting when the engine settings cannot work (before anything starts)."""
    from vllm_batch_server.engines.http import parse_backends

    if settings.engine not in ("vllm", "echo", "http", "ray"):
        raise SettingsError(f"unknown engine {settings.engine!r}; expected vllm, echo, http or ray")
    try:
        backends = parse_backends(settings.backends, settings.backend_window)
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc
    if settings.engine == "http" and not backends:
        raise SettingsError("--engine http needs at least one --backend URL")
    if settings.engine == "ray" and settings.replicas < 1:
        raise SettingsError(f"--replicas must be at least 1, got {settings.replicas}")
    if (settings.max_loaded_models > 1 or settings.max_sleeping_models > 0) and (
            settings.engine not in ("vllm", "echo") or backends):
        flag = "--max-loaded-models" if settings.max_loaded_models > 1 else "--max-sleeping-models"
        raise SettingsError(f"{flag} keeps models loaded in this process's engines; with --backend or --engine "
                            "ray each backend or replica holds its own model (docs/scale.md)")


def create_engine(settings: Settings) -> Engine:
    """The engine the scheduler drives. Raises SettingsError naming the setting when the settings cannot work."""
    from vllm_batch_server.engines.http import HttpEngine, parse_backends

    check_settings(settings)
    backends = parse_backends(settings.backends, settings.backend_window)
    if settings.engine in ("vllm", "echo") and not backends:
        return in_process_engine(settings, settings.engine)  # one engine: nothing to route

    from vllm_batch_server.engines.router.router import Router

    members: list[tuple[str, str, Engine]] = []
    if settings.engine in ("vllm", "echo"):
        members.append(("in-process", "local", in_process_engine(settings, settings.engine)))
    elif settings.engine == "ray":
        from vllm_batch_server.engines.ray import RayCluster

        cluster = RayCluster(settings)
        members += [(replica.name, "ray", replica) for replica in cluster.replicas()]
    members += [(spec.name, "http", HttpEngine(spec, settings)) for spec in backends]
    return Router(members, settings)


async def served_models(engine: Engine, settings: Settings) -> list[str]:
    """The model names a batch may use: the configured ones, or what a router's backends serve."""
    discover = getattr(engine, "served_models", None)
    if discover is None:
        return list(settings.models)
    names: list[str] = await discover()
    return names


def unlisted_backends(engine: Engine) -> list[str]:
    """The backends whose model lists are not known yet (none without backends)."""
    unlisted = getattr(engine, "unlisted_backends", None)
    return list(unlisted()) if unlisted is not None else []
