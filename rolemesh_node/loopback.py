"""The proxy's client for its own children: HTTP/1.1 on loopback, the body passed through.

Why not ``treq``/``Agent`` here (they remain the node's client everywhere
else: probes, the dispatcher): per relayed chunk, ``Agent`` decodes the
child's chunked framing into a ``Response`` protocol and ``twisted.web``
frames it again for the client; per request it builds a ``Request``,
producers, a pool entry and several Deferreds. Measured in the same run as
llama.cpp's router (``docs/performance.md``, "The relay floor"), that floor —
``Agent`` + ``twisted.web`` with nothing of ours — costs more CPU per chunk
than the router process, so the hot path takes this narrower road:

* the request goes out as one ``write`` of bytes formatted here (the path,
  ``Accept`` and ``X-Request-Id`` are the only variable parts, all checked);
* the response head is parsed by Twisted's own HTTP parser
  (``twisted.web._newclient.HTTPParser``, the one ``Agent`` uses);
* the body is handed on **as the child sent it**: a ``Content-Length`` body
  as it is, a chunked one with its framing (:class:`ChunkedFraming` only
  follows it, to find the end). A read that begins and ends on chunk
  boundaries — every read, with llama-server's one-event chunks — goes to the
  client as the very bytes read, several chunks in one ``write``. A read that
  splits a chunk is framed again as one chunk of its payload, so that what
  the client has is always whole chunks, and the node can still end a broken
  stream with an SSE error event and the terminating chunk.

Delivery (:meth:`ChildResponse.deliverBody`) follows ``IResponse``'s: the
protocol gets ``makeConnection(producer)``, the data, and
``connectionLost(reason)`` with ``ResponseDone`` at a clean end or
``ResponseFailed`` when the body broke off. With ``raw=True`` it gets
``raw_received(out, text)`` instead of ``dataReceived``: ``out`` the bytes to
write as they are (framing included), ``text`` the same bytes without any
framing added here (what the token counter reads).

Connections: one per request in flight, kept for the next only after a
``Content-Length`` answer without ``Connection: close`` (llama-server closes
a connection after a chunked answer; a stream asks for ``Connection: close``
so nobody waits for it) and for at most ``idle_s`` (below llama-server's
5 s keep-alive, so no request is written into a socket the child is
closing; a pool-wide timer closes those kept longer, since llama-server
holds a thread of its small HTTP pool for every open connection). A stream
takes a kept connection like any request (a kept one has never served a
stream). A request is never sent twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Union

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from twisted.web._newclient import HTTPParser
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from .web import write_through

#: what a chunk-size line may hold (RFC 9112 7.1: hex digits, then optional extensions)
_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: a chunk-size or trailer line longer than this is a protocol error
MAX_LINE = 4096
#: a chunk's size line, on the fast path (no extensions)
_CHUNK_HEAD = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")
#: a trailer section longer than this is a protocol error
MAX_TRAILER = 16 * 1024
_HEADER_VALUE_OK = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")


class FramingError(Exception):
    """The child's body framing is broken."""


class BodyCut(Exception):
    """The child's connection closed before the end of the body."""


class IdentityFraming:
    """A ``Content-Length`` body: ``left`` bytes to go."""

    __slots__ = ("left",)
    chunked = False

    def __init__(self, length: int) -> None:
        self.left = length

    def feed(self, data: bytes) -> tuple[bytes, bytes, int]:
        """``(out, text, end)``: the body bytes in ``data`` (twice: nothing is framed here)
        and the index after its last byte, or -1 while the body goes on."""
        left = self.left
        if len(data) < left:
            self.left = left - len(data)
            return data, data, -1
        self.left = 0
        if len(data) > left:
            data = data[:left]
        return data, data, left


class UntilCloseFraming:
    """A body without length or chunks: it ends when the connection closes."""

    __slots__ = ()
    chunked = False

    def feed(self, data: bytes) -> tuple[bytes, bytes, int]:
        return data, data, -1


# ChunkedFraming.state
_SIZE_LINE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)
#: ``whole`` holds back at most this much of a chunk that is still coming (past it, the payload goes on in pieces)
MAX_HELD = 1024 * 1024


class ChunkedFraming:
    """Follows a chunked body's framing (RFC 9112 7.1) across reads, copying nothing it need not.

    :meth:`feed` returns ``(out, text, end)``. ``end``: the index in ``data``
    just after the body, or -1 while it goes on.

    * ``raw`` (the client gets the child's framing): a read that began and
      ended on chunk boundaries (llama-server's every read) comes back as
      ``out = data`` itself, ``text = None`` (whole chunks, framed as the
      child framed them). Any other read comes back as its payload framed as
      one chunk, ``text`` that payload; the end adds the terminating chunk.
      Trailer fields are dropped either way (a proxy may; llama-server sends
      none).
    * not ``raw``: ``out`` and ``text`` are the payload.
    * ``whole`` (an SSE stream): a chunk still coming is held back (up to
      :data:`MAX_HELD`) until it is complete, so what went out is always whole
      chunks — whole SSE events, from llama-server — and a stream broken off
      can still end with an SSE error event of its own.
    """

    __slots__ = ("raw", "whole", "state", "left", "size", "line", "trailer", "held")
    chunked = True

    def __init__(self, raw: bool, whole: bool = False) -> None:
        self.raw = raw
        self.whole = whole
        self.state = _SIZE_LINE
        self.left = 0  # _DATA: payload bytes to go in this chunk; _DATA_END: CRLF bytes to go
        self.size = 0  # the current chunk's size
        self.line = b""  # a size or trailer line split across reads
        self.trailer = 0  # bytes of trailer fields so far
        self.held = b""  # payload of a chunk not yet complete (whole)

    def feed(self, data: bytes) -> tuple[bytes, bytes | None, int]:
        aligned = self.state == _SIZE_LINE and not self.line
        if aligned and self.raw:
            fast = self._whole_chunks(data)
            if fast is not None:
                return fast
        continued = self.state == _DATA  # the read goes on with a chunk begun before it
        spans: list[int] = []  # the payload, as [start, end, start, end, ...] in data
        zero_at = -1  # where the last chunk's size line begins in data
        current = 0  # spans[current:] are of the chunk being read (begun in an earlier read, or here)
        pos, n, end = 0, len(data), -1
        while pos < n:
            state = self.state
            if state == _DATA:
                take = self.left if self.left < n - pos else n - pos
                spans.append(pos)
                pos += take
                spans.append(pos)
                self.left -= take
                if not self.left:
                    self.state, self.left = _DATA_END, 2
            elif state == _DATA_END:
                got = data[pos:pos + self.left]
                if not b"\r\n"[2 - self.left:].startswith(got):
                    raise FramingError("a chunk's data is not followed by CRLF")
                pos += len(got)
                self.left -= len(got)
                if not self.left:
                    self.state = _SIZE_LINE
            else:  # a line: a chunk size, or a trailer field / the empty line that ends the body
                eol = data.find(b"\n", pos)
                if eol < 0:
                    self.line += data[pos:]
                    if len(self.line) > MAX_LINE:
                        raise FramingError("a chunk-size or trailer line is too long")
                    pos = n
                    break
                line = data[pos:eol] if not self.line else self.line + data[pos:eol]
                began, pos = pos, eol + 1
                self.line = b""
                if line[-1:] == b"\r":
                    line = line[:-1]
                if state == _SIZE_LINE:
                    digits = line.split(b";", 1)[0].strip(b" \t")
                    if not _SIZE.fullmatch(digits):
                        raise FramingError(f"bad chunk-size line {line[:40]!r}")
                    size = int(digits, 16)
                    if size:
                        self.state, self.left, self.size = _DATA, size, size
                        current, continued = len(spans), False
                    else:
                        self.state, zero_at = _TRAILER, began
                elif line:  # a trailer field
                    self.trailer += len(line)
                    if self.trailer > MAX_TRAILER:
                        raise FramingError("the trailer section is too long")
                else:
                    self.state = _DONE
                    end = pos
                    break
        done = end >= 0
        if self.raw and aligned and (self.state == _SIZE_LINE and not self.line or done):
            if not done or (end == n and not self.trailer):
                return data, None, end  # the fast path: whole chunks, as the child sent them
            if not self.trailer:
                return data[:end], None, end
            return data[:zero_at] + b"0\r\n\r\n", None, end
        payload = data[spans[0]:spans[1]] if len(spans) == 2 else b"".join(
            [data[spans[i]:spans[i + 1]] for i in range(0, len(spans), 2)])
        if self.whole:
            partial = 0
            if self.state == _DATA and self.size <= MAX_HELD:
                partial = (spans[-1] - spans[-2] if len(spans) > current else 0) + (len(self.held) if continued else 0)
            payload = self._whole(payload, partial)
        if not self.raw:
            return payload, payload, end
        out = b"%x\r\n%s\r\n" % (len(payload), payload) if payload else b""
        if done:
            out += b"0\r\n\r\n"
        return out, payload, end

    def _whole_chunks(self, data: bytes) -> tuple[bytes, None, int] | None:
        """The fast path, for a read of whole chunks without extensions or trailers (llama-server's every
        read): one regular-expression match per chunk, nothing copied, no state changed until it is
        sure; None sends the read through the general path."""
        pos, n, match = 0, len(data), _CHUNK_HEAD.match
        while pos < n:
            head = match(data, pos)
            if head is None:
                return None
            size = int(head.group(1), 16)
            pos = head.end() + size
            if data[pos:pos + 2] != b"\r\n":
                return None
            pos += 2
            if not size:  # 0 CRLF CRLF: the end, trailer section empty
                self.state = _DONE
                return (data if pos == n else data[:pos]), None, pos
        return data, None, -1

    def _whole(self, payload: bytes, partial: int) -> bytes:
        """Of ``payload`` (after what is held), the whole chunks; ``partial``: the bytes at its end
        of a chunk still coming, held back now."""
        if self.held:
            payload, self.held = self.held + payload, b""
        if not partial:
            return payload
        cut = len(payload) - partial
        self.held = payload[cut:]
        return payload[:cut]


class ChildResponse:
    """The child's answer: status, headers, and the body to come (``IResponse``-like)."""

    __slots__ = ("code", "phrase", "headers", "length", "chunked", "_conn")

    def __init__(self, conn: "_ChildConnection", code: int, phrase: bytes, headers: Headers, length: Any,
                 chunked: bool) -> None:
        self._conn = conn
        self.code = code
        self.phrase = phrase
        self.headers = headers  # without the connection-control ones (length, framing, keep-alive)
        self.length = length  # the Content-Length, or UNKNOWN_LENGTH
        self.chunked = chunked

    def deliverBody(self, protocol: Any, raw: bool = False, whole: bool = False) -> None:
        """``raw``: as the child framed it (see :class:`ChunkedFraming`); ``whole``: only whole chunks."""
        self._conn.deliver(protocol, raw, whole)


# ----------------------------------------------------- a connection's life
#
# Each state holds what belongs to it — the request waiting for the connect, the
# call waiting for the head, the framing and the receiver of a body, when a kept
# connection was kept — and ``_ChildConnection._enter`` is the one place the
# state (``stage``) changes (leaving *kept* takes the connection out of the pool).


@dataclass(slots=True, eq=False)
class Connecting:
    """The TCP connect is under way; ``request`` goes out once connected."""

    call: Deferred[ChildResponse]
    request: bytes
    keep: bool
    name = "connecting"


@dataclass(slots=True, eq=False)
class Awaiting:
    """The request is written; the answer's head is not complete."""

    call: Deferred[ChildResponse]
    keep: bool  # may serve another request after this answer
    received: bool = False  # any byte of the answer yet
    name = "awaiting"


@dataclass(slots=True, eq=False)
class Receiving:
    """The head is in; the body goes to ``body`` (bytes that come before ``deliverBody`` wait in ``early``)."""

    framing: Any
    keep: bool
    body: Any = None
    raw: bool = False
    early: list[bytes] = field(default_factory=list)
    ended: Failure | None = None  # the connection ended before ``deliverBody``: told after ``early``
    name = "receiving"


@dataclass(slots=True, eq=False)
class Kept:
    """In the pool since ``since``, for the next request to the same child."""

    since: float
    name = "kept"


@dataclass(slots=True, eq=False)
class Closed:
    """Given up: closing or closed."""

    name = "closed"


ConnectionState = Union[Connecting, Awaiting, Receiving, Kept, Closed]

#: every transition a connection to a child may make
CONNECTION_TRANSITIONS: dict[type, frozenset[type]] = {
    Connecting: frozenset({Awaiting, Closed}),
    Awaiting: frozenset({Receiving, Closed}),
    Receiving: frozenset({Kept, Closed}),
    Kept: frozenset({Awaiting, Closed}),
    Closed: frozenset(),
}


class _ChildConnection(HTTPParser):
    """One connection to a child, reused request after request while the child keeps it::

        connecting ──► awaiting ──► receiving ──► kept ──► awaiting … (each ──► closed)
    """

    def __init__(self, client: "LoopbackClient", port: int, first: Connecting) -> None:
        self.client = client
        self.port = port
        self.stage: ConnectionState = first  # (``state`` is HTTPParser's own: where it is in the head)

    def _enter(self, new: ConnectionState) -> None:
        """The one place where the state changes."""
        old = self.stage
        if type(new) not in CONNECTION_TRANSITIONS[type(old)]:
            raise RuntimeError(f"connection to port {self.port}: {old.name} -> {new.name} is not a transition")
        self.stage = new
        if isinstance(old, Kept):
            self.client._unkeep(self)

    def _close(self) -> None:
        """Give the connection up (it is closed in order, FIN)."""
        if not isinstance(self.stage, Closed):
            self._enter(Closed())
            self.transport.loseConnection()

    # -------------------------------------------------------------- requests

    def send(self, call: Deferred[ChildResponse], request: bytes, keep_alive: bool) -> None:
        self._enter(Awaiting(call, keep_alive))
        HTTPParser.connectionMade(self)  # a fresh head: headers, state STATUS
        self.setLineMode()
        write_through(self.transport, request)

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # the request goes in one write; nothing should wait behind it
        state = self.stage
        if isinstance(state, Connecting):
            self.send(state.call, state.request, state.keep)
        else:  # given up while connecting
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        state = self.stage
        try:
            if isinstance(state, Receiving):  # the hot path: a body being relayed (raw mode since the head)
                self._body_bytes(data)
            elif isinstance(state, Awaiting):
                state.received = True
                HTTPParser.dataReceived(self, data)
            else:  # nothing asked for it: a child talking out of turn
                if not isinstance(state, Closed):
                    self._enter(Closed())
                self.transport.abortConnection()
        except FramingError as exc:
            self._broken(Failure(exc))

    # ------------------------------------------------------------------ head

    def statusReceived(self, status: bytes) -> None:
        parts = status.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise FramingError(f"bad status line {status[:60]!r}")
        self.version = parts[0]
        self.code = int(parts[1])
        self.phrase = parts[2] if len(parts) == 3 else b""

    def allHeadersReceived(self) -> None:
        awaiting = self.stage
        assert isinstance(awaiting, Awaiting)
        conn = self.connHeaders
        encodings = conn.getRawHeaders(b"transfer-encoding")
        lengths = conn.getRawHeaders(b"content-length")
        if encodings is not None:
            if [e.strip().lower() for e in b",".join(encodings).split(b",")] != [b"chunked"]:
                raise FramingError(f"unsupported transfer-encoding {encodings!r}")
            framing: Any = ChunkedFraming(raw=False)  # raw or not: see deliver()
            length = UNKNOWN_LENGTH
        elif lengths is not None:
            if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
                raise FramingError(f"bad content-length {lengths!r}")
            length = int(lengths[0])
            framing = IdentityFraming(length)
        else:
            framing, length = UntilCloseFraming(), UNKNOWN_LENGTH
        connection = b",".join(conn.getRawHeaders(b"connection") or ()).lower()
        # llama-server closes after a chunked answer whatever it announced
        keep = awaiting.keep and self.version == b"HTTP/1.1" and b"close" not in connection \
            and isinstance(framing, IdentityFraming)
        receiving = Receiving(framing, keep)
        self._enter(receiving)
        self.switchToBodyMode(None)
        awaiting.call.callback(ChildResponse(self, self.code, self.phrase, self.headers, length, framing.chunked))
        if length == 0 and self.stage is receiving:
            self._body_bytes(b"")

    # ------------------------------------------------------------------ body

    def deliver(self, protocol: Any, raw: bool, whole: bool) -> None:
        state = self.stage
        assert isinstance(state, Receiving) and state.body is None
        if isinstance(state.framing, ChunkedFraming):
            state.framing.raw, state.framing.whole = raw, whole
        state.raw = raw
        state.body = protocol
        protocol.makeConnection(self)
        early, state.early = state.early, []
        for data in early:
            if self.stage is not state or state.body is not protocol:
                break
            self._body_bytes(data)
        if self.stage is state and state.ended is not None:
            self._enter(Closed())
            protocol.connectionLost(state.ended)

    def rawDataReceived(self, data: bytes) -> None:
        self._body_bytes(data)

    def _body_bytes(self, data: bytes) -> None:
        state = self.stage
        body = state.body
        if body is None:
            state.early.append(data)
            return
        out, text, end = state.framing.feed(data)
        if out or text:
            if state.raw:
                body.raw_received(out, text)
            else:
                body.dataReceived(out)
        if end < 0 or self.stage is not state:
            return
        # the end of the body: the connection is let go (or kept) before the
        # receiver hears of it, so a request it sends at once may reuse it
        if state.keep and end == len(data) and state.ended is None:  # (bytes after the answer: nobody's)
            self.setLineMode()
            self._enter(Kept(self.client.reactor.seconds()))
            self.client._keep(self)
        else:
            self._close()
        body.connectionLost(Failure(ResponseDone()))

    def _broken(self, failure: Failure) -> None:
        """The child broke the protocol: drop the connection; whoever waits gets the failure."""
        state = self.stage
        self.transport.abortConnection()
        if isinstance(state, Awaiting):
            self._enter(Closed())
            state.call.errback(ResponseFailed([failure]))
        elif isinstance(state, Receiving):
            self._end(state, Failure(ResponseFailed([failure])))

    def _end(self, state: Receiving, reason: Failure) -> None:
        """The body ends with ``reason``; told now, or after the bytes before it when ``deliverBody`` comes."""
        if state.body is None:
            if state.ended is None:
                state.ended = reason
            return
        self._enter(Closed())
        state.body.connectionLost(reason)

    # ------------------------------------------------------- the connection

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.client._gone(self)
        state = self.stage
        if isinstance(state, Awaiting):
            self._enter(Closed())
            state.call.errback(ResponseFailed([reason]) if state.received else ResponseNeverReceived([reason]))
        elif isinstance(state, Receiving):
            state.keep = False
            if isinstance(state.framing, UntilCloseFraming):
                self._end(state, Failure(ResponseDone()))
            else:
                self._end(state, Failure(ResponseFailed([reason, Failure(BodyCut(
                    "the child closed the connection before the end of the body"))])))
        elif isinstance(state, (Connecting, Kept)):
            self._enter(Closed())

    # IPushProducer, for the body's receiver
    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The receiver gives up on the body: the connection cannot be reused (it hears of the end)."""
        if isinstance(self.stage, Receiving):
            self.stage.keep = False
        self.transport.abortConnection()


class _Connect(ClientFactory):
    """Connects one ``_ChildConnection`` (which then sends its first request)."""

    noisy = False

    def __init__(self, conn: _ChildConnection) -> None:
        self.conn = conn

    def buildProtocol(self, addr: Any) -> _ChildConnection:
        return self.conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        conn = self.conn
        conn.client._gone(conn)
        state = conn.stage
        if isinstance(state, Connecting):
            conn._enter(Closed())
            state.call.errback(reason)


class LoopbackClient:
    """POSTs to the children on 127.0.0.1 (see the module's docstring)."""

    def __init__(self, reactor: Any, idle_s: float = 2.0, max_idle_per_port: int = 8,
                 connect_timeout_s: float = 5.0) -> None:
        self.reactor = reactor
        self.idle_s = idle_s
        self.max_idle_per_port = max_idle_per_port
        self.connect_timeout_s = connect_timeout_s
        self._idle: dict[int, list[_ChildConnection]] = {}  # the kept ones, per port, oldest first
        self._sweep: Any = None  # the next look for kept connections idle too long
        #: every connection, connecting, busy or kept
        self.open: set[_ChildConnection] = set()

    def post(self, port: int, path: bytes, body: bytes, *, accept: bytes, request_id: bytes,
             keep_alive: bool = True) -> Deferred[ChildResponse]:
        """Send ``body`` to the child on ``port``; fires with its answer's head (the body follows)."""
        if not _HEADER_VALUE_OK.match(accept):
            accept = b"*/*"
        request = (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                   b"Accept: %s\r\nX-Request-Id: %s\r\nContent-Length: %d\r\n%s\r\n%s"
                   % (path, port, accept, request_id, len(body),
                      b"" if keep_alive else b"Connection: close\r\n", body))
        conn = self._take(port)  # a kept connection has never served a stream: a stream may have it
        if conn is not None:
            call: Deferred[ChildResponse] = Deferred(lambda d: self._cancel(conn, d))
            conn.send(call, request, keep_alive)
            return call
        connector: Any = None

        def cancel(d: Deferred[ChildResponse]) -> None:
            if isinstance(conn.stage, Connecting):
                conn._enter(Closed())
                connector.stopConnecting()
            else:
                self._cancel(conn, d)

        call = Deferred(cancel)
        conn = _ChildConnection(self, port, Connecting(call, request, keep_alive))
        self.open.add(conn)
        connector = self.reactor.connectTCP("127.0.0.1", port, _Connect(conn), timeout=self.connect_timeout_s)
        return call

    def _cancel(self, conn: _ChildConnection, d: Deferred[ChildResponse]) -> None:
        state = conn.stage
        if isinstance(state, Awaiting) and state.call is d:
            conn._enter(Closed())
            conn.transport.abortConnection()

    def _take(self, port: int) -> _ChildConnection | None:
        idle = self._idle.get(port)
        now = self.reactor.seconds()
        while idle:
            conn = idle[-1]
            if now - conn.stage.since < self.idle_s:
                return conn  # (it leaves the pool as it leaves *kept*)
            conn._close()
        return None

    def _keep(self, conn: _ChildConnection) -> None:
        idle = self._idle.setdefault(conn.port, [])
        if len(idle) >= self.max_idle_per_port:
            idle[0]._close()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = self.reactor.callLater(self.idle_s, self._close_stale)

    def _unkeep(self, conn: _ChildConnection) -> None:
        idle = self._idle.get(conn.port)
        if idle is not None and conn in idle:
            idle.remove(conn)

    def _close_stale(self) -> None:
        """Close the connections kept longer than ``idle_s``: llama-server gives each open connection a
        thread of its HTTP pool until it closes (5 s idle), and its pool is small (``-np`` + 2 on a small
        host), so kept connections must not hold threads a probe or a new request needs. One timer for
        the whole pool, armed while connections are kept."""
        self._sweep = None
        now, oldest = self.reactor.seconds(), None
        for idle in list(self._idle.values()):
            for conn in [c for c in idle if now - c.stage.since >= self.idle_s]:
                conn._close()
            for conn in idle:
                oldest = conn.stage.since if oldest is None else min(oldest, conn.stage.since)
        if oldest is not None:
            self._sweep = self.reactor.callLater(oldest + self.idle_s - now, self._close_stale)

    def _gone(self, conn: _ChildConnection) -> None:
        self.open.discard(conn)

    def close_idle(self) -> None:
        """Close every kept connection (the node is stopping)."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn._close()
        self._idle.clear()


def unframe(data: bytes) -> bytes:
    """The payload of ``data``, whole chunks as framed by a child (what a fast-path read carries)."""
    return ChunkedFraming(raw=False).feed(data)[0]
