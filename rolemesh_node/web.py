"""HTTP plumbing: the request class, the root resource and the ``Site``.

The root sends the proxy routes straight to the lean
:class:`~rolemesh_node.proxy.ProxyResource` and everything else to the Klein
app (:mod:`rolemesh_node.api`), so the hot path skips Klein's routing.

:class:`NodeRequest` caps what a request body may hold in memory: past
``max_request_body_bytes`` the rest is read off the wire and dropped, and the
request is answered 413 — a huge upload cannot fill the agent's memory.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import implementer


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


@implementer(IResource)
class RootResource:
    """Dispatch by path: proxy routes to the proxy, the rest to Klein."""

    isLeaf = True

    def __init__(self, proxy: Any, proxy_paths: Any, fallback: Any) -> None:
        self.proxy = proxy
        self.proxy_paths = frozenset(proxy_paths)
        self.fallback = fallback

    def render(self, request: Any) -> Any:
        if request.path in self.proxy_paths:
            return self.proxy.render(request)
        return self.fallback.render(request)

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:  # pragma: no cover - isLeaf
        return self

    def putChild(self, path: bytes, child: Any) -> None:  # pragma: no cover - IResource
        raise NotImplementedError


def make_site(root: Any, max_body_bytes: int) -> Site:
    request_class = type("NodeRequest", (NodeRequest,), {"max_body_bytes": max_body_bytes})
    site = Site(root, requestFactory=request_class)
    site.displayTracebacks = False
    site.noisy = False
    return site
