"""Auth, connection and header limits, and Prometheus metrics, over real HTTP on loopback."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from rolemesh_node.auth import ApiKeys, load_api_keys
from rolemesh_node.config import ConfigError, NodeConfig, parse_config
from rolemesh_node.web import absolute_to_origin_form
from tests.rawpeer import Peer
from tests.test_supervisor_real import eventually, models_config

KEY = "k-0123456789abcdef-secret"
OTHER = "k-fedcba9876543210-other"


def url(service: Any, path: str) -> str:
    return f"http://127.0.0.1:{service.port}{path}"


# ------------------------------------------------------------------ auth (units)


def test_api_keys_accept_only_a_bearer_with_a_known_key():
    keys = ApiKeys([KEY, OTHER])
    assert keys.allows(b"Bearer " + KEY.encode()) and keys.allows(b"bearer " + OTHER.encode())
    for header in (None, b"", KEY.encode(), b"Basic " + KEY.encode(), b"Bearer", b"Bearer " + KEY[:-1].encode(),
                   b"Bearer " + KEY.encode() + b"x"):
        assert not keys.allows(header)
    assert KEY not in repr(keys) and "2 key(s)" in repr(keys)


def test_api_key_file_and_config_validation(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"# fleet keys\n{KEY}\n\n{OTHER}\n")
    config = parse_config(f"api_keys: ['{'z' * 20}']\napi_key_file: {key_file}\n", "c.yaml", tmp_path)
    assert len(load_api_keys(config)) == 3
    assert KEY not in repr(config)  # keys are repr=False
    with pytest.raises(ConfigError) as info:
        parse_config("api_keys: ['short']\n", "c.yaml", tmp_path)
    assert str(info.value) == ("config error: c.yaml: api_keys[0]: an API key must be at least 16 characters "
                               "without white space")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError) as info:
        load_api_keys(NodeConfig(source="c.yaml", api_key_file=empty))
    assert "api_key_file" in str(info.value) and "no key" in str(info.value)


# ------------------------------------------------------------------ auth (real HTTP)


@pytest_twisted.ensureDeferred
async def test_every_route_but_the_probes_needs_the_key(node_service, tiny_models, llama_server_bin):
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        service = await node_service(models_config(tiny_models, api_keys=[KEY]))
        for probe in ("/health", "/ready"):  # a kubelet or load balancer has no key
            answer = await treq.get(url(service, probe), persistent=False)
            assert answer.code == 200, probe
            await answer.content()
        body = json.dumps({"model": "tiny-a", "prompt": "x", "max_tokens": 2}).encode()
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/node/inventory"), ("GET", "/metrics"),
                             ("POST", "/v1/completions"), ("GET", "/nope")):
            for auth in (None, "Bearer wrong-key-wrong-key", f"Basic {KEY}"):
                headers = {"Authorization": auth} if auth else {}
                response = await treq.request(method, url(service, path), headers=headers, data=body,
                                              persistent=False)
                doc = json.loads(await response.content())
                assert response.code == 401, (path, auth)
                assert doc["error"]["type"] == "authentication_error" and doc["error"]["code"] == "invalid_api_key"
                assert response.headers.getRawHeaders("x-request-id"), (path, auth)
                assert response.headers.getRawHeaders("www-authenticate")[0].startswith("Bearer")
        ok = await treq.post(url(service, "/v1/completions"), data=body, persistent=False,
                             headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert ok.code == 200 and json.loads(await ok.content())["choices"]
        metrics = await treq.get(url(service, "/metrics"), headers={"Authorization": f"Bearer {KEY}"},
                                 persistent=False)
        text = (await metrics.content()).decode()
        assert "rolemesh_auth_failures_total 15.0" in text
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert KEY not in logged and "wrong-key" not in logged


@pytest_twisted.ensureDeferred
async def test_warns_when_listening_beyond_loopback_without_keys(node_service):
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        await node_service({"backend": "cpu", "listen_host": "0.0.0.0"})
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [formatEvent(e) for e in events if e.get("log_level") is not None
                and e["log_level"].name == "warn" and "WITHOUT API keys" in formatEvent(e)]
    assert len(warnings) == 1


# ------------------------------------------------------------------ limits


@pytest_twisted.ensureDeferred
async def test_slow_headers_are_cut_off_with_fin_and_a_408(node_service):
    service = await node_service({"backend": "cpu", "header_read_timeout_s": 0.3})
    peer = Peer(service.port)
    silent = Peer(service.port)
    try:
        peer.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # ...and never the blank line
        began = time.monotonic()
        await eventually(peer.closed, timeout=5, what="the slow client to be cut off")
        await eventually(silent.closed, timeout=5, what="the silent client to be cut off")
        assert time.monotonic() - began < 4
    finally:
        peer.close()
        silent.close()
    assert peer.how == "fin" and peer.received.startswith(b"HTTP/1.1 408 ")
    assert b"\r\nX-Request-Id: " in peer.received
    assert json.loads(peer.received.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    assert silent.how == "fin" and silent.received == b""  # nothing asked, nothing answered
    health = await treq.get(url(service, "/health"), persistent=False)
    assert health.code == 200
    await health.content()


@pytest_twisted.ensureDeferred
async def test_an_idle_kept_alive_connection_is_kept_until_client_idle_timeout(node_service):
    service = await node_service({"backend": "cpu", "header_read_timeout_s": 0.3, "client_idle_timeout_s": 1.5})
    peer = Peer(service.port)
    try:
        peer.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: b"}\r\n0\r\n\r\n" in peer.received or peer.closed(), what="the answer")
        answered = time.monotonic()
        assert peer.received.startswith(b"HTTP/1.1 200")
        await deferLater(reactor, 0.8, lambda: None)  # well past header_read_timeout_s
        assert not peer.closed()
        peer.received = b""
        peer.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # still usable
        await eventually(lambda: b"}\r\n0\r\n\r\n" in peer.received or peer.closed(), what="the second answer")
        assert peer.received.startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        await eventually(peer.closed, timeout=5, what="the idle connection to be closed")
        idle = time.monotonic() - answered
    finally:
        peer.close()
    assert peer.how == "fin" and 1.0 <= idle < 4.0


@pytest_twisted.ensureDeferred
async def test_kept_alive_connection_gets_a_header_deadline_for_its_next_request(node_service):
    service = await node_service({"backend": "cpu", "header_read_timeout_s": 0.3})
    peer = Peer(service.port)
    try:
        peer.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: b"}\r\n0\r\n\r\n" in peer.received or peer.closed(), what="the answer")
        peer.received = b""
        peer.send(b"GET /health HTTP/1.1\r\n")  # the next request begins, and stalls
        await eventually(peer.closed, timeout=5, what="the stalled request to be cut off")
    finally:
        peer.close()
    assert peer.how == "fin" and peer.received.startswith(b"HTTP/1.1 408 ")
    assert b"\r\nX-Request-Id: " in peer.received


def _slow_post(port: int, path: bytes = b"/v1/chat/completions") -> Peer:
    peer = Peer(port)
    peer.send(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{")
    return peer


@pytest_twisted.ensureDeferred
async def test_slow_bodies_are_closed_by_the_deadline_while_a_real_client_is_served(node_service):
    service = await node_service({"backend": "cpu", "body_read_timeout_s": 0.8})
    slow = [_slow_post(service.port) for _ in range(3)]
    began = time.monotonic()
    try:
        health = await treq.get(url(service, "/health"), persistent=False)  # served meanwhile
        assert health.code == 200
        await health.content()
        for peer in slow:
            peer.send(b" ")  # trickling: each byte in time, the whole body not
        for peer in slow:
            await eventually(peer.closed, timeout=5, what="the slow body to be cut off")
        took = time.monotonic() - began
    finally:
        for peer in slow:
            peer.close()
    assert 0.7 <= took < 4.0
    for peer in slow:
        assert peer.how == "fin" and peer.received.startswith(b"HTTP/1.1 408 ")
        assert b"\r\nX-Request-Id: " in peer.received
        error = json.loads(peer.received.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "request_timeout" and "body_read_timeout_s" in error["message"]
    await eventually(lambda: service.site.open_connections == 0, what="the connections to be closed")


@pytest_twisted.ensureDeferred
async def test_slow_clients_at_the_connection_cap_make_room_for_real_ones(node_service):
    service = await node_service({"backend": "cpu", "max_client_connections": 3, "body_read_timeout_s": 30})
    slow = [_slow_post(service.port) for _ in range(3)]
    try:
        for round_ in range(3):
            await eventually(lambda: service.site.open_connections == 3, what="the cap to be reached")
            # a real client, from the same address as the slow ones
            health = await treq.get(url(service, "/health"), persistent=False)
            assert health.code == 200
            await health.content()
            await eventually(slow[round_].closed, what="the longest waiting slow client to be closed")
            assert not any(peer.closed() for peer in slow[round_ + 1:])
            slow.append(_slow_post(service.port))  # the slow client comes back: the cap is full again
    finally:
        for peer in slow:
            peer.close()
    assert service.site.evictions == 3
    for peer in slow[:3]:
        assert peer.how == "fin" and peer.received.startswith(b"HTTP/1.1 408 ")
        assert b"\r\nX-Request-Id: " in peer.received
    # the eviction order (one dict per rank, kept at each phase change) lets nothing linger once all are gone
    await eventually(lambda: service.site.open_connections == 0, what="the connections to be closed")
    assert service.site.waiting == ({}, {})


@pytest.mark.allow_errors  # the stand-in child never gets ready: its failed start is logged
@pytest_twisted.ensureDeferred
async def test_connections_beyond_the_cap_get_a_clean_503_when_all_are_being_answered(node_service, tmp_path):
    never_ready = tmp_path / "never-ready"
    never_ready.write_text("#!/bin/sh\nexec sleep 30\n")
    never_ready.chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(64))
    service = await node_service({"backend": "cpu", "max_client_connections": 2, "llama_server_bin": str(never_ready),
                                  "llama_server_startup_timeout_s": 3, "max_pending_requests_per_device": 4,
                                  "models": {"m": {"path": str(model)}}})
    body = json.dumps({"model": "m", "messages": []}).encode()
    busy = [treq.post(url(service, "/v1/chat/completions"), data=body, persistent=False) for _ in range(2)]
    try:
        await eventually(lambda: service.node.coordinator.waiting("m") + service.node.slots["cpu:0"].inflight == 2,
                         what="two requests being answered")
        third = socket.create_connection(("127.0.0.1", service.port), timeout=5)
        try:
            answer = await deferToThread(third.recv, 65536)
        finally:
            third.close()
        head, _, answer_body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
        assert json.loads(answer_body)["error"]["code"] == "too_many_connections"
    finally:
        for d in busy:
            response = await d
            await response.content()
    await eventually(lambda: service.site.open_connections == 0, what="the connections to be closed")


@pytest_twisted.ensureDeferred
async def test_expect_100_continue_over_the_limit_gets_413_without_the_body(node_service):
    service = await node_service({"backend": "cpu", "max_request_body_bytes": 1024})
    peer = Peer(service.port)
    try:
        peer.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"X-Request-Id: big-1\r\nContent-Length: 50000000\r\nExpect: 100-continue\r\n\r\n")
        await eventually(peer.closed, timeout=5, what="the 413")
    finally:
        peer.close()
    assert peer.received.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in peer.received
    assert b"\r\nX-Request-Id: big-1\r\n" in peer.received  # the client's id, as on every answer
    assert json.loads(peer.received.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_too_large"
    # within the limit, 100 Continue as usual
    peer = Peer(service.port)
    try:
        peer.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        await eventually(lambda: b"100 Continue" in peer.received or peer.closed(), what="100 Continue")
        peer.send(b"{}")
        await eventually(lambda: b"missing_model" in peer.received or peer.closed(), what="the answer")
    finally:
        peer.close()
    assert b"HTTP/1.1 400 " in peer.received


@pytest.mark.parametrize("target, path", [
    (b"http://127.0.0.1:8088/v1/models?x=1", b"/v1/models?x=1"),
    (b"HTTPS://[::1]:8088/v1/chat/completions", b"/v1/chat/completions"),
    (b"http://host", b"/"),
    (b"http://host?q", b"/?q"),
    (b"/plain", b"/plain"),
    (b"*", b"*"),
    (b"ftp://host/x", b"ftp://host/x"),
])
def test_absolute_to_origin_form(target, path):
    assert absolute_to_origin_form(target) == path


@pytest_twisted.ensureDeferred
async def test_an_absolute_form_target_is_routed_like_its_path(node_service):
    service = await node_service({"backend": "cpu"})
    for target, status, code in ((b"/health", 200, None), (b"/v1/chat/completions", 404, b"model_not_found")):
        peer = Peer(service.port)
        body = b'{"model": "nope", "messages": []}'
        try:
            method = b"GET" if target == b"/health" else b"POST"
            peer.send(method + b" http://127.0.0.1:%d%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (service.port, target, len(body) if code else 0,
                                                             body if code else b""))
            await eventually(peer.closed, what="the answer")
        finally:
            peer.close()
        assert peer.received.startswith(b"HTTP/1.1 %d " % status), peer.received[:200]
        if code:
            assert code in peer.received


# ------------------------------------------------------------------ metrics


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of ``name{labels}`` in a Prometheus text exposition (label order free)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


@pytest_twisted.ensureDeferred
async def test_metrics_count_requests_children_and_devices(node_service, tiny_models, llama_server_bin):
    service = await node_service(models_config(tiny_models, max_pending_requests_per_device=1))
    body = json.dumps({"model": "tiny-a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    for model in ("tiny-a", "tiny-b", "nope"):
        response = await treq.post(url(service, "/v1/chat/completions"), data=body.replace("tiny-a", model).encode(),
                                   headers={"Content-Type": "application/json"}, persistent=False)
        await response.content()
    await service.node.refresh_metrics()
    response = await treq.get(url(service, "/metrics"), persistent=False)
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    text = (await response.content()).decode()
    route = "/v1/chat/completions"
    assert sample(text, "rolemesh_requests_total", route=route, model="tiny-a", status="200") == 1
    assert sample(text, "rolemesh_requests_total", route=route, model="tiny-b", status="200") == 1
    assert sample(text, "rolemesh_requests_total", route=route, model="-", status="404") == 1
    assert sample(text, "rolemesh_request_duration_seconds_count", route=route, model="tiny-a") == 1
    assert sample(text, "rolemesh_child_starts_total", device="cpu:0", model="tiny-a") == 1
    assert sample(text, "rolemesh_child_ready_seconds_count", device="cpu:0", model="tiny-b") == 1
    assert sample(text, "rolemesh_device_in_flight", device="cpu:0") == 0
    assert sample(text, "rolemesh_device_queue_depth", device="cpu:0") == 0
    assert sample(text, "rolemesh_device_child_state", device="cpu:0", state="ready") == 1
    assert sample(text, "rolemesh_device_memory_total_bytes", device="cpu:0") > 0
    assert sample(text, "rolemesh_node_uptime_seconds") > 0


@pytest.mark.allow_errors
@pytest_twisted.ensureDeferred
async def test_metrics_count_crashes_and_failed_starts(node_service, tiny_models, tmp_path, llama_server_bin):
    import os
    import signal

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    config = models_config(tiny_models)
    config["models"]["bad"] = {"path": bad}
    service = await node_service(config)
    slot = service.node.slots["cpu:0"]
    child = await slot.ensure_server(service.config.models["tiny-a"])
    os.kill(child.pid, signal.SIGKILL)
    await eventually(lambda: slot.phase.value == "failed", what="the crash")
    from rolemesh_node.llama_server import ChildStartError

    with pytest.raises(ChildStartError):
        await slot.ensure_server(service.config.models["bad"])
    text = service.metrics.render().decode()
    assert sample(text, "rolemesh_child_crashes_total", device="cpu:0", model="tiny-a") == 1
    assert sample(text, "rolemesh_child_failed_starts_total", device="cpu:0", model="bad") == 1
    await treq.get(url(service, "/health"), persistent=False).addCallback(treq.content)
    assert reactor.running
