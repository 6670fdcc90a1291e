"""``makeService(config)``: the whole node as one ``MultiService``.

Children, started in this order (``MultiService`` stops them all at once, each
``stopService`` returning a Deferred; the whole stop fires when every one has):

1. :class:`NodeRuntime` — device discovery, the device slots and their
   ``llama-server`` children, the periodic metrics sample. Stopping it stops
   every child and fires only when all have exited.
2. :class:`HttpListener` — the HTTP port (the node's own routes + proxy resource).
3. the dispatcher link (when ``dispatcher_base_url`` is set) — it
   deregisters on stop, bounded to a couple of seconds.

The access log (:mod:`rolemesh_node.accesslog`, when ``access_log`` is on and
``log_level`` shows info lines) starts batching before them and is flushed
after all of them have stopped, so the last requests' lines are written too.

Stopping begins with a drain (:mod:`rolemesh_node.drain`): the dispatcher is
told, new requests get 503, the requests in flight and waiting are served up to
``drain_timeout_s``; only then do the services above stop.
:meth:`NodeService.reload` (SIGHUP, ``POST /v1/node/reload``) applies a changed
config file (:mod:`rolemesh_node.reload`).

Only :func:`makeService` touches the global reactor; everything below takes
it as an argument.
"""

from __future__ import annotations

from typing import Any

import treq.client
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from .accesslog import AccessLog, shows_access_lines
from .api import NodeAPI
from .auth import load_api_keys
from .childlog import check_log_dir
from .config import ConfigError, NodeConfig
from .dispatcher import DispatcherLink, default_advertise_url
from .drain import Drain
from .hosts import is_loopback_host
from .identity import node_id as resolve_node_id
from .loopback import LoopbackClient
from .metrics import NodeMetrics
from .node import Node
from .proxy import ROUTES, ProxyResource
from .reload import ConfigStore, ReloadResult, diff, effective, rejected_line
from .web import RootResource, make_site

log = Logger()


class _QuietPool(HTTPConnectionPool):
    """A pool whose per-connection factories do not log "Starting factory"."""

    class _factory(HTTPConnectionPool._factory):  # type: ignore[name-defined,misc]
        noisy = False


#: llama-server closes a kept-alive connection after 5 s idle ("Keep-Alive:
#: timeout=5"): drop ours well before, so no request is written into a socket
#: the child is closing.
UPSTREAM_IDLE_S = 2.0


@implementer(IAgentEndpointFactory)
class LoopbackEndpoints:
    """Plain TCP endpoints for the children on 127.0.0.1.

    ``Agent``'s default ``HostnameEndpoint`` resolves and races address
    families even for an IP literal: more work per connect, and a refused
    loopback port is reported only after ~0.3 s. The children are always on
    127.0.0.1, so a ``TCP4ClientEndpoint`` is all that is needed.
    """

    def __init__(self, reactor: Any, connect_timeout_s: float = 5.0) -> None:
        self.reactor = reactor
        self.connect_timeout_s = connect_timeout_s

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(self.reactor, uri.host.decode("ascii"), uri.port,
                                  timeout=self.connect_timeout_s)


def make_pool(reactor: Any, config: NodeConfig, persistent: bool = True) -> HTTPConnectionPool:
    pool = _QuietPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = max(4, 2 * config.max_concurrent_requests_per_device)
    pool.cachedConnectionTimeout = UPSTREAM_IDLE_S
    pool.retryAutomatically = False  # a POST must not be sent twice
    return pool


class NodeRuntime(Service):
    """Discovery, slots and children, and the metrics loop."""

    name = "node"

    def __init__(self, node: Node, reactor: Any) -> None:
        self.node = node
        self.reactor = reactor
        self.discovered: Deferred[Any] | None = None
        self._metrics = LoopingCall(node.refresh_metrics)
        self._metrics.clock = reactor
        self._metrics_done: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        self.discovered = self.node.start()
        self.discovered.addCallback(self._start_metrics)
        self.discovered.addErrback(lambda f: log.failure("device discovery failed", f))

    def _start_metrics(self, _: Any) -> None:
        if self.running and not self._metrics.running:
            self._metrics_done = self._metrics.start(self.node.config.metrics_interval_s, now=False)
            self._metrics_done.addErrback(lambda f: log.failure("metrics loop stopped", f))

    def set_interval(self, seconds: float) -> None:
        """A reloaded ``metrics_interval_s``: a new loop (the old one may still wait on its sample)."""
        if self._metrics.running:
            self._metrics.stop()
            self._metrics = LoopingCall(self.node.refresh_metrics)
            self._metrics.clock = self.reactor
            self._start_metrics(None)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._metrics.running:
            self._metrics.stop()
        return self.node.stop()


#: the listen queue: Twisted's default of 50 overflows when hundreds of clients connect at once (a burst of
#: streams; the scale bench saw 1,000 connect within 1.5 s, and clients waited a second for a SYN retry);
#: the kernel caps it at net.core.somaxconn
LISTEN_BACKLOG = 4096


class HttpListener(Service):
    """Listens on ``listen_host:listen_port``; ``port`` is the bound port."""

    name = "http"

    def __init__(self, reactor: Any, site: Any, host: str, port: int, authenticated: bool = False) -> None:
        self.reactor = reactor
        self.authenticated = authenticated
        self.site = site
        self.host = host
        self.requested_port = port
        self.listening: Any = None

    @property
    def port(self) -> int:
        return self.listening.getHost().port

    def startService(self) -> None:
        super().startService()
        self.listening = self.reactor.listenTCP(self.requested_port, self.site, backlog=LISTEN_BACKLOG,
                                                interface=self.host)
        log.info("rolemesh-node listening on http://{host}:{port}", host=self.host, port=self.port)
        if not is_loopback_host(self.host):
            if self.authenticated:
                log.info("listening on {host}, beyond loopback, with API keys; firewall this port to the "
                         "dispatcher and clients", host=self.host)
            else:
                log.warn("listening on {host}, beyond loopback, WITHOUT API keys: anyone who can reach this port "
                         "can use the node; set api_keys or api_key_file and firewall it", host=self.host)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self.listening is None:
            return succeed(None)
        return maybeDeferred(self.listening.stopListening)


class NodeService(MultiService):
    """The node: runtime, HTTP listener, dispatcher link."""

    def __init__(self, config: NodeConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.store = ConfigStore(config)
        self.reactor = reactor
        if config.log_dir is not None:
            problem = check_log_dir(config.log_dir)
            if problem is not None:
                raise ConfigError(config.source, "log_dir", problem)
        self.pool = make_pool(reactor, config)
        endpoints = LoopbackEndpoints(reactor)
        self.agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)
        # the proxy's own client for the children (the hot path: bodies passed through)
        self.upstream = LoopbackClient(reactor, idle_s=UPSTREAM_IDLE_S)
        # probes to the children go through the loopback agent; the dispatcher
        # (any host, http or https) through a standard one on the same pool
        self.child_http = treq.client.HTTPClient(self.agent)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))
        self.node = Node(config, reactor, self.child_http, resolve_node_id(config))
        self.runtime = NodeRuntime(self.node, reactor)
        self.runtime.setServiceParent(self)
        self.proxy = ProxyResource(self.node, self.upstream, reactor)
        self.keys = load_api_keys(config)
        self.metrics = NodeMetrics(self.node)
        self.proxy.metrics = self.metrics
        self.node.slot_listeners.append(self.metrics.slot_event)
        self.node.coordinator.listeners.append(self.metrics.switch_event)
        self.dispatcher: DispatcherLink | None = None
        self.api = NodeAPI(self.node, self.metrics, reload=self.reload, dispatcher=lambda: self.dispatcher)
        self.root = root = RootResource(self.proxy, ROUTES, self.api.resource(), keys=self.keys,
                                        on_denied=lambda request: self.metrics.auth_failures.inc())
        self.access_log = AccessLog(reactor) if shows_access_lines(config.access_log, config.log_level) else None
        self.site = make_site(root, max_body_bytes=config.max_request_body_bytes,
                              max_connections=config.max_client_connections,
                              header_timeout_s=config.header_read_timeout_s,
                              body_timeout_s=config.body_read_timeout_s,
                              idle_timeout_s=config.client_idle_timeout_s, access_log=self.access_log,
                              reactor=reactor, on_refusal=self._refused)
        self.listener = HttpListener(reactor, self.site, config.listen_host, config.listen_port,
                                     authenticated=bool(self.keys))
        self.listener.setServiceParent(self)
        if config.dispatcher_base_url:
            self._link(config)  # after the listener: it starts, and stops, after it
        self.drain = Drain(reactor, lambda: self.node.config.drain_timeout_s, in_flight=lambda: len(self.proxy.live),
                           end_all=self.proxy.end_for_drain, announce=self._announce)

    def _advertise_url(self, config: NodeConfig) -> Any:
        # Looked up once, before the reactor runs at start (it may resolve the host name).
        fixed = default_advertise_url(config) if config.listen_port else None
        return fixed or (lambda: default_advertise_url(config, port=self.port))

    def _link(self, config: NodeConfig) -> None:
        self.dispatcher = DispatcherLink(reactor=self.reactor, http=self.http, node=self.node, config=config,
                                         advertise_url=self._advertise_url(config))
        self.dispatcher.setServiceParent(self)
        self.metrics.dispatcher = self.dispatcher

    @property
    def port(self) -> int:
        return self.listener.port

    def _refused(self, status: int, reason: str, message: str | None) -> None:
        """The node answered 429/503 itself: counted by reason; a 503 is one of the recent errors."""
        self.metrics.refused(status, reason)
        if status == 503 and message:
            self.node.errors.add("request", message)

    def startService(self) -> None:
        if self.access_log is not None:
            self.access_log.start()
        super().startService()

    def stopService(self) -> Deferred[Any]:
        """Drain (:mod:`rolemesh_node.drain`); then stop every child service; then
        close the pooled connections, which the children (the dispatcher's last
        deregister included) no longer use; then write what the access log still
        holds (a line of a request that ends even later is written at once)."""
        self.node.draining = self.drain
        d = self.drain.start()
        d.addCallback(lambda _: MultiService.stopService(self))

        def close_pool(result: Any) -> Deferred[Any]:
            self.upstream.close_idle()
            return self.pool.closeCachedConnections().addBoth(lambda _: result)

        def flush_access_log(result: Any) -> Any:
            if self.access_log is not None:
                self.access_log.stop()
            return result

        return d.addBoth(close_pool).addBoth(flush_access_log)

    def hurry(self) -> None:
        """A second SIGTERM: end the drain now."""
        self.drain.hurry()

    def _announce(self, reason: str) -> None:
        if self.dispatcher is not None:
            self.dispatcher.leave(reason)

    # ------------------------------------------------------------ reload

    def reload(self) -> ReloadResult:
        """Read the config file again and apply what changed (SIGHUP, ``POST /v1/node/reload``).
        An invalid file changes nothing (one log line); keys that need a restart keep their value."""
        old = self.store.current
        source = self.store.path or old.source
        if self.drain.state != Drain.SERVING:
            return self._reloaded(ReloadResult("rejected", source, "the node is stopping"))
        try:
            new = self.store.load()
        except ConfigError as exc:
            log.warn("{line}", line=rejected_line(exc))
            return self._reloaded(ReloadResult("rejected", source, str(exc)))
        changes = diff(old, new)
        if changes.empty:
            log.info("config reloaded from {source}: nothing changed", source=source)
            return self._reloaded(ReloadResult("unchanged", source))
        config = effective(old, new, changes)
        self.store.current = self.config = config
        self._apply(old, config, changes)
        result = ReloadResult("applied", source, changes=changes)
        summary = result.to_json()
        log.info("config reloaded from {source}: applied {applied}; children restarted for {children}; "
                 "dispatcher {dispatcher}; models {models}", source=source, applied=summary["applied"],
                 children=summary["children_restarted"], dispatcher=summary["dispatcher"], models=summary["models"])
        if changes.needs_restart:
            log.warn("config reload: {keys} need a restart of the agent to change; the running values are kept",
                     keys=", ".join(changes.needs_restart))
        return self._reloaded(result)

    def _reloaded(self, result: ReloadResult) -> ReloadResult:
        self.metrics.reload_done(result.result)
        return result

    def _apply(self, old: NodeConfig, config: NodeConfig, changes: Any) -> None:
        if "node_id" in changes.dispatcher:
            self.node.node_id = resolve_node_id(config)
        self.node.apply_config(config)
        self.keys = load_api_keys(config)
        self.root.keys = self.keys if self.keys else None
        site = self.site
        site.requestFactory.max_body_bytes = config.max_request_body_bytes
        site.protocol.header_timeout_s = config.header_read_timeout_s
        site.protocol.body_timeout_s = config.body_read_timeout_s
        site.timeOut = config.client_idle_timeout_s
        site.max_connections = config.max_client_connections
        self.pool.maxPersistentPerHost = max(4, 2 * config.max_concurrent_requests_per_device)
        if config.metrics_interval_s != old.metrics_interval_s:
            self.runtime.set_interval(config.metrics_interval_s)
        self._relink(config, changes)

    def _relink(self, config: NodeConfig, changes: Any) -> None:
        link = self.dispatcher
        if link is not None and not config.dispatcher_base_url:
            log.info("dispatcher_base_url removed: deregistering, standalone from now on")
            self.dispatcher = self.metrics.dispatcher = None
            link.disownServiceParent()  # its stopService deregisters (bounded)
        elif link is None and config.dispatcher_base_url:
            self._link(config)
        elif link is not None:
            identity = {"dispatcher_base_url", "dispatcher_token", "dispatcher_token_file", "node_id",
                        "advertise_url"}
            again = bool(identity & set(changes.dispatcher)) or changes.models_changed
            link.reconfigure(config, self._advertise_url(config), register_again=again)

    def when_discovered(self) -> Deferred[Any]:
        """Fires once devices are discovered (for tests and the demo)."""
        assert self.runtime.discovered is not None, "start the service first"
        d: Deferred[Any] = Deferred()

        def notify(result: Any) -> Any:
            d.callback(None)
            return result  # the runtime's own chain goes on unchanged

        self.runtime.discovered.addBoth(notify)
        return d


def makeService(config: NodeConfig, reactor: Any = None) -> NodeService:
    """The node's service tree; the global reactor unless one is given."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor
        reactor = global_reactor
    return NodeService(config, reactor)
