"""The docs name only what exists: every `--flag` in docs/*.md and README.md is an option of the command it is
written for, every `serve` flag is in docs/server.md's settings table, every `BATCH_SERVER_*` name is a setting,
and every `pip install` line installs from a clone or a wheel with extras pyproject.toml defines.

Which command a flag belongs to is read from its context: in a code block, the command on its line (after
`&&`, `|` or `;` too), else the block's last command; in prose, a command in the same inline code span, else the
commands the line names. Flags of other programs (pip, vllm serve, ray, curl, the benchmarks, ...) are skipped
where one of those is named there; a flag with no command around it must be an option of one of ours.
The parsers are built in process (`build_parser()` of each CLI), so this is exact and fast."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_batch import _cli as client_cli
from vllm_batch_server import cli as server_cli
from vllm_batch_server.settings import Settings, env_name

REPO = Path(__file__).resolve().parents[1]
DOCS = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]

# Programs whose flags are not ours: a command line (or an inline code span, or a prose line) that starts one of
# these is not checked. `benchmarks` covers `python -m benchmarks.NAME` (their --help is tested elsewhere).
OTHER_PROGRAMS = {"pip", "pip3", "uv", "vllm", "podman", "docker", "curl", "systemctl", "journalctl", "ray",
                  "git", "ssh", "nox", "pytest", "ruff", "mypy", "benchmarks", "sqlite3", "psql", "kill",
                  "chromium", "hatch", "prometheus", "promtool", "openssl", "dev.py"}

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
SPAN = re.compile(r"`([^`]+)`")
ENV = re.compile(r"BATCH_SERVER_[A-Z0-9_]*[A-Z0-9]")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")}


ROOTS = {"vllm-batch-server": server_cli.build_parser(), "vllm-batch": client_cli.build_parser()}
ALL_OURS: set[str] = set()


def _walk(name: str, parser: argparse.ArgumentParser) -> Iterator[tuple[str, set[str]]]:
    yield name, _options(parser)
    for sub, child in _subparsers(parser).items():
        yield from _walk(f"{name} {sub}", child)


for _root, _parser in ROOTS.items():
    for _name, _flags in _walk(_root, _parser):
        ALL_OURS |= _flags


@dataclass(frozen=True)
class Program:
    name: str  # "vllm-batch-server serve", or another program's name
    flags: set[str] | None  # None: not ours, not checked


def _program(tokens: list[str]) -> tuple[Program, int] | None:
    """The first program a command's tokens start (ours resolved down to its subcommand), and where its
    arguments begin."""
    words = [t.strip("\"'`,[](){}") for t in tokens]
    for i, word in enumerate(words):
        base = word.rsplit("/", 1)[-1]
        root = None
        if base in ROOTS and ("/" not in word or "/bin/" in word):  # not ~/.cache/vllm-batch
            root, rest = base, i + 1
        elif base in ("python", "python3") and words[i + 1:i + 2] == ["-m"] and i + 2 < len(words):
            module = words[i + 2]
            if module.startswith("vllm_batch_server"):
                root, rest = "vllm-batch-server", i + 3
            elif module.startswith("vllm_batch"):
                root, rest = "vllm-batch", i + 3
            else:
                return Program(module.split(".")[0], None), i + 3
        elif base in OTHER_PROGRAMS or base.split(".")[0] == "benchmarks":
            return Program(base, None), i + 1
        if root is None:
            continue
        parser, name = ROOTS[root], root
        while rest < len(words) and words[rest] in _subparsers(parser):
            name += " " + words[rest]
            parser = _subparsers(parser)[words[rest]]
            rest += 1
        return Program(name, _options(parser)), rest
    return None


@dataclass(frozen=True)
class Finding:
    doc: str
    line: int
    flag: str
    command: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.flag} is not an option of {self.command}"


def _check_command(doc: str, number: int, text: str, fallback: Program | None) -> tuple[list[Finding],
                                                                                        Program | None]:
    """Flags in one command line of a code block (comments are prose). Returns the findings and the last
    program the line started, for the lines of the block after it."""
    findings: list[Finding] = []
    code, _, comment = text.partition(" #")
    findings += _check_prose(doc, number, comment)
    last = None
    for segment in re.split(r"&&|\|\||;|\|", code):
        tokens = segment.split()
        found = _program(tokens)
        if found is None and last is not None and last.flags is not None:
            # A usage line's alternatives: `vllm-batch tail ID | retry ID [--wait]`.
            root = last.name.split()[0]
            again = _program([root, *tokens])
            if again is not None and again[0].name != root:
                found = again[0], again[1] - 1
        program, args = found if found else (last or fallback, 0)
        if found:
            last = program
        flags = FLAG.findall(" ".join(tokens[args:]))
        if program is None:
            findings += [Finding(doc, number, f, "any of our commands") for f in flags if f not in ALL_OURS]
        elif program.flags is not None:
            findings += [Finding(doc, number, f, program.name) for f in flags if f not in program.flags]
    return findings, last


def _check_prose(doc: str, number: int, text: str, others_near: bool = False) -> list[Finding]:
    """Flags in a prose line: those in a span that starts a command are that command's; the rest belong to the
    commands of ours the line names, else to another program the line (or its paragraph or section) names,
    else to any of ours."""
    findings: list[Finding] = []
    ours: list[Program] = []
    others = bool(OTHERS_NAMED.search(text))
    loose = FLAG.findall(SPAN.sub(" ", text))
    for span in SPAN.findall(text):
        found = _program(span.split())
        if found is None:
            loose += FLAG.findall(span)
            continue
        program, args = found
        if program.name in ROOTS and args == len(span.split()):  # "the `vllm-batch` client": no command
            loose += FLAG.findall(span)
            continue
        if program.flags is None:
            others = True
            continue
        ours.append(program)
        flags = FLAG.findall(" ".join(span.split()[args:]))
        findings += [Finding(doc, number, f, program.name) for f in flags if f not in program.flags]
    if ours:
        allowed = set().union(*(p.flags or set() for p in ours))
        name = " or ".join(p.name for p in ours)
        findings += [Finding(doc, number, f, name) for f in loose if f not in allowed and not others]
    elif not (others or others_near):
        findings += [Finding(doc, number, f, "any of our commands") for f in loose if f not in ALL_OURS]
    return findings


OTHERS_NAMED = re.compile(r"benchmarks[./]|python -m (?!vllm_batch)|`vllm serve|`ray |`pip |`nox ")


def _others_near(lines: list[str]) -> list[bool]:
    """Per line: whether its paragraph (or table), or a heading above it, names another program, which then owns
    the flags the line does not place (performance.md's `--repeats` under "`benchmarks.throughput`")."""
    near = [False] * len(lines)
    start = 0
    for i in range(len(lines) + 1):
        if i == len(lines) or not lines[i].strip():
            if OTHERS_NAMED.search(" ".join(lines[start:i])):
                near[start:i] = [True] * (i - start)
            start = i + 1
    headings: list[tuple[int, bool]] = []  # (level, names another program) of the headings above
    for i, line in enumerate(lines):
        if heading := re.match(r"(#+) ", line):
            level = len(heading.group(1))
            headings = [h for h in headings if h[0] < level] + [(level, bool(OTHERS_NAMED.search(line)))]
        near[i] = near[i] or any(named for _, named in headings)
    return near


def doc_flag_findings(path: Path) -> list[Finding]:
    doc = path.name
    lines = path.read_text(encoding="utf-8").splitlines()
    near = _others_near(lines)
    findings: list[Finding] = []
    in_block = False
    block_program: Program | None = None
    pending, pending_at = "", 0
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            in_block, block_program, pending = not in_block, None, ""
            continue
        if not in_block:
            # An inline code span may go on to the next line: read the lines together until it closes.
            pending, pending_at = pending + " " + line, pending_at or number
            if pending.count("`") % 2 and line.strip():
                continue
            findings += _check_prose(doc, pending_at, pending, near[pending_at - 1])
            pending, pending_at = "", 0
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        found, last = _check_command(doc, number, pending + line, block_program)
        pending = ""
        findings += found
        block_program = last or block_program
    return findings


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_flag_a_doc_names_is_an_option_of_its_command(path: Path) -> None:
    findings = doc_flag_findings(path)
    assert not findings, "\n".join(map(str, findings))


def test_every_serve_flag_is_in_the_server_docs_settings_table() -> None:
    serve = _subparsers(ROOTS["vllm-batch-server"])["serve"]
    lines = (REPO / "docs" / "server.md").read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if re.match(r"\|\s*setting\s*\|", line))
    table = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        table.append(line.split("|")[1])
    documented = set(FLAG.findall(" ".join(table)))
    missing = [action.option_strings[0] for action in serve._actions
               if action.option_strings and action.dest != "help" and not documented & set(action.option_strings)]
    assert not missing, f"serve flags missing from docs/server.md's settings table: {', '.join(missing)}"


def test_every_batch_server_variable_a_doc_names_is_a_setting() -> None:
    names = {env_name(name) for name in Settings.__dataclass_fields__}
    # "(`ONLINE_MODEL`)" after a flag, in tables whose header says the prefix is BATCH_SERVER_.
    short = re.compile(r"`--[a-z-]+[^`]*` \(`([A-Z][A-Z0-9_]+)`\)")
    unknown = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        named = set(ENV.findall(text)) | {"BATCH_SERVER_" + n for n in short.findall(text)}
        unknown += [f"{path.name}: {name}" for name in sorted(named - names)]
    assert not unknown, "not settings: " + ", ".join(unknown)


def test_every_pip_install_line_installs_what_exists() -> None:
    # The names of [project.optional-dependencies] (tomllib is not in Python 3.10).
    section = (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([a-z][a-z0-9-]*) = \[", section, re.MULTILINE))
    assert {"server", "gpu", "cpu", "ray", "postgres", "dev"} <= extras
    problems = []
    for path in DOCS:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for command in re.findall(r"pip install ([^`&;|#]*)", line):
                for word in command.split():
                    requirement = word.strip("\"'")
                    package, _, wanted = requirement.partition("[")
                    # Not on PyPI until a release is published: install from a clone (`.`) or a built wheel.
                    if re.fullmatch(r"vllm[-_]batch([<>=!~].*)?", package):
                        problems.append(f"{path.name}:{number}: {requirement} is not on PyPI")
                    if wanted and (package in (".", "") or package.endswith(".whl") or package.startswith("vllm")):
                        for extra in wanted.rstrip("]").split(","):
                            if extra.strip() not in extras:
                                problems.append(f"{path.name}:{number}: no extra {extra.strip()!r}")
    assert not problems, "\n".join(problems)


def test_the_flag_check_catches_a_wrong_flag_and_skips_other_programs(tmp_path: Path) -> None:
    doc = tmp_path / "sample.md"
    doc.write_text("\n".join([
        "Start it with `vllm-batch-server serve --no-such-flag` or set `--windoww`.",  # 1, 1
        "`vllm serve` takes `--enable-prompt-tokens-details`; `pip install --no-deps x`.",  # other programs
        "`vllm-batch wait ID --timeout 60` and `vllm-batch wait ID --label x`.",  # 1
        "```bash",
        "podman run --cap-add SYS_NICE image && vllm-batch-server serve --engine echo --echoo-delay 1",  # 1
        "vllm-batch-server service install --env-file /etc/x --run-as batch \\",
        "    --window 8 --nope",  # 1 (a serve setting is fine there; --nope is not)
        "python -m benchmarks.throughput --workloads short",
        "vllm-batch tail ID | retry ID [--wait] | results ID [--with-retries] [--format x]",  # 1
        "```",
    ]), encoding="utf-8")
    found = [(f.line, f.flag) for f in doc_flag_findings(doc)]
    assert found == [(1, "--no-such-flag"), (1, "--windoww"), (3, "--label"), (5, "--echoo-delay"),
                     (7, "--nope"), (9, "--format")], found


def test_serve_help_for_api_key_names_every_open_route() -> None:
    from vllm_batch_server.settings import OPEN_PATHS, OPEN_PREFIXES

    serve = _subparsers(ROOTS["vllm-batch-server"])["serve"]
    [api_key] = [a for a in serve._actions if "--api-key" in a.option_strings]
    text = api_key.help or ""
    for path in (*OPEN_PATHS, *OPEN_PREFIXES):
        assert re.search(re.escape(path) + r"(?![\w-])", text), (path, text)
    assert "/metrics" in text and "--metrics-public" in text, text


def test_the_readme_names_every_opt_in_variable_of_the_tests() -> None:
    """A test that skips until a variable is set (`reason="set BATCH_SLOW_TESTS=1 ..."`) is found only if the
    README says how to turn it on."""
    readme = (REPO / "README.md").read_text()
    wanted = {name for path in (REPO / "tests").rglob("*.py")
              for name in re.findall(r"reason=\"[^\"]*\bset ([A-Z][A-Z0-9_]{3,})", path.read_text())}
    assert {"BATCH_SLOW_TESTS", "LABEL_STUDIO_BIN"} <= wanted
    assert sorted(name for name in wanted if name not in readme) == []


def test_the_readme_says_that_the_system_packages_start_services() -> None:
    """`dev.py tests` installs Debian's prometheus and postgresql, which start services of their own."""
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "systemctl disable --now prometheus postgresql" in readme

def test_reliability_names_the_open_routes_the_check_uses() -> None:
    from vllm_batch_server.api import auth
    from vllm_batch_server.settings import OPEN_PATHS, OPEN_PREFIXES

    assert (auth.OPEN_PATHS, auth.OPEN_PREFIXES) == (OPEN_PATHS, OPEN_PREFIXES)  # one list, not two
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    [paragraph] = [p for p in text.split("\n\n") if p.startswith("**With `--api-key`")]
    named = set(re.findall(r"`(/[\w/.]*)`", paragraph))
    assert named == {*OPEN_PATHS, *(p + "..." for p in OPEN_PREFIXES), "/metrics"}, named
