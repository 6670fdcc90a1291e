"""The proxy routes: one request in, forwarded to the chosen device's child.

This is the hot path, so it is a lean ``twisted.web`` resource of its own, and
it talks to the children through the node's loopback client
(:mod:`rolemesh_node.loopback`: kept connections, the body passed through as
the child framed it). The request body is parsed once (to find the model) and
forwarded as the same bytes; the response body is relayed read by read as it
arrives — never collected, never decoded and framed again.

Per request, an :class:`_Exchange` — a state machine (``queued → sent →
relaying → done``, and ``held``, ``rebinding``; the table is
``EXCHANGE_TRANSITIONS``, ``_Exchange._enter`` the one place it changes):

1. validate → ``node.submit`` (429 at once when the model's waiting bound is
   reached, 503 when no device can serve it); *queued* node-wide until the
   scheduler gives it a device (a streamed request gets an SSE comment every
   ``WAIT_COMMENT_S`` while it waits, which commits its 200: a later failure
   reaches it as an SSE error event);
2. *sent*: POST to ``127.0.0.1:<child port>``. ``request_timeout_s`` without
   progress (counted from its turn in the child, see
   :class:`~rolemesh_node.device_slot.Lease`; progress before headers is the
   child's, from :mod:`rolemesh_node.liveness`) → 504 for this request only;
   reset → 502; refused by a child that just died → *rebinding*, then
   *queued* again for its replacement (nothing was sent);
3. *relaying*: status, headers (a plain answer keeps its Content-Length) and
   body; the relay is registered as the client request's producer, so a slow
   client pauses the upstream;
4. a client that disconnects cancels whatever is pending (queue place,
   upstream request, or the body transfer) and the place is released —
   except a non-streamed request already sent to the child: llama-server
   computes it to the end anyway, so it is *held* until the answer comes
   (and is dropped) — as is one that got 504;
5. an upstream that fails mid-body ends an SSE stream with an error event,
   or aborts a plain response (its length can no longer be honoured);
6. while the node drains before stopping (:mod:`rolemesh_node.drain`), new
   requests get 503 ``node_draining`` with ``Retry-After``; the exchanges still
   live (:attr:`ProxyResource.live`) end by themselves or, at the drain's
   deadline, by :meth:`ProxyResource.end_for_drain`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Union

from twisted.internet.defer import CancelledError, fail
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import NOT_DONE_YET

from .coordinator import ModelRemoved, NoDevice, Rejected
from .errors import error_body, set_error
from .llama_server import ChildStartError
from .metrics import NULL_METER
from .node import Node, NotReady
from .web import direct_transport, request_id, write_through

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

#: a streamed request still waiting for a device gets an SSE comment this often
#: (so clients and proxies in between do not time out during a model load)
WAIT_COMMENT_S = 2.0
#: at most this much of a child's error answer is read to pass it on as an SSE error event
ERROR_BODY_MAX = 64 * 1024
#: a child that refused a request's connection is given this long to be seen exiting (then the request
#: waits again for its replacement); a child that refuses and lives on gets the request 502
REBIND_WAIT_S = 1.0


class ProxyResource:
    """``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``."""

    isLeaf = True

    def __init__(self, node: Node, client: Any, reactor: Any) -> None:
        self.node = node
        #: ``post(port, path, body, accept=, request_id=, keep_alive=)`` to a child: a
        #: :class:`~rolemesh_node.loopback.LoopbackClient` (in-memory tests give one over an ``Agent``)
        self.client = client
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
        _Exchange(self, request, body, spec.name, ticket, stream, started, rid).begin()
        return NOT_DONE_YET


class _Relay(Protocol):
    """Receives the upstream body; produces it into the client request."""

    __slots__ = ("exchange",)

    def __init__(self, exchange: "_Exchange") -> None:
        self.exchange = exchange

    def connectionMade(self) -> None:
        self.exchange.relay_started(self.transport, self)

    def dataReceived(self, data: bytes) -> None:
        self.exchange.chunk(data, data)

    def raw_received(self, out: bytes, text: bytes | None) -> None:
        """The child's bytes as they are to be written (its chunk framing included); ``text``: the
        payload, or None when ``out`` is whole chunks as the child framed them
        (see :mod:`rolemesh_node.loopback`)."""
        self.exchange.chunk(out, text)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.exchange.body_done(reason)

    # IPushProducer, driven by the client connection
    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


# ------------------------------------------------------------------ the states
#
# Each state holds what belongs to it — the ticket and the comment timer while
# queued, the lease, the pending upstream call and the deadline once sent — so
# leaving a state is where its timers are cancelled (``_Exchange._enter``).


@dataclass(slots=True, eq=False)
class Queued:
    """Waiting node-wide for a device (the coordinator's ticket)."""

    ticket: Any
    comments: Any = None  # the next SSE waiting comment (a streamed request)
    name = "queued"


@dataclass(slots=True, eq=False)
class Sent:
    """Sent to the child; no response headers yet."""

    lease: Any
    pending: Any = None  # the Agent's Deferred of the response
    deadline: Any = None  # the next look at its progress (from its turn in the child)
    turn_at: float | None = None
    name = "sent"


@dataclass(slots=True, eq=False)
class Relaying:
    """The child's answer is being relayed to the client."""

    lease: Any
    upstream: Any = None  # the response body's transport
    producer: Any = None  # what is registered as the client request's producer
    deadline: Any = None
    chunks_seen: int = 0
    last_progress: float = 0.0
    name = "relaying"


@dataclass(slots=True, eq=False)
class Rebinding:
    """The child refused the connection (nothing was sent): waiting to see it exit, then wait again."""

    lease: Any
    exited: Any = None  # the child's exit, bounded by REBIND_WAIT_S
    name = "rebinding"


@dataclass(slots=True, eq=False)
class Held:
    """The client has its answer (504) or left; the child still works on the request, so its place is kept."""

    lease: Any
    pending: Any = None
    deadline: Any = None
    turn_at: float | None = None
    name = "held"


@dataclass(slots=True, eq=False)
class Done:
    name = "done"


ExchangeState = Union[Queued, Sent, Relaying, Rebinding, Held, Done]

#: every transition an exchange may make
EXCHANGE_TRANSITIONS: dict[type, frozenset[type]] = {
    Queued: frozenset({Sent, Done}),
    Sent: frozenset({Relaying, Held, Rebinding, Done}),
    Rebinding: frozenset({Queued, Done}),
    Relaying: frozenset({Done}),
    Held: frozenset({Done}),
    Done: frozenset(),
}


class _Exchange:
    """One proxied request, from its wait for a device to the last byte: a state machine.

    ::

        queued ──► sent ──► relaying ──► done
          │  ▲      │ │                   ▲
          │  │      │ └──► held ──────────┤   (client left / 504 on a plain request: the child still works)
          │  └─ rebinding ◄┘ (refused)    │
          └───────────────────────────────┘   (refused, client left, error)

    The client side is two facts beside the state: ``client_gone`` (its
    connection closed first) and ``committed`` (a 200 and SSE comments went
    out while it waited, so any later error is an SSE event).
    """

    __slots__ = ("proxy", "request", "body", "model", "stream", "started", "arrived", "state", "slot", "status",
                 "client_gone", "committed", "chunks", "rebound", "meter", "rid", "framed", "direct")

    def __init__(self, proxy: ProxyResource, request: Any, body: bytes, model: str, ticket: Any,
                 stream: bool, started: float, rid: bytes) -> None:
        self.proxy = proxy
        self.request = request
        self.body = body
        self.rid = rid
        self.framed = False  # the child's chunk framing goes to the client as it is (see _deliver)
        self.direct: Any = None  # the client's TCP transport, while relayed bytes are sent at once (_deliver)
        self.model = model
        self.stream = stream
        self.started = started
        self.arrived = ticket.arrived
        self.state: ExchangeState = Queued(ticket)
        self.slot: Any = None
        self.status = 0
        self.client_gone = False
        self.committed = False
        self.chunks = 0  # relayed chunks: the deadline reads it, nothing is re-armed per chunk
        self.rebound = False
        self.meter = proxy.meter(model, stream, started)  # queue wait, first byte, tokens (metrics)

    # ------------------------------------------------------------ the table

    def _enter(self, new: ExchangeState) -> None:
        """The one place where the state changes: what the old state held is let go."""
        old = self.state
        if type(new) not in EXCHANGE_TRANSITIONS[type(old)]:
            raise RuntimeError(f"request for {self.model}: {old.name} -> {new.name} is not a transition")
        self.state = new
        comments = getattr(old, "comments", None)
        if comments is not None and comments.active():
            comments.cancel()
        deadline = getattr(old, "deadline", None)
        if deadline is not None and deadline.active() and getattr(new, "deadline", None) is not deadline:
            deadline.cancel()
        lease = getattr(old, "lease", None)
        if lease is not None and getattr(new, "lease", None) is not lease:
            lease.release()
        if isinstance(new, Done):
            self._count()

    def begin(self) -> None:
        self.proxy.live.add(self)
        self.request.notifyFinish().addErrback(self._client_lost)
        self._wait(self.state)

    def _wait(self, state: Queued) -> None:
        d = state.ticket.d
        if self.stream and not d.called:
            state.comments = self.proxy.reactor.callLater(WAIT_COMMENT_S, self._comment)
        d.addCallbacks(self._granted, self._refused)

    # ---------------------------------------------------------------- queue

    def _comment(self) -> None:
        """Still waiting for a device: tell the (streaming) client what for."""
        state = self.state
        if not isinstance(state, Queued):
            return
        state.comments = None
        request = self.request
        if not self.committed:
            self.committed = True
            self.status = 200
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
        text = self.proxy.node.coordinator.describe_wait(state.ticket)
        request.write(b": " + text.encode("utf-8", "replace") + b"\n\n")
        state.comments = self.proxy.reactor.callLater(WAIT_COMMENT_S, self._comment)

    def _refused(self, failure: Failure) -> None:
        if not isinstance(self.state, Queued):
            return  # cancelled on the way out
        if failure.check(CancelledError):
            self._enter(Done())
        else:
            self._refuse(failure)

    def _refuse(self, failure: Failure) -> None:
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
        self._enter(Done())

    def _granted(self, lease: Any) -> None:
        if not isinstance(self.state, Queued):
            lease.release()
            return
        self.slot = lease.slot
        self.meter.granted(self.proxy.reactor.seconds() - self.arrived)
        request = self.request
        if not self.committed:
            request.setHeader(b"x-rolemesh-device", self.slot.id.encode())
        state = Sent(lease)
        self._enter(state)
        # The deadline counts from when the child has a slot for this request,
        # not while it waits inside the child behind another one.
        lease.when_running(self._turn)
        # llama-server closes the connection after a streamed answer: a stream says so up front
        state.pending = self.proxy.client.post(lease.port, request.path, self.body,
                                               accept=request.getHeader(b"accept") or b"*/*",
                                               request_id=self.rid, keep_alive=not self.stream)
        state.pending.addCallbacks(self._response, self._upstream_failed)

    # ------------------------------------------------------------ deadlines

    def _turn(self) -> None:
        state = self.state
        if isinstance(state, (Sent, Held)) and state.turn_at is None:
            state.turn_at = self.proxy.reactor.seconds()
            self._look(state)

    def _look(self, state: Any = None) -> None:
        """Has it gone ``request_timeout_s`` without progress? (Looked at lazily, never per chunk.)

        Sent or held (no headers yet): progress is its child's, from the
        liveness check's ``/slots`` reading. Relaying: chunks relayed since the
        last look (looked at every quarter of the timeout). One timer serves
        an exchange from its turn to its end: *relaying* takes over the timer
        of *sent* (the timer looks at whatever state the exchange is in)."""
        if state is None:
            state = self.state
        elif self.state is not state:
            return
        if not isinstance(state, (Sent, Held, Relaying)):
            return
        reactor, timeout = self.proxy.reactor, self.proxy.config.request_timeout_s
        now = reactor.seconds()
        if isinstance(state, Relaying):
            if self.chunks != state.chunks_seen:
                state.chunks_seen, state.last_progress = self.chunks, now
            left = state.last_progress + timeout - now
            period = min(left, timeout / 4)
        else:
            progress = state.lease.progress_at()
            last = state.turn_at if progress is None else max(state.turn_at, progress)
            period = left = last + timeout - now
        if left <= 0:
            state.deadline = None
            self._timed_out(state)
        else:
            state.deadline = reactor.callLater(period, self._look)

    def _timed_out(self, state: Any) -> None:
        """``request_timeout_s`` without progress: only this request ends (504); the child is checked, not killed."""
        self.slot.suspect(state.lease.child)
        if isinstance(state, Held):  # nobody waits for it any more: stop booking it
            log.warn("device {device}: dropping the place of a request for {model} held without progress "
                     "for request_timeout_s", device=self.slot.id, model=self.model)
            pending = state.pending
            self._enter(Done())
            if pending is not None:
                pending.cancel()
            return
        message = (f"the llama-server for model {self.model!r} on device {self.slot.id} made no progress on this "
                   f"request within request_timeout_s={self.proxy.config.request_timeout_s:g}s")
        if isinstance(state, Relaying):
            self._enter(Done())
            self._relay_failed(state, "timed out")
            if state.upstream is not None:
                state.upstream.stopProducing()
            return
        # Sent: no headers yet
        if not self.client_gone:
            self._error(504, message, "upstream_timeout")
        if self.stream:  # closing the connection cancels a stream at its next token
            self._enter(Done())
            state.pending.cancel()
        else:  # llama-server computes it to the end anyway: keep its place until it has
            held = Held(state.lease, state.pending, turn_at=self.proxy.reactor.seconds())
            self._enter(held)
            self._look(held)

    # ------------------------------------------------------------- upstream

    def _response(self, response: Any) -> None:
        state = self.state
        if not isinstance(state, Sent):
            response.deliverBody(_Discard())
            if isinstance(state, Held):
                self._enter(Done())
            return
        relaying = Relaying(state.lease, deadline=state.deadline, last_progress=self.proxy.reactor.seconds())
        self._enter(relaying)
        if self.committed:  # the head went out with the first comment
            if response.code == 200:
                self._deliver(response)
            else:
                response.deliverBody(_ErrorEvent(self, response.code))
        else:
            self.status = response.code
            request = self.request
            request.setResponseCode(response.code, response.phrase)
            out = request.responseHeaders
            for name, values in response.headers.getAllRawHeaders():
                lower = name.lower()
                if lower not in HOP_BY_HOP and not lower.startswith(b"access-control-"):
                    out.setRawHeaders(name, values)
            if response.length is not UNKNOWN_LENGTH:  # the client reads it as llama-server sent it, not chunked
                out.setRawHeaders(b"content-length", [b"%d" % response.length])
            self._deliver(response)
        if relaying.deadline is None:  # its turn in the child was not seen: look from now on
            self._look(relaying)

    def _deliver(self, response: Any) -> None:
        """Relay the body: as the child framed it when the client gets the same framing (both
        chunked, or both with a length), else decoded and framed again by ``twisted.web``
        (an HTTP/1.0 client, or an ``Agent``'s response)."""
        request = self.request
        relay = _Relay(self)
        chunked = getattr(response, "chunked", None)
        if chunked is None:  # an Agent's IResponse: decoded
            response.deliverBody(relay)
            return
        if not request.startedWriting:
            request.write(b"")  # the head goes out; request.chunked now says how the body must go
        # a stream goes out in whole chunks (whole SSE events), so that one broken off can end with an event
        if bool(request.chunked) != chunked:
            response.deliverBody(relay, whole=self.stream)
            return
        if chunked:
            request.chunked = 0  # twisted.web frames nothing more: the child's chunks go through
            self.framed = True
        self.direct = direct_transport(request)  # the bytes as they are, to the socket at once
        response.deliverBody(relay, raw=True, whole=self.stream)

    def _own_framing(self) -> None:
        """The node writes bytes of its own after relayed ones: twisted.web frames them again."""
        self.direct = None
        if self.framed:
            self.framed = False
            self.request.chunked = 1

    def _upstream_failed(self, failure: Failure) -> None:
        state = self.state
        if isinstance(state, Held):
            self._enter(Done())
        if not isinstance(state, Sent):
            return  # cancelled by a timeout or a client that left
        if failure.check(ConnectError) and not self.rebound:
            self._rebind(state)
            return
        self._error(502, f"the llama-server for model {self.model!r} on device {self.slot.id} "
                    f"failed: {_describe(failure)}", "upstream_failed")
        self._enter(Done())

    def _rebind(self, state: Sent) -> None:
        """Refused: the request never reached the child. If the child has died
        (it is seen exiting within REBIND_WAIT_S), the request waits again for its
        replacement instead of failing; it cannot run twice. Else 502."""
        self.rebound = True
        child = state.lease.child
        when_exited = getattr(child, "when_exited", None)
        exited = when_exited() if when_exited is not None else fail(ConnectError("the child did not exit"))
        rebinding = Rebinding(state.lease, exited)
        self._enter(rebinding)
        exited.addTimeout(REBIND_WAIT_S, self.proxy.reactor)
        # requeued on the next turn of the reactor: the device notes the exit after its waiters
        exited.addCallbacks(lambda _: self.proxy.reactor.callLater(0, self._requeue, rebinding), self._not_rebound,
                            errbackArgs=(rebinding,))

    def _requeue(self, rebinding: Rebinding) -> None:
        if self.state is not rebinding:
            return
        log.info("request for {model}: device {device}'s child died before it got the request; waiting again",
                 model=self.model, device=self.slot.id)
        queued = Queued(self.proxy.node.coordinator.requeue(self.model, self.arrived))
        self._enter(queued)
        self._wait(queued)

    def _not_rebound(self, failure: Failure, rebinding: Rebinding) -> None:
        if self.state is not rebinding:
            return
        self._error(502, f"the llama-server for model {self.model!r} on device {self.slot.id} refused the "
                    "connection", "upstream_failed")
        self._enter(Done())

    def relay_started(self, transport: Any, relay: Any) -> None:
        state = self.state
        if isinstance(state, Relaying):
            state.upstream = transport
            if not self.client_gone and relay is not None:
                state.producer = relay
                self.request.registerProducer(relay, True)
        else:
            transport.stopProducing()

    def chunk(self, out: bytes, text: bytes | None) -> None:
        """Relay ``out`` (a read of the child's body); ``text``: the same without framing, or
        None when ``out`` is whole chunks as the child framed them."""
        self.chunks += 1
        if text is None:
            self.meter.chunk(out, True)
        else:
            self.meter.chunk(text)
        if self.client_gone:
            return
        if self.direct is not None:  # what request.write would do, minus a turn of the reactor
            self.request.sentLength += len(out)
            write_through(self.direct, out)
        else:
            self.request.write(out)

    def body_done(self, reason: Failure) -> None:
        state = self.state
        if not isinstance(state, Relaying):
            return
        self.meter.done(self.status)
        self._enter(Done())
        if reason.check(ResponseDone, PotentialDataLoss):
            if not self.client_gone:
                self.request.unregisterProducer()
                self._finish()
        else:
            self._relay_failed(state, _describe(reason))

    def _relay_failed(self, state: Relaying, why: str) -> None:
        """The body broke off (or stalled): an SSE error event ends a stream; a plain answer is cut."""
        if self.client_gone:
            return
        request = self.request
        if state.producer is not None:
            request.unregisterProducer()
        self._own_framing()
        if self.stream and not request.responseHeaders.hasHeader(b"content-length"):
            message = f"the llama-server for model {self.model!r} on device {self.slot.id} failed mid-stream: {why}"
            request.write(b"data: " + error_body(502, message, "upstream_failed") + b"\n\n")
            self._finish()
        else:  # its Content-Length can no longer be honoured
            log.warn("upstream body for {model} on {device} broke off: {why}", model=self.model,
                     device=self.slot.id, why=why)
            request.loseConnection()

    # ---------------------------------------------------------------- client

    def _client_lost(self, failure: Failure) -> None:
        self.client_gone = True
        state = self.state
        if isinstance(state, Queued):
            self._enter(Done())
            state.ticket.d.cancel()
        elif isinstance(state, Sent):
            if self.stream:  # llama-server stops a stream whose connection closed
                self._enter(Done())
                state.pending.cancel()
            else:
                # llama-server does not notice that a non-streamed request's
                # connection closed: it computes it to the end all the same.
                # Closing ours would only take that work off the device's books,
                # and the next request would wait behind it inside the child
                # unaccounted; so its place is held until the answer comes (and
                # is dropped), or it goes request_timeout_s without progress.
                held = Held(state.lease, state.pending, turn_at=state.turn_at)
                self._enter(held)
                if held.turn_at is not None:
                    self._look(held)
        elif isinstance(state, Relaying):
            self._enter(Done())
            if state.upstream is not None:
                state.upstream.stopProducing()
        elif isinstance(state, Rebinding):
            self._enter(Done())
            state.exited.cancel()

    def end_for_drain(self) -> None:
        """End this request now, the node's drain having run out of time, so that its client can
        tell: a stream gets an SSE error event and its end; a request whose answer has not begun
        gets a 503 JSON error; a plain answer already begun is cut off. Then whatever is pending
        is cancelled and the place released, as for a client that left."""
        state = self.state
        if isinstance(state, Done):
            return
        message = "the node stopped before the request was done (drain_timeout_s ran out)"
        request = self.request
        if not self.client_gone:
            if getattr(state, "producer", None) is not None:
                request.unregisterProducer()  # the relay is the producer of a body being relayed
            self._own_framing()
            if not request.startedWriting:
                self._error(503, message, "node_stopping")
            elif self.stream:
                request.write(b"data: " + error_body(503, message, "node_stopping") + b"\n\n")
                self._finish()
            else:
                request.loseConnection()
        self._enter(Done())  # counted with its status; lets go of the lease and the timers
        self.client_gone = True  # nobody to answer any more: cancel what is pending
        if isinstance(state, Queued):
            state.ticket.d.cancel()
        elif isinstance(state, (Sent, Held)):
            if state.pending is not None:
                state.pending.cancel()
        elif isinstance(state, Relaying):
            if state.upstream is not None:
                state.upstream.stopProducing()
        elif isinstance(state, Rebinding):
            if state.exited is not None:
                state.exited.cancel()

    # --------------------------------------------------------------- helpers

    def _count(self) -> None:
        self.proxy.live.discard(self)
        metrics = self.proxy.metrics
        if metrics is not None:
            status = 499 if self.client_gone else self.status  # 499: the client closed the request
            metrics.request_done(self.request.path.decode("latin-1"), self.model, status,
                                 self.proxy._clock() - self.started)

    def _finish(self) -> None:
        self.request.finish()

    def _error(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        if self.client_gone:
            return
        if self.committed:  # the 200 is gone: an SSE error event, as for a failure mid-stream
            self._own_framing()
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

    def connectionMade(self) -> None:
        self.exchange.relay_started(self.transport, None)

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < ERROR_BODY_MAX:
            self.data += data[:ERROR_BODY_MAX - len(self.data)]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        exchange = self.exchange
        if not isinstance(exchange.state, Relaying):
            return
        exchange._enter(Done())
        try:
            error = json.loads(bytes(self.data))["error"]
            message = str(error.get("message") if isinstance(error, dict) else error)
        except (ValueError, KeyError, TypeError):
            message = bytes(self.data).decode("utf-8", "replace")[:1000]
        exchange._error(self.code, f"the llama-server for model {exchange.model!r} answered {self.code}: {message}",
                        "upstream_error")


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
