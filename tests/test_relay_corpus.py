"""Byte-exact relay corpus: what a client sees on the wire for each way a child may send its answer.

The child is a raw-socket fake (:class:`RawChild`): it reads the node's request, then writes a script
of bytes exactly as given, each element in its own ``transport.write`` a few milliseconds after the
previous one, so that they reach the node in separate reads — chunk sizes, CRLFs, trailers and JSON cut
in awkward places. The node is the real service over real loopback HTTP; the client is a raw socket
(:class:`tests.rawpeer.Peer`) whose bytes are parsed here, strictly.

The tests look only at the wire and at the node's state (the slot's ``inflight``, the proxy's live
exchanges, the token counters in ``/metrics``), never at how the proxy relays, so they hold whatever
client the relay is built on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from tests.rawpeer import Peer
from tests.test_metrics_real import scrape, value
from tests.test_proxy_upstream_faults import FakeReadyChild
from tests.test_supervisor_real import eventually

# ---------------------------------------------------------------- the fake child

#: script elements: the child closes the connection here, whatever it promised (FIN; RST)
CLOSE = object()
ABORT = object()
#: between two writes of a script (s): enough for each write to arrive in a read of its own
GAP_S = 0.008

HEALTH = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"status":"ok"}'
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class RawChild(Protocol):
    """One connection from the node: answers ``GET /health`` (``/slots`` and the rest: 404) at once, and
    each ``POST`` with the factory's script; keep-alive between requests, as llama-server."""

    def __init__(self, factory: "RawChildFactory") -> None:
        self.factory = factory
        self.buffer = b""
        self.posted = False  # a POST came on this connection
        self.lost = False
        self.playing: Any = None  # the delayed call of the next write, while a script plays

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # no coalescing of the script's small writes
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._serve()

    def _serve(self) -> None:
        while self.playing is None and not self.lost:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            lines = head.split(b"\r\n")
            headers = dict(line.lower().split(b":", 1) for line in lines[1:])
            length = int(headers.get(b"content-length", b"0"))
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            method, path = lines[0].split(b" ")[:2]
            if method == b"POST":
                self.posted = True
                self.factory.requests.append(json.loads(rest[:length]))
                self._play(iter(self.factory.script))
            else:
                self.transport.write(HEALTH if path == b"/health" else NOT_FOUND)

    def _play(self, steps: Iterator[Any]) -> None:
        self.playing = None
        step = next(steps, None)
        if step is CLOSE:
            self.transport.loseConnection()
        elif step is ABORT:
            self.transport.abortConnection()
        elif step is not None:
            self.transport.write(step)
            self.playing = reactor.callLater(self.factory.gap, self._play, steps)
        else:
            self._serve()  # the next request on this connection, if any

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        self.stop()

    def stop(self) -> None:
        if self.playing is not None and self.playing.active():
            self.playing.cancel()
        self.playing = None


class RawChildFactory(Factory):
    def __init__(self) -> None:
        self.script: Iterable[Any] = ()
        self.gap = GAP_S
        self.connections: list[RawChild] = []
        self.requests: list[dict[str, Any]] = []
        self.port = 0

    def buildProtocol(self, addr: Any) -> RawChild:
        return RawChild(self)

    def posting(self) -> list[RawChild]:
        """The connections that carried a POST (the liveness checks' are left out)."""
        return [c for c in self.connections if c.posted]


@pytest.fixture
def child() -> Any:
    factory = RawChildFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.port = port.getHost().port
    yield factory
    for connection in factory.connections:
        connection.stop()
        if not connection.lost:
            connection.transport.abortConnection()
    port.stopListening()


async def start(node_service: Any, tiny_models: dict[str, Path], child: RawChildFactory) -> Any:
    config = {"backend": "cpu", "request_timeout_s": 10, "models": {"m": {"path": tiny_models["tiny-a"]}}}
    service = await node_service(config)
    slot = service.node.slots["cpu:0"]
    slot._child_factory = lambda **kwargs: FakeReadyChild(child.port, **kwargs)
    return service, slot


# ---------------------------------------------------------------- what the child sends

STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
LAST = b"0\r\n\r\n"


def plain_head(length: int, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (content_type, length)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(i: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"tok%d"}}],"object":"chat.completion.chunk"}\n\n' % i


def cut(wire: bytes, *at: int) -> list[bytes]:
    """``wire`` cut at the offsets ``at``: one script element per piece."""
    bounds = [0, *sorted(set(at)), len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(bounds) if a < b]


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


# ---------------------------------------------------------------- the client

@dataclass
class Answer:
    """The client's view of one response on a ``Connection: close`` socket."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes  # de-chunked
    complete: bool  # its framing ended as announced (terminating chunk, Content-Length reached)
    extra: bytes  # what came after that end (nothing, on a Connection: close answer)
    how: str | None  # how the node closed the connection: "fin" or "rst"
    trailers: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """A 200 whose framing ended as announced, nothing after it, then a clean close."""
        return self.status == 200 and self.complete and not self.extra and self.how == "fin"

    def __repr__(self) -> str:  # bodies may be 8 MiB
        return (f"Answer({self.status}, complete={self.complete}, how={self.how}, {len(self.body)} bytes: "
                f"{self.body[:80]!r}...{self.body[-200:]!r}, extra={self.extra[:80]!r})")


def request_bytes(stream: bool) -> bytes:
    body = json.dumps({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def parse(raw: bytes, how: str | None) -> Answer:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:  # closed before a whole head came
        return Answer(0, {}, raw, False, b"", how)
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value_ = line.partition(b":")
        headers[name.strip().lower()] = value_.strip()
    answer = Answer(int(lines[0].split(b" ")[1]), headers, rest, False, b"", how)
    if headers.get(b"transfer-encoding") == b"chunked":
        answer.body, answer.complete, answer.extra, answer.trailers = dechunk(rest)
    elif b"content-length" in headers:  # a client reads that many bytes, and takes them for the answer
        length = int(headers[b"content-length"])
        answer.body, answer.extra, answer.complete = rest[:length], rest[length:], len(rest) >= length
    return answer


def dechunk(data: bytes) -> tuple[bytes, bool, bytes, dict[bytes, bytes]]:
    """(the body, whether the terminating chunk and the final CRLF came, what came after, the trailers)."""
    out = bytearray()
    at = 0
    while True:
        eol = data.find(b"\r\n", at)
        if eol < 0:
            return bytes(out), False, b"", {}
        size = int(data[at:eol].split(b";")[0], 16)
        at = eol + 2
        if size == 0:
            break
        if len(data) < at + size + 2:
            return bytes(out + data[at:at + size]), False, b"", {}
        assert data[at + size:at + size + 2] == b"\r\n", f"bad chunk framing at {at + size}"
        out += data[at:at + size]
        at += size + 2
    trailers = {}
    while True:
        eol = data.find(b"\r\n", at)
        if eol < 0:
            return bytes(out), False, b"", trailers
        if eol == at:
            return bytes(out), True, data[eol + 2:], trailers
        name, _, value_ = data[at:eol].partition(b":")
        trailers[name.strip().lower()] = value_.strip()
        at = eol + 2


def connect(service: Any, stream: bool) -> Peer:
    peer = Peer(service.port)
    peer.send(request_bytes(stream))
    return peer


async def exchange(service: Any, stream: bool, timeout: float = 15.0) -> Answer:
    """One request on a fresh ``Connection: close`` socket; what came back once the node closed it."""
    peer = connect(service, stream)
    try:
        await eventually(peer.closed, timeout=timeout, what="the node to close the client connection")
    finally:
        peer.close()
    return parse(peer.received, peer.how)


async def settled(service: Any, slot: Any) -> None:
    """The request is off the books: the slot's place released, no exchange left live."""
    await eventually(lambda: slot.inflight == 0 and not service.proxy.live, timeout=5.0,
                     what="the slot's place to be released")


def error_event(body: bytes) -> dict[str, Any]:
    """The last SSE event of ``body``, which must be an error event standing on its own."""
    assert body.endswith(b"\n\n"), body[-200:]
    last = body[:-2].rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: "), last[:200]
    return json.loads(last[len(b"data: "):])["error"]


# ---------------------------------------------------------------- 1, 2: chunk boundaries


EVENTS = [sse(i) for i in range(3)]
BODY = b"".join(chunk(e) for e in EVENTS) + LAST
SECOND = len(chunk(EVENTS[0]))  # where the second chunk's size line starts
N = len(EVENTS[1])  # its data (the size has two hex digits)
TERM = len(BODY) - len(LAST)
assert 0x10 <= N < 0x100
AWKWARD = {
    "inside the size hex": [SECOND + 1],
    "between the size and its CRLF": [SECOND + 2],
    "inside the size line's CRLF": [SECOND + 3],
    "between the size line and the data": [SECOND + 4],
    "inside the data": [SECOND + 4 + N // 2],
    "after the data's first byte": [SECOND + 4 + 1],
    "between the data and its CRLF": [SECOND + 4 + N],
    "inside the data's CRLF": [SECOND + 4 + N + 1],
    "between two chunks": [SECOND],
    "after the terminating 0": [TERM + 1],
    "inside the terminating 0's CRLF": [TERM + 2],
    "before the final CRLF": [TERM + 3],
    "inside the final CRLF": [TERM + 4],
}
AWKWARD["all of them at once"] = sorted(x for cuts in AWKWARD.values() for x in cuts)
AWKWARD["every byte"] = list(range(1, len(BODY)))


@pytest.mark.parametrize("cuts", AWKWARD.values(), ids=AWKWARD.keys())
@pytest_twisted.ensureDeferred
async def test_chunks_split_across_reads_in_awkward_places(node_service, tiny_models, child, cuts):
    child.script = [STREAM_HEAD, *cut(BODY, *cuts)]
    child.gap = 0.004 if len(cuts) > 50 else GAP_S
    service, slot = await start(node_service, tiny_models, child)
    answer = await exchange(service, stream=True)
    assert answer.status == 200 and answer.headers[b"content-type"] == b"text/event-stream"
    assert answer.ok, answer
    assert answer.body == b"".join(EVENTS)
    await settled(service, slot)


MANY = [sse(i) for i in range(200)]
MANY_CHUNKED = b"".join(chunk(e) for e in MANY) + LAST
IN_ONE_READ = {
    "the whole body in one write": [STREAM_HEAD, MANY_CHUNKED],
    "the whole answer, head and body, in one write": [STREAM_HEAD + MANY_CHUNKED],
    "seven chunks a write": [STREAM_HEAD, *(b"".join(chunk(e) for e in MANY[i:i + 7]) for i in range(0, 200, 7)),
                             LAST],
    "many events in one chunk": [STREAM_HEAD, chunk(b"".join(MANY)), LAST],
}


@pytest.mark.parametrize("script", IN_ONE_READ.values(), ids=IN_ONE_READ.keys())
@pytest_twisted.ensureDeferred
async def test_many_chunks_in_one_read_are_all_relayed(node_service, tiny_models, child, script):
    child.script = script
    service, slot = await start(node_service, tiny_models, child)
    answer = await exchange(service, stream=True)
    assert answer.ok, answer
    assert answer.body == b"".join(MANY)
    await settled(service, slot)


# ---------------------------------------------------------------- 3: trailers


TRAILED = {
    "in one write": [STREAM_HEAD, chunk(EVENTS[0]), chunk(EVENTS[1]), b"0\r\nX-Foo: bar\r\n\r\n"],
    "split inside the trailer": [STREAM_HEAD, chunk(EVENTS[0]), chunk(EVENTS[1]), b"0\r\nX-F", b"oo: b",
                                 b"ar\r", b"\n", b"\r", b"\n"],
    "announced, two of them": [STREAM_HEAD.replace(b"\r\n\r\n", b"\r\nTrailer: X-Foo, X-Bar\r\n\r\n"),
                               chunk(EVENTS[0]), chunk(EVENTS[1]), b"0\r\nX-Foo: bar\r\nX-Bar: 1\r\n\r\n"],
}


@pytest.mark.parametrize("script", TRAILED.values(), ids=TRAILED.keys())
@pytest_twisted.ensureDeferred
async def test_trailers_after_the_last_chunk(node_service, tiny_models, child, script):
    # The node drops the child's trailers (and its Trailer header, hop-by-hop):
    # the client gets the body and a clean end, without trailers.
    child.script = script
    service, slot = await start(node_service, tiny_models, child)
    answer = await exchange(service, stream=True)
    assert answer.ok, answer
    assert answer.body == EVENTS[0] + EVENTS[1]
    assert answer.trailers == {} and b"trailer" not in answer.headers
    await settled(service, slot)


# ---------------------------------------------------------------- 4: huge bodies, slow readers

HUGE = 8 * 1024 * 1024
PIECE = 128 * 1024


def huge_script(kind: str, data: bytes) -> list[bytes]:
    if kind == "one 8 MiB chunk":
        return [STREAM_HEAD, b"%x\r\n" % len(data), data, b"\r\n" + LAST]
    return [plain_head(len(data), b"application/octet-stream"),
            *(data[i:i + PIECE] for i in range(0, len(data), PIECE))]


@pytest.mark.parametrize("kind", ["one 8 MiB chunk", "Content-Length in 64 writes"])
@pytest_twisted.ensureDeferred
async def test_a_huge_body_is_relayed_whole(node_service, tiny_models, child, kind):
    data = payload(HUGE)
    child.script = huge_script(kind, data)
    child.gap = 0.002
    service, slot = await start(node_service, tiny_models, child)
    answer = await exchange(service, stream=False, timeout=30.0)
    assert answer.ok, answer
    if kind != "one 8 MiB chunk":
        assert answer.headers[b"content-length"] == b"%d" % HUGE and b"transfer-encoding" not in answer.headers
    assert len(answer.body) == HUGE and hashlib.sha256(answer.body).digest() == hashlib.sha256(data).digest()
    await settled(service, slot)


async def read_slowly(peer: Peer, upto: int, piece: int = 32 * 1024) -> None:
    """Read ``piece`` bytes every 20 ms until ``upto`` have come (the node must hold the rest back)."""
    while len(peer.received) < upto and peer.how is None:
        try:
            data = peer.sock.recv(piece)
        except BlockingIOError:
            data = None
        if data == b"":
            peer.how = "fin"
        elif data:
            peer.received += data
        await deferLater(reactor, 0.02, lambda: None)


@pytest.mark.parametrize("kind", ["one 8 MiB chunk", "Content-Length in 64 writes"])
@pytest_twisted.ensureDeferred
async def test_a_slow_reader_gets_a_huge_body_whole(node_service, tiny_models, child, kind):
    data = payload(HUGE)
    child.script = huge_script(kind, data)
    child.gap = 0.002
    service, slot = await start(node_service, tiny_models, child)
    peer = Peer(service.port)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    try:
        peer.send(request_bytes(stream=False))
        await read_slowly(peer, upto=2 * 1024 * 1024)  # ~1.3 s: the child's writes are long done
        await eventually(peer.closed, timeout=30.0, what="the rest of the body")
    finally:
        peer.close()
    answer = parse(peer.received, peer.how)
    assert answer.ok, answer
    assert len(answer.body) == HUGE and hashlib.sha256(answer.body).digest() == hashlib.sha256(data).digest()
    await settled(service, slot)


# ---------------------------------------------------------------- 5, 6: the child breaks off

PARTIAL = sse(9)[:30]  # an event cut in the middle
BROKEN = {  # what the child sends after the head and two whole chunks
    "between two chunks": [CLOSE],
    "between two chunks, reset": [ABORT],
    "mid-chunk": [b"64\r\n", PARTIAL, CLOSE],
    "mid-chunk, on an event boundary": [b"64\r\n", sse(9), CLOSE],
    "mid-size-line": [b"6", CLOSE],
    "after the size line": [b"64\r\n", CLOSE],
    "between the data and its CRLF": [chunk(sse(9))[:-2], CLOSE],
    "after the terminating 0": [b"0\r\n", CLOSE],
    "mid-trailer": [b"0\r\nX-Fo", CLOSE],
    "after a trailer, before the final CRLF": [b"0\r\nX-Foo: bar\r\n", CLOSE],
}
@pytest.mark.parametrize("broken", BROKEN.values(), ids=BROKEN.keys())
@pytest_twisted.ensureDeferred
async def test_a_stream_broken_off_ends_with_an_sse_error_event(node_service, tiny_models, child, broken):
    # Wherever the chunked framing breaks, even after the last data ("after the terminating 0",
    # "mid-trailer"), the node ends the stream with one error event and a proper terminating chunk.
    # A stream goes out in whole chunks (whole events): an event broken off ("mid-chunk") is not
    # relayed at all, so the error event is never glued onto half an event.
    child.script = [STREAM_HEAD, chunk(EVENTS[0]), chunk(EVENTS[1]), *broken]
    service, slot = await start(node_service, tiny_models, child)
    answer = await exchange(service, stream=True)
    assert answer.ok, answer
    assert answer.body.startswith(EVENTS[0] + EVENTS[1])
    error = error_event(answer.body)
    assert error["code"] == "upstream_failed" and "mid-stream" in error["message"]
    assert answer.body.count(b'"upstream_failed"') == 1
    # whole events only (the event whose data all came before the break may be relayed)
    assert answer.body[:answer.body.index(b'data: {"error"')] in (EVENTS[0] + EVENTS[1], EVENTS[0] + EVENTS[1] + sse(9))
    await settled(service, slot)


PLAIN_BROKEN = {
    "Content-Length, 10 of 100 bytes": [plain_head(100), b'{"choices"', CLOSE],
    "Content-Length, the head only": [plain_head(100), CLOSE],
    **{f"chunked, {k}": [STREAM_HEAD.replace(b"text/event-stream", b"application/json"), chunk(b'{"a":'), *v]
       for k, v in BROKEN.items()},
}


@pytest.mark.parametrize("script", PLAIN_BROKEN.values(), ids=PLAIN_BROKEN.keys())
@pytest_twisted.ensureDeferred
async def test_a_plain_answer_broken_off_is_cut_for_the_client(node_service, tiny_models, child, script):
    # The node closes the client connection where the child's answer broke off: after the 200 head and
    # the bytes relayed so far, with no terminating chunk or short of the Content-Length. When nothing at
    # all had gone out yet ("the head only") the client sees its connection closed without a byte.
    child.script = script
    service, slot = await start(node_service, tiny_models, child)
    answer = await exchange(service, stream=False)
    assert not (answer.status == 200 and answer.complete)  # the client cannot take it for the whole answer
    if answer.status == 200:  # only what the child sent, no error appended to a JSON body
        assert b"upstream_failed" not in answer.body
    await settled(service, slot)


#: a stream request answered with a Content-Length (as llama-server answers errors), then broken off
STREAM_WITH_LENGTH = {
    "10 of 1000 bytes": [plain_head(1000, b"text/event-stream"), EVENTS[0][:10], CLOSE],
    "30 of 100 bytes": [plain_head(100, b"text/event-stream"), EVENTS[0][:30], CLOSE],
}


@pytest.mark.parametrize("script", STREAM_WITH_LENGTH.values(), ids=STREAM_WITH_LENGTH.keys())
@pytest_twisted.ensureDeferred
async def test_a_stream_request_answered_with_a_length_and_broken_off_is_cut(node_service, tiny_models, child,
                                                                             script):
    # An answer with a Content-Length broken off can only be cut (an SSE error event written into it
    # would count against the child's length), even for a stream request.
    child.script = script
    service, slot = await start(node_service, tiny_models, child)
    answer = await exchange(service, stream=True)
    await settled(service, slot)
    assert not (answer.status == 200 and answer.complete)
    assert script[1].startswith(answer.body)  # only what the child sent


UNTIL_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
@pytest_twisted.ensureDeferred
async def test_an_answer_ended_by_the_connection_close_is_relayed_whole(node_service, tiny_models, child,
                                                                        stream):
    # Neither a length nor chunks: the child's close ends the answer (HTTP/1.1 allows it), so the
    # node cannot tell it from a broken one and relays it as whole, chunked to its client.
    child.script = [UNTIL_CLOSE, EVENTS[0], EVENTS[1][:20], EVENTS[1][20:], CLOSE]
    service, slot = await start(node_service, tiny_models, child)
    answer = await exchange(service, stream=stream)
    assert answer.ok, answer
    assert answer.body == EVENTS[0] + EVENTS[1]
    await settled(service, slot)


# ---------------------------------------------------------------- 7: the client leaves


def endless_stream() -> Iterator[bytes]:
    yield STREAM_HEAD
    for i in range(5000):  # ~40 s at GAP_S: far longer than the test
        yield chunk(sse(i))


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_stream_closes_the_upstream_connection(node_service, tiny_models, child,
                                                                           stream):
    child.script = endless_stream()
    service, slot = await start(node_service, tiny_models, child)
    peer = connect(service, stream)
    try:
        await eventually(lambda: peer.closed() or b"tok5" in peer.received, timeout=10.0, what="some events")
        assert peer.how is None and slot.inflight == 1
    finally:
        peer.close()
    [upstream] = child.posting()
    # The node closes it as soon as it sees the client go (about 20 ms here): a second is ample.
    await eventually(lambda: upstream.lost, timeout=1.0, what="the node to close the upstream connection")
    await settled(service, slot)


# ---------------------------------------------------------------- 8: byte by byte


PLAIN_BODY = json.dumps({"id": "x", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hello there"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}).encode()
BYTEWISE = {
    "the body's first 20 bytes one by one": [plain_head(len(PLAIN_BODY)), *cut(PLAIN_BODY, *range(1, 21))],
    "the head cut too": [*cut(plain_head(len(PLAIN_BODY)), 5, 17, 30, 52), *cut(PLAIN_BODY, *range(1, 21))],
    "head and first byte in one write": [plain_head(len(PLAIN_BODY)) + PLAIN_BODY[:1],
                                         *cut(PLAIN_BODY[1:], *range(1, 20))],
}


@pytest.mark.parametrize("script", BYTEWISE.values(), ids=BYTEWISE.keys())
@pytest_twisted.ensureDeferred
async def test_a_plain_answer_written_byte_by_byte(node_service, tiny_models, child, script):
    child.script = script
    service, slot = await start(node_service, tiny_models, child)
    answer = await exchange(service, stream=False)
    assert answer.ok, answer
    assert answer.headers[b"content-length"] == b"%d" % len(PLAIN_BODY)
    assert b"transfer-encoding" not in answer.headers
    assert answer.body == PLAIN_BODY
    await settled(service, slot)


# ---------------------------------------------------------------- 9: token counts at the end


USAGE_EVENT = (b'data: {"choices":[],"object":"chat.completion.chunk","usage":{"prompt_tokens":3,'
               b'"completion_tokens":5,"total_tokens":8},"timings":{"prompt_n":3,"cache_n":0,"predicted_n":5,'
               b'"predicted_ms":12.5}}\n\n')
TIMINGS_EVENT = (b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
                 b'"timings":{"prompt_n":1,"cache_n":2,"predicted_n":5,"predicted_ms":12.5}}\n\n')
DONE = b"data: [DONE]\n\n"


def usage_script(event: bytes, how: str) -> list[bytes]:
    key = b'"completion_tokens"' if b'"usage"' in event else b'"predicted_n"'
    inside = event.index(key) + 5  # inside the object that holds the counts
    if how == "one chunk split inside the counts":
        return [STREAM_HEAD, chunk(EVENTS[0]), *cut(chunk(event), inside + 4), chunk(DONE), LAST]
    if how == "two chunks split inside the counts":
        return [STREAM_HEAD, chunk(EVENTS[0]), chunk(event[:inside]), chunk(event[inside:]), chunk(DONE), LAST]
    # every byte of the counts' event in a write of its own
    return [STREAM_HEAD, chunk(EVENTS[0]), *cut(chunk(event), *range(1, len(chunk(event)))), chunk(DONE), LAST]


@pytest.mark.parametrize("how", ["one chunk split inside the counts", "two chunks split inside the counts",
                                 "byte by byte"])
@pytest.mark.parametrize("event", [USAGE_EVENT, TIMINGS_EVENT], ids=["usage", "timings only"])
@pytest_twisted.ensureDeferred
async def test_the_token_counts_at_the_end_of_a_stream_are_counted(node_service, tiny_models, child, event, how):
    child.script = usage_script(event, how)
    child.gap = 0.003
    service, slot = await start(node_service, tiny_models, child)
    before = await scrape(service)
    answer = await exchange(service, stream=True)
    assert answer.ok, answer
    assert answer.body == EVENTS[0] + event + DONE
    await settled(service, slot)
    after = await scrape(service)
    counted = {kind: value(after, "rolemesh_tokens_total", model="m", kind=kind)
               - value(before, "rolemesh_tokens_total", model="m", kind=kind) for kind in ("prompt", "completion")}
    assert counted == {"prompt": 3, "completion": 5}

