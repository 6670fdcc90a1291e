"""HTTP plumbing: the request and channel classes, the root resource, the ``Site``.

* The root sends the proxy routes straight to the lean
  :class:`~rolemesh_node.proxy.ProxyResource` and everything else to the Klein
  app (:mod:`rolemesh_node.api`), so the hot path skips Klein's routing. It
  checks the API key (when keys are configured) on every route but
  ``/health``, ``/ready`` and the status page's HTML and files, which carry
  no data (:func:`is_public`).
* :class:`NodeRequest` caps what a request body may hold in memory: past
  ``max_request_body_bytes`` the rest is read off the wire and dropped, and the
  request is answered 413 — a huge upload cannot fill the agent's memory.
* :class:`NodeChannel` closes a connection whose request headers do not
  arrive within ``header_read_timeout_s`` (slow-loris), on top of Twisted's
  idle timeout (``client_idle_timeout_s``).
* :class:`NodeSite` answers connections beyond ``max_client_connections``
  with a 503 and closes them, instead of serving without bound; it hands each
  finished request to its :class:`~rolemesh_node.accesslog.AccessLog` (none:
  no access log) instead of Twisted's one log event per request, and tells
  ``on_refusal`` of every 429 and 503 the node answered itself (status, code,
  message), the connection cap's included.
"""

from __future__ import annotations

import io
from typing import Any, Callable

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


class NodeChannel(HTTPChannel):
    """An ``HTTPChannel`` with a deadline for each request's headers."""

    header_timeout_s = 30.0
    _header_timer: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_header_timer()
        self.factory.connection_opened()

    def allHeadersReceived(self) -> None:
        self._disarm_header_timer()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self.persistent:  # kept alive: the next request's headers have a deadline too
            self._arm_header_timer()

    def connectionLost(self, reason: Any) -> None:
        self._disarm_header_timer()
        self.factory.connection_closed()
        super().connectionLost(reason)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.callLater(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        timer, self._header_timer = self._header_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport is not None:
            self.transport.abortConnection()


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


class NodeSite(Site):
    protocol = NodeChannel
    max_connections = 1024
    access_log: AccessLog | None = None
    #: ``on_refusal(status, code, message)`` for each 429/503 the node gave itself (not a child's, relayed)
    on_refusal: Callable[[int, str, str | None], None] | None = None

    def __init__(self, resource: Any, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.open_connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        if self.open_connections >= self.max_connections:
            if self.on_refusal is not None:
                self.on_refusal(503, "too_many_connections", None)
            refuse = _Refuse()
            refuse.factory = self
            return refuse
        return super().buildProtocol(addr)

    def connection_opened(self) -> None:
        self.open_connections += 1

    def connection_closed(self) -> None:
        self.open_connections -= 1

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
    """Authenticate, then dispatch by path: proxy routes to the proxy, the rest to Klein."""

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
              on_refusal: Callable[[int, str, str | None], None] | None = None) -> NodeSite:
    """The node's ``Site``. ``access_log``: where each finished request goes
    (``None``: no access log); ``reactor``: the site's clock and timers (default:
    the global reactor); ``on_refusal``: told of each 429/503 the node answers."""
    request_class = type("NodeRequest", (NodeRequest,), {"max_body_bytes": max_body_bytes})
    # No form parsing: the node reads JSON bodies only, and Twisted would parse
    # every POST's Content-Type with the email package to look for forms.
    site = NodeSite(root, requestFactory=request_class, timeout=idle_timeout_s, parsePOSTFormSubmission=False,
                    reactor=reactor)
    site.protocol = type("NodeChannel", (NodeChannel,), {"header_timeout_s": header_timeout_s})
    site.max_connections = max_connections
    site.displayTracebacks = False
    site.noisy = False
    site.access_log = access_log
    site.on_refusal = on_refusal
    return site
