"""The node's own endpoints over real HTTP on a loopback port, in-process.

A real ``NodeService`` (``cpu`` backend) runs on the test reactor; requests go
through treq over TCP. No llama-server is started: ``llama_server_bin`` points
at a stand-in executable that is never run, and the models either exist (the
tiny GGUF files) or are missing on purpose.
(``stand_in_bin`` comes from conftest: a missing binary would be logged as
an error, and logged errors fail tests.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from rolemesh_node import __version__

ERROR_KEYS = {"message", "type", "code"}


@pytest.fixture
def base_config(tmp_path: Path, tiny_models: dict[str, Path], stand_in_bin: str) -> dict[str, Any]:
    return {
        "listen_host": "127.0.0.1",
        "backend": "cpu",
        "state_dir": str(tmp_path / "state"),
        "llama_server_bin": stand_in_bin,
        "models": {
            "tiny-a": {"path": str(tiny_models["tiny-a"]), "ctx_size": 512, "aliases": ["tiny"]},
            "tiny-b": {"path": str(tiny_models["tiny-b"])},
            "ghost": {"path": "models/ghost.gguf"},  # relative to the config file; never there
            "embedder": {"path": str(tiny_models["tiny-a"]), "embedding": True, "ttl_s": 60},
        },
    }


async def call(http: Any, service: Any, path: str, method: str = "GET",
               headers: dict[str, str] | None = None, body: bytes | None = None) -> tuple[Any, bytes]:
    url = f"http://127.0.0.1:{service.port}{path}"
    response = await http.request(method, url, headers=headers, data=body)
    content = await response.content()
    return response, content


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return None if not values else values[0]


async def get_json(http: Any, service: Any, path: str, status: int = 200, **kwargs: Any) -> Any:
    response, content = await call(http, service, path, **kwargs)
    assert response.code == status, content
    assert header(response, "content-type") == "application/json"
    return json.loads(content)


def assert_error(doc: Any, code: str) -> None:
    assert set(doc) == {"error"}
    assert set(doc["error"]) == ERROR_KEYS
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    assert doc["error"]["type"] == "invalid_request_error"
    assert doc["error"]["code"] == code


# --------------------------------------------------------------------------
# /health


@pytest_twisted.ensureDeferred
async def test_health(node_service: Any, http_client: Any, base_config: dict[str, Any]) -> None:
    service = await node_service(base_config)
    doc = await get_json(http_client, service, "/health")
    assert doc["status"] == "ok"
    assert doc["node_id"] == service.node.node_id
    assert isinstance(doc["uptime_s"], (int, float)) and doc["uptime_s"] >= 0
    assert doc["devices"] == 1
    assert doc["discovered"] is True


@pytest_twisted.ensureDeferred
async def test_head_health(node_service: Any, http_client: Any, base_config: dict[str, Any]) -> None:
    service = await node_service(base_config)
    response, content = await call(http_client, service, "/health", method="HEAD")
    assert response.code == 200
    assert content == b""
    assert header(response, "content-type") == "application/json"


# --------------------------------------------------------------------------
# /v1/models


@pytest_twisted.ensureDeferred
async def test_models_openai_list(node_service: Any, http_client: Any, base_config: dict[str, Any]) -> None:
    service = await node_service(base_config)
    doc = await get_json(http_client, service, "/v1/models")
    assert doc["object"] == "list"
    by_id = {m["id"]: m for m in doc["data"]}
    assert list(by_id) == ["tiny-a", "tiny-b", "ghost", "embedder"]  # config order
    for model in doc["data"]:
        assert model["object"] == "model"
        assert isinstance(model["created"], int)
        assert model["owned_by"] == "rolemesh-node"
        assert model["state"] in {"available", "loading", "loaded", "unavailable"}
        assert model["loaded_on"] == []  # nothing was started
    assert by_id["tiny-a"]["state"] == "available"
    assert by_id["tiny-a"]["available"] is True
    assert by_id["tiny-a"]["aliases"] == ["tiny"]
    assert by_id["tiny-a"]["embedding"] is False
    assert by_id["embedder"]["embedding"] is True
    assert "reason" not in by_id["tiny-a"]


@pytest_twisted.ensureDeferred
async def test_missing_model_file_is_unavailable(node_service: Any, http_client: Any,
                                                 base_config: dict[str, Any], tmp_path: Path) -> None:
    service = await node_service(base_config)  # starts although ghost's file is missing
    ghost_path = str(tmp_path / "models" / "ghost.gguf")

    models = {m["id"]: m for m in (await get_json(http_client, service, "/v1/models"))["data"]}
    assert models["ghost"]["state"] == "unavailable"
    assert models["ghost"]["available"] is False
    assert ghost_path in models["ghost"]["reason"]
    assert models["tiny-b"]["state"] == "available"

    inventory = {m["name"]: m for m in (await get_json(http_client, service, "/v1/node/inventory"))["models"]}
    assert inventory["ghost"]["state"] == "unavailable"
    assert inventory["ghost"]["available"] is False
    assert inventory["ghost"]["path"] == ghost_path
    assert inventory["ghost"]["size_bytes"] is None

    # The node may get the file later: it is checked on demand, not only at start.
    (tmp_path / "models").mkdir()
    Path(ghost_path).write_bytes(b"GGUF")
    models = {m["id"]: m for m in (await get_json(http_client, service, "/v1/models"))["data"]}
    assert models["ghost"]["state"] == "available"


# --------------------------------------------------------------------------
# /v1/node/inventory


@pytest_twisted.ensureDeferred
async def test_inventory(node_service: Any, http_client: Any, base_config: dict[str, Any],
                         tiny_models: dict[str, Path]) -> None:
    service = await node_service(base_config)
    doc = await get_json(http_client, service, "/v1/node/inventory")
    assert doc["node_id"] == service.node.node_id
    assert doc["version"] == __version__
    assert isinstance(doc["uptime_s"], (int, float)) and doc["uptime_s"] >= 0
    assert doc["backend"] == "cpu"
    assert doc["discovered"] is True

    [device] = doc["devices"]
    assert device["id"] == "cpu:0"
    assert device["backend"] == "cpu"
    assert device["index"] == 0
    metrics = device["metrics"]
    assert metrics is not None  # discovery samples once before it fires
    assert {"memory_total_bytes", "memory_used_bytes", "memory_free_bytes", "utilization_pct",
            "sampled_at"} <= set(metrics)
    assert device["child"]["state"] == "idle"
    assert device["child"]["pid"] is None

    models = {m["name"]: m for m in doc["models"]}
    assert list(models) == ["tiny-a", "tiny-b", "ghost", "embedder"]
    a = models["tiny-a"]
    assert a["path"] == str(tiny_models["tiny-a"])
    assert a["size_bytes"] == tiny_models["tiny-a"].stat().st_size
    assert a["ctx_size"] == 512
    assert a["aliases"] == ["tiny"]
    assert a["state"] == "available"
    assert models["embedder"]["embedding"] is True
    assert models["embedder"]["ttl_s"] == 60.0


@pytest_twisted.ensureDeferred
async def test_cpu_devices_three(node_service: Any, http_client: Any, base_config: dict[str, Any]) -> None:
    service = await node_service({**base_config, "cpu_devices": 3})
    doc = await get_json(http_client, service, "/v1/node/inventory")
    assert [(d["id"], d["backend"], d["index"]) for d in doc["devices"]] == [
        ("cpu:0", "cpu", 0), ("cpu:1", "cpu", 1), ("cpu:2", "cpu", 2)]
    assert all(d["metrics"] is not None for d in doc["devices"])
    assert (await get_json(http_client, service, "/health"))["devices"] == 3


# --------------------------------------------------------------------------
# node identity


@pytest_twisted.ensureDeferred
async def test_generated_node_id_persists_across_restarts(node_service: Any, http_client: Any,
                                                         base_config: dict[str, Any], tmp_path: Path) -> None:
    shared = {**base_config, "state_dir": str(tmp_path / "shared-state")}
    assert "node_id" not in shared
    first = await node_service(shared)
    first_id = (await get_json(http_client, first, "/health"))["node_id"]
    await first.stopService()

    second = await node_service(shared)
    assert (await get_json(http_client, second, "/v1/node/inventory"))["node_id"] == first_id
    assert (tmp_path / "shared-state" / "node_id").read_text().strip() == first_id

    # Another state directory: another generated id.
    other = await node_service({**base_config, "state_dir": str(tmp_path / "other-state")})
    assert (await get_json(http_client, other, "/health"))["node_id"] != first_id


@pytest_twisted.ensureDeferred
async def test_node_id_from_the_environment_wins(node_service: Any, http_client: Any, base_config: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLEMESH_NODE_ID", "k8s-node-3.example")  # as a DaemonSet sets it from spec.nodeName
    service = await node_service({**base_config, "node_id": "from-the-shared-file"})
    assert (await get_json(http_client, service, "/health"))["node_id"] == "k8s-node-3.example"
    assert (await get_json(http_client, service, "/v1/node/inventory"))["node_id"] == "k8s-node-3.example"


@pytest_twisted.ensureDeferred
async def test_configured_node_id_wins(node_service: Any, http_client: Any, base_config: dict[str, Any],
                                       tmp_path: Path) -> None:
    service = await node_service({**base_config, "node_id": "rack-3.gpu-node:7"})
    assert (await get_json(http_client, service, "/health"))["node_id"] == "rack-3.gpu-node:7"
    assert (await get_json(http_client, service, "/v1/node/inventory"))["node_id"] == "rack-3.gpu-node:7"
    assert not (tmp_path / "state" / "node_id").exists()  # nothing generated, nothing written


# --------------------------------------------------------------------------
# errors: 404, 405


@pytest.mark.parametrize("path", ["/nope", "/v1/nothing/here", "/v1/model", "/health/", "//health", "/ui//status.js"])
@pytest_twisted.ensureDeferred
async def test_unknown_path_is_json_404(node_service: Any, http_client: Any, base_config: dict[str, Any],
                                        path: str) -> None:
    service = await node_service(base_config)
    doc = await get_json(http_client, service, path, status=404)
    assert_error(doc, "not_found")
    assert path in doc["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_a_path_not_utf8_once_decoded_is_json_400(node_service: Any, http_client: Any,
                                                        base_config: dict[str, Any]) -> None:
    service = await node_service(base_config)
    doc = await get_json(http_client, service, "/v1/models/%ff", status=400)
    assert_error(doc, "invalid_request")


@pytest.mark.parametrize("model_id", ["nope", "org/nope", "tiny-a/extra"])
@pytest_twisted.ensureDeferred
async def test_retrieving_an_unknown_model_is_an_openai_404(node_service: Any, http_client: Any,
                                                            base_config: dict[str, Any], model_id: str) -> None:
    service = await node_service(base_config)
    doc = await get_json(http_client, service, f"/v1/models/{model_id}", status=404)
    assert_error(doc, "model_not_found")
    assert repr(model_id) in doc["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_wrong_method_on_own_endpoint_is_json_405(node_service: Any, http_client: Any,
                                                         base_config: dict[str, Any]) -> None:
    service = await node_service(base_config)
    for method, path in [("POST", "/health"), ("DELETE", "/v1/models"), ("PUT", "/v1/node/inventory")]:
        response, content = await call(http_client, service, path, method=method, body=b"{}")
        assert response.code == 405, (method, path, content)
        assert header(response, "content-type") == "application/json"
        assert_error(json.loads(content), "method_not_allowed")
        allowed = {m.strip() for m in (header(response, "allow") or "").split(",")}
        assert "GET" in allowed and method not in allowed, (method, path, allowed)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
@pytest_twisted.ensureDeferred
async def test_get_on_proxy_route_is_json_405(node_service: Any, http_client: Any,
                                              base_config: dict[str, Any], path: str) -> None:
    service = await node_service(base_config)
    response, content = await call(http_client, service, path)
    assert response.code == 405
    assert header(response, "content-type") == "application/json"
    assert header(response, "allow") == "POST"
    assert_error(json.loads(content), "method_not_allowed")


# --------------------------------------------------------------------------
# X-Request-Id

_GENERATED = re.compile(r"^[0-9a-f]{32}$")


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/v1/node/inventory", "/v1/chat/completions"])
@pytest_twisted.ensureDeferred
async def test_request_id_echoed_when_sane(node_service: Any, http_client: Any, base_config: dict[str, Any],
                                           path: str) -> None:
    service = await node_service(base_config)
    response, _ = await call(http_client, service, path, headers={"X-Request-Id": "client-42.a:b_c"})
    assert header(response, "x-request-id") == "client-42.a:b_c"


@pytest.mark.parametrize("given", [None, "has spaces", "x" * 129, "semi;colon", ""])
@pytest_twisted.ensureDeferred
async def test_request_id_generated_otherwise(node_service: Any, http_client: Any, base_config: dict[str, Any],
                                              given: str | None) -> None:
    service = await node_service(base_config)
    headers = None if given is None else {"X-Request-Id": given}
    first, _ = await call(http_client, service, "/health", headers=headers)
    second, _ = await call(http_client, service, "/health", headers=headers)
    ids = [header(first, "x-request-id"), header(second, "x-request-id")]
    assert all(i is not None and _GENERATED.match(i) for i in ids), ids
    assert ids[0] != ids[1]


@pytest_twisted.ensureDeferred
async def test_request_id_on_routing_errors(node_service: Any, http_client: Any,
                                            base_config: dict[str, Any]) -> None:
    service = await node_service(base_config)
    missing, _ = await call(http_client, service, "/nope", headers={"X-Request-Id": "rid-404"})
    wrong, _ = await call(http_client, service, "/health", method="POST", headers={"X-Request-Id": "rid-405"})
    assert (header(missing, "x-request-id"), header(wrong, "x-request-id")) == ("rid-404", "rid-405")
