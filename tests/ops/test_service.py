"""`vllm-batch-server service install | uninstall | status`: the unit verifies with `systemd-analyze verify`,
and its environment file gives the service exactly the settings `install` was given."""

from __future__ import annotations

import base64
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.tools import missing_tool
from vllm_batch_server import cli
from vllm_batch_server.settings import ENV_PREFIX, Settings

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
FLAGS = ["--engine", "echo", "--model", "echo-model", "--model", "echo-embed", "--port", "4999", "--preload",
         "--no-prefix-caching", "--engine-arg", "max_num_batched_tokens=4096", "--api-key", "sk-it's $secret",
         "--webhook", f"https://hooks.example/x?a=1&b=2 secret={SECRET} events=batch.completed,batch.failed",
         "--webhook-allowed-host", "*.example.com", "--webhook-secret", SECRET]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return subprocess.run([sys.executable, "-m", "vllm_batch_server.cli", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=120, check=False)


def service_user() -> str:
    """An existing unprivileged user that systemd does not warn about (it warns about `nobody`)."""
    for entry in pwd.getpwall():
        if 0 < entry.pw_uid < 1000 and entry.pw_name not in ("nobody",):
            return entry.pw_name
    pytest.skip("no unprivileged system user on this machine")


def verify(unit: Path, *, user: bool, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        missing_tool("systemd-analyze is not installed (Debian: apt-get install systemd)")
    env = dict(os.environ)
    if user:  # a user manager needs a runtime directory, which a session would have
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    done = subprocess.run([analyze, *(["--user"] if user else []), "verify", str(unit)], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    # verify exits 0 on mere warnings (an unknown key, say); a warning here is a defect of the unit too.
    assert done.returncode == 0 and done.stderr.strip() == "" and done.stdout.strip() == "", done


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile reads them: comments skipped, quotes removed."""
    values = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, raw = line.partition("=")
        (values[key],) = shlex.split(raw) if raw else [""]
    return values


def test_a_system_unit_verifies_and_its_environment_file_holds_the_settings(tmp_path: Path) -> None:
    user = service_user()
    units = tmp_path / "units"
    done = run_cli("service", "install", "--unit-dir", str(units), "--run-as", user, *FLAGS)
    assert done.returncode == 0, done.stderr
    unit, env_file = units / "vllm-batch.service", units / "vllm-batch.env"
    text = unit.read_text()
    for line in ("Type=notify", "NotifyAccess=main", f"User={user}", f"EnvironmentFile={env_file}",
                 f"ExecStart={sys.executable} -m vllm_batch_server.cli serve", "Restart=on-failure",
                 "KillMode=mixed", "TimeoutStopSec=120", "WatchdogSec=120", "WantedBy=multi-user.target"):
        assert line in text.splitlines(), line
    verify(unit, user=False, tmp_path=tmp_path)

    assert env_file.stat().st_mode & 0o777 == 0o600  # it holds the API key and the webhook secrets
    values = read_env_file(env_file)
    home = Path(pwd.getpwnam(user).pw_dir)
    assert values[f"{ENV_PREFIX}DATA_DIR"] == str(home / ".local/share/vllm-batch")  # the service user's
    # The service reads exactly the settings install was given: the flags, through the environment file.
    from_flags = cli.settings_from_args(cli.build_parser().parse_args(["serve", *FLAGS]))
    os.environ.update(values)
    try:
        from_file = Settings()
    finally:
        for key in values:
            os.environ.pop(key)
    assert from_file.data_dir == home / ".local/share/vllm-batch"
    from_file.data_dir = from_flags.data_dir
    from_file.model_cache_dir = from_flags.model_cache_dir
    assert from_file == from_flags
    assert from_file.webhooks[0].secret == SECRET and from_file.api_key == "sk-it's $secret"
    # Every other setting is there, commented out, to be found and edited.
    assert "#BATCH_SERVER_CHECKPOINT_EVERY=500" in env_file.read_text()

    again = run_cli("service", "install", "--unit-dir", str(units), "--run-as", user, "--port", "1")
    assert again.returncode == 0 and "kept" in again.stdout
    assert read_env_file(env_file)[f"{ENV_PREFIX}PORT"] == "4999"  # an operator's file is never overwritten

    removed = run_cli("service", "uninstall", "--unit-dir", str(units))
    assert removed.returncode == 0 and not unit.exists() and env_file.exists()


def test_a_user_unit_verifies(tmp_path: Path) -> None:
    units = tmp_path / "units"
    done = run_cli("service", "install", "--user", "--unit-dir", str(units), "--name", "batches",
                   env={f"{ENV_PREFIX}ENGINE": "echo"})
    assert done.returncode == 0, done.stderr
    unit = units / "batches.service"
    text = unit.read_text()
    assert "User=" not in text and "WantedBy=default.target" in text and "network-online" not in text
    assert "SyslogIdentifier=batches" in text
    verify(unit, user=True, tmp_path=tmp_path)
    values = read_env_file(units / "batches.env")
    assert values[f"{ENV_PREFIX}ENGINE"] == "echo"  # from the environment
    # Unasked, a service preloads: systemd counts it started only once a model is loaded.
    assert values[f"{ENV_PREFIX}PRELOAD"] == "true"


def test_a_service_can_be_installed_without_preloading(tmp_path: Path) -> None:
    units = tmp_path / "units"
    done = run_cli("service", "install", "--user", "--unit-dir", str(units), "--no-preload")
    assert done.returncode == 0, done.stderr
    assert read_env_file(units / "vllm-batch.env")[f"{ENV_PREFIX}PRELOAD"] == "false"


def test_install_without_systemd_writes_the_files_and_says_what_to_run(tmp_path: Path) -> None:
    if Path("/run/systemd/system").is_dir():
        pytest.skip("this machine runs systemd: install would enable the unit")
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    done = run_cli("service", "install", "--user", env=env)
    assert done.returncode == 0, done.stderr
    assert "systemd is not running" in done.stdout and "enable --now vllm-batch" in done.stdout
    assert (home / ".config/systemd/user/vllm-batch.service").exists()
    assert (home / ".config/vllm-batch/vllm-batch.env").exists()
    status = run_cli("service", "status", "--user", env=env)
    assert "installed" in status.stdout and "systemd is not running" in status.stdout


def test_a_system_service_is_never_run_as_root_unasked(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root")
    env = {"SUDO_USER": ""}
    done = run_cli("service", "install", "--unit-dir", str(tmp_path), env=env)
    assert done.returncode == 2 and "--run-as" in done.stderr
    assert not (tmp_path / "vllm-batch.service").exists()
