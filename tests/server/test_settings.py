"""Settings come from one declaration: flags and environment variables are generated from the fields, with the
same precedence for every setting (flag or code, then environment, then default)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_batch_server import __version__
from vllm_batch_server.cli import build_parser, settings_from_args
from vllm_batch_server.settings import DEFAULT_MODELS, Settings, SettingsError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("BATCH_SERVER_"):
            monkeypatch.delenv(name)


def parse(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_settings_built_in_code_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_SERVER_PORT", "5001")
    monkeypatch.setenv("BATCH_SERVER_CHECKPOINTING", "off")
    monkeypatch.setenv("BATCH_SERVER_DATA_DIR", "/srv/batches")
    settings = Settings()
    assert (settings.port, settings.checkpointing, settings.data_dir) == (5001, False, Path("/srv/batches"))
    assert Settings(port=6000).port == 6000  # an explicit value wins over the environment


def test_a_flag_replaces_the_environment_value_for_lists_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: --model and BATCH_SERVER_MODELS used to add up."""
    monkeypatch.setenv("BATCH_SERVER_MODELS", "env-a, env-b")
    assert parse().models == ["env-a", "env-b"]
    assert parse("--model", "flag-a", "--model", "flag-b").models == ["flag-a", "flag-b"]
    monkeypatch.delenv("BATCH_SERVER_MODELS")
    assert parse().models == list(DEFAULT_MODELS)


def test_every_setting_has_the_same_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_SERVER_WINDOW", "7")
    monkeypatch.setenv("BATCH_SERVER_ENGINE_ARGS", '{"seed": 3}')
    monkeypatch.setenv("BATCH_SERVER_PREFIX_CACHING", "false")
    settings = parse()
    assert (settings.window, settings.engine_args, settings.prefix_caching) == (7, {"seed": 3}, False)
    settings = parse("--window", "9", "--engine-arg", "seed=4", "--prefix-caching")
    assert (settings.window, settings.engine_args, settings.prefix_caching) == (9, {"seed": 4}, True)
    monkeypatch.setenv("BATCH_SERVER_API_KEY", "")
    assert parse().api_key is None  # an empty optional value means unset


def test_a_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_SERVER_PORT", "eighty")
    with pytest.raises(SettingsError, match="BATCH_SERVER_PORT='eighty': expected an integer"):
        Settings()
    done = subprocess.run([sys.executable, "-m", "vllm_batch_server.cli", "serve"], capture_output=True,
                          text=True, env={"BATCH_SERVER_PORT": "eighty", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "BATCH_SERVER_PORT='eighty': expected an integer" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_shows_defaults_as_values_and_test_knobs_apart() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = " ".join(serve.format_help().split())
    assert "PosixPath" not in text
    assert "default 4080" in text and "env BATCH_SERVER_PORT" in text
    assert "default smollm2-135m-instruct,all-minilm-l6-v2" in text
    groups = text.split("options:")[1]  # past the usage line, which names every flag
    before, testing = groups.split("testing and benchmarking")
    assert "--echo-fault" in testing and "--checkpointing" in testing
    assert "--echo-fault" not in before and "--checkpointing" not in before


def test_version() -> None:
    done = subprocess.run([sys.executable, "-m", "vllm_batch_server.cli", "--version"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"vllm-batch-server {__version__}"
    assert __version__ and __version__ != "0+unknown"


@pytest.mark.parametrize("flag", ["--header-timeout", "--body-idle-timeout", "--keep-alive-timeout",
                                  "--max-connections"])
def test_limits_must_be_positive(tmp_path: Path, flag: str) -> None:
    done = subprocess.run([sys.executable, "-m", "vllm_batch_server.cli", "serve", "--engine", "echo",
                           "--data-dir", str(tmp_path / "data"), flag, "0"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and f"{flag} (BATCH_SERVER_" in done.stderr and "must be positive" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was touched


@pytest.mark.parametrize("soft,configured,expected", [(1024, None, 448), (20000, None, 1000), (160, None, 16),
                                                      (100, None, 1), (1024, 5000, 5000), (1024, 3, 3)])
def test_the_default_connection_cap_fits_the_descriptor_limit(monkeypatch: pytest.MonkeyPatch, soft: int,
                                                              configured: int | None, expected: int) -> None:
    import resource

    from vllm_batch_server.api import connections

    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, soft))
    assert connections.connection_cap(configured) == expected


def test_the_online_latency_target_is_above_one_or_zero_for_off() -> None:
    with pytest.raises(SettingsError, match=r"--online-latency-target \(BATCH_SERVER_ONLINE_LATENCY_TARGET\).*above 1"):
        Settings(online_latency_target=0.5)
    with pytest.raises(SettingsError, match="above 1"):
        Settings(online_latency_target=1.0)  # no answer beside a batch is faster than alone
    assert Settings(online_latency_target=0).online_latency_target == 0
    assert Settings().online_latency_target == 2.0
