"""Every numeric option of every command of both CLIs, given a bad value (`-3`, `abc`, `nan`, `inf`), ends in a
usage error naming the option (exit status 2), never a traceback or a command run with it. Numeric options are
found by walking the parsers (an option that takes `1` and refuses `abc`), so a new one is covered unasked."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vllm_batch import _cli as client_cli
from vllm_batch_server import cli as server_cli

BAD = ["-3", "abc", "nan", "inf"]
# Options where a negative value means something (a curation score is any finite number).
SIGNED = {("vllm-batch", "mark", "--score"), ("vllm-batch", "export", "--min-score")}


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                          argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaves(sub, (*path, name))


def positionals(parser: argparse.ArgumentParser) -> list[str]:
    """Values for what the command requires (its positionals and required options), so that only the option
    tried can be wrong."""
    values = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.nargs in ("?", "*"):
            continue
        if action.option_strings and not action.required:
            continue
        value = str(next(iter(action.choices))) if action.choices else "x"
        values += [action.option_strings[0], value] if action.option_strings else [value]
    return values


def parses(parser: argparse.ArgumentParser, argv: list[str]) -> bool:
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit:
            return False
    return True


def numeric_options() -> list[tuple[str, tuple[str, ...], str]]:
    found = []
    for program, build in (("vllm-batch-server", server_cli.build_parser), ("vllm-batch", client_cli.build_parser)):
        root = build()
        for path, leaf in leaves(root):
            base = [*path, *positionals(leaf)]
            for action in leaf._actions:
                if not action.option_strings or action.nargs == 0 or action.choices:
                    continue
                flag = action.option_strings[-1]
                if parses(root, [*base, flag, "1"]) and not parses(root, [*base, flag, "abc"]):
                    found.append((program, path, flag))
    return found


NUMERIC = numeric_options()


def test_the_walk_finds_the_numeric_options_of_both_clis() -> None:
    flags = {(program, " ".join(path), flag) for program, path, flag in NUMERIC}
    assert ("vllm-batch", "export", "--limit") in flags
    assert ("vllm-batch-server", "serve", "--port") in flags
    assert ("vllm-batch-server", "service install", "--webhook-timeout") in flags
    assert len(flags) > 60


@pytest.mark.parametrize(("program", "path", "flag"), NUMERIC, ids=lambda v: " ".join(v) if isinstance(v, tuple)
                         else v)
@pytest.mark.parametrize("bad", BAD)
def test_a_bad_numeric_value_is_a_usage_error(program: str, path: tuple[str, ...], flag: str, bad: str,
                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if bad == "-3" and (program, path[-1], flag) in SIGNED:
        pytest.skip("a negative value is valid here")
    ran: list[Any] = []
    monkeypatch.setattr(server_cli, "serve", lambda settings: ran.append(settings))
    for variable in ("BATCH_SERVER_DATA_DIR",):
        monkeypatch.setenv(variable, str(tmp_path))
    root = server_cli.build_parser() if program == "vllm-batch-server" else client_cli.build_parser()
    leaf = dict(leaves(root))[path]
    argv = [*path, *positionals(leaf), flag, bad]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exited:
        if program == "vllm-batch-server":
            server_cli.main(argv)  # parsing and the settings: what serve and service install read first
        else:
            root.parse_args(argv)  # the commands run only after this
    assert exited.value.code == 2, (argv, stderr.getvalue())
    assert not ran
    message = stderr.getvalue()
    assert "Traceback" not in message
    assert flag in message or flag.lstrip("-").replace("-", "_") in message, message
