"""The node-wide scheduler through the real llama-server: grouping, replicas, waiting clients kept informed.

Assertions are on counts (switches, devices used, what a client received), never on times.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList, ensureDeferred

from tests.test_proxy_real import chat_body, post, proxy_config

pytestmark = pytest.mark.llama


async def closed_loop(service: Any, models: list[str], requests: int, max_tokens: int = 4,
                      extra: dict[str, Any] | None = None) -> list[str]:
    """One client: ``requests`` requests in a row, cycling through ``models``; the devices that served them."""
    devices = []
    for i in range(requests):
        body = json.loads(chat_body(models[i % len(models)], max_tokens=max_tokens))
        body.update(extra or {})
        response = await post(service, "/v1/chat/completions", json.dumps(body).encode())
        content = await response.content()
        assert response.code == 200, content
        devices.append(response.headers.getRawHeaders("x-rolemesh-device")[0])
    return devices


async def run_clients(service: Any, plans: list[list[str]], requests: int, **kwargs: Any) -> list[list[str]]:
    results = await DeferredList([ensureDeferred(closed_loop(service, models, requests, **kwargs))
                                  for models in plans], consumeErrors=True, fireOnOneErrback=False)
    out = []
    for ok, value in results:
        assert ok, value
        out.append(value)
    return out


def switches(service: Any) -> int:
    return sum(slot.switches for slot in service.node.slots.values())


@pytest_twisted.ensureDeferred
async def test_two_clients_per_model_do_not_thrash(node_service, tiny_models, llama_server_bin):
    service = await node_service(proxy_config(tiny_models, max_pending_requests_per_device=8))
    per_client = 40
    done = await run_clients(service, [["tiny-a"], ["tiny-a"], ["tiny-b"], ["tiny-b"]], per_client)
    total = sum(len(d) for d in done)
    assert total == 4 * per_client
    # first wave: 1.0 restarts per request with these clients; grouping with a bounded wait: a few in all
    assert switches(service) <= 0.1 * total
    assert service.node.slots["cpu:0"].inflight == 0 and service.node.coordinator.queue_counts() == {}


@pytest_twisted.ensureDeferred
async def test_clients_that_alternate_models_switch_once_per_round(node_service, tiny_models, llama_server_bin):
    service = await node_service(proxy_config(tiny_models, max_pending_requests_per_device=8))
    per_client = 20
    await run_clients(service, [["tiny-a", "tiny-b"]] * 4, per_client)
    # 0.25 per request is the floor for this traffic (each round of four requests needs one switch)
    assert switches(service) <= 0.3 * 4 * per_client


@pytest_twisted.ensureDeferred
async def test_a_hot_model_is_served_by_both_devices(node_service, tiny_models, llama_server_bin):
    config = proxy_config(tiny_models, cpu_devices=2, max_pending_requests_per_device=8)
    service = await node_service(config)
    # long enough that waiting for the one device costs more than loading it on the other
    done = await run_clients(service, [["tiny-a"]] * 8, 4, max_tokens=64, extra={"ignore_eos": True})
    used = {device for client in done for device in client}
    assert used == {"cpu:0", "cpu:1"}
    assert [slot.model for slot in service.node.slots.values()] == ["tiny-a", "tiny-a"]
    costs = service.node.inventory_json()["switch_costs"]
    assert {(row["model"], row["device"]) for row in costs} == {("tiny-a", "cpu:0"), ("tiny-a", "cpu:1")}


def slow_start_bin(tmp_path: Path, real: str, delay_s: float, then: str = "exec") -> str:
    """A llama-server that takes ``delay_s`` to start (``then``: 'exec' the real one, or 'fail')."""
    script = tmp_path / "slow-llama-server"
    tail = f'exec "{real}" "$@"' if then == "exec" else "echo 'load failed: out of memory' >&2; exit 1"
    script.write_text(f"#!/bin/sh\nsleep {delay_s}\n{tail}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def sse_events(body: bytes) -> list[bytes]:
    return [e.strip() for e in body.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]


@pytest_twisted.ensureDeferred
async def test_a_stream_waiting_for_a_load_gets_comments_then_its_answer(node_service, tiny_models,
                                                                          llama_server_bin, tmp_path):
    config = proxy_config(tiny_models, llama_server_bin=slow_start_bin(tmp_path, llama_server_bin, 3.5))
    service = await node_service(config)
    streamed = post(service, "/v1/chat/completions", chat_body("tiny-a", max_tokens=3, stream=True))
    plain = post(service, "/v1/chat/completions", chat_body("tiny-a", max_tokens=3))
    response = await streamed
    assert response.code == 200 and response.headers.getRawHeaders("content-type")[0] == "text/event-stream"
    events = sse_events(await response.content())
    assert events[0].startswith(b": loading model tiny-a on cpu:0, ")
    data = [e for e in events if e.startswith(b"data: ")]
    assert data[-1] == b"data: [DONE]" and b'"choices"' in data[0]
    answer = await plain  # a non-streamed request just waits
    assert answer.code == 200 and json.loads(await answer.content())["choices"]


@pytest.mark.allow_errors
@pytest_twisted.ensureDeferred
async def test_a_start_that_fails_after_comments_reaches_the_stream_as_an_error_event(
        node_service, tiny_models, llama_server_bin, tmp_path):
    config = proxy_config(tiny_models, llama_server_bin=slow_start_bin(tmp_path, llama_server_bin, 3.5, "fail"))
    service = await node_service(config)
    streamed = post(service, "/v1/chat/completions", chat_body("tiny-a", max_tokens=3, stream=True))
    plain = post(service, "/v1/chat/completions", chat_body("tiny-a", max_tokens=3))
    response = await streamed
    assert response.code == 200
    events = sse_events(await response.content())
    assert events[0].startswith(b": loading model tiny-a on cpu:0")
    error = json.loads(events[-1][len(b"data: "):])["error"]
    assert error["code"] == "model_not_ready" and "out of memory" in error["message"]
    answer = await plain
    assert answer.code == 503 and json.loads(await answer.content())["error"]["code"] == "model_not_ready"
    assert service.node.coordinator.queue_counts() == {}
