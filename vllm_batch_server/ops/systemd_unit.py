"""`vllm-batch-server service install | uninstall | status`: run the server as a systemd service.

`install` writes two files and, where systemd runs, enables the unit:

- the unit (`/etc/systemd/system/vllm-batch.service`, or with `--user` `~/.config/systemd/user/...`):
  `Type=notify` (systemd counts the server started once it listens, after its data directory is locked, the
  queue recovered and a model loaded: a service preloads unless installed with `--no-preload`), restart on
  failure, a graceful stop that leaves
  time for the last checkpoint, a watchdog on the event loop, and settings from
- an environment file (`/etc/vllm-batch/vllm-batch.env`, or `~/.config/vllm-batch/vllm-batch.env`): every
  setting as its `BATCH_SERVER_*` variable, commented out at its default, and set where a flag given to
  `install` (or the environment `install` runs in) sets it. An existing environment file is never
  overwritten: it holds the operator's edits.

The unit runs the Python that ran `install`, so the server runs in the same virtualenv.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from vllm_batch_server import __version__
from vllm_batch_server.settings import (
    ENV_PREFIX,
    GROUPS,
    Settings,
    declared_default,
    env_name,
    field_types,
    option,
)

DEFAULT_NAME = "vllm-batch"
DOCS = "https://github.com/vllm-batch/vllm-batch/blob/main/docs/deployment.md"
# How long a stop may take: the server stops feeding the engine, commits a last checkpoint of every running
# batch (its own limit is 30 s), then shuts vLLM's engine process down.
STOP_SECONDS = 120
# Loading a large model from slow storage can take many minutes before the server is ready (--preload).
START_TIMEOUT = "30min"
WATCHDOG_SECONDS = 120


# ---- the files --------------------------------------------------------------------------------------------


def _unit_quote(arg: str) -> str:
    """One ExecStart word as systemd reads it: `%` is a specifier, whitespace and quotes need quoting."""
    arg = arg.replace("%", "%%")
    if arg and not any(c in arg for c in " \t\"'\\;"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_text(*, user_mode: bool, run_as: str | None, env_file: Path, python: str, name: str) -> str:
    command = " ".join(_unit_quote(a) for a in (python, "-m", "vllm_batch_server.cli", "serve"))
    lines = [
        f"# Written by `vllm-batch-server service install` (vllm-batch {__version__}). Settings belong in",
        f"# {env_file}; install again rather than editing this file.",
        "[Unit]",
        "Description=vllm-batch: OpenAI-compatible batch API on vLLM",
        f"Documentation={DOCS}",
    ]
    if not user_mode:  # a user's service manager has no network targets
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += ["", "[Service]", "Type=notify", "NotifyAccess=main"]
    if run_as:
        lines.append(f"User={run_as}")
    lines += [
        f"EnvironmentFile={env_file}",
        f"ExecStart={command}",
        "# After a crash, a failed start or a watchdog timeout; running batches resume from their checkpoint.",
        "Restart=on-failure",
        "RestartSec=5",
        f"TimeoutStartSec={START_TIMEOUT}",
        "# SIGTERM to the server alone: it stops feeding the engine, commits a last checkpoint and stops vLLM's",
        "# engine process itself. Whatever is still running after TimeoutStopSec is killed.",
        "KillMode=mixed",
        f"TimeoutStopSec={STOP_SECONDS}",
        "# The server pings from its event loop; a loop stuck this long gets the service restarted.",
        f"WatchdogSec={WATCHDOG_SECONDS}",
        "LimitNOFILE=65536",
        "NoNewPrivileges=yes",
        f"SyslogIdentifier={name}",
        "",
        "[Install]",
        f"WantedBy={'default.target' if user_mode else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)


def env_value(value: Any) -> str:
    """A setting's value as its environment variable takes it (settings.parse_value reads it back)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, list):
        if any(hasattr(item, "as_setting") for item in value):
            return json.dumps([item.as_setting() for item in value])
        return ",".join(str(item) for item in value)
    return str(value)


def env_quote(value: str) -> str:
    """A value as a systemd EnvironmentFile line reads it: quoted unless it is plainly one word."""
    if value and all(c.isalnum() or c in "_./:,@+=-" for c in value):
        return value
    if "'" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def env_file_text(given: dict[str, str], *, service: str) -> str:
    """Every setting, grouped as `serve --help` groups them: the given ones set, the others commented out."""
    types_ = field_types()
    lines = [
        f"# Settings of the vllm-batch server run by systemd ({service}.service); written by",
        "# `vllm-batch-server service install`. One variable per setting; `vllm-batch-server serve --help`",
        f"# explains each. After an edit: systemctl restart {service} (with --user for a user service).",
        "# This file may hold the API key and webhook secrets: keep it readable by its owner only.",
    ]
    for group in GROUPS:
        items = [item for item in fields(Settings) if option(item).group == group]
        if not items:
            continue
        lines += ["", f"# ---- {group}"]
        for item in items:
            name = env_name(item.name)
            default = env_value(declared_default(item.name))
            kind = types_[item.name]
            note = f" (default: {default})" if default else ""
            if _takes_json(kind):
                note += " [JSON]"
            lines.append(f"# {option(item).help}{note}")
            if name in given:
                lines.append(f"{name}={env_quote(given[name])}")
            else:
                lines.append(f"#{name}={env_quote(default) if default else ''}")
    return "\n".join(lines) + "\n"


def _takes_json(kind: Any) -> bool:
    if typing.get_origin(kind) is dict:
        return True
    args = typing.get_args(kind)
    return typing.get_origin(kind) is list and bool(args) and hasattr(args[0], "as_setting")


# ---- where things go --------------------------------------------------------------------------------------


def _config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def unit_path(name: str, user_mode: bool, unit_dir: Path | None) -> Path:
    if unit_dir is not None:
        return unit_dir / f"{name}.service"
    base = _config_home() / "systemd" / "user" if user_mode else Path("/etc/systemd/system")
    return base / f"{name}.service"


def default_env_file(name: str, user_mode: bool) -> Path:
    base = _config_home() / "vllm-batch" if user_mode else Path("/etc/vllm-batch")
    return base / f"{name}.env"


def systemd_running() -> bool:
    """Whether this machine was booted with systemd (what sd_booted() checks) and systemctl is here."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def _systemctl(user_mode: bool, *args: str) -> int:
    command = ["systemctl", *(["--user"] if user_mode else []), *args]
    print("$ " + " ".join(command))
    return subprocess.run(command, check=False).returncode


def _given_settings(args: argparse.Namespace, settings: Settings, home: Path | None) -> dict[str, str]:
    """The settings to write set: flags given to `install`, BATCH_SERVER_* variables of this environment, and
    the data and model directories resolved for the user the service runs as."""
    given = {key: value for key, value in os.environ.items() if key.startswith(ENV_PREFIX)}
    for item in fields(Settings):
        if hasattr(args, item.name):
            given[env_name(item.name)] = env_value(getattr(settings, item.name))
    for setting, default in (("data_dir", ".local/share/vllm-batch"), ("model_cache_dir", ".cache/vllm-batch")):
        key = env_name(setting)
        if key not in given:
            # The defaults follow the home directory, which is the service user's, not the installer's.
            given[key] = str(home / default) if home is not None else str(getattr(settings, setting))
    # A service preloads unless told not to (--no-preload): then systemd's "started" (READY=1) means a model is
    # loaded and the engine can serve (a model that cannot load shows in /ready and `systemctl status`).
    given.setdefault(env_name("preload"), env_value(True))
    return given


def _importable_without_pythonpath(python: str) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([python, "-c", "import vllm_batch_server"], env=env, cwd="/", capture_output=True,
                          check=False).returncode == 0


# ---- the commands -----------------------------------------------------------------------------------------


def install(args: argparse.Namespace, settings: Settings) -> int:
    user_mode: bool = args.user
    name: str = args.name
    run_as: str | None = None
    home: Path | None = None
    if not user_mode:
        run_as = args.run_as or os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
        if run_as == "root" and not args.run_as:
            print("refusing to run the server as root; name the user it should run as with --run-as USER",
                  file=sys.stderr)
            return 2
        try:
            home = Path(pwd.getpwnam(run_as).pw_dir)
        except KeyError:
            print(f"no user {run_as!r} on this machine (--run-as)", file=sys.stderr)
            return 2
    unit = unit_path(name, user_mode, args.unit_dir)
    env_file: Path = args.env_file or (unit.parent / f"{name}.env" if args.unit_dir else
                                       default_env_file(name, user_mode))
    python = sys.executable
    if not _importable_without_pythonpath(python):
        print(f"warning: {python} cannot import vllm_batch_server without PYTHONPATH; install the package "
              "(pip install 'vllm-batch[server]') or the service will not start", file=sys.stderr)
    try:
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.write_text(unit_text(user_mode=user_mode, run_as=run_as, env_file=env_file, python=python,
                                  name=name))
        print(f"wrote {unit}")
        if env_file.exists():
            print(f"kept {env_file} (it exists; edit it to change settings)")
        else:
            env_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(env_file_text(_given_settings(args, settings, home), service=name))
            print(f"wrote {env_file} (mode 600)")
    except PermissionError as exc:
        print(f"{exc}; a system service is installed as root (sudo), or use --user", file=sys.stderr)
        return 1
    if args.unit_dir is not None:
        return 0
    if not systemd_running():
        print("systemd is not running on this machine: nothing enabled. Where it runs: systemctl "
              f"{'--user ' if user_mode else ''}daemon-reload && systemctl {'--user ' if user_mode else ''}"
              f"enable --now {name}")
        return 0
    if _systemctl(user_mode, "daemon-reload") != 0:
        return 1
    if _systemctl(user_mode, "enable", *(["--now"] if args.start else []), name) != 0:
        return 1
    if user_mode:
        print(f"a user service starts at boot only with lingering on: sudo loginctl enable-linger "
              f"{pwd.getpwuid(os.getuid()).pw_name}")
    if not args.start:
        print(f"start it with: systemctl {'--user ' if user_mode else ''}start {name}")
    return 0


def uninstall(args: argparse.Namespace) -> int:
    unit = unit_path(args.name, args.user, args.unit_dir)
    if args.unit_dir is None and systemd_running():
        _systemctl(args.user, "disable", "--now", args.name)
    if unit.exists():
        unit.unlink()
        print(f"removed {unit}")
    else:
        print(f"no unit at {unit}")
    if args.unit_dir is None and systemd_running():
        _systemctl(args.user, "daemon-reload")
    print("kept the environment file and the data directory")
    return 0


def status(args: argparse.Namespace) -> int:
    unit = unit_path(args.name, args.user, None)
    print(f"unit: {unit} ({'installed' if unit.exists() else 'not installed'})")
    if not systemd_running():
        print("systemd is not running on this machine")
        return 3 if not unit.exists() else 0
    return _systemctl(args.user, "status", "--no-pager", args.name)


def add_parser(sub: Any, add_settings_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    service = sub.add_parser("service", help="run the server as a systemd service (install, uninstall, status)",
                             description="Run the server as a systemd service that starts at boot, restarts on "
                             "failure and stops gracefully (docs/deployment.md).")
    actions = service.add_subparsers(dest="action", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--user", action="store_true", help="a user service (systemctl --user) instead of "
                            "a system one")
        parser.add_argument("--name", default=DEFAULT_NAME, help=f"the unit's name (default {DEFAULT_NAME})")

    install_parser = actions.add_parser(
        "install", help="write the unit and its environment file, and enable it",
        description="Write a systemd unit and an environment file with every setting, then enable the unit. "
        "Settings flags given here (as to `serve`) are written into the environment file.")
    common(install_parser)
    install_parser.add_argument("--run-as", metavar="USER", help="the user a system service runs as (default: the "
                                "user who ran sudo, else the current user)")
    install_parser.add_argument("--env-file", type=Path, help="where the settings go (default /etc/vllm-batch/"
                                "NAME.env, or ~/.config/vllm-batch/NAME.env with --user)")
    install_parser.add_argument("--unit-dir", type=Path, help="write the unit into this directory and run no "
                                "systemctl (packaging, tests)")
    install_parser.add_argument("--start", action="store_true", help="start it now too")
    add_settings_flags(install_parser)

    uninstall_parser = actions.add_parser("uninstall", help="stop, disable and remove the unit (settings and data "
                                          "are kept)")
    common(uninstall_parser)
    uninstall_parser.add_argument("--unit-dir", type=Path, help="remove the unit from this directory")

    status_parser = actions.add_parser("status", help="whether the unit is installed, and systemctl status")
    common(status_parser)


def main(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "install":
        return install(args, settings)
    if args.action == "uninstall":
        return uninstall(args)
    return status(args)
