"""Upstream failures through the real proxy over loopback: a misbehaving fake llama-server.

The child here is a real twisted.web server on a loopback port that hangs,
breaks off mid-body or is not there at all; the node under test is the real
service. Each case must answer the client cleanly and release the slot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from rolemesh_node.llama_server import ChildState, ExitInfo, free_port
from tests.test_supervisor_real import eventually

BEHAVIOURS = ("hang", "midstream", "midplain", "stall", "refused", "ok", "serial")
#: "serial" answers like a one-slot llama-server: one request at a time, each this long
SERIAL_S = 0.7


class AliveResource(Resource):
    """Answers the liveness check as a live llama-server without ``/slots`` would."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/health":
            return b'{"status": "ok"}'
        request.setResponseCode(404)
        return b'{"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}'


class MisbehavingLlama(AliveResource):

    def __init__(self) -> None:
        super().__init__()
        self.open: list[Any] = []
        self.serial: list[Any] = []  # the one being answered first

    def _serve_next(self) -> None:
        request = self.serial[0]

        def answer() -> None:
            self.serial.pop(0)
            if not request.finished and request.channel is not None:
                request.setHeader(b"content-type", b"application/json")
                request.write(b'{"ok": true}')
                request.finish()
            if self.serial:
                self._serve_next()

        reactor.callLater(SERIAL_S, answer)

    def render_POST(self, request: Any) -> Any:
        model = json.loads(request.content.read())["model"]
        self.open.append(request)
        if model == "hang":
            return NOT_DONE_YET
        if model == "serial":
            self.serial.append(request)
            if len(self.serial) == 1:
                self._serve_next()
            return NOT_DONE_YET
        if model == "ok":
            request.setHeader(b"content-type", b"application/json")
            return b'{"ok": true}'
        if model in ("midstream", "stall"):
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n')
            if model == "midstream":
                reactor.callLater(0.05, request.channel.transport.abortConnection)
            return NOT_DONE_YET
        # midplain: promise 1000 bytes, send 10, break off
        request.setHeader(b"content-length", b"1000")
        request.write(b"0123456789")
        reactor.callLater(0.05, request.channel.transport.abortConnection)
        return NOT_DONE_YET


class FakeReadyChild:
    """A "child" that is ready at once and points at the misbehaving server."""

    def __init__(self, upstream_port: int, **kwargs: Any) -> None:
        self.model = kwargs["model"]
        self.port = upstream_port
        self.state = ChildState.READY
        self.pid = None
        self.started_at = self.ready_at = None
        self.tail: list[str] = []
        self.hung_reason: str | None = None
        self.on_exit = kwargs["on_exit"]

    def kill(self) -> None:
        self.state = ChildState.EXITED
        self.on_exit(self, ExitInfo(None, 9, 0.0, expected=False))

    def start(self) -> Any:
        return succeed(self)

    def stop(self, grace_s: float) -> Any:
        self.state = ChildState.EXITED
        return succeed(None)


def serve(resource: Any) -> Any:
    """Serve ``resource`` (which lists its requests in ``open``) on loopback;
    yields the port, then aborts what is still open and stops listening."""
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    yield port.getHost().port
    for request in resource.open:
        if not request.finished and request.channel is not None:
            request.channel.transport.abortConnection()
    port.stopListening()


@pytest.fixture
def upstream() -> Any:
    yield from serve(MisbehavingLlama())


async def start_node(node_service: Any, tiny_models: dict[str, Path], upstream_port: int,
                     timeout_s: float = 0.5) -> Any:
    config = {"backend": "cpu", "request_timeout_s": timeout_s, "max_pending_requests_per_device": 4,
              "models": {name: {"path": tiny_models["tiny-a"]} for name in BEHAVIOURS}}
    service = await node_service(config)
    slot = service.node.slots["cpu:0"]
    dead = free_port()  # nothing listens there

    def factory(**kwargs: Any) -> FakeReadyChild:
        return FakeReadyChild(dead if kwargs["model"] == "refused" else upstream_port, **kwargs)

    slot._child_factory = factory
    return service, slot


def post(service: Any, model: str, stream: bool = False) -> Any:
    body = json.dumps({"model": model, "stream": stream, "messages": []}).encode()
    return treq.post(f"http://127.0.0.1:{service.port}/v1/chat/completions", data=body, persistent=False,
                     unbuffered=True)


@pytest.mark.allow_errors
@pytest.mark.parametrize("model, status, code", [
    ("refused", 502, "upstream_failed"),
    ("hang", 504, "upstream_timeout"),
])
@pytest_twisted.ensureDeferred
async def test_failures_before_the_response(node_service, tiny_models, upstream, model, status, code):
    service, slot = await start_node(node_service, tiny_models, upstream)
    response = await post(service, model)
    doc = json.loads(await response.content())
    assert response.code == status and doc["error"]["code"] == code
    assert "cpu:0" in doc["error"]["message"] and model in doc["error"]["message"]
    if model == "hang":
        # A slow answer is not a hung child (its /health answers): only this request
        # ended. Its place stays booked while the child may still work on it, then
        # is given up after another request_timeout_s without any sign of progress.
        assert slot.phase.value == "ready" and slot.crash_count == 0
        await eventually(lambda: slot.inflight == 0, timeout=3.0, what="the held place to be given up")
        assert slot.phase.value == "ready" and slot.crash_count == 0
    assert slot.inflight == 0
    ok = await post(service, "ok")
    assert ok.code == 200 and json.loads(await ok.content()) == {"ok": True}


@pytest.mark.allow_errors
@pytest.mark.parametrize("model, why", [("midstream", "failed mid-stream"), ("stall", "timed out")])
@pytest_twisted.ensureDeferred
async def test_mid_stream_failure_ends_with_an_sse_error_event(node_service, tiny_models, upstream, model, why):
    service, slot = await start_node(node_service, tiny_models, upstream)
    response = await post(service, model, stream=True)
    assert response.code == 200
    body = await response.content()
    events = [e for e in body.split(b"\n\n") if e.strip()]
    assert events[0].startswith(b'data: {"choices"')
    last = json.loads(events[-1][len(b"data: "):])
    assert last["error"]["code"] == "upstream_failed" and why in last["error"]["message"]
    assert slot.inflight == 0


@pytest_twisted.ensureDeferred
async def test_mid_body_failure_of_a_plain_response_aborts_the_client_connection(node_service, tiny_models,
                                                                                   upstream):
    service, slot = await start_node(node_service, tiny_models, upstream)
    response = await post(service, "midplain")
    assert response.code == 200
    with pytest.raises(Exception) as info:
        await response.content()  # 10 of 1000 promised bytes: the client must not take it as complete
    assert "ResponseFailed" in type(info.value).__name__ or "PotentialDataLoss" in repr(info.value)
    assert slot.inflight == 0


@pytest_twisted.ensureDeferred
async def test_the_timeout_does_not_count_the_wait_behind_another_request_inside_the_child(
        node_service, tiny_models, upstream):
    # Two in flight on a one-slot child (the default): the second waits inside
    # the child for SERIAL_S, then takes SERIAL_S itself. Counted from its
    # send it would pass request_timeout_s; counted from its turn it does not.
    service, slot = await start_node(node_service, tiny_models, upstream, timeout_s=1.0)
    assert slot.capacity == 2
    first = post(service, "serial")
    await deferLater(reactor, 0.2, lambda: None)  # the first reaches the child first
    second = post(service, "serial")
    for response in (await first, await second):
        assert response.code == 200 and json.loads(await response.content()) == {"ok": True}
    assert slot.inflight == 0 and slot.phase.value == "ready"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_frees_the_place_when_the_child_is_done_with_it(
        node_service, tiny_models, upstream, stream):
    # llama-server computes a non-streamed request to the end although its
    # client left, so the node keeps it on the books until the answer comes; a
    # stream it cancels at once (llama-server stops it at its next write).
    service, slot = await start_node(node_service, tiny_models, upstream, timeout_s=5.0)
    response = post(service, "serial", stream=stream)
    await deferLater(reactor, 0.2, lambda: None)  # sent to the child, not answered
    assert slot.inflight == 1
    gone: list[Any] = []
    response.addErrback(gone.append)  # the client side of the cancel
    response.cancel()
    await deferLater(reactor, 0.2, lambda: None)
    assert gone and slot.inflight == (0 if stream else 1)
    await deferLater(reactor, SERIAL_S, lambda: None)
    assert slot.inflight == 0 and slot.phase.value == "ready"
    ok = await post(service, "ok")
    assert ok.code == 200


class FirstThenHang(AliveResource):
    """A one-slot child that answers its first request after 0.3 s, then hangs (its /health still answers)."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        self.open.append(request)
        if len(self.open) == 1:
            def answer() -> None:
                request.setHeader(b"content-type", b"application/json")
                request.write(b'{"ok": true}')
                request.finish()
            reactor.callLater(0.3, answer)
        return NOT_DONE_YET


@pytest.fixture
def first_then_hang() -> Any:
    yield from serve(FirstThenHang())


@pytest_twisted.ensureDeferred
async def test_a_held_request_whose_client_left_is_still_timed(node_service, tiny_models, first_then_hang):
    # B waits inside the child and its client leaves; the child then never
    # answers B but stays alive. B's place is held, and request_timeout_s still
    # runs from B's turn: with no sign of progress its place is given up. The
    # child is not killed (only a failed liveness check does that).
    service, slot = await start_node(node_service, tiny_models, first_then_hang, timeout_s=0.5)
    first = post(service, "ok")
    await deferLater(reactor, 0.1, lambda: None)
    second = post(service, "ok")
    await deferLater(reactor, 0.1, lambda: None)
    assert slot.inflight == 2
    second.addErrback(lambda _: None)
    second.cancel()
    assert (await first).code == 200
    await eventually(lambda: slot.inflight == 0, timeout=3.0, what="the held request to time out")
    assert slot.phase.value == "ready" and slot.crash_count == 0
