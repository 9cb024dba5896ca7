"""What the README promises about setting up and testing is what `dev.py`, the noxfile and CI do."""

from __future__ import annotations

import re
import runpy
import textwrap
from pathlib import Path

import pytest

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
    noxfile = runpy.run_path(str(REPO / "noxfile.py"))
    assert noxfile["OTHER_PYTHONS"] == ["3.10", "3.13"]
    source = (REPO / "noxfile.py").read_text()
    assert "tests-pythons-{version}" in source
    for step in ('step("lint"', 'step("layers"', 'step("typecheck"'):
        assert step in source
    # Every test once: the other Pythons split all but the real engine in halves, .venv runs exactly the real
    # engine.
    assert '"--splits", str(len(OTHER_PYTHONS)), "--group", str(group)' in source
    assert '"-m", "not vllm"' in source and '[str(PYTHON), "-m", "pytest", "-m", marks' in source
    assert sorted(noxfile["REAL_ENGINE_RUNS"].values()) == ["vllm and not vllm_session", "vllm and vllm_session"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'python_version = "3.10"' in pyproject and 'requires-python = ">=3.10"' in pyproject


@pytest.fixture(scope="module")
def selections() -> dict[str, set[str]]:
    """What the fast suite, its two halves and the two real-engine runs select, collected in one process."""
    import json
    import subprocess
    import sys

    noxfile = runpy.run_path(str(REPO / "noxfile.py"))
    assert (REPO / noxfile["DURATIONS"][-1]).is_file()
    # Two folders stand for the whole fast suite: collecting all of it three times takes half a minute.
    fast = ["-m", "not vllm", "tests/server", "tests/client"]
    wanted = {"everything": fast,
              **{f"half {group}": [*fast, "--splits", "2", "--group", str(group), *noxfile["DURATIONS"]]
                 for group in (1, 2)},
              **{marks: ["-m", marks, "tests/vllm"] for marks in noxfile["REAL_ENGINE_RUNS"].values()}}
    done = subprocess.run([sys.executable, "-m", "tests.helpers.collect", json.dumps(list(wanted.values()))],
                          capture_output=True, text=True, cwd=REPO, check=True)
    found = json.loads(done.stdout.splitlines()[-1])
    return {name: set(ids) for name, ids in zip(wanted, found, strict=True)}


def test_the_halves_of_the_fast_suite_add_up_to_all_of_it(selections: dict[str, set[str]]) -> None:
    """Each fast test runs in exactly one half (and the recorded durations are where the split reads them)."""
    halves = [selections["half 1"], selections["half 2"]]
    assert halves[0] and halves[1] and not halves[0] & halves[1]
    assert halves[0] | halves[1] == selections["everything"]


def test_the_real_engine_runs_split_the_session_servers_tests_from_the_rest(
        selections: dict[str, set[str]]) -> None:
    """tests/vllm/conftest.py marks the tests on the session server `vllm_session` from their fixtures, so CI's
    two real-engine runs start the session server in one process only."""
    session = {nodeid.split("::")[0] for nodeid in selections["vllm and vllm_session"]}
    own = {nodeid.split("::")[0] for nodeid in selections["vllm and not vllm_session"]}
    assert {"tests/vllm/test_e2e.py", "tests/vllm/test_online.py", "tests/vllm/test_engine_death.py"} <= session
    assert {"tests/vllm/test_crash.py", "tests/vllm/test_online_preemption.py"} <= own
    assert not session & own  # a module split over both would start the session server in both


def test_cpu_account_counts_the_cpu_of_the_processes_a_test_starts(tmp_path: Path) -> None:
    """`pytest -p tests.helpers.cpu_account`: which tests cost CPU (on 2 busy cores, what the suite's time is
    made of), the processes they start included, which `--durations` cannot tell from waiting."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "test_costs.py").write_text(textwrap.dedent("""
        import signal, subprocess, sys, time
        BURN = "import time\\nend = time.process_time() + 1.0\\nwhile time.process_time() < end: pass\\n"
        HOLD = BURN + "print('burnt', flush=True)\\ntime.sleep(60)\\n"  # burns, says so, lives on
        # A parent that starts a burning child and, on SIGTERM, reaps it and exits: a server and its engine.
        TREE = ("import signal, subprocess, sys\\n"
                f"child = subprocess.Popen([sys.executable, '-c', {HOLD!r}])\\n"
                "signal.signal(signal.SIGTERM, lambda *_: (child.kill(), child.wait(), sys.exit(0)))\\n"
                "signal.pause()\\n")
        held = []
        def test_burns_in_a_child():
            subprocess.run([sys.executable, "-c", BURN], check=True)
        def test_waits():
            time.sleep(1.0)
        def test_starts_processes_that_burn_and_outlive_it():
            held.append(subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE))
            held.append(subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE))
            for process in held:
                assert process.stdout.readline() == b"burnt\\n"
        def test_stops_them():
            held[0].kill()
            held[1].send_signal(signal.SIGTERM)
            for process in held:
                process.wait()
        """))
    out = tmp_path / "cpu.jsonl"
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.helpers.cpu_account", "-q",
                           "-p", "no:cacheprovider", str(tmp_path / "test_costs.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(repo), "BATCH_TEST_CPU": str(out)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CPU seconds: the 25 costliest tests" in done.stdout
    seconds = {json.loads(line)["test"].split("::")[1]: json.loads(line)["cpu_seconds"]
               for line in out.read_text().splitlines()}
    assert seconds["test_burns_in_a_child"] >= 0.9, seconds
    assert seconds["test_waits"] < 0.5, seconds
    # A process is counted once, where it used its CPU, not again by the test that reaps it (a session's
    # server was counted twice: its whole life went to the last test), nor a child its parent reaped.
    assert seconds["test_starts_processes_that_burn_and_outlive_it"] >= 1.8, seconds
    assert seconds["test_stops_them"] < 0.5, seconds
