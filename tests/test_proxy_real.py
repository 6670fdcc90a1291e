"""The OpenAI-compatible proxy through the real llama-server, the official openai client and real HTTP."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.iweb import UNKNOWN_LENGTH

from tests.rawpeer import Peer
from tests.test_supervisor_real import eventually, models_config

pytestmark = pytest.mark.llama

SLOW_TOKENS = 1500  # ~0.2-0.5 s of generation with the tiny model: long enough to overlap


def proxy_config(tiny_models: dict[str, Path], **extra: Any) -> dict[str, Any]:
    config = models_config(tiny_models, **extra)
    for spec in config["models"].values():
        spec["ctx_size"] = 2048
    config["models"]["tiny-a"]["aliases"] = ["tiny"]
    config["models"]["tiny-embed"] = {"path": tiny_models["tiny-a"], "ctx_size": 512, "embedding": True}
    return config


def openai_client(service: Any) -> Any:
    import openai

    # No keep-alive: a pooled connection would outlive the test (and its server-side timers).
    http = openai.DefaultHttpx2Client(limits=_no_keepalive(), timeout=30)
    return openai.OpenAI(base_url=f"http://127.0.0.1:{service.port}/v1", api_key="unused", max_retries=0,
                         http_client=http)


def _no_keepalive() -> Any:
    try:
        import httpx2 as httpx  # what openai 3.x is built on
    except ImportError:  # openai 1.x/2.x
        import httpx
    return httpx.Limits(max_keepalive_connections=0)


def chat_body(model: str, max_tokens: int = 4, stream: bool = False) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}],
                       "max_tokens": max_tokens, "stream": stream}).encode()


def post(service: Any, path: str, body: bytes, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """POST on a fresh connection; a Deferred of the treq response."""
    return treq.post(f"http://127.0.0.1:{service.port}{path}", data=body,
                     headers={"Content-Type": "application/json", **(headers or {})}, persistent=False, **kwargs)


@pytest_twisted.ensureDeferred
async def test_openai_client_chat_completions_and_embeddings(node_service, tiny_models, llama_server_bin):
    service = await node_service(proxy_config(tiny_models))
    client = openai_client(service)

    chat = await deferToThread(client.chat.completions.create, model="tiny",
                               messages=[{"role": "user", "content": "hello"}], max_tokens=5)
    assert chat.choices[0].message.content and chat.model == "tiny-a"
    assert chat.usage.completion_tokens == 5

    def stream_chat() -> list[Any]:
        return list(client.chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=6, stream=True))

    chunks = await deferToThread(stream_chat)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason == "length"

    completion = await deferToThread(client.completions.create, model="tiny-a", prompt="once", max_tokens=3)
    assert completion.choices[0].text

    embedding = await deferToThread(client.embeddings.create, model="tiny-embed", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 64

    models = await deferToThread(client.models.list)
    assert {m.id for m in models.data} == {"tiny-a", "tiny-b", "tiny-embed"}
    model = await deferToThread(client.models.retrieve, "tiny-a")
    assert model.id == "tiny-a" and model.object == "model" and model.owned_by == "rolemesh-node"
    assert (await deferToThread(client.models.retrieve, "tiny")).id == "tiny-a"  # an alias finds its model

    import openai
    with pytest.raises(openai.NotFoundError) as info:
        await deferToThread(client.models.retrieve, "nope")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as info:
        await deferToThread(client.chat.completions.create, model="nope",
                            messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"
    assert service.node.slots["cpu:0"].inflight == 0
    client.close()


@pytest_twisted.ensureDeferred
async def test_response_headers_name_request_and_device(node_service, tiny_models, llama_server_bin):
    service = await node_service(proxy_config(tiny_models))
    response = await post(service, "/v1/chat/completions", chat_body("tiny-a"),
                          headers={"Content-Type": "application/json", "X-Request-Id": "abc-123"})
    assert response.code == 200
    assert response.headers.getRawHeaders("x-request-id") == ["abc-123"]
    assert response.headers.getRawHeaders("x-rolemesh-device") == ["cpu:0"]
    assert not response.headers.hasHeader("access-control-allow-origin")
    body = await response.content()
    assert response.length == len(body)  # llama-server's Content-Length kept: not re-sent chunked
    stream = await post(service, "/v1/chat/completions", chat_body("tiny-a", stream=True))
    assert stream.code == 200 and stream.length is UNKNOWN_LENGTH  # a stream stays chunked
    await stream.content()
    fresh = await post(service, "/v1/chat/completions", chat_body("tiny-a"))
    assert len(fresh.headers.getRawHeaders("x-request-id")[0]) == 32
    await fresh.content()


@pytest_twisted.ensureDeferred
async def test_requests_beyond_the_pending_limit_get_429_while_the_rest_succeed(
        node_service, tiny_models, llama_server_bin):
    service = await node_service(proxy_config(tiny_models, max_pending_requests_per_device=2))
    warm = await post(service, "/v1/completions", json.dumps({"model": "tiny-a", "prompt": "x",
                                                                "max_tokens": 1}).encode())
    assert warm.code == 200
    await warm.content()
    body = json.dumps({"model": "tiny-a", "prompt": "x", "max_tokens": SLOW_TOKENS}).encode()
    results = await DeferredList([post(service, "/v1/completions", body) for _ in range(6)], consumeErrors=True)
    responses = [r for ok, r in results if ok]
    assert len(responses) == 6
    codes = sorted(r.code for r in responses)
    assert codes.count(429) >= 1 and codes.count(200) >= 2 and set(codes) <= {200, 429}
    for response in responses:
        doc = json.loads(await response.content())
        if response.code == 429:
            assert response.headers.getRawHeaders("retry-after") == ["1"]
            assert doc["error"]["type"] == "rate_limit_error" and doc["error"]["code"] == "queue_full"
        else:
            assert doc["choices"][0]["text"]
    slot = service.node.slots["cpu:0"]
    assert slot.inflight == 0 and slot.phase.value == "ready"


@pytest_twisted.ensureDeferred
async def test_two_models_interleaved_on_one_device_switch_correctly(node_service, tiny_models, llama_server_bin):
    service = await node_service(proxy_config(tiny_models, max_pending_requests_per_device=8))
    order = ["tiny-a", "tiny-b", "tiny-a", "tiny-b", "tiny-b", "tiny-a"]
    results = await DeferredList([post(service, "/v1/chat/completions", chat_body(m, 3)) for m in order],
                                 consumeErrors=True)
    for (ok, response), model in zip(results, order):
        assert ok and response.code == 200
        assert json.loads(await response.content())["model"] == model  # never the other model's answer
    slot = service.node.slots["cpu:0"]
    assert slot.starts >= 2 and slot.inflight == 0
    # Sequential alternation: every request switches, none sees "Loading model".
    for model in ["tiny-a", "tiny-b", "tiny-a"]:
        response = await post(service, "/v1/chat/completions", chat_body(model, 2))
        assert response.code == 200 and json.loads(await response.content())["model"] == model


@pytest_twisted.ensureDeferred
async def test_stream_relays_the_first_chunk_before_the_upstream_finishes(
        node_service, tiny_models, llama_server_bin):
    service = await node_service(proxy_config(tiny_models))
    slot = service.node.slots["cpu:0"]
    response = await post(service, "/v1/chat/completions", chat_body("tiny-a", SLOW_TOKENS, stream=True),
                          unbuffered=True)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/event-stream")
    chunks: list[bytes] = []
    in_flight_at_first_chunk: list[int] = []

    def collect(data: bytes) -> None:
        if not chunks:
            in_flight_at_first_chunk.append(slot.inflight)
        chunks.append(data)

    await treq.collect(response, collect)
    # When the client held its first chunk, the upstream exchange was still running.
    assert in_flight_at_first_chunk == [1]
    body = b"".join(chunks)
    assert body.rstrip().endswith(b"data: [DONE]") and body.count(b"data: ") > 100
    assert slot.inflight == 0


def _raw_request(port: int, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
@pytest_twisted.ensureDeferred
async def test_client_disconnect_frees_the_slot_and_the_next_request_is_served(
        node_service, tiny_models, llama_server_bin, stream):
    service = await node_service(proxy_config(tiny_models))
    slot = service.node.slots["cpu:0"]
    await slot.ensure_server(service.config.models["tiny-a"])
    sock = _raw_request(service.port, chat_body("tiny-a", SLOW_TOKENS, stream=stream))
    try:
        await eventually(lambda: slot.inflight == 1, what="the request to reach the child")
        if stream:
            sock.setblocking(False)
            await eventually(lambda: _readable(sock), what="the first streamed bytes")
    finally:
        sock.close()
    began = time.monotonic()
    if not stream:
        # llama-server computes a non-streamed request to the end although its
        # connection closed: the node holds the place until the answer comes
        await deferLater(reactor, 0.05, lambda: None)
        assert slot.inflight == 1
    await eventually(lambda: slot.inflight == 0, what="the slot to be released")
    assert time.monotonic() - began < 5
    if not stream:
        await eventually(lambda: any("stop processing" in line for line in slot.child.tail),
                         what="the child's log line for the finished request")
    response = await post(service, "/v1/chat/completions", chat_body("tiny-a", 2))
    assert response.code == 200 and json.loads(await response.content())["model"] == "tiny-a"
    assert slot.child.state.value == "ready"  # the child survived the cancelled request


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(65536, socket.MSG_PEEK))
    except BlockingIOError:
        return False


@pytest_twisted.ensureDeferred
async def test_cpu_devices_spread_concurrent_work(node_service, tiny_models, llama_server_bin):
    service = await node_service(proxy_config(tiny_models, cpu_devices=2, max_pending_requests_per_device=1))
    # Long enough that the device whose child loads first cannot finish both
    # before the other's is ready (two loads at once on a busy machine can
    # differ by 50 ms and more; 200 tokens took ~20 ms).
    body = json.dumps({"model": "tiny-a", "prompt": "x", "max_tokens": 1500, "ignore_eos": True}).encode()
    results = await DeferredList([post(service, "/v1/completions", body) for _ in range(2)], consumeErrors=True)
    devices = set()
    for ok, response in results:
        assert ok and response.code == 200
        devices.add(response.headers.getRawHeaders("x-rolemesh-device")[0])
        await response.content()
    assert devices == {"cpu:0", "cpu:1"}


@pytest_twisted.ensureDeferred
async def test_wrong_model_kind_and_validation_errors(node_service, tiny_models, llama_server_bin):
    service = await node_service(proxy_config(tiny_models, max_request_body_bytes=4096))
    cases = [
        ("/v1/embeddings", json.dumps({"model": "tiny-a", "input": "x"}).encode(), 400, "wrong_model_kind"),
        ("/v1/chat/completions", chat_body("tiny-embed"), 400, "wrong_model_kind"),
        ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
        ("/v1/chat/completions", b"[1, 2]", 400, "invalid_request"),
        ("/v1/chat/completions", json.dumps({"model": 7}).encode(), 400, "missing_model"),
        ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, "missing_model"),
        ("/v1/chat/completions", chat_body("unknown"), 404, "model_not_found"),
        ("/v1/chat/completions", json.dumps({"model": "tiny-a", "pad": "x" * 5000}).encode(), 413,
         "request_too_large"),
    ]
    for path, body, status, code in cases:
        response = await post(service, path, body)
        doc = json.loads(await response.content())
        assert (response.code, doc["error"]["code"]) == (status, code), (path, body[:40])
        assert set(doc["error"]) == {"message", "type", "code"}
    response = await treq.get(f"http://127.0.0.1:{service.port}/v1/chat/completions", persistent=False)
    assert response.code == 405 and response.headers.getRawHeaders("allow") == ["POST"]
    await response.content()
    ok = await post(service, "/v1/chat/completions", chat_body("tiny-a"))
    assert ok.code == 200  # still serving
    await ok.content()
    assert service.node.slots["cpu:0"].inflight == 0
    await deferLater(reactor, 0, lambda: None)


@pytest_twisted.ensureDeferred
async def test_slow_bodies_are_closed_by_the_deadline_and_a_real_client_is_served(node_service, tiny_models,
                                                                                    llama_server_bin):
    service = await node_service(proxy_config(tiny_models, max_client_connections=4, body_read_timeout_s=1.0))
    slow = []
    for _ in range(4):  # the cap, filled by bodies trickled a byte at a time
        peer = Peer(service.port)
        peer.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 200\r\n\r\n{")
        slow.append(peer)
    try:
        await eventually(lambda: service.site.open_connections == 4, what="the cap to be filled")
        response = await post(service, "/v1/chat/completions", chat_body("tiny-a"))  # a real client
        doc = json.loads(await response.content())
        assert response.code == 200 and doc["choices"][0]["message"]["content"] is not None
        for peer in slow:
            await eventually(peer.closed, timeout=5, what="the slow body to be closed")
    finally:
        for peer in slow:
            peer.sock.close()
    assert all(peer.how == "fin" and peer.received.startswith(b"HTTP/1.1 408 ") for peer in slow)
    assert service.node.slots["cpu:0"].inflight == 0


@pytest_twisted.ensureDeferred
async def test_an_idle_kept_alive_connection_is_kept_until_client_idle_timeout(node_service, tiny_models,
                                                                               llama_server_bin):
    service = await node_service(proxy_config(tiny_models, header_read_timeout_s=0.3, client_idle_timeout_s=2.0))
    body = chat_body("tiny-a")
    ask = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    peer = Peer(service.port)
    try:
        for _ in range(2):  # the second request on the same connection, after an idle pause
            peer.received = b""
            peer.send(ask)
            await eventually(lambda: peer.received.endswith(b"}") or peer.closed(), what="an answer")
            assert peer.received.startswith(b"HTTP/1.1 200") and b"Content-Length:" in peer.received
            answered = time.monotonic()
            await deferLater(reactor, 1.0, lambda: None)  # idle, well past header_read_timeout_s
            assert not peer.closed()
        await eventually(peer.closed, timeout=5, what="the idle connection to be closed")
        idle = time.monotonic() - answered
    finally:
        peer.sock.close()
    assert peer.how == "fin" and 1.8 <= idle < 4.5
