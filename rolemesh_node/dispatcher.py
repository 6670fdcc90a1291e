"""The link to the dispatcher: register, heartbeat, deregister.

The protocol is described in ``docs/dispatcher-protocol.md`` and, as OpenAPI
webhooks, in ``docs/openapi.yaml``. In short::

    start ──► POST /v1/nodes/register      (retried with backoff until it succeeds)
                 │ 2xx
                 ▼
              POST /v1/nodes/heartbeat     every heartbeat_interval_s (a LoopingCall)
                 │ 404 / 410: the dispatcher forgot us → register again
                 │ devices changed (discovery finished) → register again
                 ▼
    drain ──► POST /v1/nodes/deregister    reason "draining" (or "shutdown" with nothing in flight),
              best effort, bounded by DEREGISTER_TIMEOUT_S; heartbeats stop first
    reload ─► register again when the URL, token, node id, advertised URL or models changed

:class:`DispatcherLink` is a small explicit state machine::

    stopped ─start─► unregistered ─► registering ─2xx─► registered ─404/410─► unregistered
                          ▲               │ failure                               │
                          └── backoff ────┘                   (heartbeats only here)

Rules it keeps:

* one call to the dispatcher at a time: registration is never repeated in
  parallel, and the heartbeat ``LoopingCall`` waits for the call it started
  (never two heartbeats in flight); the call in flight is kept so that
  :meth:`DispatcherLink.stopService` can cancel it;
* every call has a timeout (``addTimeout``), and every failure is caught, so
  the heartbeat loop never dies silently;
* failures are logged without flooding: the first of a run, then when the
  error changes and every ``log_every``-th, with a count; recovery is logged;
* the bearer token is read once at construction and never logged (nor in
  ``repr`` of the link);
* reading device metrics goes through ``node.refresh_metrics()`` (a Deferred)
  with a bounded wait, so a slow vendor tool cannot hold a heartbeat back.

The payload builders (:func:`register_payload`, :func:`heartbeat_payload`,
:func:`deregister_payload`) are pure functions of the node's state.
"""

from __future__ import annotations

import enum
import functools
import socket
import time
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.error import TimeoutError as TxTimeoutError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import __version__
from .backoff import Backoff
from .config import ConfigError, NodeConfig
from .hosts import is_loopback_host
from .proxy import ROUTES

log = Logger()

REGISTER_PATH = "/v1/nodes/register"
HEARTBEAT_PATH = "/v1/nodes/heartbeat"
DEREGISTER_PATH = "/v1/nodes/deregister"

#: the node's own endpoints, advertised in the registration's capabilities
NODE_ENDPOINTS: tuple[str, ...] = (
    *(path.decode() for path in ROUTES),
    "/v1/models",
    "/v1/node/inventory",
    "/health",
    "/ready",
)

#: stop never waits longer than this for the deregistration
DEREGISTER_TIMEOUT_S = 2.0
#: why a node deregisters: it stops with nothing in flight, or it drains (stops taking requests, finishes
#: the ones it has within drain_timeout_s, then stops)
DEREGISTER_REASONS = ("shutdown", "draining")
#: a heartbeat waits at most this long for a fresh metrics sample
METRICS_WAIT_S = 1.0
#: registration retries: 1 s, 2 s, 4 s … up to 60 s, each minus up to half at random
REGISTER_BACKOFF = Backoff(base=1.0, factor=2.0, cap=60.0, jitter=0.5)

_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


class LinkState(str, enum.Enum):
    """Where the link stands with the dispatcher."""

    STOPPED = "stopped"
    UNREGISTERED = "unregistered"
    REGISTERING = "registering"
    REGISTERED = "registered"


class DispatcherError(Exception):
    """The dispatcher answered a call with a non-2xx status."""

    def __init__(self, path: str, status: int, detail: str) -> None:
        super().__init__(path, status, detail)
        self.path = path
        self.status = status
        self.detail = detail

    @property
    def forgotten(self) -> bool:
        """404 / 410: the dispatcher does not know this node (any more)."""
        return self.status in (404, 410)

    def __str__(self) -> str:
        return f"HTTP {self.status}" + (f": {self.detail}" if self.detail else "")


# --------------------------------------------------------------------------
# configuration helpers


def read_token(config: NodeConfig) -> str | None:
    """The bearer token: ``dispatcher_token``, else the stripped content of
    ``dispatcher_token_file``, else None. Raises :class:`ConfigError` (which
    never quotes the token) when the file cannot be used."""
    token = config.dispatcher_token
    where = "dispatcher_token"
    if not token and config.dispatcher_token_file is not None:
        where = "dispatcher_token_file"
        path = config.dispatcher_token_file
        try:
            token = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(config.source, where, f"cannot read {path}: {exc.strerror or type(exc).__name__}") \
                from None
        except UnicodeDecodeError:
            raise ConfigError(config.source, where, f"{path} is not UTF-8 text") from None
        if not token.strip():
            raise ConfigError(config.source, where, f"{path} is empty")
    if not token:
        return None
    token = token.strip()
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in token):
        raise ConfigError(config.source, where, "the token must be one word without spaces or control characters")
    return token


@functools.lru_cache(maxsize=1)
def host_name() -> str:
    """This host's fully qualified name (else its host name); looked up once."""
    name = ""
    try:
        name = socket.getfqdn()
    except OSError:
        pass
    if not name or name.startswith("localhost") or name in ("127.0.0.1", "::1"):
        name = socket.gethostname() or "localhost"
    return name


def default_advertise_url(config: NodeConfig, port: int | None = None) -> str:
    """Where the dispatcher can reach this node.

    ``config.advertise_url`` when set; otherwise ``http://{listen_host}:{port}``
    (``port`` defaults to ``listen_port``), with a wildcard ``listen_host``
    (``0.0.0.0``, ``::``) replaced by this host's name — looked up once, so
    call this at startup, before the reactor runs.
    """
    if config.advertise_url:
        return config.advertise_url
    host = config.listen_host
    if host in _WILDCARD_HOSTS:
        host = host_name()
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{config.listen_port if port is None else port}"


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part (safe to log)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


# --------------------------------------------------------------------------
# payloads (pure functions of the node's state)


def _device_signature(node: Any) -> tuple[bool, tuple[str, ...]]:
    """What the registration told the dispatcher about devices; a change re-registers."""
    return bool(getattr(node, "discovered", True)), tuple(d.id for d in node.devices)


def register_payload(node: Any, config: NodeConfig, advertise_url: str) -> dict[str, Any]:
    """The body of ``POST /v1/nodes/register``."""
    backend = getattr(node, "backend", None)
    models = []
    for spec in config.models.values():
        models.append({
            "name": spec.name,
            "aliases": list(spec.aliases),
            "embedding": spec.embedding,
            "ctx_size": spec.ctx_size,
            "size_bytes": spec.size_bytes(),
            "available": spec.available(),
            "ttl_s": spec.ttl_s,
        })
    return {
        "node_id": node.node_id,
        "url": advertise_url,
        "version": __version__,
        "started_at": node.started_at,
        "backend": None if backend is None else backend.name,
        "discovered": bool(getattr(node, "discovered", True)),
        "heartbeat_interval_s": config.heartbeat_interval_s,
        "devices": [device.to_json() for device in node.devices],
        "models": models,
        "capabilities": {
            "endpoints": list(NODE_ENDPOINTS),
            "streaming": True,
            "max_concurrent_requests_per_device": config.max_concurrent_requests_per_device,
            "max_pending_requests_per_device": config.max_pending_requests_per_device,
            "max_request_body_bytes": config.max_request_body_bytes,
            "request_timeout_s": config.request_timeout_s,
        },
    }


def _device_status(device: Any, metrics: Any, snap: Any) -> dict[str, Any]:
    return {
        "id": device.id,
        "metrics": None if metrics is None else metrics.to_json(),
        "state": None if snap is None else snap.phase.value,
        "model": None if snap is None else snap.model,
        "in_flight": 0 if snap is None else snap.in_flight,
        "waiting": 0 if snap is None else snap.waiting,
        "max_pending": None if snap is None else snap.max_pending,
        "max_concurrent": None if snap is None else snap.capacity,
        "last_error": None if snap is None else snap.last_error,
        "cooldowns": [] if snap is None else [c.to_json() for c in snap.cooldowns],
    }


def heartbeat_payload(node: Any, seq: int, now: float) -> dict[str, Any]:
    """The body of ``POST /v1/nodes/heartbeat`` number ``seq``, sent at ``now`` (Unix time)."""
    metrics: Mapping[str, Any] = getattr(node, "metrics", None) or {}
    snapshots = {snap.device_id: snap for snap in node.snapshots()}
    return {
        "node_id": node.node_id,
        "seq": seq,
        "time": now,
        "started_at": node.started_at,
        "discovered": bool(getattr(node, "discovered", True)),
        "llama_server_error": getattr(node, "bin_error", None),
        "devices": [_device_status(d, metrics.get(d.id), snapshots.get(d.id)) for d in node.devices],
        "waiting": node.waiting_by_model(),
    }


def deregister_payload(node: Any, now: float, reason: str = "shutdown") -> dict[str, Any]:
    """The body of ``POST /v1/nodes/deregister``."""
    return {"node_id": node.node_id, "started_at": node.started_at, "time": now, "reason": reason}


# --------------------------------------------------------------------------
# the link


class _FailureRun:
    """Counts a run of consecutive failures and says which of them to log."""

    def __init__(self, every: int) -> None:
        self.every = max(1, every)
        self.count = 0
        self.last_error: str | None = None

    def failed(self, error: str) -> bool:
        """Count one failure; True when it should be logged."""
        self.count += 1
        changed = error != self.last_error
        self.last_error = error
        return self.count == 1 or changed or self.count % self.every == 0

    def succeeded(self) -> int:
        """End the run; returns how many failures it had."""
        count, self.count, self.last_error = self.count, 0, None
        return count


class _Secret:
    """Holds the token; its repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


def _describe(failure: Failure, timeout: float) -> str:
    """A one-line, log-friendly description of why a call failed."""
    value = failure.value
    if failure.check(DeferredTimeoutError, TxTimeoutError):
        return f"no answer within {timeout:g}s"
    if failure.check(ConnectingCancelledError):
        return f"could not connect within {timeout:g}s"
    if isinstance(value, DispatcherError):
        return str(value)
    reasons = getattr(value, "reasons", None)  # treq's ResponseNeverReceived / ResponseFailed
    if reasons:
        return "; ".join(_describe(r, timeout) for r in reasons)
    text = str(value) or type(value).__name__
    return text.splitlines()[0][:300]


class DispatcherLink(Service):
    """Registers the node with the dispatcher, heartbeats, deregisters on stop.

    :param reactor: provides ``IReactorTime`` (a ``Clock`` in tests).
    :param http: a ``treq.client.HTTPClient`` (anything with ``post(url, json=, headers=)``
        whose responses have ``code`` and ``content()``).
    :param node: the :class:`~rolemesh_node.node.Node` (or anything with ``node_id``,
        ``started_at``, ``devices``, ``slots``, ``refresh_metrics()``).
    :param config: the node's config (``dispatcher_base_url`` must be set).
    :param advertise_url: where the dispatcher reaches the node — a string, or a
        function returning one, called at each registration (for ``listen_port: 0``).
    :param register_backoff: retry policy of registration.
    :param heartbeat_backoff: how far heartbeats are spaced out after consecutive
        failures (default: base ``heartbeat_interval_s``, cap ``max(60 s, interval)``).
    :param wallclock: Unix time for payloads (``time.time``).
    :param log_every: log every n-th failure of a run (besides the first and changes).
    """

    name = "dispatcher"

    def __init__(
        self,
        *,
        reactor: Any,
        http: Any,
        node: Any,
        config: NodeConfig,
        advertise_url: str | Callable[[], str],
        register_backoff: Backoff = REGISTER_BACKOFF,
        heartbeat_backoff: Backoff | None = None,
        wallclock: Callable[[], float] = time.time,
        log_every: int = 10,
    ) -> None:
        if not config.dispatcher_base_url:
            raise ValueError("DispatcherLink needs config.dispatcher_base_url")
        self.reactor = reactor
        self.http = http
        self.node = node
        self.config = config
        self.base_url = config.dispatcher_base_url.rstrip("/")
        self._advertise_url = advertise_url
        self.interval = config.heartbeat_interval_s
        self.timeout = config.dispatcher_timeout_s
        self.register_backoff = register_backoff
        self.heartbeat_backoff = heartbeat_backoff or Backoff(
            base=self.interval, factor=2.0, cap=max(60.0, self.interval), jitter=0.25)
        self.wallclock = wallclock
        token = read_token(config)
        self._token = None if token is None else _Secret(token)

        self.state = LinkState.STOPPED
        self.seq = 0  #: the last heartbeat sequence number sent (per process, never reset)
        self.registrations = 0  #: successful registrations so far
        #: totals since start, read by the Prometheus collector
        self.counts = {"register_ok": 0, "register_failed": 0, "heartbeat_ok": 0, "heartbeat_failed": 0}
        self._register_attempt = 0
        self._register_failures = _FailureRun(log_every)
        self._heartbeat_failures = _FailureRun(log_every)
        self._forget_failures = _FailureRun(log_every)
        self._forgets = 0  #: times forgotten since a heartbeat last got through
        self._skip_beats = 0
        self._registered_signature: tuple[bool, tuple[str, ...]] | None = None
        self._pending_signature: tuple[bool, tuple[str, ...]] | None = None
        self._retry: Any = None  # IDelayedCall of the next registration attempt
        self._loop: LoopingCall | None = None
        self._inflight: Deferred[Any] | None = None
        self._metrics_pending: Deferred[Any] | None = None
        self._leaving: Deferred[Any] | None = None  # the deregistration sent by leave()

        if self._token is not None and self.base_url.startswith("http://") and not _is_loopback_url(self.base_url):
            log.warn("the dispatcher token is sent over plain http to {dispatcher}; use https",
                     dispatcher=redact_url(self.base_url))

    def __repr__(self) -> str:
        return (f"<DispatcherLink node_id={self.node.node_id!r} dispatcher={redact_url(self.base_url)!r} "
                f"state={self.state.value}>")

    __str__ = __repr__

    @property
    def advertise_url(self) -> str:
        """The URL sent in the registration."""
        url = self._advertise_url
        return url() if callable(url) else url

    # ------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        super().startService()
        self.state = LinkState.UNREGISTERED
        self._leaving = None
        self._register_attempt = 0
        log.info("registering node {node_id} with the dispatcher at {dispatcher}",
                 node_id=self.node.node_id, dispatcher=redact_url(self.base_url))
        self._register()

    def stopService(self) -> Deferred[None]:
        """Stop heartbeats, cancel the call in flight, deregister (bounded) — or, after
        :meth:`leave`, wait for its deregistration.

        The returned Deferred always succeeds, within about
        ``min(DEREGISTER_TIMEOUT_S, dispatcher_timeout_s)`` seconds.
        """
        d = self.leave("shutdown")
        super().stopService()
        return d

    def leave(self, reason: str) -> Deferred[None]:
        """Stop heartbeats and registering, cancel the call in flight, deregister with
        ``reason`` (bounded); the link sends nothing more until it is started again.
        Called by the drain first thing, then by :meth:`stopService` (which then only waits)."""
        if self._leaving is None:
            self._leaving = self._deregister(reason)
        return _when_fired(self._leaving)

    def _deregister(self, reason: str) -> Deferred[None]:
        was = self.state
        self.state = LinkState.STOPPED
        self._cancel_retry()
        self._stop_loop()
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            inflight.cancel()
        if was not in (LinkState.REGISTERED, LinkState.REGISTERING):
            return succeed(None)
        limit = min(DEREGISTER_TIMEOUT_S, self.timeout)
        d = self._call(DEREGISTER_PATH, lambda: deregister_payload(self.node, self.wallclock(), reason), limit)
        d.addCallbacks(self._deregistered, self._deregister_failed, errbackArgs=(limit,))
        d.addErrback(self._bug, "deregistration")
        return d

    @property
    def _active(self) -> bool:
        return self.running and self._leaving is None

    def reconfigure(self, config: NodeConfig, advertise_url: str | Callable[[], str], register_again: bool) -> None:
        """A reloaded config: new settings at once; with ``register_again`` (its URL, token,
        node id, advertised URL or models changed) a new registration now."""
        if not config.dispatcher_base_url:
            raise ValueError("DispatcherLink needs config.dispatcher_base_url")
        token = read_token(config)
        old_token = None if self._token is None else self._token.reveal()
        register_again = register_again or token != old_token  # a token file's content may have changed
        self.config = config
        self.base_url = config.dispatcher_base_url.rstrip("/")
        self._advertise_url = advertise_url
        self._token = None if token is None else _Secret(token)
        self.timeout = config.dispatcher_timeout_s
        interval_changed = config.heartbeat_interval_s != self.interval
        if interval_changed:
            self.interval = config.heartbeat_interval_s
            self.heartbeat_backoff = Backoff(base=self.interval, factor=2.0, cap=max(60.0, self.interval),
                                             jitter=0.25)
        if not self._active:
            return
        if register_again:
            log.info("registering again with the dispatcher at {dispatcher}: the config was reloaded",
                     dispatcher=redact_url(self.base_url))
            self._stop_loop()
            self._cancel_retry()
            self.state = LinkState.UNREGISTERED
            if self._inflight is not None:
                inflight, self._inflight = self._inflight, None
                inflight.cancel()
            self._register_attempt = 0
            self._register()
        elif interval_changed and self.state is LinkState.REGISTERED:
            self._start_loop(now=False)

    # --------------------------------------------------------- registration

    def _register(self) -> None:
        """Start one registration attempt (only from ``unregistered``)."""
        self._retry = None
        if not self.running or self.state is not LinkState.UNREGISTERED:
            return
        self.state = LinkState.REGISTERING
        d = self._call(REGISTER_PATH, self._register_body, self.timeout)
        self._track(d)
        d.addCallbacks(self._registered, self._register_failed)
        d.addErrback(self._bug, "registration")

    def _register_body(self) -> dict[str, Any]:
        self._pending_signature = _device_signature(self.node)
        return register_payload(self.node, self.config, self.advertise_url)

    def _registered(self, _body: bytes) -> None:
        if not self._active:
            return
        failures = self._register_failures.succeeded()
        self._register_attempt = 0
        self.registrations += 1
        self.counts["register_ok"] += 1
        self._registered_signature = self._pending_signature
        self.state = LinkState.REGISTERED
        log.info("registered with the dispatcher at {dispatcher} as {node_id}"
                 + (" after {failures} failed attempts" if failures else ""),
                 dispatcher=redact_url(self.base_url), node_id=self.node.node_id, failures=failures,
                 registrations=self.registrations)
        self._start_loop()

    def _register_failed(self, failure: Failure) -> None:
        if not self._active or failure.check(CancelledError):
            return  # cancelled by stopService, leave() or reconfigure()
        self.counts["register_failed"] += 1
        self.state = LinkState.UNREGISTERED
        delay = self.register_backoff.delay(self._register_attempt)
        self._register_attempt += 1
        error = self._scrub(_describe(failure, self.timeout))
        if self._register_failures.failed(error):
            log.warn("registration with the dispatcher at {dispatcher} failed: {error} "
                     "({failures} in a row); retrying in {delay:.1f}s",
                     dispatcher=redact_url(self.base_url), error=error,
                     failures=self._register_failures.count, delay=delay)
        self._cancel_retry()
        self._retry = self.reactor.callLater(delay, self._register)

    def _forget(self, why: str) -> None:
        """Registered → unregistered, then register again: at once the first
        time, with the registration backoff when the dispatcher keeps
        forgetting the node (no heartbeat got through since the last time)."""
        self._stop_loop()
        self.state = LinkState.UNREGISTERED
        self._forgets += 1
        if self._forgets == 1:
            self._register_attempt = 0
            log.info("registering again with the dispatcher: {why}", why=why)
            self._register()
            return
        delay = self.register_backoff.delay(self._forgets - 2)
        if self._forget_failures.failed(why):
            log.warn("the dispatcher forgot this node again ({why}, {count} times without a heartbeat getting "
                     "through); registering again in {delay:.1f}s", why=why, count=self._forgets, delay=delay)
        self._cancel_retry()
        self._retry = self.reactor.callLater(delay, self._register)

    # ------------------------------------------------------------ heartbeat

    def _start_loop(self, now: bool = True) -> None:
        self._stop_loop()
        self._heartbeat_failures.succeeded()
        self._skip_beats = 0
        # a fresh LoopingCall each time: an old one may still wait on its last call
        loop = LoopingCall(self._beat)
        loop.clock = self.reactor
        self._loop = loop
        done = loop.start(self.interval, now=now)
        done.addErrback(self._bug, "the heartbeat loop")

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def _beat(self) -> Deferred[None] | None:
        """One heartbeat tick: never fails; its Deferred fires when the call is done."""
        if not self._active or self.state is not LinkState.REGISTERED:
            return None
        if self._skip_beats > 0:
            self._skip_beats -= 1
            return None
        if _device_signature(self.node) != self._registered_signature:
            self._forget("the node's devices changed since it registered")
            return None
        d = self._fresh_metrics()
        d.addCallback(lambda _: self._call(HEARTBEAT_PATH, self._heartbeat_body, self.timeout))
        self._track(d)
        d.addCallbacks(self._beat_ok, self._beat_failed)
        d.addErrback(self._bug, "heartbeat")
        return d

    def _heartbeat_body(self) -> dict[str, Any]:
        self.seq += 1
        return heartbeat_payload(self.node, self.seq, self.wallclock())

    def _beat_ok(self, _body: bytes) -> None:
        self.counts["heartbeat_ok"] += 1
        self._forgets = 0
        self._forget_failures.succeeded()
        failures = self._heartbeat_failures.succeeded()
        self._skip_beats = 0
        if failures:
            log.info("heartbeats to the dispatcher work again after {failures} failures", failures=failures)

    def _beat_failed(self, failure: Failure) -> None:
        if not self._active or failure.check(CancelledError):
            return  # cancelled by stopService, leave() or reconfigure()
        self.counts["heartbeat_failed"] += 1
        if failure.check(DispatcherError) and failure.value.forgotten:
            self._forget(f"it answered a heartbeat with HTTP {failure.value.status}")
            return
        error = self._scrub(_describe(failure, self.timeout))
        logged = self._heartbeat_failures.failed(error)
        count = self._heartbeat_failures.count
        delay = self.heartbeat_backoff.delay(count - 1)
        self._skip_beats = max(1, round(delay / self.interval)) - 1
        if logged:
            log.warn("heartbeat to the dispatcher at {dispatcher} failed: {error} ({failures} in a row); "
                     "next one in about {delay:.1f}s", dispatcher=redact_url(self.base_url), error=error,
                     failures=count, delay=(self._skip_beats + 1) * self.interval)

    def _fresh_metrics(self) -> Deferred[None]:
        """Fires after a metrics refresh, or after METRICS_WAIT_S, whichever is first."""
        if self._metrics_pending is not None:
            return succeed(None)  # the previous refresh is still running: send what we have
        out: Deferred[None] = Deferred(lambda _: timer.cancel() if timer.active() else None)

        def done(result: Any) -> None:
            self._metrics_pending = None
            if isinstance(result, Failure):
                log.warn("reading device metrics failed: {error}", error=result.getErrorMessage())
            if timer.active():
                timer.cancel()
            if not out.called:
                out.callback(None)

        def waited() -> None:
            if not out.called:
                out.callback(None)

        timer = self.reactor.callLater(min(METRICS_WAIT_S, self.timeout / 2), waited)
        pending = maybeDeferred(self.node.refresh_metrics)
        if not pending.called:
            self._metrics_pending = pending
        pending.addBoth(done)
        return out

    # -------------------------------------------------------------- calls

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"rolemesh-node/{__version__}", "Accept": "application/json"}
        if self._token is not None:
            headers["Authorization"] = "Bearer " + self._token.reveal()
        return headers

    def _call(self, path: str, body: Callable[[], dict[str, Any]], timeout: float) -> Deferred[bytes]:
        """POST ``body()`` as JSON to the dispatcher; fires with the response body on 2xx."""
        d = maybeDeferred(body)
        d.addCallback(self._post, path)
        d.addTimeout(timeout, self.reactor)
        return d

    def _post(self, payload: dict[str, Any], path: str) -> Deferred[bytes]:
        d = self.http.post(self.base_url + path, json=payload, headers=self._headers())
        d.addCallback(self._read, path)
        return d

    def _read(self, response: Any, path: str) -> Deferred[bytes]:
        d = response.content()

        def check(body: bytes) -> bytes:
            if 200 <= response.code < 300:
                return body
            detail = self._scrub(body[:200].decode("utf-8", "replace").strip().replace("\n", " "))
            raise DispatcherError(path, response.code, detail)

        d.addCallback(check)
        return d

    def _track(self, d: Deferred[Any]) -> None:
        """Keep ``d`` as the call in flight until it fires (stopService cancels it)."""
        self._inflight = d

        def clear(result: Any) -> Any:
            if self._inflight is d:
                self._inflight = None
            return result

        d.addBoth(clear)

    def _deregistered(self, _body: bytes) -> None:
        log.info("deregistered from the dispatcher at {dispatcher}", dispatcher=redact_url(self.base_url))

    def _deregister_failed(self, failure: Failure, limit: float) -> None:
        log.warn("deregistration from the dispatcher at {dispatcher} failed: {error}",
                 dispatcher=redact_url(self.base_url), error=self._scrub(_describe(failure, limit)))

    # ------------------------------------------------------------ helpers

    def _cancel_retry(self) -> None:
        retry, self._retry = self._retry, None
        if retry is not None and retry.active():
            retry.cancel()

    def _scrub(self, text: str) -> str:
        """``text`` with the token (should it ever be echoed back) replaced."""
        if self._token is not None:
            text = text.replace(self._token.reveal(), "<redacted>")
        return text

    def _bug(self, failure: Failure, what: str) -> None:
        if failure.check(CancelledError):
            return
        log.failure("dispatcher link: unexpected error in {what}", failure, what=what)


def _when_fired(d: Deferred[Any]) -> Deferred[None]:
    """A new Deferred that fires (with None) when ``d`` has, leaving ``d``'s own result alone."""
    out: Deferred[None] = Deferred()

    def fire(result: Any) -> Any:
        out.callback(None)
        return result

    d.addBoth(fire)
    return out


def _is_loopback_url(url: str) -> bool:
    return is_loopback_host(urlsplit(url).hostname or "")
