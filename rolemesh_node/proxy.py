"""The proxy routes: one request in, forwarded to the chosen device's child.

This is the hot path, so it is a lean ``twisted.web`` resource rather than a
Klein route, and it talks to the children through one pooled
``twisted.web.client.Agent`` (persistent connections, no per-request client
objects). The request body is parsed once (to find the model) and forwarded as
the same bytes; the response body is relayed chunk by chunk as it arrives —
never collected, never re-encoded.

Per request (:class:`_Exchange`):

1. validate → ``node.submit`` (429 at once when the model's waiting bound is
   reached, 503 when no device can serve it); the request then waits
   node-wide until the scheduler gives it a device (a streamed request gets
   an SSE comment every ``WAIT_COMMENT_S`` while it waits, which commits its
   200: a later failure reaches it as an SSE error event);
2. POST to ``127.0.0.1:<child port>``; no headers within
   ``request_timeout_s`` (counted from when the child has a slot for it,
   see :class:`~rolemesh_node.device_slot.Lease`) → 504; refused or reset → 502;
3. relay status, headers and body; the relay is registered as the client
   request's producer, so a slow client pauses the upstream;
4. a client that disconnects cancels whatever is pending (queue place,
   upstream request, or the body transfer) and the device slot is released —
   except a non-streamed request already sent to the child: llama-server
   computes it to the end anyway, so its place is held until the answer
   comes (and is dropped);
5. an upstream that fails mid-body ends an SSE stream with an error event,
   or aborts a plain response (its length can no longer be honoured);
6. while the node drains before stopping (:mod:`rolemesh_node.drain`), new
   requests get 503 ``node_draining`` with ``Retry-After``; the exchanges still
   live (:attr:`ProxyResource.live`) end by themselves or, at the drain's
   deadline, by :meth:`ProxyResource.end_for_drain`.
"""

from __future__ import annotations

import json
import re
import uuid
from time import perf_counter
from typing import Any

from twisted.internet.defer import CancelledError, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from .coordinator import ModelRemoved, NoDevice, Rejected
from .errors import error_body, set_error
from .llama_server import ChildStartError
from .metrics import NULL_METER
from .node import Node, NotReady

log = Logger()

#: path -> whether it needs an embedding model (True), a generative one (False)
ROUTES = {
    b"/v1/chat/completions": False,
    b"/v1/completions": False,
    b"/v1/embeddings": True,
}

#: not relayed: hop-by-hop headers, the child's own Server/Date, and (below) its
#: CORS headers — the child allows every origin, the node does not.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"server", b"date",
})
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")

#: a streamed request still waiting for a device gets an SSE comment this often
#: (so clients and proxies in between do not time out during a model load)
WAIT_COMMENT_S = 2.0
#: at most this much of a child's error answer is read to pass it on as an SSE error event
ERROR_BODY_MAX = 64 * 1024


@implementer(IBodyProducer)
class BytesProducer:
    """An ``IBodyProducer`` for bytes already in memory (written in one go)."""

    __slots__ = ("body", "length")

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


def request_id(request: Any) -> bytes:
    """The client's ``X-Request-Id`` when it is sane, else a new one."""
    given = request.getHeader(b"x-request-id")
    if given is not None:
        raw = given.encode("latin-1", "replace") if isinstance(given, str) else given
        if _REQUEST_ID.match(raw):
            return raw
    return uuid.uuid4().hex.encode()


class ProxyResource:
    """``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``."""

    isLeaf = True

    def __init__(self, node: Node, agent: Any, reactor: Any, stream_agent: Any = None) -> None:
        self.node = node
        self.agent = agent
        self.stream_agent = stream_agent if stream_agent is not None else agent
        self.reactor = reactor
        self.metrics: Any = None  # a NodeMetrics, when metrics are on
        self._clock = perf_counter
        #: the exchanges not yet over (waiting, sent, relaying): what a drain waits for
        self.live: set[_Exchange] = set()

    @property
    def config(self) -> Any:
        return self.node.config  # the current one: a reload replaces it

    def end_for_drain(self) -> int:
        """The drain ran out of time: end every live exchange (see ``_Exchange.end_for_drain``)."""
        live = list(self.live)
        for exchange in live:
            exchange.end_for_drain()
        return len(live)

    def meter(self, model: str, stream: bool, started: float) -> Any:
        """What a request tells the metrics (queue wait, first byte, tokens); a no-op without metrics."""
        return NULL_METER if self.metrics is None else self.metrics.meter(model, stream, started, self._clock)

    def render(self, request: Any) -> Any:
        started = self._clock()
        answer = self._render(request, started)
        if answer is not NOT_DONE_YET and self.metrics is not None:
            model = getattr(request, "rolemesh_model", None)
            self.metrics.request_done(request.path.decode("latin-1"), model, request.code,
                                      self._clock() - started)
        return answer

    def _render(self, request: Any, started: float) -> Any:
        rid = request_id(request)
        request.setHeader(b"x-request-id", rid)
        if self.node.draining is not None:
            return set_error(request, 503, "this node is draining before it stops; send the request to another "
                             "node", "node_draining", headers={"Retry-After": str(self.node.draining.retry_after_s())})
        if request.method != b"POST":
            return set_error(request, 405, f"{request.method.decode('latin-1')} is not allowed here; use POST",
                             "method_not_allowed", headers={"Allow": "POST"})
        if getattr(request, "body_too_large", False):
            return set_error(request, 413, f"request body exceeds max_request_body_bytes "
                             f"({self.config.max_request_body_bytes})", "request_too_large")
        body = request.content.getvalue() if hasattr(request.content, "getvalue") else request.content.read()
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return set_error(request, 400, f"request body is not valid JSON: {exc}", "invalid_json")
        except RecursionError:
            return set_error(request, 400, "request body is nested too deeply", "invalid_json")
        if not isinstance(payload, dict):
            return set_error(request, 400, "request body must be a JSON object", "invalid_request")
        name = payload.get("model")
        if not isinstance(name, str) or not name:
            return set_error(request, 400, "'model' is required and must be a non-empty string",
                             "missing_model")
        spec = self.config.resolve_model(name)
        if spec is not None:
            request.rolemesh_model = spec.name
        if spec is None:
            return set_error(request, 404, f"model {name[:200]!r} is not served by this node",
                             "model_not_found")
        wants_embedding = ROUTES[request.path]
        if spec.embedding != wants_embedding:
            what = "an embedding model" if spec.embedding else "not an embedding model"
            return set_error(request, 400, f"model {spec.name!r} is {what}; it cannot serve "
                             f"{request.path.decode()}", "wrong_model_kind")
        problem = _message_problem(payload) if request.path == b"/v1/chat/completions" else None
        if problem is not None:
            return set_error(request, 400, problem, "invalid_request")
        if self.node.bin_error is not None:
            return set_error(request, 503, self.node.bin_error, "llama_server_missing")
        if not self.node.files.available(spec):
            return set_error(request, 503, _unavailable(spec), "model_unavailable")
        try:
            ticket = self.node.submit(spec)
        except Rejected as exc:
            return set_error(request, 429, str(exc), "queue_full", headers={"Retry-After": str(exc.retry_after_s)})
        except (NoDevice, NotReady) as exc:
            return set_error(request, 503, str(exc), "no_device")
        stream = payload.get("stream") is True
        _Exchange(self, request, body, spec.name, ticket, stream, started).begin()
        return NOT_DONE_YET


class _Relay(Protocol):
    """Receives the upstream body; produces it into the client request."""

    def __init__(self, exchange: "_Exchange") -> None:
        self.exchange = exchange

    def connectionMade(self) -> None:
        self.exchange.upstream = self.transport
        self.exchange.request.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        self.exchange.chunk(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.exchange.body_done(reason)

    # IPushProducer, driven by the client connection
    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


class _Exchange:
    """One proxied request, from its wait for a device to the last byte."""

    __slots__ = ("proxy", "request", "body", "model", "ticket", "slot", "stream", "lease", "pending", "upstream",
                 "timer", "client_gone", "timed_out", "finished", "status", "started", "counted", "committed",
                 "comment_timer", "meter")

    def __init__(self, proxy: ProxyResource, request: Any, body: bytes, model: str, ticket: Any,
                 stream: bool, started: float) -> None:
        self.proxy = proxy
        self.request = request
        self.body = body
        self.model = model
        self.ticket = ticket
        self.slot: Any = None
        self.stream = stream
        self.lease: Any = None
        self.pending: Any = None
        self.upstream: Any = None
        self.timer: Any = None
        self.client_gone = False
        self.timed_out = False
        self.finished = False
        self.status = 0
        self.started = started
        self.counted = False
        self.committed = False  # a 200 and SSE comments were sent while it waited
        self.comment_timer: Any = None
        self.meter = proxy.meter(model, stream, started)

    def begin(self) -> None:
        self.proxy.live.add(self)
        self.request.notifyFinish().addErrback(self._client_lost)
        self.pending = self.ticket.d
        if self.stream and not self.pending.called:
            self.comment_timer = self.proxy.reactor.callLater(WAIT_COMMENT_S, self._comment)
        self.pending.addCallbacks(self._granted, self._refused)

    # ---------------------------------------------------------------- queue

    def _comment(self) -> None:
        """Still waiting for a device: tell the (streaming) client what for."""
        self.comment_timer = None
        if self.lease is not None or self.client_gone or self.finished:
            return
        request = self.request
        if not self.committed:
            self.committed = True
            self.status = 200
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
        text = self.proxy.node.coordinator.describe_wait(self.ticket)
        request.write(b": " + text.encode("utf-8", "replace") + b"\n\n")
        self.comment_timer = self.proxy.reactor.callLater(WAIT_COMMENT_S, self._comment)

    def _stop_comments(self) -> None:
        if self.comment_timer is not None:
            if self.comment_timer.active():
                self.comment_timer.cancel()
            self.comment_timer = None

    def _refused(self, failure: Failure) -> None:
        self.pending = None
        self._stop_comments()
        if failure.check(CancelledError) or self.client_gone:
            self.client_gone = True
            self._count()
            return
        if failure.check(NoDevice):
            self._error(503, str(failure.value), "no_device")
        elif failure.check(ModelRemoved):
            self._error(503, str(failure.value), "model_removed")
        elif failure.check(ChildStartError):
            spec = self.proxy.config.models[self.model]
            if not self.proxy.node.files.check(spec)[0]:  # gone since the last look: say so from now on
                self._error(503, _unavailable(spec), "model_unavailable")
            else:
                self._error(503, str(failure.value), "model_not_ready")
        else:
            log.failure("request for {model} failed before reaching a child", failure, model=self.model)
            self._error(500, f"internal error: {failure.getErrorMessage()}", "internal_error")
        self._count()

    def _granted(self, lease: Any) -> None:
        self.pending = None
        self.lease = lease
        self.slot = lease.slot
        self.meter.granted(self.proxy.reactor.seconds() - self.ticket.arrived)
        self._stop_comments()
        if self.client_gone:
            self._release()
            return
        request = self.request
        if not self.committed:
            request.setHeader(b"x-rolemesh-device", self.slot.id.encode())
        headers = Headers({
            b"content-type": [b"application/json"],
            b"accept": [request.getHeader(b"accept") or b"*/*"],
            b"x-request-id": [request.responseHeaders.getRawHeaders(b"x-request-id")[0]],
        })
        url = b"http://127.0.0.1:%d%s" % (lease.port, request.path)
        # The timeout counts from when the child has a slot for this request,
        # not while it waits inside the child behind another one.
        lease.when_running(self._arm_timer)
        agent = self.proxy.stream_agent if self.stream else self.proxy.agent
        self.pending = agent.request(b"POST", url, headers, BytesProducer(self.body))
        self.pending.addCallbacks(self._response, self._upstream_failed)

    def _arm_timer(self) -> None:
        # also for a request whose client left: its place is held while the
        # child works on it, and a child that hangs on it must still be found
        if not (self.finished or self.timed_out) and self.timer is None:
            self.timer = self.proxy.reactor.callLater(self.proxy.config.request_timeout_s, self._timeout)

    # ------------------------------------------------------------- upstream

    def _response(self, response: Any) -> None:
        self.pending = None
        if self.client_gone:
            self._cancel_timer()
            response.deliverBody(_Discard())
            self._release()
            return
        request = self.request
        if self.committed:
            if response.code == 200:  # the head went out with the first comment
                response.deliverBody(_Relay(self))
            else:
                response.deliverBody(_ErrorEvent(self, response.code))
            return
        self.status = response.code
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        for name, values in response.headers.getAllRawHeaders():
            lower = name.lower()
            if lower not in HOP_BY_HOP and not lower.startswith(b"access-control-"):
                out.setRawHeaders(name, values)
        response.deliverBody(_Relay(self))

    def _upstream_failed(self, failure: Failure) -> None:
        self.pending = None
        self._cancel_timer()
        if self.timed_out:
            self._unresponsive()
        if not self.client_gone:
            if self.timed_out:
                self._error(504, f"the llama-server for model {self.model!r} on device {self.slot.id} "
                            f"did not answer within request_timeout_s={self.proxy.config.request_timeout_s:g}s",
                            "upstream_timeout")
            else:
                self._error(502, f"the llama-server for model {self.model!r} on device {self.slot.id} "
                            f"failed: {_describe(failure)}", "upstream_failed")
        self._release()

    def chunk(self, data: bytes) -> None:
        self.meter.chunk(data)
        if self.timer is not None:
            self.timer.reset(self.proxy.config.request_timeout_s)
        if not self.client_gone:
            self.request.write(data)

    def body_done(self, reason: Failure) -> None:
        self.meter.done(self.status)
        self._cancel_timer()
        if self.timed_out:
            self._unresponsive()
        request = self.request
        if not self.client_gone:
            request.unregisterProducer()
            if reason.check(ResponseDone, PotentialDataLoss):
                self._finish()
            elif self.stream:
                why = "timed out" if self.timed_out else _describe(reason)
                message = f"the llama-server for model {self.model!r} on device {self.slot.id} failed mid-stream: {why}"
                request.write(b"data: " + error_body(502, message, "upstream_failed") + b"\n\n")
                self._finish()
            else:
                log.warn("upstream body for {model} on {device} broke off: {why}", model=self.model,
                         device=self.slot.id, why=_describe(reason))
                self.finished = True
                request.loseConnection()
        self._release()

    # ---------------------------------------------------------------- client

    def _client_lost(self, failure: Failure) -> None:
        if self.finished:
            return
        self.client_gone = True
        self._stop_comments()
        if self.lease is not None and self.pending is not None and not self.stream:
            # Sent and not answered yet. llama-server does not notice that the
            # connection of a non-streamed request closed: it computes it to the
            # end all the same (a stream it cancels at its next write). Closing
            # ours would only take that work off the slot's books, and the next
            # request would wait behind it inside the child unaccounted; so the
            # place is held until the answer comes (and is dropped) or
            # request_timeout_s passes.
            return
        self._cancel_timer()
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.cancel()
        if self.upstream is not None:
            self.upstream.stopProducing()
        if self.lease is not None:
            self._release()

    def _timeout(self) -> None:
        self.timer = None
        self.timed_out = True
        if self.pending is not None:
            self.pending.cancel()
        elif self.upstream is not None:
            self.upstream.stopProducing()

    def end_for_drain(self) -> None:
        """End this request now, the node's drain having run out of time, so that its client can
        tell: a stream gets an SSE error event and its terminating chunk; a request whose answer
        has not begun gets a 503 JSON error; a plain answer already begun is cut off. Then
        whatever is pending is cancelled and the place released, as for a client that left."""
        if self.finished or self.client_gone:
            return
        message = "the node stopped before the request was done (drain_timeout_s ran out)"
        request = self.request
        if self.upstream is not None:
            request.unregisterProducer()  # the relay is the producer of a body being relayed
        if not request.startedWriting:
            self._error(503, message, "node_stopping")
        elif self.stream:
            request.write(b"data: " + error_body(503, message, "node_stopping") + b"\n\n")
            self._finish()
        else:
            self.finished = True
            request.loseConnection()
        self._count()  # with its status, before it counts as gone (499)
        self.client_gone = True  # nobody to answer any more: cancel and release the rest
        self._stop_comments()
        self._cancel_timer()
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.cancel()
        if self.upstream is not None:
            self.upstream.stopProducing()
        if self.lease is not None:
            self._release()

    # --------------------------------------------------------------- helpers

    def _unresponsive(self) -> None:
        if self.lease is not None and self.lease.child is not None:
            self.slot.child_unresponsive(self.lease.child, f"no answer within request_timeout_s="
                                         f"{self.proxy.config.request_timeout_s:g}s")

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def _release(self) -> None:
        if self.lease is not None:
            self.lease.release()
        self._count()

    def _count(self) -> None:
        self.proxy.live.discard(self)
        metrics = self.proxy.metrics
        if metrics is not None and not self.counted:
            self.counted = True
            status = 499 if self.client_gone else self.status  # 499: the client closed the request
            metrics.request_done(self.request.path.decode("latin-1"), self.model, status,
                                 self.proxy._clock() - self.started)

    def _finish(self) -> None:
        self.finished = True
        self.request.finish()

    def _error(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        if self.committed:  # the 200 is gone: an SSE error event, as for a failure mid-stream
            self.request.write(b"data: " + error_body(status, message, code) + b"\n\n")
            self._finish()
            return
        self.status = status
        body = set_error(self.request, status, message, code, headers=headers)
        self.request.setHeader(b"content-length", str(len(body)).encode())
        self.request.write(body)
        self._finish()


class _ErrorEvent(Protocol):
    """The child's error answer to a request whose 200 already went out: passed on as an SSE error event."""

    def __init__(self, exchange: _Exchange, code: int) -> None:
        self.exchange = exchange
        self.code = code
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < ERROR_BODY_MAX:
            self.data += data[:ERROR_BODY_MAX - len(self.data)]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        exchange = self.exchange
        exchange._cancel_timer()
        if not exchange.client_gone and not exchange.finished:
            try:
                error = json.loads(bytes(self.data))["error"]
                message = str(error.get("message") if isinstance(error, dict) else error)
            except (ValueError, KeyError, TypeError):
                message = bytes(self.data).decode("utf-8", "replace")[:1000]
            exchange.request.write(b"data: " + error_body(
                self.code, f"the llama-server for model {exchange.model!r} answered {self.code}: {message}",
                "upstream_error") + b"\n\n")
            exchange._finish()
        exchange._release()


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _message_problem(payload: dict[str, Any]) -> str | None:
    """What is wrong with a chat request's messages, among what llama-server would answer with a 500.

    ``messages`` is llama-server's business, but it answers a message without a string
    ``role``, a ``name`` that is not a string, or a text part without a string ``text``
    with 500 "Failed to parse messages" (b11434) — a client's error that would read as a
    server fault. The node refuses those cases itself, with the 400 they are; it leaves
    everything else (which llama-server answers 400 itself) alone.
    """
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        if not isinstance(message.get("role"), str):
            return f"messages[{i}]: 'role' is required and must be a string"
        if "name" in message and not isinstance(message["name"], str):
            return f"messages[{i}]: 'name' must be a string"
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if isinstance(part, dict) and part.get("type") == "text" and not isinstance(part.get("text"), str):
                return f"messages[{i}].content[{j}]: a text part needs 'text', a string"
    return None


def _unavailable(spec: Any) -> str:
    return f"model {spec.name!r} is unavailable: file {spec.path} is missing or unreadable"


def _describe(failure: Failure) -> str:
    value = failure.value
    reasons = getattr(value, "reasons", None)  # ResponseFailed / ResponseNeverReceived wrap others
    if reasons:
        return "; ".join(_describe(r) for r in reasons)
    text = str(value) or type(value).__name__
    return text.splitlines()[0][:300]
