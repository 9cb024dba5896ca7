"""The wheel as a user installs it: build it, install it with `[server]` into a fresh venv, and use it from a
folder that holds no source tree.

    python tests/wheel/smoke.py                 # builds the wheel from this checkout
    python tests/wheel/smoke.py --wheel dist/vllm_batch-0.1.0-py3-none-any.whl

Checks: both CLIs answer `--version` with the wheel's version; the installed packages are the venv's (not this
checkout) and carry the dashboard (`vllm_batch_server/ui/`) and both `py.typed`; an installed
`vllm-batch-server serve --engine echo` on a free loopback port serves the dashboard; an echo-engine batch runs
end to end through the installed `vllm-batch` CLI and through the installed client (`from vllm_batch import
VLLMBatch`, and openai-batch's spelling `Batch`). pip's cache is reused, so a second run takes seconds to install.
Exit status 0 when all passed; `nox -s wheel` runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = "echo-model"


def log(message: str) -> None:
    print(f"[wheel smoke {time.monotonic() - START:5.1f}s] {message}", flush=True)


START = time.monotonic()


def run(*command: str | Path, cwd: Path, env: dict[str, str], stdin: str | None = None) -> str:
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=env, input=stdin, capture_output=True,
                          text=True, check=False, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"FAILED ({done.returncode}): {' '.join(map(str, command))}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def build_wheel(out: Path) -> Path:
    """`python -m build --wheel`; without build isolation when hatchling is already here (seconds, not tens)."""
    isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-isolation"]
    run(sys.executable, "-m", "build", "--wheel", *isolation, "--outdir", out, ROOT, cwd=ROOT, env=dict(os.environ))
    (wheel,) = out.glob("vllm_batch-*.whl")
    return wheel


def clean_env(venv: Path) -> dict[str, str]:
    """The user's shell: the venv first on PATH, nothing of ours on sys.path, no BATCH_* settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP") and not k.startswith("BATCH_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


def wait_healthy(url: str, server: subprocess.Popen[bytes], server_log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"FAILED: the installed server exited with {server.returncode}:\n{server_log.read_text()}")
        try:
            if get(url + "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"FAILED: the installed server was not healthy within {timeout}s:\n{server_log.read_text()}")


CLIENT = textwrap.dedent("""
    import sys
    import vllm_batch
    from vllm_batch import Batch, VLLMBatch

    assert Batch is VLLMBatch and "Batch" in vllm_batch.__all__
    with VLLMBatch(base_url=sys.argv[1], api_key="none") as batch:
        for n in range(5):
            batch.add_to_batch(model=sys.argv[2], messages=[{"role": "user", "content": f"client {n}"}],
                               max_tokens=8)
        status, output, errors = batch.submit_wait_download(poll_interval=0.5, progress=False, timeout=60)
        results = sorted(batch.results(), key=lambda r: r.custom_id)
        assert status.status == "completed", status
        assert len(results) == 5 and all(r.text and not r.error for r in results), results
        print(status.id, len(results), repr(results[0].text))
""")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--wheel", type=Path, help="test this wheel instead of building one from the checkout")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="vllm-batch-wheel-"))
    server: subprocess.Popen[bytes] | None = None
    try:
        wheel = args.wheel.resolve() if args.wheel else build_wheel(tmp / "dist")
        version = wheel.name.split("-")[1]
        with zipfile.ZipFile(wheel) as archive:
            assert archive.testzip() is None
        log(f"wheel: {wheel.name}")

        venv = tmp / "venv"
        run(sys.executable, "-m", "venv", venv, cwd=tmp, env=dict(os.environ))
        env = clean_env(venv)
        python = venv / "bin" / "python"
        # pip's cache is left on: CI and a developer's second run install from it. --no-compile: byte-compiling
        # every installed module (openai's thousand) costs more than compiling the few that run.
        run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
            f"{wheel}[server]",
            cwd=tmp, env=env)
        log("installed with [server] into a fresh venv")

        work = tmp / "work"  # the user's folder: no source tree in it or above it on sys.path
        work.mkdir()
        for command in ("vllm-batch", "vllm-batch-server"):
            answer = run(venv / "bin" / command, "--version", cwd=work, env=env).split()
            assert answer == [command, version], (command, answer)
        log(f"vllm-batch --version and vllm-batch-server --version: {version}")

        where = json.loads(run(python, "-c", textwrap.dedent("""
            import json, vllm_batch, vllm_batch_server
            from pathlib import Path
            print(json.dumps({"client": str(Path(vllm_batch.__file__).parent),
                              "server": str(Path(vllm_batch_server.__file__).parent),
                              "version": vllm_batch.__version__, "server_version": vllm_batch_server.__version__}))
        """), cwd=work, env=env))
        client_dir, server_dir = Path(where["client"]), Path(where["server"])
        for installed in (client_dir, server_dir):
            assert installed.is_relative_to(venv) and not installed.is_relative_to(ROOT), installed
            assert (installed / "py.typed").is_file(), f"{installed} has no py.typed"
        assert where["version"] == where["server_version"] == version, where
        ui = server_dir / "ui"
        shipped = sorted(p.relative_to(ui).as_posix() for p in ui.rglob("*") if p.is_file())
        source = sorted(p.relative_to(ROOT / "vllm_batch_server" / "ui").as_posix()
                        for p in (ROOT / "vllm_batch_server" / "ui").rglob("*") if p.is_file())
        assert shipped == source, (shipped, source)
        log(f"installed in the venv, not the checkout; py.typed in both; dashboard: {len(shipped)} files")

        port = free_port()
        root = f"http://127.0.0.1:{port}"
        server_log = tmp / "server.log"
        with open(server_log, "wb") as out:
            server = subprocess.Popen(
                [str(venv / "bin" / "vllm-batch-server"), "serve", "--engine", "echo", "--model", MODEL,
                 "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(tmp / "data")],
                cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(root, server, server_log)
        status, page = get(root + "/")
        assert status == 200 and page == (ui / "index.html").read_bytes()
        for name in shipped:
            status, body = get(f"{root}/ui/{name}")
            assert status == 200 and body == (ui / name).read_bytes(), name
        log(f"installed server on {root}: the dashboard's {len(shipped)} files are served")

        (work / "prompts.txt").write_text("".join(f"cli prompt {n}\n" for n in range(4)))
        run("vllm-batch", "create", "prompts.txt", "--model", MODEL, "--max-tokens", "8", "-o", "requests.jsonl",
            cwd=work, env=env)
        batch_id = run("vllm-batch", "submit", "requests.jsonl", "--base-url", f"{root}/v1", "--wait",
                       "--poll-interval", "1", "--timeout", "60", "--no-progress", "-o", "results.jsonl",
                       cwd=work, env=env).strip()
        lines = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
        assert len(lines) == 4 and all(line["response"]["status_code"] == 200 for line in lines), lines
        log(f"installed vllm-batch CLI: {batch_id} -> 4 results")

        answer = run(python, "-c", CLIENT, f"{root}/v1", MODEL, cwd=work, env=env).strip()
        log(f"installed client (VLLMBatch / Batch): {answer}")

        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        # uvicorn shuts down gracefully, then re-raises the signal: exit status 0 or "killed by SIGTERM".
        stopped = server_log.read_text()
        assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in stopped, (code, stopped)
        server = None
        log("server stopped gracefully on SIGTERM")
        log("PASSED")
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        if args.keep:
            print(f"kept {tmp}")
        else:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()
