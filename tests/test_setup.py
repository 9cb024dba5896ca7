"""What the README promises about setting up and testing is what `dev.py`, the noxfile and CI do."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Run the tests"):]
    command = re.search(r"```bash\n(.+?)\n```", section)
    assert command is not None
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert ci == [command.group(1)] == ["python3 dev.py tests"]


def test_dev_py_turns_a_session_name_into_nox_arguments() -> None:
    dev = runpy.run_path(str(REPO / "dev.py"))
    assert dev["nox_args"](["demo"]) == ["-s", "demo"]
    assert dev["nox_args"](["tests-fast", "--", "-x"]) == ["-s", "tests-fast", "--", "-x"]
    assert dev["nox_args"](["-l"]) == ["-l"] and dev["nox_args"]([]) == []


def test_the_ci_session_runs_lint_types_other_pythons_and_everything() -> None:
    noxfile = (REPO / "noxfile.py").read_text()
    assert 'OTHER_PYTHONS = ["3.10", "3.13"]' in noxfile
    assert "tests-pythons-{version}" in noxfile and 'step("typecheck"' in noxfile
    # Every test once: the other Pythons run all but the real engine, .venv runs exactly the real engine.
    assert '"-m", "not vllm"' in noxfile and 'step("tests-vllm", str(PYTHON), "-m", "pytest", "-m", "vllm"' in noxfile
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'python_version = "3.10"' in pyproject and 'requires-python = ">=3.10"' in pyproject
