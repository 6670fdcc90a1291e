"""The proxy's loopback client (:mod:`rolemesh_node.loopback`): body framing in memory, the client on real sockets.

The relay through the whole node is covered byte by byte in ``test_relay_corpus.py``; here are the
framing follower's own rules (what is passed through as it is, what is framed again, what is held
back) and the client's connection handling (reuse, ``Connection: close``, refusals, cancels).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import ResponseDone, ResponseFailed

from rolemesh_node.llama_server import free_port
from rolemesh_node.loopback import MAX_HELD, ChunkedFraming, FramingError, IdentityFraming, LoopbackClient, unframe
from tests.test_supervisor_real import eventually


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(5)]
BODY = b"".join(chunk(e) for e in EVENTS) + b"0\r\n\r\n"


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """A strict client's reading of a chunked body: (payload, ended properly)."""
    framing = ChunkedFraming(raw=False)
    payload, _text, end = framing.feed(data)
    return payload, end == len(data)


# ------------------------------------------------------------------ framing


def test_whole_chunks_pass_through_as_the_very_bytes_read() -> None:
    framing = ChunkedFraming(raw=True)
    first = b"".join(chunk(e) for e in EVENTS[:3])
    out, text, end = framing.feed(first)
    assert out is first and text is None and end == -1  # several chunks, one write, no copy
    rest = BODY[len(first):]
    out, text, end = framing.feed(rest)
    assert out is rest and text is None and end == len(rest)
    assert unframe(first) == b"".join(EVENTS[:3])


@pytest.mark.parametrize("seed", range(20))
def test_any_split_gives_the_client_whole_chunks_and_the_same_payload(seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(BODY)), rng.randint(1, 12)))
    pieces = [BODY[a:b] for a, b in zip([0, *cuts], [*cuts, len(BODY)])]
    for whole in (False, True):
        framing = ChunkedFraming(raw=True, whole=whole)
        sent, ends = b"", []
        for piece in pieces:
            out, _text, end = framing.feed(piece)
            sent += out
            ends.append(end)
            if end < 0:  # what the client has at every read boundary is whole chunks
                payload, ended = dechunk(sent + b"0\r\n\r\n")
                assert ended
                if whole:  # and, holding back a chunk still coming, whole events
                    assert payload.endswith(b"\n\n") or not payload
        assert ends[-1] == len(pieces[-1]) and all(e < 0 for e in ends[:-1])
        assert dechunk(sent) == (b"".join(EVENTS), True)


def test_a_read_that_splits_a_chunk_is_framed_again_unless_it_must_be_whole() -> None:
    data = chunk(EVENTS[0]) + chunk(EVENTS[1])[:9]
    out, text, _ = ChunkedFraming(raw=True).feed(data)
    assert out == chunk(EVENTS[0] + EVENTS[1][:5]) and text == EVENTS[0] + EVENTS[1][:5]
    framing = ChunkedFraming(raw=True, whole=True)
    out, text, _ = framing.feed(data)
    assert out == chunk(EVENTS[0])  # the event still coming is held back
    out, _, _ = framing.feed(chunk(EVENTS[1])[9:])
    assert out == chunk(EVENTS[1])


def test_a_huge_chunk_is_not_held_back() -> None:
    framing = ChunkedFraming(raw=True, whole=True)
    out, _, _ = framing.feed(b"%x\r\n" % (MAX_HELD + 1) + b"x" * 1000)
    assert out == chunk(b"x" * 1000)


@pytest.mark.parametrize("split", [None, 3, 7])
def test_trailers_are_dropped(split: int | None) -> None:
    body = chunk(EVENTS[0]) + b"0\r\nX-Foo: bar\r\nX-Bar: baz\r\n\r\n"
    framing = ChunkedFraming(raw=True)
    pieces = [body] if split is None else [body[:len(body) - split], body[len(body) - split:]]
    sent = b"".join(framing.feed(p)[0] for p in pieces)
    assert sent == chunk(EVENTS[0]) + b"0\r\n\r\n"


def test_bytes_after_the_end_are_not_the_body() -> None:
    out, _, end = ChunkedFraming(raw=True).feed(BODY + b"HTTP/1.1 200 OK\r\n")
    assert out == BODY and end == len(BODY)
    identity = IdentityFraming(5)
    assert identity.feed(b"abc") == (b"abc", b"abc", -1)
    assert identity.feed(b"defg") == (b"de", b"de", 2)


@pytest.mark.parametrize("bad", [b"zz\r\n", b"+5\r\nhello\r\n", b"0x5\r\nhello\r\n", b"5\r\nhelloXX",
                                 b"1" * 5000])
def test_broken_framing_is_refused(bad: bytes) -> None:
    with pytest.raises(FramingError):
        ChunkedFraming(raw=True).feed(bad)


# ------------------------------------------------------- the client, for real


class Scripted(Protocol):
    """A child that answers each request (once its body is in) with the next answer of ``answers``."""

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.buffer = b""

    def connectionMade(self) -> None:
        self.server.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.server.requests.append(head + b"\r\n\r\n" + rest[:length])
            if not self.server.answers:
                continue  # no answer: it hangs
            answer = self.server.answers.pop(0)
            close = isinstance(answer, tuple)  # (bytes, "close"): write them, then close
            self.transport.write(answer[0] if close else answer)
            if close:
                self.transport.loseConnection()


class Server(Factory):
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections: list[Scripted] = []

    def buildProtocol(self, addr: Any) -> Scripted:
        return Scripted(self)


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[Any] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def raw_received(self, out: bytes, text: bytes | None) -> None:
        self.data += out

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback([reason])  # (a Failure given to callback would be raised by await)


PLAIN = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
STREAM = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + BODY


@pytest.fixture
def server() -> Any:
    made: list[Any] = []

    def serve(answers: list[Any]) -> tuple[Server, int]:
        factory = Server(answers)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        made.append((factory, port))
        return factory, port.getHost().port

    yield serve
    for factory, port in made:
        for conn in factory.connections:
            conn.transport.abortConnection()
        port.stopListening()


async def fetch(client: LoopbackClient, port: int, raw: bool = True,
                keep_alive: bool = True) -> tuple[Any, Collect, Any]:
    response = await client.post(port, b"/v1/chat/completions", b'{"model": "m"}', accept=b"*/*",
                                 request_id=b"r1", keep_alive=keep_alive)
    body = Collect()
    response.deliverBody(body, raw=raw)
    [reason] = await body.done
    return response, body, reason


@pytest_twisted.ensureDeferred
async def test_a_kept_connection_serves_the_next_request_and_a_stream_closes_its_own(server) -> None:
    factory, port = server([PLAIN, PLAIN, STREAM])
    client = LoopbackClient(reactor)
    first, body, reason = await fetch(client, port)
    assert first.code == 200 and first.length == 7 and body.data == b'{"a":1}' and reason.check(ResponseDone)
    assert first.headers.getRawHeaders(b"content-type") == [b"application/json"]
    second, body, _ = await fetch(client, port)
    assert body.data == b'{"a":1}' and len(factory.connections) == 1  # the same connection
    third, body, reason = await fetch(client, port, keep_alive=False)
    assert third.chunked and body.data == BODY and reason.check(ResponseDone)
    assert b"Connection: close\r\n" in factory.requests[2] and b"X-Request-Id: r1\r\n" in factory.requests[0]
    await eventually(lambda: len(client.open) == 1, what="the stream's connection to close")
    client.close_idle()  # the plain requests' one, kept
    await eventually(lambda: not client.open, what="the kept connection to close")


@pytest_twisted.ensureDeferred
async def test_a_body_cut_short_fails_and_a_refused_port_is_a_connect_error(server) -> None:
    _factory, port = server([(PLAIN[:-3], "close")])
    client = LoopbackClient(reactor)
    _response, body, reason = await fetch(client, port)
    assert reason.check(ResponseFailed) and body.data == b'{"a"'
    with pytest.raises(ConnectError):
        await client.post(free_port(), b"/v1/completions", b"{}", accept=b"*/*", request_id=b"r")
    await eventually(lambda: not client.open, what="no connection left")


@pytest_twisted.ensureDeferred
async def test_a_request_cancelled_before_its_answer_drops_its_connection(server) -> None:
    factory, port = server([])  # never answers
    client = LoopbackClient(reactor)
    d = client.post(port, b"/v1/completions", b"{}", accept=b"*/*", request_id=b"r")
    await eventually(lambda: factory.requests, what="the request to arrive")
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await eventually(lambda: not client.open, what="the connection to close")


@pytest_twisted.ensureDeferred
async def test_a_header_value_with_a_line_break_is_not_sent(server) -> None:
    factory, port = server([PLAIN])
    client = LoopbackClient(reactor)
    response = await client.post(port, b"/v1/completions", b"{}", accept=b"x\r\nX-Evil: 1", request_id=b"r")
    response.deliverBody(Collect())
    assert b"X-Evil" not in factory.requests[0] and b"Accept: */*\r\n" in factory.requests[0]
    client.close_idle()


def test_kept_connections_are_closed_after_idle_s_by_one_timer() -> None:
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from rolemesh_node.loopback import Awaiting, Kept, _ChildConnection

    clock = Clock()
    client = LoopbackClient(clock, idle_s=2.0)

    def kept(port: int) -> _ChildConnection:
        conn = _ChildConnection(client, port, Awaiting(Deferred(), True))
        conn.transport = StringTransport()
        conn.stage = Kept(clock.seconds())  # (as an answer's end leaves it)
        client._keep(conn)
        return conn

    first = kept(1)
    clock.advance(1.5)
    second = kept(2)
    assert len(clock.getDelayedCalls()) == 1  # one timer for the pool, not one per connection
    clock.advance(0.5)
    assert first.transport.disconnecting and not second.transport.disconnecting
    assert first.stage.name == "closed" and second.stage.name == "kept"
    clock.advance(1.5)
    assert second.transport.disconnecting and not clock.getDelayedCalls() and not any(client._idle.values())


def test_a_connection_is_a_state_table() -> None:
    from rolemesh_node.loopback import Closed, Connecting, _ChildConnection

    conn = _ChildConnection(LoopbackClient(reactor), 1, Connecting(Deferred(), b"", True))
    conn._enter(Closed())
    with pytest.raises(RuntimeError):
        conn._enter(Closed())  # closed is final
