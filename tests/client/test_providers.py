"""Which backend, which limits, and above all which key goes where."""

from __future__ import annotations

import httpx
import pytest
import respx

from tests.client.conftest import chat
from vllm_batch import PRESETS, ConfigurationError, Provider, VLLMBatch
from vllm_batch._providers import resolve_provider

FILE = {"id": "file_1", "object": "file", "bytes": 1, "created_at": 0, "filename": "x", "purpose": "batch",
        "status": "processed"}


def upload_headers(url: str, **kwargs) -> httpx.Headers:
    """Submit one request to `url` (mocked) and return the headers the upload was sent with."""
    with respx.mock(assert_all_mocked=True) as router:
        route = router.post(f"{url}/files").mock(return_value=httpx.Response(200, json=FILE))
        router.post(f"{url}/batches").mock(return_value=httpx.Response(400, json={"error": {"message": "stop"}}))
        with VLLMBatch(**kwargs) as batch:
            batch.add_to_batch(**chat("x"))
            with pytest.raises(Exception, match="stop"):
                batch.submit()
        assert route.call_count == 1
        return route.calls.last.request.headers


def test_presets() -> None:
    assert PRESETS["local"].base_url == "http://localhost:4080/v1"
    openai_ = PRESETS["openai"]
    assert (openai_.max_requests, openai_.max_bytes, openai_.mixed_models) == (50_000, 200_000_000, False)
    parasail = PRESETS["parasail"]
    assert parasail.base_url == "https://api.parasail.io/v1" and parasail.api_key_env == "PARASAIL_API_KEY"
    assert (parasail.max_requests, parasail.max_bytes, parasail.mixed_models) == (50_000, 500_000_000, True)


def test_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_provider().provider.name == "local"
    monkeypatch.setenv("BATCH_BASE_URL", "http://gpu-box:9000/v1")
    assert resolve_provider().provider.base_url == "http://gpu-box:9000/v1"
    monkeypatch.setenv("PARASAIL_API_KEY", "ps-key")
    monkeypatch.setenv("BATCH_PROVIDER", "parasail")
    assert resolve_provider().provider.name == "parasail"
    assert resolve_provider("local").provider.name == "local"
    assert resolve_provider(base_url="http://other:1/v1").provider.base_url == "http://other:1/v1"
    with pytest.raises(ConfigurationError, match="unknown provider"):
        resolve_provider("nope")
    with pytest.raises(ConfigurationError, match="either"):
        resolve_provider("local", base_url="http://x/v1")


def test_a_preset_url_inherits_the_preset_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARASAIL_API_KEY", "ps")
    resolved = resolve_provider(base_url="https://api.parasail.io/v1")
    assert resolved.provider.name == "parasail" and resolved.provider.max_bytes == 500_000_000
    assert resolved.api_key == "ps"


def test_custom_provider_with_its_own_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "mine")
    custom = Provider("acme", "https://batch.acme.test/v1", api_key_env="MY_KEY", max_requests=10, max_bytes=1000,
                      mixed_models=True)
    resolved = resolve_provider(custom)
    assert resolved.api_key == "mine" and resolved.provider.max_requests == 10
    assert resolve_provider(base_url="http://x.test/v1", max_requests=7).provider.max_requests == 7


def test_missing_parasail_key_never_falls_back_to_openai_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setenv("BATCH_API_KEY", "batch-secret")
    with pytest.raises(ConfigurationError, match="PARASAIL_API_KEY"):
        VLLMBatch(provider="parasail")


def test_parasail_gets_only_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setenv("PARASAIL_API_KEY", "ps-secret")
    headers = upload_headers("https://api.parasail.io/v1", provider="parasail")
    assert headers["authorization"] == "Bearer ps-secret"


def test_openai_key_is_not_sent_to_a_custom_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-secret")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-secret")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "X-Secret: leaked")
    headers = upload_headers("http://batch.test/v1", base_url="http://batch.test/v1")
    assert "authorization" not in headers
    assert "openai-organization" not in headers and "openai-project" not in headers
    assert "x-secret" not in headers


def test_batch_api_key_goes_only_with_batch_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_BASE_URL", "http://gpu-box:9000/v1")
    monkeypatch.setenv("BATCH_API_KEY", "box-key")
    headers = upload_headers("http://gpu-box:9000/v1")
    assert headers["authorization"] == "Bearer box-key"
    # Another URL given in code: the env key belongs to gpu-box, not to it.
    headers = upload_headers("http://elsewhere.test/v1", base_url="http://elsewhere.test/v1")
    assert "authorization" not in headers
    # An explicit key is the caller's choice for that URL.
    headers = upload_headers("http://elsewhere.test/v1", base_url="http://elsewhere.test/v1", api_key="k2")
    assert headers["authorization"] == "Bearer k2"


def test_batch_api_key_without_base_url_is_for_the_local_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_API_KEY", "local-key")
    assert upload_headers("http://localhost:4080/v1")["authorization"] == "Bearer local-key"
    monkeypatch.setenv("PARASAIL_API_KEY", "ps")
    assert resolve_provider("parasail").api_key == "ps"


def test_openai_preset_keeps_its_org_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-1")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://evil.test/v1")  # never consulted: we always pass base_url
    headers = upload_headers("https://api.openai.com/v1", provider="openai")
    assert headers["authorization"] == "Bearer sk-openai" and headers["openai-organization"] == "org-1"


def test_bad_url() -> None:
    with pytest.raises(ConfigurationError, match="http"):
        resolve_provider(base_url="ftp://x")


def test_a_vllm_batch_server_on_another_port_gets_its_own_limits(api, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.client.conftest import BASE

    api.server_health = {"status": "ok", "engine": "echo", "loaded_model": None}
    monkeypatch.setenv("BATCH_BASE_URL", BASE)
    monkeypatch.setenv("BATCH_API_KEY", "box-key")
    with VLLMBatch(max_requests=3) as batch:
        assert batch.provider.name == "custom"  # nothing asked yet
        batch.add_to_batch(**chat("x"))
        batch.submit()
        assert batch.provider.name == "local" and batch.provider.base_url == BASE
        assert batch.provider.max_bytes == PRESETS["local"].max_bytes  # 512 MiB, not OpenAI's 200 MB
        assert batch.provider.max_requests == 3  # the caller's own limit still wins
    probe = api.health.calls.last.request.headers
    assert "authorization" not in probe  # /health needs no key, so it is not sent one
    assert api.upload.calls.last.request.headers["authorization"] == "Bearer box-key"


def test_a_custom_url_that_is_not_a_vllm_batch_server_keeps_the_safe_limits(api) -> None:
    from tests.client.conftest import BASE

    with VLLMBatch(base_url=BASE) as batch:
        batch.add_to_batch(**chat("x"))
        batch.submit()
        assert batch.provider.name == "custom" and batch.provider.max_bytes == 200_000_000
    assert api.health.call_count == 1  # asked once


def test_the_client_uses_only_the_openai_sdks_public_surface() -> None:
    from pathlib import Path

    import vllm_batch

    source = "\n".join(p.read_text() for p in Path(vllm_batch.__file__).parent.glob("*.py"))
    for private in ("_validate_headers", "_custom_headers", "client._client", "openai._"):
        assert private not in source, private
