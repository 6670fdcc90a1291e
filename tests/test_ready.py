"""``GET /ready``: 200 when the node serves, 503 while it starts or stops or cannot serve.

Through real nodes (``cpu`` backend) on loopback, like ``test_endpoints.py``. No llama-server is started.
Discovery is held back where a test needs the "starting" phase: the cpu backend's ``discover`` waits for a
Deferred the test fires.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from rolemesh_node.config import load_config
from rolemesh_node.devices.cpu import CpuBackend

KEY = "ready-test-key-0123456789"
WAIT_S = 30.0


async def get(http: Any, port: int, path: str, method: str = "GET", key: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    response = await http.request(method, f"http://127.0.0.1:{port}{path}", headers=headers)
    body = await response.content()
    if method == "HEAD":
        assert body == b""
        return response.code, None
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    if path == "/ready":
        assert response.headers.getRawHeaders("x-request-id")
    return response.code, json.loads(body)


@pytest_twisted.ensureDeferred
async def test_ready_follows_discovery_and_stop(monkeypatch: pytest.MonkeyPatch, write_config: Any,
                                                tmp_path: Path, stand_in_bin: str, http_client: Any) -> None:
    from twisted.internet import reactor

    from rolemesh_node.service import makeService

    gate: Deferred[None] = Deferred()
    discover = CpuBackend.discover

    def held_discover(self: CpuBackend) -> Any:
        return gate.addCallback(lambda _: discover(self))

    monkeypatch.setattr(CpuBackend, "discover", held_discover)
    config = load_config(write_config({"backend": "cpu", "llama_server_bin": stand_in_bin, "api_keys": [KEY],
                                       "state_dir": str(tmp_path / "state")}))
    service = makeService(dataclasses.replace(config, listen_port=0), reactor)
    service.startService()
    try:
        # listening, alive, but discovery has not finished: not ready
        assert await get(http_client, service.port, "/ready") == (
            503, {"ready": False, "status": "starting", "reason": "device discovery has not finished"})
        assert await get(http_client, service.port, "/ready", "HEAD") == (503, None)
        status, health = await get(http_client, service.port, "/health")
        assert status == 200 and health["discovered"] is False

        gate.callback(None)
        await service.when_discovered().addTimeout(WAIT_S, reactor)
        assert await get(http_client, service.port, "/ready") == (200, {"ready": True, "status": "ready",
                                                                        "reason": None})
        assert await get(http_client, service.port, "/ready", "HEAD") == (200, None)
        # no key needed for the probe, while the rest of the API wants one
        assert (await get(http_client, service.port, "/v1/models"))[0] == 401
        assert (await get(http_client, service.port, "/v1/models", key=KEY))[0] == 200

        # the node stops (the first thing the service's stop does) while its port still answers
        await service.runtime.stopService().addTimeout(WAIT_S, reactor)
        assert await get(http_client, service.port, "/ready") == (
            503, {"ready": False, "status": "stopping", "reason": "the node is stopping"})
        assert (await get(http_client, service.port, "/health"))[0] == 200  # still alive
    finally:
        if not gate.called:
            gate.callback(None)
        await service.stopService().addTimeout(WAIT_S, reactor)


@pytest.mark.allow_errors
@pytest_twisted.ensureDeferred
async def test_not_ready_without_devices(node_service: Any, http_client: Any, stand_in_bin: str,
                                         fail_on_logged_errors: list[Any]) -> None:
    service = await node_service({"backend": "cpu", "devices": [4], "llama_server_bin": stand_in_bin})
    assert await get(http_client, service.port, "/ready") == (
        503, {"ready": False, "status": "no_devices", "reason": "no device was found (see the log)"})
    status, health = await get(http_client, service.port, "/health")
    assert status == 200 and health["discovered"] is True and health["devices"] == 0
    assert any("no devices found" in str(e.get("log_format")) for e in fail_on_logged_errors)


@pytest.mark.allow_errors
@pytest_twisted.ensureDeferred
async def test_not_ready_without_llama_server_until_it_appears(node_service: Any, http_client: Any,
                                                               tmp_path: Path,
                                                               fail_on_logged_errors: list[Any]) -> None:
    binary = tmp_path / "later" / "llama-server"
    service = await node_service({"backend": "cpu", "llama_server_bin": str(binary)})
    assert await get(http_client, service.port, "/ready") == (
        503, {"ready": False, "status": "no_llama_server",
              "reason": "llama-server was not found (see /v1/node/inventory)"})
    assert fail_on_logged_errors, "the missing binary is logged at start"

    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)
    assert await get(http_client, service.port, "/ready") == (200, {"ready": True, "status": "ready",
                                                                    "reason": None})
    status, inventory = await get(http_client, service.port, "/v1/node/inventory")
    assert inventory["llama_server_error"] is None and inventory["llama_server_bin"] == str(binary)
