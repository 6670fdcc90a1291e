"""The proxy's request lifecycle (``proxy._Exchange``), in memory: no sockets, no sleeps.

A real ``twisted.web.client.Agent`` talks to a real ``Site`` standing in for
llama-server over ``iosim`` (``treq.testing.RequestTraversalAgent``), and a
client (``StubTreq``) talks to the real ``ProxyResource`` the same way. The
node, coordinator and device slot are the real ones; every timer runs on one
``MemoryReactorClock``. The child is a stand-in that is ready at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from rolemesh_node.config import ModelSpec, NodeConfig
from rolemesh_node.devices.base import DeviceRef
from rolemesh_node.devices.cpu import CpuBackend
from rolemesh_node.llama_server import ChildState, ExitInfo
from rolemesh_node.node import Node
from rolemesh_node.proxy import REBIND_WAIT_S, Done, Held, ProxyResource, Relaying, Sent, _Exchange

TIMEOUT = 10.0


class FakeLlama(Resource):
    """llama-server as far as the proxy and the liveness check see it.

    POSTs are kept open (``open``) for the test to answer; ``/slots`` shows
    ``decoded`` tokens on one slot while ``working`` (404 when ``slots`` is off)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.open: list[Any] = []
        self.bodies: list[bytes] = []
        self.gone: list[Any] = []
        self.slots = True
        self.working = False
        self.decoded = 0

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/health":
            return b'{"status": "ok"}'
        if request.path == b"/slots" and self.slots:
            slot: dict[str, Any] = {"id": 0, "is_processing": self.working}
            if self.working:
                slot.update(id_task=1, n_prompt_tokens_processed=5, next_token=[{"n_decoded": self.decoded}])
            return json.dumps([slot]).encode()
        request.setResponseCode(404)
        return b"{}"

    def render_POST(self, request: Any) -> Any:
        self.bodies.append(request.content.read())
        self.open.append(request)
        request.notifyFinish().addErrback(lambda _: self.gone.append(request))
        return NOT_DONE_YET


class ReadyChild:
    """A child that is ready at once; the test makes it die."""

    def __init__(self, **kwargs: Any) -> None:
        self.model = kwargs["model"]
        self.port = kwargs["port"]
        self.on_exit = kwargs["on_exit"]
        self.state = ChildState.READY
        self.pid = None
        self.started_at = self.ready_at = None
        self.tail: list[str] = []
        self.hung_reason: str | None = None
        self._exited: list[Deferred[Any]] = []

    def start(self) -> Any:
        return succeed(self)

    def stop(self, grace_s: float) -> Any:
        self.state = ChildState.EXITED
        return succeed(None)

    def kill(self) -> None:
        self.die()

    def when_exited(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._exited.append(d)
        return d

    def die(self) -> None:
        self.state = ChildState.EXITED
        info = ExitInfo(None, 9, 0.0, expected=False)
        for d in self._exited:
            d.callback(info)
        self.on_exit(self, info)


@implementer(IBodyProducer)
class BytesProducer:
    """An ``IBodyProducer`` for bytes already in memory, written in one go (no cooperator: the test's Clock)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Any:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class AgentClient:
    """The proxy's client interface (``LoopbackClient.post``) over an ``Agent``: here one that reaches
    ``FakeLlama`` in memory. The proxy relays an ``Agent``'s response decoded, framed again by twisted.web."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def post(self, port: int, path: bytes, body: bytes, *, accept: bytes, request_id: bytes,
             keep_alive: bool = True) -> Deferred[Any]:
        headers = Headers({b"content-type": [b"application/json"], b"accept": [accept],
                           b"x-request-id": [request_id]})
        return self.agent.request(b"POST", b"http://127.0.0.1:%d%s" % (port, path), headers, BytesProducer(body))


class Upstream:
    """The proxy's Agent: in memory to FakeLlama; a port in ``refused`` refuses the connection."""

    def __init__(self, llama: FakeLlama) -> None:
        self.agent = RequestTraversalAgent(llama)
        self.refused: set[int] = set()

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        port = int(uri.split(b"/")[2].split(b":")[1])
        if port in self.refused:
            return fail(ConnectionRefusedError())
        return self.agent.request(method, uri, headers, bodyProducer)


class World:
    def __init__(self, **config: Any) -> None:
        self.clock = Clock()
        self.llama = FakeLlama()
        self.upstream = Upstream(self.llama)
        settings = {"backend": "cpu", "request_timeout_s": TIMEOUT, "liveness_interval_s": 1.0,
                    "liveness_timeout_s": 1.0, "models": {"m": ModelSpec(name="m", path=Path(__file__))}, **config}
        self.config = NodeConfig(**settings)
        device = DeviceRef("cpu", 0)
        self.node = Node(self.config, self.clock, StubTreq(self.llama), "memory",
                         select=lambda reactor, config: succeed((CpuBackend(), [device])))
        self.node.start()
        self.slot = self.node.slots["cpu:0"]
        self.ports = iter(range(9000, 9100))
        self.children: list[ReadyChild] = []
        self.slot._port_picker = lambda: next(self.ports)
        self.slot._child_factory = self._child
        self.exchanges: list[_Exchange] = []
        self.proxy = ProxyResource(self.node, AgentClient(self.upstream), self.clock)
        self.client = StubTreq(self.proxy)
        self.clock.advance(0)
        self.slot.ensure_server(self.config.models["m"])

    def _child(self, **kwargs: Any) -> ReadyChild:
        child = ReadyChild(**kwargs)
        self.children.append(child)
        return child

    def post(self, stream: bool = False) -> Deferred[Any]:
        body = json.dumps({"model": "m", "stream": stream, "messages": []}).encode()
        d = self.client.post("http://node/v1/chat/completions", data=body)
        self.flush()
        return d

    def flush(self) -> None:
        for _ in range(4):
            self.client.flush()
            self.upstream.agent.flush()

    def advance(self, seconds: float, step: float = 0.5) -> None:
        left = seconds
        while left > 1e-9:
            self.clock.advance(min(step, left))
            left -= step
            self.flush()

    def answer(self, index: int = -1, body: bytes = b'{"ok": true}', code: int = 200) -> None:
        request = self.llama.open[index]
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()
        self.flush()

    @property
    def state(self) -> Any:
        """The state of the latest request."""
        return self.exchanges[-1].state


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


def fired(d: Deferred[Any]) -> bool:
    out: list[Any] = []
    d.addBoth(lambda r: out.append(r) or r)
    return bool(out)


def answer_of(world: World, d: Deferred[Any]) -> tuple[int, Any]:
    response = result(d)
    body = result(response.content())
    world.flush()
    return response.code, json.loads(body) if body.startswith(b"{") else body


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    import rolemesh_node.proxy as proxy_module

    made: list[_Exchange] = []

    class Recorded(_Exchange):
        def begin(self) -> None:
            made.append(self)
            super().begin()

    monkeypatch.setattr(proxy_module, "_Exchange", Recorded)
    world = World()
    world.exchanges = made
    return world


def test_a_plain_request_is_relayed_with_its_content_length(world: World) -> None:
    d = world.post()
    assert isinstance(world.state, Sent) and world.slot.inflight == 1
    world.answer(body=b'{"choices": []}')
    response = result(d)
    assert response.code == 200 and response.length == len(b'{"choices": []}')
    assert result(response.content()) == b'{"choices": []}'
    assert isinstance(world.state, Done) and world.slot.inflight == 0
    assert not world.clock.getDelayedCalls() or all(c.func.__name__ != "_look" for c in world.clock.getDelayedCalls())


def test_held_a_plain_request_whose_client_left_keeps_its_place_until_the_child_answers(world: World) -> None:
    d = world.post()
    d.addErrback(lambda f: None)
    d.cancel()
    world.flush()
    assert isinstance(world.state, Held) and world.slot.inflight == 1  # the child still computes it
    assert not world.llama.gone  # the request stays open at the child: it is computing it
    world.advance(TIMEOUT / 2)
    assert world.slot.inflight == 1
    world.answer()
    assert isinstance(world.state, Done) and world.slot.inflight == 0


def test_timed_out_a_plain_request_without_progress_gets_504_and_the_child_lives(world: World) -> None:
    world.llama.slots = False  # no progress to be seen
    d = world.post()
    world.advance(TIMEOUT - 1)
    assert not fired(d)
    world.advance(2)
    code, doc = answer_of(world, d)
    assert code == 504 and doc["error"]["code"] == "upstream_timeout"
    assert isinstance(world.state, Held) and world.slot.inflight == 1  # llama-server still works on it
    assert world.slot.phase.value == "ready" and world.slot.crash_count == 0
    world.advance(TIMEOUT + 1)  # another request_timeout_s with no sign of progress: the place is given up
    assert isinstance(world.state, Done) and world.slot.inflight == 0
    assert world.slot.phase.value == "ready" and world.slot.crash_count == 0 and not world.children[0].hung_reason


def test_a_plain_request_that_progresses_never_times_out(world: World) -> None:
    world.llama.working = True
    d = world.post()
    for _ in range(int(3 * TIMEOUT)):  # three timeouts long, a token a second
        world.llama.decoded += 1
        world.advance(1)
    assert not fired(d) and isinstance(world.state, Sent)
    world.answer()
    assert result(d).code == 200 and world.slot.inflight == 0 and world.slot.crash_count == 0


def test_timed_out_a_stream_without_a_byte_is_cancelled_upstream(world: World) -> None:
    world.llama.slots = False
    d = world.post(stream=True)
    world.advance(TIMEOUT + 1)
    code, doc = answer_of(world, d)
    assert code == 504 and isinstance(world.state, Done) and world.slot.inflight == 0
    assert world.llama.gone == world.llama.open  # closing it makes llama-server stop the stream


def test_disconnected_a_stream_frees_its_place_at_once(world: World) -> None:
    d = world.post(stream=True)
    request = world.llama.open[0]
    request.setHeader(b"content-type", b"text/event-stream")
    request.write(b"data: {}\n\n")
    world.flush()
    response = result(d)
    assert response.code == 200 and isinstance(world.state, Relaying)
    protocol = _Drop()
    response.deliverBody(protocol)
    world.flush()
    protocol.transport.loseConnection()  # the client goes away mid-stream
    world.flush()
    assert isinstance(world.state, Done) and world.slot.inflight == 0
    assert world.llama.gone == [request]


def test_upstream_failed_mid_stream_ends_with_an_error_event(world: World) -> None:
    d = world.post(stream=True)
    request = world.llama.open[0]
    request.setHeader(b"content-type", b"text/event-stream")
    request.write(b"data: {}\n\n")
    world.flush()
    request.channel.transport.abortConnection()
    world.flush()
    body = result(result(d).content())
    last = json.loads(body.split(b"\n\n")[-2][len(b"data: "):])
    assert last["error"]["code"] == "upstream_failed"
    assert isinstance(world.state, Done) and world.slot.inflight == 0


def test_a_request_refused_by_a_child_that_just_died_goes_to_its_replacement(world: World) -> None:
    first = world.children[0]
    world.upstream.refused.add(first.port)  # it died: nothing listens
    d = world.post()
    assert world.state.name == "rebinding" and not world.llama.bodies  # never reached any child
    first.die()
    world.advance(0.5)
    assert len(world.children) == 2 and isinstance(world.state, Sent)
    world.answer()
    code, doc = answer_of(world, d)
    assert code == 200 and doc == {"ok": True}
    assert len(world.llama.bodies) == 1  # sent once, to the replacement
    assert world.slot.inflight == 0


def test_a_child_that_refuses_and_lives_on_gets_the_request_502(world: World) -> None:
    world.upstream.refused.add(world.children[0].port)
    d = world.post()
    world.advance(REBIND_WAIT_S + 0.5)
    code, doc = answer_of(world, d)
    assert code == 502 and doc["error"]["code"] == "upstream_failed"
    assert isinstance(world.state, Done) and world.slot.inflight == 0


class _Drop(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass
