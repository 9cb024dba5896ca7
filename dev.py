#!/usr/bin/env python3
"""Run a developer session from nothing but `python3`: `python3 dev.py demo`, `python3 dev.py tests`, ...

It makes `.venv/` in this folder (never touching the system Python, which Debian and Ubuntu forbid anyway),
puts nox and uv in it, and hands over to `noxfile.py`, which installs everything else into that same `.venv/`
(with uv, several times faster than pip; DEV_PY_WITHOUT_UV=1 for pip alone): one environment for the demo, the
tests and the benchmarks.

    python3 dev.py demo                # the quickstart on real vLLM (CPU)
    python3 dev.py tests               # what CI runs: lint, types, the fast suite on other Pythons, everything
    python3 dev.py tests-fast          # no real engine: a couple of minutes
    python3 dev.py -s benchmarks -- throughput   # anything else goes to nox as it is

Only the standard library is used here. Where `venv` cannot install pip (Debian/Ubuntu without the
`python3-venv` package) the environment is made without it and pip is fetched from PyPI as a wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
NOX = "nox>=2024.4"
UV = "uv>=0.5"  # DEV_PY_WITHOUT_UV=1: pip alone, as before
MIN_PYTHON = (3, 10)
PIP_SIMPLE = "https://pypi.org/simple/pip/"


def say(text: str) -> None:
    print(f"dev.py: {text}", file=sys.stderr, flush=True)


def has_module(python: Path, module: str) -> bool:
    done = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, check=False)
    return done.returncode == 0


def fetch_pip_wheel(folder: Path) -> Path:
    """The newest pip wheel from PyPI (PEP 691 JSON index), checked against its sha256."""
    import hashlib

    request = urllib.request.Request(PIP_SIMPLE, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        files = json.load(response)["files"]
    wheels = [f for f in files if f["filename"].endswith("-py3-none-any.whl") and not f.get("yanked")]
    newest = wheels[-1]  # PyPI lists files oldest first
    path = folder / newest["filename"]
    with urllib.request.urlopen(newest["url"], timeout=120) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != newest["hashes"]["sha256"]:
        raise SystemExit(f"dev.py: {newest['filename']} from PyPI does not match its sha256; try again")
    path.write_bytes(data)
    return path


def make_venv() -> None:
    if has_module(Path(sys.executable), "ensurepip") and not os.environ.get("DEV_PY_WITHOUT_ENSUREPIP"):
        say(f"creating {VENV} with {sys.executable}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        return
    # Debian and Ubuntu ship ensurepip in a separate package (python3-venv); do without it.
    say(f"creating {VENV} without ensurepip (the python3-venv package is not installed); pip comes from PyPI")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(VENV)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            wheel = fetch_pip_wheel(Path(tmp))
        except OSError as exc:
            raise SystemExit(
                f"dev.py: could not fetch pip from PyPI ({exc}). Install the python3-venv package "
                "(sudo apt install python3-venv) and run this again."
            ) from None
        # A pip wheel runs as it is: use it to install pip itself into the new environment.
        subprocess.run([str(PYTHON), f"{wheel}/pip", "install", "--quiet", str(wheel)], check=True)


def nox_args(argv: list[str]) -> list[str]:
    """`demo` is `-s demo`; `tests-fast -- -x` is `-s tests-fast -- -x`; options go to nox as they are."""
    return argv if not argv or argv[0].startswith("-") else ["-s", *argv]


def main(argv: list[str]) -> int:
    if sys.version_info < MIN_PYTHON:
        say(f"needs Python {'.'.join(map(str, MIN_PYTHON))} or newer; this is {sys.version.split()[0]}")
        return 1
    if not PYTHON.exists():
        make_venv()
    if not has_module(PYTHON, "nox"):
        say(f"installing {NOX} into {VENV}")
        subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", NOX], check=True)
    if not os.environ.get("DEV_PY_WITHOUT_UV") and not has_module(PYTHON, "uv"):
        # uv installs the rest (noxfile.py) several times faster than pip; without it, pip does.
        say(f"installing {UV} into {VENV}")
        done = subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", UV], check=False)
        if done.returncode:
            say("could not install uv; pip installs everything instead (slower)")
    os.chdir(ROOT)
    return subprocess.run([str(PYTHON), "-m", "nox", *nox_args(argv)], check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
