"""HTTP plumbing: the request and channel classes, the root resource, the ``Site``.

* The root sends the proxy routes straight to the lean
  :class:`~rolemesh_node.proxy.ProxyResource` and everything else to the node's
  own routes (:mod:`rolemesh_node.api`), so the hot path skips any routing. It
  checks the API key (when keys are configured) on every route but
  ``/health``, ``/ready`` and the status page's HTML and files, which carry
  no data (:func:`is_public`).
* :class:`NodeRequest` caps what a request body may hold in memory: past
  ``max_request_body_bytes`` the rest is read off the wire and dropped, and the
  request is answered 413 — a huge upload cannot fill the agent's memory.
  A target in absolute form (``POST http://host:port/v1/...``) is routed as
  the path it names. ``Expect: 100-continue`` with a ``Content-Length`` over
  the cap gets 413 at once, without the body being read.
* :class:`NodeChannel` closes a connection whose request headers do not
  arrive within ``header_read_timeout_s`` (from the connect, or from the
  first byte of a kept-alive connection's next request) or whose body does
  not within ``body_read_timeout_s`` (408), and an idle kept-alive one after
  ``client_idle_timeout_s`` (Twisted's idle timeout) — always with FIN.
* :class:`NodeSite` caps connections at ``max_client_connections``: a new
  one takes the place of the one that kept the node waiting longest, and is
  refused with 503 only when every connection is being answered; it hands
  each finished request to its :class:`~rolemesh_node.accesslog.AccessLog`
  (none: no access log) instead of Twisted's one log event per request, and tells
  ``on_refusal`` of every 429 and 503 the node answered itself (status, code,
  message), the connection cap's included.
"""

from __future__ import annotations

import io
import re
from os import urandom
from typing import Any, Callable

from twisted.internet import tcp
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import implementer

from .accesslog import AccessLog
from .auth import ApiKeys
from .errors import error_body, set_error

#: probes (a kubelet, a load balancer) call these without a key
UNAUTHENTICATED_PATHS = frozenset({b"/health", b"/ready"})
#: the status page's static files (no data: the page fetches it with the key)
UI_PREFIX = b"/ui/"


_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def request_id(request: Any) -> bytes:
    """The client's ``X-Request-Id`` when it is sane, else a new one."""
    given = request.getHeader(b"x-request-id")
    if given is not None:
        raw = given.encode("latin-1", "replace") if isinstance(given, str) else given
        if _REQUEST_ID.match(raw):
            return raw
    return urandom(16).hex().encode()


def is_public(request: Any) -> bool:
    """Served without a key: the probes, and the status page (its HTML for a browser, its files)."""
    path = request.path
    if path in UNAUTHENTICATED_PATHS or path.startswith(UI_PREFIX):
        return True
    return path == b"/" and wants_html(request)


def wants_html(request: Any) -> bool:
    """A browser asking for a page (``Accept`` names ``text/html``)."""
    return b"text/html" in (request.getHeader(b"accept") or b"")


class _CappedBody(io.BytesIO):
    """Keeps at most ``limit`` bytes; notes when more arrived."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.overflow = False

    def write(self, data: Any) -> int:
        if self.overflow or self.tell() + len(data) > self.limit:
            self.overflow = True
            return len(data)
        return super().write(data)


class NodeRequest(Request):
    max_body_bytes = 10 * 1024 * 1024

    def gotLength(self, length: int | None) -> None:
        self.content = _CappedBody(self.max_body_bytes)
        if length is not None and length > self.max_body_bytes:
            self.content.overflow = True

    @property
    def body_too_large(self) -> bool:
        content = self.content
        return isinstance(content, _CappedBody) and content.overflow

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if path[:1] != b"/":
            path = absolute_to_origin_form(path)
        super().requestReceived(command, path, version)


def direct_transport(request: Any) -> Any:
    """The client connection's TCP transport when bytes may be sent on it at once
    (:func:`write_through`): a plain TCP connection (not TLS), else None."""
    transport = getattr(request.channel, "transport", None)
    if isinstance(transport, tcp.Connection) and not ISSLTransport.providedBy(transport):
        return transport
    return None


def write_through(transport: Any, data: bytes) -> None:
    """Write ``data`` to a TCP ``transport``, sending it at once when nothing is queued before it.

    Twisted's ``write`` only queues: the bytes go out on the reactor's next
    turn, after the socket is registered for writing and before it is
    unregistered again — two ``epoll_ctl`` calls and a second pass through
    the reactor for every relayed token. When the transport's buffers are
    empty, this sends with the transport's own ``writeSomeData`` right away
    and queues only what the socket did not take, so ordering, producers and
    errors stay Twisted's (an error is left for the queued write to meet).
    """
    if transport._tempDataLen or transport.offset != len(transport.dataBuffer) or not transport.connected \
            or transport.disconnecting:
        transport.write(data)
        return
    sent = transport.writeSomeData(data)
    if isinstance(sent, Exception) or sent < 0:
        transport.write(data)  # Twisted's write path meets the error and closes the connection
    elif sent < len(data):
        transport.write(data[sent:])


def absolute_to_origin_form(target: bytes) -> bytes:
    """``http://host:port/p?q`` → ``/p?q`` (RFC 9112 3.2.2: a server must accept the absolute form);
    anything else is returned as it is.

    >>> absolute_to_origin_form(b"http://127.0.0.1:8088/v1/models?x=1")
    b'/v1/models?x=1'
    >>> absolute_to_origin_form(b"HTTP://host")
    b'/'
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return target
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    path = rest[cut:]
    return path if path[:1] == b"/" else b"/" + path


# What a connection waits for (NodeChannel.phase). The node waits on the
# client in NEW, HEADERS, BODY and IDLE; in BUSY the client waits on the node.
NEW = "new"  # connected, no byte yet: header_read_timeout_s from the connect
HEADERS = "headers"  # a request's first bytes came: header_read_timeout_s from the first
BODY = "body"  # headers done, body coming: body_read_timeout_s from the end of the headers
BUSY = "busy"  # the request is being answered (no client deadline)
IDLE = "idle"  # kept alive after an answer: client_idle_timeout_s (Twisted's own idle timeout)
CLOSING = "closing"  # closed by the node (deadline or eviction), waiting for the socket to go


class NodeChannel(HTTPChannel):
    """An ``HTTPChannel`` with deadlines for a request's headers and body.

    Every deadline closes the connection in order (FIN, never RST), after a
    408 when a request had begun; Twisted's ``abortTimeout`` aborts it later
    only if the client does not let it close.
    """

    header_timeout_s = 30.0
    body_timeout_s = 60.0
    phase = NEW
    since = 0.0  # reactor seconds: when the current phase began
    _deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if isinstance(self.transport, tcp.Connection):
            # tokens go out one small write each: Nagle would hold each one until the last was acknowledged
            self.transport.setTcpNoDelay(True)
        self.since = self.factory.clock.seconds()
        self._watch()
        self.factory.connection_opened(self)

    def dataReceived(self, data: bytes) -> None:
        if self.phase is IDLE:  # a kept-alive connection's next request begins
            self._enter(HEADERS)
            self._watch()
        elif self.phase is NEW:
            self.phase = HEADERS  # its deadline still counts from the connect
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        length = self.length
        if length and length > request.max_body_bytes and self._version == b"HTTP/1.1":
            expect = request.requestHeaders.getRawHeaders(b"expect")
            if expect and expect[0].lower() == b"100-continue":
                # No 100 Continue: the client learns at once, without sending the body.
                self._answer_and_close(413, b"Request Entity Too Large", error_body(
                    413, f"request body exceeds max_request_body_bytes ({request.max_body_bytes})",
                    "request_too_large"))
                return
        super().allHeadersReceived()
        if length != 0:
            self._enter(BODY)
            self._watch()

    def allContentReceived(self) -> None:
        self._enter(BUSY)
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if self.persistent:  # kept alive: idle until the next request's first byte
            self._enter(IDLE)
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        self._enter(CLOSING)
        self.factory.connection_closed(self)
        super().connectionLost(reason)

    # ------------------------------------------------------------ deadlines
    #
    # One timer per connection, moved only sooner and looked at when it fires:
    # a phase change sets ``phase`` and ``since`` and nothing else, unless the
    # new phase's deadline comes before the timer. A kept-alive connection
    # serving request after request arms about one timer per
    # header_read_timeout_s, not two per request.

    def _due(self) -> float | None:
        """When the current phase's deadline passes (None: the node is not waiting on the client)."""
        if self.phase is NEW or self.phase is HEADERS:
            return self.since + self.header_timeout_s
        if self.phase is BODY:
            return self.since + self.body_timeout_s
        return None

    def _enter(self, phase: str) -> None:
        self.factory.phase_changed(self, self.phase, phase)
        self.phase = phase
        self.since = self.factory.clock.seconds()

    def _watch(self) -> None:
        """The timer fires no later than the current phase's deadline."""
        due = self._due()
        if due is None:
            return
        timer = self._deadline
        if timer is None:
            self._deadline = self.callLater(max(0.0, due - self.factory.clock.seconds()), self._look)
        elif timer.getTime() > due:
            timer.reset(max(0.0, due - self.factory.clock.seconds()))

    def _look(self) -> None:
        self._deadline = None
        due = self._due()
        if due is None:
            return  # answering, or kept alive idle (Twisted's own idle timeout): armed again at the next request
        if self.factory.clock.seconds() < due:
            self._watch()
        elif self.phase is BODY:
            self._body_too_slow()
        else:
            self._headers_too_slow()

    def _disarm(self) -> None:
        timer, self._deadline = self._deadline, None
        if timer is not None and timer.active():
            timer.cancel()

    def _headers_too_slow(self) -> None:
        self.evict(f"request headers not complete within header_read_timeout_s={self.header_timeout_s:g}s")

    def _body_too_slow(self) -> None:
        self.evict(f"request body not complete within body_read_timeout_s={self.body_timeout_s:g}s")

    def evict(self, why: str) -> None:
        """Close this connection (the node is waiting on its client): 408 if a request began."""
        if self.phase in (HEADERS, BODY):
            self._answer_and_close(408, b"Request Timeout", error_body(408, why, "request_timeout"))
        else:
            self._close()

    def _answer_and_close(self, status: int, phrase: bytes, body: bytes) -> None:
        """An answer before any resource saw the request (413 on ``Expect``, 408): written here, with
        a request id (the client's when its ``X-Request-Id`` header came in). No access log line: the
        request line was not handed to a ``Request`` yet."""
        if self.transport is None:
            return
        rid = request_id(self.requests[-1]) if self.requests else urandom(16).hex().encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"X-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s"
                             % (status, phrase, rid, len(body), body))
        self._close()

    def _close(self) -> None:
        self._disarm()
        self._enter(CLOSING)
        self.dataReceived = lambda data: None  # type: ignore[method-assign]  # read and drop the rest
        if self.transport is None:
            return
        if self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()


class _Refuse(Protocol):
    """Answers one 503 and closes: the connection cap is reached."""

    def connectionMade(self) -> None:
        body = error_body(503, "this node has too many open connections (max_client_connections); retry later",
                          "too_many_connections")
        self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
        self.transport.loseConnection()


#: the statuses whose answers are counted by reason (``NodeSite.on_refusal``)
REFUSALS = frozenset({429, 503})
#: a connection waiting on its client is closed for a new one in this order: a
#: request under way (or nothing yet) before a kept-alive idle one, then the
#: one that has waited longest
_EVICT_ORDER = {NEW: 0, HEADERS: 0, BODY: 0, IDLE: 1}


class NodeSite(Site):
    """A ``Site`` with a connection cap that slow clients cannot hold.

    At ``max_connections``, a new connection takes the place of the one that
    has kept the node waiting longest: a connection sending its request (or
    nothing) before a kept-alive idle one, the longest waiting first. It is
    closed (408 if a request had begun). Only when every connection is being
    answered is the new one refused with 503. No rule per client address, so
    ordinary loopback traffic (benchmarks, tests, a local gateway) is never
    refused for where it comes from.
    """

    protocol = NodeChannel
    max_connections = 1024
    access_log: AccessLog | None = None
    #: ``on_refusal(status, code, message)`` for each 429/503 the node gave itself (not a child's, relayed)
    on_refusal: Callable[[int, str, str | None], None] | None = None

    def __init__(self, resource: Any, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.channels: set[NodeChannel] = set()
        #: the connections that keep the node waiting, one dict per eviction rank (``_EVICT_ORDER``), each in
        #: the order they began to wait: the next one to evict is the first of the first non-empty dict, found
        #: without looking at the others (a flood of new connections at the cap costs O(1) each)
        self.waiting: tuple[dict[NodeChannel, None], ...] = ({}, {})
        self.evictions = 0
        self.clock = self.reactor

    @property
    def open_connections(self) -> int:
        return len(self.channels)

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.channels) >= self.max_connections:
            victim = self._slowest()
            if victim is None:
                if self.on_refusal is not None:
                    self.on_refusal(503, "too_many_connections", None)
                refuse = _Refuse()
                refuse.factory = self
                return refuse
            self.evictions += 1
            victim.evict(f"closed for a new connection: max_client_connections={self.max_connections} reached "
                         "and this one kept the node waiting longest")
        return super().buildProtocol(addr)

    def _slowest(self) -> NodeChannel | None:
        for waiting in self.waiting:
            for channel in waiting:
                return channel
        return None

    def phase_changed(self, channel: NodeChannel, old: str, new: str) -> None:
        """``channel`` now waits (or no longer waits) on its client; it goes last in its rank."""
        rank = _EVICT_ORDER.get(old)
        if rank is not None:
            self.waiting[rank].pop(channel, None)
        rank = _EVICT_ORDER.get(new)
        if rank is not None:
            self.waiting[rank][channel] = None

    def connection_opened(self, channel: NodeChannel) -> None:
        self.channels.add(channel)
        self.waiting[0][channel] = None  # NEW: waiting for its request since the connect

    def connection_closed(self, channel: NodeChannel) -> None:
        self.channels.discard(channel)
        for waiting in self.waiting:
            waiting.pop(channel, None)

    def log(self, request: Any) -> None:
        access_log = self.access_log
        if access_log is not None:
            access_log.add(request)
        if request.code in REFUSALS and self.on_refusal is not None:
            error = getattr(request, "rolemesh_error", None)
            if error is not None and error[0]:
                self.on_refusal(request.code, error[0], error[1])


@implementer(IResource)
class RootResource:
    """Authenticate, then dispatch by path: proxy routes to the proxy, the rest to the node's own routes."""

    isLeaf = True

    def __init__(self, proxy: Any, proxy_paths: Any, fallback: Any, keys: ApiKeys | None = None,
                 on_denied: Callable[[Any], None] | None = None) -> None:
        self.proxy = proxy
        self.proxy_paths = frozenset(proxy_paths)
        self.fallback = fallback
        self.keys = keys if keys else None
        self.on_denied = on_denied

    def render(self, request: Any) -> Any:
        path = request.path
        if self.keys is not None and not is_public(request) \
                and not self.keys.allows(request.getHeader(b"authorization")):
            if self.on_denied is not None:
                self.on_denied(request)
            request.setHeader(b"x-request-id", request_id(request))
            return set_error(request, 401, "missing or invalid API key (send Authorization: Bearer <key>)",
                             "invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="rolemesh-node"'})
        if path in self.proxy_paths:
            return self.proxy.render(request)
        return self.fallback.render(request)

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:  # pragma: no cover - isLeaf
        return self

    def putChild(self, path: bytes, child: Any) -> None:  # pragma: no cover - IResource
        raise NotImplementedError


def make_site(root: Any, *, max_body_bytes: int, max_connections: int, header_timeout_s: float,
              idle_timeout_s: float, access_log: AccessLog | None, reactor: Any = None,
              on_refusal: Callable[[int, str, str | None], None] | None = None,
              body_timeout_s: float = 60.0) -> NodeSite:
    """The node's ``Site``. ``access_log``: where each finished request goes
    (``None``: no access log); ``reactor``: the site's clock and timers (default:
    the global reactor); ``on_refusal``: told of each 429/503 the node answers."""
    request_class = type("NodeRequest", (NodeRequest,), {"max_body_bytes": max_body_bytes})
    # No form parsing: the node reads JSON bodies only, and Twisted would parse
    # every POST's Content-Type with the email package to look for forms.
    site = NodeSite(root, requestFactory=request_class, timeout=idle_timeout_s, parsePOSTFormSubmission=False,
                    reactor=reactor)
    site.protocol = type("NodeChannel", (NodeChannel,), {"header_timeout_s": header_timeout_s,
                                                         "body_timeout_s": body_timeout_s})
    site.max_connections = max_connections
    site.displayTracebacks = False
    site.noisy = False
    site.access_log = access_log
    site.on_refusal = on_refusal
    return site
