"""From the `result_handlers` setting to handler objects: each configuration checked, each type found.

The setting maps a handler's name to its configuration: the type alone (`"directory"`) or an object with
`type`, the handler's own options, and these options of ours:

    statuses           which endings run it (default: all of completed, failed, expired, cancelled)
    max_attempts       attempts before its run for a batch is given up as failed (default 10)
    backoff_seconds    wait after the first failed attempt, doubled after each further one (default 5)
    max_backoff_seconds  the longest wait between attempts (default 600)
    timeout_seconds    an attempt running longer counts as failed (default 600)
    concurrency        runs of this handler at once, each for another batch (default 2)
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from vllm_batch_server.handlers import ENTRY_POINT_GROUP, HandlerConfigError, ResultHandler
from vllm_batch_server.statuses import TERMINAL, BatchStatus

BUILTIN = {
    "postgres": "vllm_batch_server.handlers.postgres:PostgresHandler",
    "directory": "vllm_batch_server.handlers.directory:DirectoryHandler",
}
ENDINGS = tuple(status.value for status in BatchStatus if status in TERMINAL)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass
class Handler:
    """One configured handler: its name (what the API shows), the object, and how it is retried."""

    name: str
    type: str
    handler: ResultHandler
    statuses: frozenset[str] = field(default_factory=lambda: frozenset(ENDINGS))
    max_attempts: int = 10
    backoff_seconds: float = 5.0
    max_backoff_seconds: float = 600.0
    timeout_seconds: float = 600.0
    concurrency: int = 2

    def backoff(self, attempts: int) -> float:
        """The wait after `attempts` failed attempts."""
        return float(min(self.max_backoff_seconds, self.backoff_seconds * 2 ** max(0, attempts - 1)))


def _number(name: str, key: str, value: Any, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < low:
        raise HandlerConfigError(f"result handler {name!r}: {key!r} must be a number of at least {low:g}")
    return float(value)


def _whole(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HandlerConfigError(f"result handler {name!r}: {key!r} must be a whole number of at least 1")
    return value


def find_factory(type_name: str) -> Any:
    """The class (or any callable) a handler type names: built-in, entry point, or module:attribute."""
    target = BUILTIN.get(type_name)
    if target is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == type_name]
        if found:
            return found[0].load()
        if ":" not in type_name:
            known = sorted({*BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
            raise HandlerConfigError(f"unknown result handler type {type_name!r}; known types: {', '.join(known)} "
                                     "(or give module:attribute)")
        target = type_name
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerConfigError(f"result handler type {type_name!r}: cannot import {module_name!r} ({exc})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise HandlerConfigError(f"result handler type {type_name!r}: {module_name!r} has no {attribute!r}") from None


def load_handler(name: str, config: Any) -> Handler:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise HandlerConfigError(f"result handler name {name!r}: use 1 to 64 letters, digits, '_', '-' or '.'")
    if isinstance(config, str):
        config = {"type": config}
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise HandlerConfigError(f"result handler {name!r}: expected a type name or an object with a \"type\"")
    options = dict(config)
    type_name = options.pop("type")
    statuses = options.pop("statuses", ENDINGS)
    if (not isinstance(statuses, list | tuple) or not statuses
            or not all(isinstance(s, str) and s in ENDINGS for s in statuses)):
        raise HandlerConfigError(f"result handler {name!r}: 'statuses' must list some of {', '.join(ENDINGS)}")
    max_attempts = _whole(name, "max_attempts", options.pop("max_attempts", 10))
    concurrency = _whole(name, "concurrency", options.pop("concurrency", 2))
    backoff = _number(name, "backoff_seconds", options.pop("backoff_seconds", 5.0), 0)
    max_backoff = _number(name, "max_backoff_seconds", options.pop("max_backoff_seconds", 600.0), 0)
    timeout = _number(name, "timeout_seconds", options.pop("timeout_seconds", 600.0), 0.001)
    factory = find_factory(type_name)
    try:
        handler = factory(**options)
    except HandlerConfigError as exc:
        raise HandlerConfigError(f"result handler {name!r} ({type_name}): {exc}") from None
    except TypeError as exc:
        raise HandlerConfigError(f"result handler {name!r} ({type_name}): bad options: {exc}") from None
    if not callable(getattr(handler, "handle", None)):
        raise HandlerConfigError(f"result handler {name!r} ({type_name}): the object made has no handle() method")
    return Handler(name, type_name, handler, frozenset(statuses), max_attempts, backoff, max_backoff, timeout,
                   concurrency)


def load_handlers(configs: dict[str, Any]) -> list[Handler]:
    return [load_handler(name, config) for name, config in configs.items()]
