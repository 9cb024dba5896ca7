"""Schema-driven fuzzing with schemathesis against the server's own OpenAPI description (GET /openapi.json):
valid and invalid requests for every operation. No answer is a 5xx, every refusal is in OpenAI's error shape,
and what the server answers matches the schemas it publishes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from starlette.routing import Route

from tests.helpers.server import RunningServer, make_server
from vllm_batch_server.api.openapi import spec
from vllm_batch_server.app import create_app
from vllm_batch_server.settings import Settings


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = make_server(tmp_path_factory.mktemp("schema") / "data",
                          extra_args=["--max-file-bytes", str(64 * 1024)]).start()
    yield running
    running.kill()
    assert "unhandled error" not in running.log()


@pytest.fixture(scope="module")
def api_schema(server: RunningServer) -> Any:
    published = httpx.get(server.root_url + "/openapi.json").raise_for_status().json()
    return schemathesis.openapi.from_dict(published)


# Driven by hand rather than through schemathesis's pytest plugin, which does not run under pytest 9.
# Invalid input can only be made for operations that take some (/health takes none, not even a key).
# An event stream never ends by itself, so it cannot be called like this; tests/server/test_events_api.py
# covers it.
STREAMS = {path for path, item in spec()["paths"].items() for operation in item.values()
           if "text/event-stream" in operation["responses"].get("200", {}).get("content", {})}
OPERATIONS = [(path, method, mode) for path, item in spec()["paths"].items() for method, operation in item.items()
              for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
              if path not in STREAMS and (mode == GenerationMode.POSITIVE or operation.get("parameters")
                                          or operation.get("requestBody") or operation.get("security", True))]


@pytest.mark.parametrize("path,method,mode", OPERATIONS, ids=lambda v: getattr(v, "value", v))
def test_every_operation(api_schema: Any, server: RunningServer, path: str, method: str,
                         mode: GenerationMode) -> None:
    operation = api_schema[path][method.upper()]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        response = case.call(base_url=server.root_url, timeout=30)
        case.validate_response(response, checks=[not_a_server_error, content_type_conformance,
                                                 response_schema_conformance])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]

    run()


def test_every_route_is_described() -> None:
    app = create_app(Settings(engine="echo", models=["echo-model"]))
    served = set()
    for route in app.routes:
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)
        served.update((method.lower(), path) for method in (route.methods or ()) if method != "HEAD")
    described = {(method, path) for path, item in spec()["paths"].items() for method in item}
    assert served == described


def test_the_description_is_served_behind_the_key(tmp_path: Any) -> None:
    server = make_server(tmp_path / "data", api_key="sk-k").start()
    try:
        assert httpx.get(server.root_url + "/openapi.json").status_code == 401
        with_key = httpx.get(server.root_url + "/openapi.json", headers={"authorization": "Bearer sk-k"})
        assert with_key.status_code == 200 and with_key.json()["openapi"].startswith("3.1")
    finally:
        server.kill()
