"""`vllm-batch-server serve | models`.

The flags of `serve` are generated from the Settings fields (settings.py), each with its environment variable,
so a service manager or container can configure the server without a command line, and the precedence is the
same for every setting: flag, then environment, then default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from vllm_batch_server import __version__
from vllm_batch_server.settings import (
    GROUPS,
    Settings,
    SettingsError,
    declared_default,
    env_name,
    field_types,
    option,
    parse_value,
)


def _engine_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


def _shown(value: Any) -> str | None:
    """A default as a user would type it (not PosixPath('...')); None when there is nothing to show."""
    if value is None or value == [] or value == {}:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _converter(kind: Any, flag: str) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse_value(kind, text, flag)
        except SettingsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _item_converter(kind: Any, flag: str) -> Any:
    def convert(text: str) -> Any:
        try:
            return kind.parse_setting(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{flag}: {exc}") from None

    return convert


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, in help groups; only flags actually given end up in the namespace."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    types_ = field_types()
    for item in fields(Settings):
        opt = option(item)
        kind = types_[item.name]
        flag = opt.flag or "--" + item.name.replace("_", "-")
        shown = _shown(declared_default(item.name))
        help_text = f"{opt.help} [env {env_name(item.name)}" + (f"; default {shown}]" if shown else "]")
        kwargs: dict[str, Any] = {"dest": item.name, "default": argparse.SUPPRESS, "help": help_text}
        if opt.metavar:
            kwargs["metavar"] = opt.metavar
        origin = typing.get_origin(kind)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is dict:
            kwargs.update(action="append", type=_engine_arg)
        elif origin is list:
            kwargs.update(action="append")
            item_kind = typing.get_args(kind)[0] if typing.get_args(kind) else str
            if hasattr(item_kind, "parse_setting"):  # items with a syntax of their own (webhook endpoints)
                kwargs["type"] = _item_converter(item_kind, flag)
        else:
            kwargs["type"] = _converter(kind, flag)
            if opt.choices:
                kwargs["choices"] = opt.choices
        groups[opt.group].add_argument(flag, **kwargs)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the flags given; everything else from the environment or the defaults."""
    given = {item.name: getattr(args, item.name) for item in fields(Settings) if hasattr(args, item.name)}
    types_ = field_types()
    for name, value in given.items():
        if typing.get_origin(types_[name]) is dict:  # repeated KEY=VALUE flags
            given[name] = dict(value)
    return Settings(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-batch-server",
        description="Self-hosted, OpenAI-compatible Batch API on vLLM: durable, resumable batches.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server and the batch scheduler",
                           description="Run the HTTP server and the batch scheduler. Every flag can also be "
                           "set by the environment variable named in its help; a flag wins over the "
                           "variable.")
    add_settings_flags(serve)

    models = sub.add_parser("models", help="list configured models and what is cached; prepare the defaults")
    models.add_argument("action", nargs="?", choices=["list", "prepare"], default="list",
                        help="list: what each model resolves to; prepare: convert the embedded defaults "
                        "(default: list)")
    models.add_argument("--model", dest="models", action="append", default=argparse.SUPPRESS, metavar="MODEL",
                        help=f"a model name, repeatable [env {env_name('models')}]")
    models.add_argument("--model-cache-dir", dest="model_cache_dir", type=Path, default=argparse.SUPPRESS,
                        help=f"where embedded models are prepared [env {env_name('model_cache_dir')}]")

    from vllm_batch_server.ops import systemd_unit

    systemd_unit.add_parser(sub, add_settings_flags)
    hooks = sub.add_parser("webhooks", help="webhook helpers", description="Webhook helpers (docs/operations.md).")
    hooks.add_argument("action", choices=["new-secret"],
                       help="new-secret: print a new random signing secret (whsec_...)")
    return parser


def serve(settings: Settings) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request to a backend otherwise
    from vllm_batch_server.api.connections import ConnectionLimits, ServerConfig
    from vllm_batch_server.app import begin_shutdown, create_app
    from vllm_batch_server.handlers import HandlerConfigError
    from vllm_batch_server.ops.notify import Notifier
    from vllm_batch_server.store.data_dir_lock import DataDirInUse, locked

    notifier = Notifier()

    class Server(uvicorn.Server):
        """uvicorn, telling systemd (Type=notify) once it listens, which is after the app's start-up, and ending
        open event streams as soon as a stop is asked for."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            begin_shutdown(app)  # open event streams end now, not after the graceful timeout
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list[Any] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                notifier.ready(f"serving {', '.join(settings.models)} on {settings.host}:{settings.port}")

        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            notifier.stopping()
            try:
                await super().shutdown(sockets)
            finally:
                await notifier.close()

    try:
        limits = ConnectionLimits.from_settings(settings)
    except SettingsError as exc:
        sys.exit(f"vllm-batch-server: error: {exc}")

    # The lock comes first, before uvicorn runs the app's start-up (which cleans the upload area and resumes
    # batches) and before it binds the port: a second server on the same directory must touch nothing, whether
    # its port is free or not. Held until the server has stopped.
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(settings.data_dir, host=settings.host, port=settings.port))
        except DataDirInUse as exc:
            sys.exit(f"vllm-batch-server: error: {exc}")
        except OSError as exc:  # cannot create the directory, or its filesystem cannot lock
            sys.exit(f"vllm-batch-server: error: cannot use the data directory {settings.data_dir}: {exc}")
        try:
            app = create_app(settings)
        except HandlerConfigError as exc:
            sys.exit(f"vllm-batch-server: error: {exc}")
        config = ServerConfig(app, limits, host=settings.host, port=settings.port, log_level="info",
                              timeout_graceful_shutdown=5)
        server = Server(config)
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
        if not server.started:  # the port was taken, or start-up failed: uvicorn has logged why
            sys.exit(3)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        if args.command == "serve":
            serve(settings)
    except SettingsError as exc:
        parser.exit(2, f"vllm-batch-server: error: {exc}\n")
    if args.command == "service":
        from vllm_batch_server.ops import systemd_unit

        sys.exit(systemd_unit.main(args, settings))
    elif args.command == "webhooks":
        import base64
        import secrets

        print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
    elif args.command == "models":
        from vllm_batch_server.engines import model_files

        sys.exit(model_files.main(args.action, settings.models, settings.model_cache_dir))


if __name__ == "__main__":
    main()
