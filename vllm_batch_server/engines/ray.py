"""Engine replicas as Ray actors (`--engine ray --replicas N`), each an Engine the router (router.py) routes to.

The queue, the database, the result files and the checkpoints stay in this process, on the node running the
server; a replica only computes. Each replica is one actor running one of our in-process engines (vLLM, or
echo for dry runs and tests) with the GPUs Ray gives it (`--replica-gpus`, by default tensor x pipeline
parallel size on a cluster with GPUs). Ray places the actors and restarts one whose process dies
(`max_restarts`); a replica killed for good is created again by `start`. Either way the router takes it out of
rotation meanwhile, moves its in-flight requests to the others and puts it back once its model is loaded again.
No cluster management of our own: placement, node failure and restarts are Ray's.

Ray is imported only here, and only when `--engine ray` is asked for.

The actors run this package's own code (shipped with the job as a `py_modules` runtime environment), so every
node needs vLLM (and our dependencies) installed, but not this package at the server's version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from vllm_batch_server.engines.base import EngineError, Result
from vllm_batch_server.engines.inflight import InFlight
from vllm_batch_server.settings import Settings

log = logging.getLogger(__name__)

# How long a replica has to answer a ping before it counts as gone (its process may be restarting).
PING_SECONDS = 10.0


class Replica:
    """The actor: one in-process engine on whatever node Ray placed it. (Made a Ray actor class at run time.)"""

    def __init__(self, settings: Settings, owner: str) -> None:
        from vllm_batch_server.engines.in_process import in_process_engine

        self.owner = owner  # the server that created it: a replica of another server is never reused
        self.incarnation = uuid.uuid4().hex  # new after every restart of the actor's process
        self.engine = in_process_engine(settings, settings.replica_engine)

    def identity(self) -> tuple[str, str]:
        return self.owner, self.incarnation

    async def start(self, model: str) -> int:
        await self.engine.start(model)
        return self.engine.capacity

    async def stop(self) -> None:
        await self.engine.stop()

    async def run(self, request_id: str, url: str, body: dict[str, Any], priority: int) -> Result:
        options: dict[str, Any] = {"priority": priority} if priority else {}
        return await self.engine.run(request_id, url, body, **options)

    async def check_health(self) -> None:
        await self.engine.check_health()


class RayCluster:
    """The connection to the Ray cluster, shared by this server's replicas."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.owner = uuid.uuid4().hex
        self._connected = False
        self._lock = asyncio.Lock()
        self._actor_class: Any = None
        self._actor_options: dict[str, Any] = {}

    def replicas(self) -> list[RayReplica]:
        return [RayReplica(self, index) for index in range(self.settings.replicas)]

    async def connect(self) -> None:
        async with self._lock:
            if not self._connected:
                await asyncio.to_thread(self._connect)
                self._connected = True

    def _connect(self) -> None:
        import ray

        import vllm_batch_server

        if not ray.is_initialized():
            package = str(Path(vllm_batch_server.__file__).resolve().parent)
            ray.init(address=self.settings.ray_address, namespace=self.settings.ray_namespace,
                     runtime_env={"py_modules": [package]}, ignore_reinit_error=True)
        gpus = self.settings.replica_gpus
        if gpus is None:
            # A cast, not a type: ignore: ray is untyped where it is installed and absent (Any) where it is not.
            cluster_resources = cast("Callable[[], dict[str, float]]", ray.cluster_resources)
            has_gpus = cluster_resources().get("GPU", 0) > 0
            per_model = (self.settings.tensor_parallel_size or 1) * (self.settings.pipeline_parallel_size or 1)
            gpus = float(per_model) if has_gpus else 0.0
        self._actor_class = ray.remote(Replica)
        self._actor_options = {
            "num_cpus": self.settings.replica_cpus, "num_gpus": gpus, "namespace": self.settings.ray_namespace,
            # Ray restarts a replica whose process died; the requests it had are not retried by Ray (the router
            # moves them elsewhere instead).
            "max_restarts": -1, "max_task_retries": 0}
        log.info("connected to Ray (%s); replicas get %g CPU and %g GPU each", ray.get_runtime_context().gcs_address,
                 self.settings.replica_cpus, gpus)

    def _replica_settings(self) -> Settings:
        """What a replica needs to know: the engine settings, nothing of the server's own secrets (its API key)
        or of other engines. --window is the server's total in flight; a replica sizes its own from its engine."""
        return dataclasses.replace(self.settings, api_key=None, backends=[], window=None)

    def create(self, name: str) -> Any:
        """A new replica actor named `name` in this server's namespace (blocking; call it off the loop)."""
        import ray

        try:
            return self._actor_class.options(name=name, **self._actor_options).remote(self._replica_settings(),
                                                                                      self.owner)
        except ValueError as exc:  # the name is taken: ours from before (dead, being released) or another server's
            try:
                existing = ray.get_actor(name, namespace=self.settings.ray_namespace)
                identity: Any = ray.get(existing.identity.remote(), timeout=PING_SECONDS)
            except Exception:
                raise EngineError(f"Ray replica {name}: {exc}") from exc
            if identity[0] != self.owner:
                raise EngineError(f"another vllm-batch server runs replica {name!r} in Ray namespace "
                                  f"{self.settings.ray_namespace!r}; give this one its own --ray-namespace") from exc
            return existing


class RayReplica:
    """One replica, as the router sees it: the Engine protocol over an actor."""

    kind = "ray"

    def __init__(self, cluster: RayCluster, index: int) -> None:
        self.cluster = cluster
        self.name = f"replica-{index}"
        self._actor: Any = None
        self._incarnation: str | None = None
        self._model: str | None = None
        settings = cluster.settings
        self._capacity = 2 * (settings.max_num_seqs or 128)  # until its engine reports its own
        self._inflight = InFlight()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def model(self) -> str | None:
        return self._model

    async def start(self, model: str) -> None:
        await self.cluster.connect()
        try:
            await self._ensure_actor()
            self._capacity = int(await self._actor.start.remote(model))
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"Ray {self.name} could not load {model!r}: {_reason(exc)}") from exc
        self._model = model

    async def stop(self) -> None:
        await self._inflight.end_all()
        self._model = None
        if self._actor is not None:
            try:
                await asyncio.wait_for(self._actor.stop.remote(), PING_SECONDS)
            except Exception as exc:  # a dead replica holds nothing; `start` replaces it
                log.info("Ray %s did not stop cleanly (%s)", self.name, _reason(exc))

    async def run(self, request_id: str, url: str, body: dict[str, Any], *, priority: int = 0) -> Result:
        if self._model is None or self._actor is None:
            raise EngineError(f"Ray {self.name}: no model is loaded")
        return await self._inflight.run(request_id, self._call(request_id, url, body, priority))

    async def abort(self, request_ids: list[str]) -> None:
        self._inflight.abort(request_ids)

    async def check_health(self) -> None:
        if self._actor is None:
            raise EngineError(f"Ray {self.name} has no actor")
        try:
            _, incarnation = await asyncio.wait_for(self._actor.identity.remote(), PING_SECONDS)
            if incarnation != self._incarnation:
                raise EngineError(f"Ray {self.name} was restarted by Ray; its model must be loaded again")
            await self._actor.check_health.remote()
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"Ray {self.name}: {_reason(exc)}") from exc

    async def _call(self, request_id: str, url: str, body: dict[str, Any], priority: int) -> Result:
        import ray

        ref = self._actor.run.remote(request_id, url, body, priority)
        try:
            result: Result = await ref
            return result
        except asyncio.CancelledError:
            ray.cancel(ref)  # stops the request in the replica (an async actor task is cancellable)
            raise
        except Exception as exc:
            raise EngineError(f"Ray {self.name}: {_reason(exc)}") from exc

    async def _ensure_actor(self) -> None:
        """The actor, alive: the one we have, or (if it is gone for good) a new one under the same name."""
        if self._actor is not None:
            try:
                _, self._incarnation = await asyncio.wait_for(self._actor.identity.remote(), PING_SECONDS)
                return
            except Exception as exc:
                log.warning("Ray %s is gone (%s); creating it again", self.name, _reason(exc))
                self._actor = None
        for attempt in range(20):
            try:
                actor = await asyncio.to_thread(self.cluster.create, self.name)
                _, incarnation = await asyncio.wait_for(actor.identity.remote(), 300)  # placement may wait
            except EngineError:
                if attempt == 19:
                    raise
                await asyncio.sleep(0.5)  # a dead actor's name is released shortly after its death
                continue
            self._actor, self._incarnation = actor, incarnation
            return


def _reason(exc: BaseException) -> str:
    """A Ray error in one line: the cause raised in the replica when there is one."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
