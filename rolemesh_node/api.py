"""The node's own endpoints: health, readiness, model list, inventory, config reload, status,
device logs, and the status page.

The proxy routes live in :mod:`rolemesh_node.proxy`; the root resource in
:mod:`rolemesh_node.web` sends everything else here. Unknown paths and wrong
methods get OpenAI-style JSON errors, like every other error of the node.

Routing is a table of a dozen patterns in Werkzeug's rule syntax, the part of it
the node uses (``<name>``: one path segment; ``<path:name>``: the rest of the
path), matched against the request's percent-decoded path as Klein matched it;
``GET`` implies ``HEAD``; a known path with another method is 405 with ``Allow``.
Paths are taken literally: a trailing or doubled ``/`` is another path (404), as
on the proxy routes. (Klein and Werkzeug did this before, for ~3 MB of resident
memory, ~35 modules imported, and per-request work the node does not need.)
A handler answers bytes or a Deferred of bytes, which is cancelled when the
client goes away (the device log follower).

The status page is ``GET /`` for a browser (``Accept: text/html``; any other
client gets the JSON 404 it always got) and three files under ``/ui/``, read
once from the package (``rolemesh_node/ui``). They carry no data, so they are
served without a key; the page's script reads ``/v1/node/status`` with the
key the operator typed in.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from .childlog import SSEFollower
from .errors import set_error
from .metrics import CONTENT_TYPE
from .node import Node
from .web import request_id, wants_html

log = Logger()

#: the status page's files: name -> content type
UI_FILES = {
    "index.html": b"text/html; charset=utf-8",
    "status.js": b"text/javascript; charset=utf-8",
    "status.css": b"text/css; charset=utf-8",
}
#: the page may load its own files and call its own node, nothing else (these machines are offline anyway)
UI_HEADERS = {
    b"content-security-policy": b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-cache",
}


@functools.cache
def ui_file(name: str) -> bytes:
    from importlib import resources  # imported when the page is first asked for (~0.2 MB of RSS otherwise)

    return (resources.files("rolemesh_node") / "ui" / name).read_bytes()


def _json(request: Any, doc: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(doc).encode()


class Route:
    """One pattern (``/v1/models/<path:model_id>``), its methods and its handler (a NodeAPI method)."""

    __slots__ = ("pattern", "methods", "allow", "handler", "regex")

    _PARAM = re.compile(r"<(?:(path):)?(\w+)>")

    def __init__(self, pattern: str, methods: tuple[str, ...], handler: Callable[..., Any]) -> None:
        if "GET" in methods and "HEAD" not in methods:
            methods += ("HEAD",)
        self.pattern = pattern
        self.methods = frozenset(m.encode() for m in methods)
        self.allow = ", ".join(methods)
        self.handler = handler
        regex, at = "", 0
        for param in self._PARAM.finditer(pattern):
            regex += re.escape(pattern[at:param.start()])
            regex += f"(?P<{param[2]}>[^/].*)" if param[1] else f"(?P<{param[2]}>[^/]+)"
            at = param.end()
        self.regex = re.compile(regex + re.escape(pattern[at:])) if at else None

    def match(self, path: str) -> dict[str, str] | None:
        if self.regex is None:
            return {} if path == self.pattern else None
        m = self.regex.fullmatch(path)
        return None if m is None else m.groupdict()


ROUTES: list[Route] = []


def route(pattern: str, *methods: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def add(handler: Callable[..., Any]) -> Callable[..., Any]:
        ROUTES.append(Route(pattern, methods, handler))
        return handler
    return add


class NodeAPI:
    def __init__(self, node: Node, metrics: Any = None, reload: Callable[[], Any] | None = None,
                 dispatcher: Callable[[], Any] = lambda: None) -> None:
        self.node = node
        self.metrics = metrics
        self._reload = reload
        self._dispatcher = dispatcher  # the current link (a reload may add, replace or remove it)

    def resource(self) -> "RouterResource":
        return RouterResource(self)

    @route("/", "GET", "HEAD")
    def page(self, request: Any) -> bytes:
        """The status page for a browser; for anyone else the 404 this path always answered
        (another method: 405, as on every documented path)."""
        if wants_html(request):
            return self._ui(request, "index.html")
        return self.not_found(request)

    @route("/ui/<name>", "GET", "HEAD")
    def ui(self, request: Any, name: str) -> bytes:
        if name not in UI_FILES or name == "index.html":
            return self.not_found(request)
        return self._ui(request, name)

    def _ui(self, request: Any, name: str) -> bytes:
        request.setHeader(b"x-request-id", request_id(request))
        request.setHeader(b"content-type", UI_FILES[name])
        for header, value in UI_HEADERS.items():
            request.setHeader(header, value)
        return ui_file(name)

    @route("/health", "GET", "HEAD")
    def health(self, request: Any) -> bytes:
        request.setHeader(b"x-request-id", request_id(request))
        node = self.node
        return _json(request, {
            "status": "ok",
            "node_id": node.node_id,
            "uptime_s": round(node.uptime_s(), 3),
            "devices": len(node.devices),
            "discovered": node.discovered,
        })

    @route("/ready", "GET", "HEAD")
    def ready(self, request: Any) -> bytes:
        """200 when the node serves, 503 while it starts, stops, or cannot serve."""
        request.setHeader(b"x-request-id", request_id(request))
        serving = self.node.serving()
        return _json(request, serving.to_json(), 200 if serving.ready else 503)

    @route("/v1/models", "GET")
    def models(self, request: Any) -> bytes:
        request.setHeader(b"x-request-id", request_id(request))
        return _json(request, self.node.models_json())

    @route("/v1/models/<path:model_id>", "GET")
    def model(self, request: Any, model_id: str) -> bytes:
        """One model, as OpenAI's ``GET /v1/models/{model}`` (an alias finds its model too)."""
        request.setHeader(b"x-request-id", request_id(request))
        spec = self.node.config.resolve_model(model_id)
        if spec is None:
            return set_error(request, 404, f"The model {model_id[:200]!r} does not exist on this node",
                             "model_not_found")
        return _json(request, self.node.model_json(spec))

    @route("/v1/node/inventory", "GET")
    def inventory(self, request: Any) -> bytes:
        request.setHeader(b"x-request-id", request_id(request))
        return _json(request, self.node.inventory_json())

    @route("/v1/node/reload", "POST")
    def reload(self, request: Any) -> bytes:
        """Read the config file again and apply it (as SIGHUP does): 200 with what changed, or
        422 with the config error (nothing changed)."""
        request.setHeader(b"x-request-id", request_id(request))
        if self._reload is None:
            return set_error(request, 404, "this node cannot reload its config", "not_found")
        result = self._reload()
        return _json(request, result.to_json(), 422 if result.result == "rejected" else 200)

    @route("/v1/node/status", "GET")
    def status(self, request: Any) -> bytes:
        """Everything the status page shows, in one compact document."""
        request.setHeader(b"x-request-id", request_id(request))
        request.setHeader(b"cache-control", b"no-store")
        return _json(request, self.node.status_json(self._dispatcher()))

    @route("/v1/node/devices/<device>/logs", "GET")
    def device_logs(self, request: Any, device: str) -> Any:
        """The device's child output: the last ``lines`` as text, or with ``follow=1`` as SSE, then every new line."""
        request.setHeader(b"x-request-id", request_id(request))
        slot = self.node.slots.get(device)
        if slot is None:
            return set_error(request, 404, f"no device {device[:100]!r} on this node", "device_not_found")
        devlog = slot.output
        try:
            lines = _int_arg(request, b"lines", 100, 0, devlog.size)
            follow = _flag_arg(request, b"follow")
        except ValueError as exc:
            return set_error(request, 400, str(exc), "invalid_request")
        if follow:
            return SSEFollower(request, devlog, self.node.reactor).start(lines)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        return "".join(line + "\n" for line in devlog.tail(lines)).encode("utf-8", "replace")

    @route("/metrics", "GET")
    def prometheus(self, request: Any) -> bytes:
        if self.metrics is None:
            return set_error(request, 404, "metrics are off on this node", "not_found")
        request.setHeader(b"content-type", CONTENT_TYPE.encode())
        return self.metrics.render()

    def not_found(self, request: Any) -> bytes:
        request.setHeader(b"x-request-id", request_id(request))
        path = request.path.decode("utf-8", "replace")[:200]
        return set_error(request, 404, f"no route {path!r} on this node", "not_found")

    def not_allowed(self, request: Any, allow: str) -> bytes:
        request.setHeader(b"x-request-id", request_id(request))
        method = request.method.decode("latin-1")
        return set_error(request, 405, f"{method} is not allowed on {request.path.decode('utf-8', 'replace')}",
                         "method_not_allowed", headers={"Allow": allow})

    def bad_path(self, request: Any) -> bytes:
        request.setHeader(b"x-request-id", request_id(request))
        return set_error(request, 400, "the path is not valid UTF-8 once percent-decoded", "invalid_request")


@implementer(IResource)
class RouterResource:
    """The :class:`NodeAPI`'s routes as a twisted.web resource (a leaf)."""

    isLeaf = True

    def __init__(self, api: NodeAPI) -> None:
        self.api = api
        self.fixed = {r.pattern: r for r in ROUTES if r.regex is None}
        self.patterns = [r for r in ROUTES if r.regex is not None]

    def render(self, request: Any) -> Any:
        api = self.api
        try:
            # the segments twisted.web split and percent-decoded, as Klein (Werkzeug) matched them
            path = "/" + "/".join(segment.decode("utf-8") for segment in request.postpath)
        except UnicodeDecodeError:
            return self._write(request, api.bad_path(request))
        found, params = self.fixed.get(path), {}
        if found is None:
            for candidate in self.patterns:
                matched = candidate.match(path)
                if matched is not None:
                    found, params = candidate, matched
                    break
        if found is None:
            body = api.not_found(request)
        elif request.method not in found.methods:
            body = api.not_allowed(request, found.allow)
        else:
            body = found.handler(api, request, **params)
            if isinstance(body, Deferred):
                return self._later(request, body)
        return self._write(request, body)

    @staticmethod
    def _write(request: Any, body: bytes) -> Any:
        # written as Klein wrote it (chunked on HTTP/1.1), not returned to twisted.web, which would log a line
        # for every HEAD answer with a body
        request.write(body)
        request.finish()
        return NOT_DONE_YET

    def _later(self, request: Any, answer: Deferred[Any]) -> Any:
        """A handler's Deferred: its bytes end the answer; it is cancelled when the client goes away."""
        gone: list[Any] = []
        request.notifyFinish().addBoth(gone.append)
        request.notifyFinish().addErrback(lambda _: answer.cancel())

        def done(body: bytes | None) -> None:
            if not gone:
                if body:
                    request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            if not gone:
                request.processingFailed(failure)
            elif not failure.check(CancelledError):
                log.failure("error after the client went away", failure)

        answer.addCallbacks(done, failed)
        return NOT_DONE_YET

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:  # pragma: no cover - isLeaf
        return self

    def putChild(self, path: bytes, child: Any) -> None:  # pragma: no cover - IResource
        raise NotImplementedError


def _arg(request: Any, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    return None if not values else values[-1].decode("utf-8", "replace")


def _int_arg(request: Any, name: bytes, default: int, lo: int, hi: int) -> int:
    """An integer query parameter; above ``hi`` is taken as ``hi`` (the ring holds no more)."""
    text = _arg(request, name)
    if text is None:
        return min(default, hi)
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name.decode()} must be an integer, got {text[:40]!r}") from None
    if value < lo:
        raise ValueError(f"{name.decode()} must be at least {lo}, got {value}")
    return min(value, hi)


def _flag_arg(request: Any, name: bytes) -> bool:
    text = _arg(request, name)
    if text is None or text in ("0", "false", "no", ""):
        return False
    if text in ("1", "true", "yes"):
        return True
    raise ValueError(f"{name.decode()} must be 1 or 0, got {text[:40]!r}")
