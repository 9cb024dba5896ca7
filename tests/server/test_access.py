"""API key, /v1/models and /health."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import AppFactory, chat_lines, sdk, submit, wait_for


def test_api_key_is_required_on_every_route_but_health(app_factory: AppFactory) -> None:
    server = app_factory(api_key="s3cret")
    for wrong in ("nope", "s3cre", "s3cret2"):
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk(server, api_key=wrong).files.list()
        assert caught.value.code == "invalid_api_key"
    for method, path in (("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/files/file-x"),
                         ("GET", "/v1/files/file-x/content"), ("DELETE", "/v1/files/file-x"),
                         ("GET", "/v1/batches"), ("POST", "/v1/batches"), ("GET", "/v1/batches/batch_x"),
                         ("POST", "/v1/batches/batch_x/cancel"), ("GET", "/v1/models"), ("GET", "/v1/nothing")):
        response = server.http.request(method, server.root_url + path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert server.http.get(server.root_url + "/health").status_code == 200

    client = sdk(server)  # the right key
    assert wait_for(client, submit(client, chat_lines(2)).id).status == "completed"


def test_models_and_health(app_factory: AppFactory) -> None:
    server = app_factory(models=["alpha", "org/beta"])
    client = sdk(server)
    models = client.models.list()
    assert [m.id for m in models] == ["alpha", "org/beta"]
    assert all(m.object == "model" and m.owned_by == "vllm-batch" for m in models)
    assert client.models.retrieve("org/beta").id == "org/beta"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gamma")
    health = server.http.get(server.root_url + "/health").json()
    assert health["status"] == "ok" and health["engine"] == "echo"
