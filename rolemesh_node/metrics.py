"""Prometheus metrics (``GET /metrics``) in the text format of :mod:`rolemesh_node.promtext`.

Events are counted as they happen (requests, child starts, crashes, switch
durations, tokens, refusals, reloads); state that already lives in the node
(queue depth, in-flight, child state, device memory and utilization,
dispatcher link state and counts) is read at scrape time by a collector, so
nothing is duplicated or can drift. Each service has its own
``CollectorRegistry`` (no process-global state).

Each proxied request gets a :class:`RequestMeter` (:meth:`NodeMetrics.meter`):
the proxy tells it when the request got its device (queue wait), each body
chunk it relays (the first one is the time to first token of a stream; the
last ones hold the token counts, :mod:`rolemesh_node.tokens`) and the end.

The ``model`` label only ever takes configured model names (anything else is
``-``), so a client cannot grow the label space; ``reason`` labels only take
the node's own codes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from .loopback import unframe
from .promtext import CollectorRegistry, Counter, CounterMetricFamily, GaugeMetricFamily, Histogram, generate_latest
from .snapshot import Phase
from .tokens import TailWindow, read_counts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
START_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CHILD_STATES = tuple(phase.value for phase in Phase)
#: what :meth:`NodeMetrics.reload_done` accepts (a config reload, issue 13)
RELOAD_RESULTS = ("applied", "unchanged", "rejected")
#: scheduler decisions that start a switch (``drained`` completes an ``overdue`` one, ``resume`` cancels it)
SWITCH_REASONS = ("load", "overdue", "replica")


class NodeMetrics:
    def __init__(self, node: Any, dispatcher: Any = None) -> None:
        self.node = node
        self.dispatcher = dispatcher
        self.registry = CollectorRegistry()
        self.requests = Counter("rolemesh_requests", "HTTP requests answered, by route, model and status",
                                ["route", "model", "status"], registry=self.registry)
        self.latency = Histogram("rolemesh_request_duration_seconds",
                                 "Time from request to last byte (or error), by route and model",
                                 ["route", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.auth_failures = Counter("rolemesh_auth_failures", "Requests refused for a missing or wrong API key",
                                     registry=self.registry)
        labels = ["device", "model"]
        self.child_starts = Counter("rolemesh_child_starts", "llama-server children spawned", labels,
                                    registry=self.registry)
        self.child_ready = Histogram("rolemesh_child_ready_seconds",
                                     "Load time: a child's spawn until it was ready (what the scheduler measures)",
                                     labels, buckets=START_BUCKETS, registry=self.registry)
        self.child_failed_starts = Counter("rolemesh_child_failed_starts", "Children that never became ready",
                                           labels, registry=self.registry)
        self.child_crashes = Counter("rolemesh_child_crashes", "Children that died while serving", labels,
                                     registry=self.registry)
        self.child_idle_unloads = Counter("rolemesh_child_idle_unloads", "Children stopped after ttl_s idle",
                                          labels, registry=self.registry)
        self.switches = Counter("rolemesh_scheduler_switches",
                                "Model switches the scheduler decided, by device, model switched to and reason "
                                "(load, overdue, replica)",
                                ["device", "model", "reason"], registry=self.registry)
        self.switch_time = Histogram("rolemesh_model_switch_seconds",
                                     "A switch from the scheduler's decision until the new child was ready "
                                     "(drain, stop of the old child and load), by device, model and reason",
                                     ["device", "model", "reason"], buckets=START_BUCKETS, registry=self.registry)
        self.tokens = Counter("rolemesh_tokens", "Tokens of answered requests as the child reported them "
                              "(usage, else timings), by model and kind (prompt, completion)",
                              ["model", "kind"], registry=self.registry)
        self.ttft = Histogram("rolemesh_time_to_first_token_seconds",
                              "Streamed requests: arrival until the first body byte from the child, by model",
                              ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("rolemesh_queue_wait_seconds",
                                    "Proxied requests: arrival until a device was granted, by model",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.refusals = Counter("rolemesh_refusals", "429 and 503 answers of the node itself, by status and reason "
                                "(queue_full, no_device, model_not_ready, model_unavailable, ...)",
                                ["status", "reason"], registry=self.registry)
        self.reloads = Counter("rolemesh_config_reloads", "Config reloads (SIGHUP, POST /v1/node/reload), by "
                               "result: applied, unchanged, rejected", ["result"], registry=self.registry)
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)
        self._switching: dict[str, tuple[str, str, float]] = {}  # device -> (model, reason, since)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.registry.register(_StateCollector(self))

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set: ``labels()`` converts and
        checks its arguments on every call, too much for every request."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def model_label(self, name: Any) -> str:
        return name if isinstance(name, str) and name in self.node.config.models else "-"

    def request_done(self, route: str, model: Any, status: int, seconds: float) -> None:
        label = self.model_label(model)
        self.child(self.requests, route, label, str(status)).inc()
        self.child(self.latency, route, label).observe(seconds)

    def meter(self, model: str, stream: bool, started: float, clock: Callable[[], float]) -> "RequestMeter":
        """The meter of one proxied request (``started``: its arrival on ``clock``)."""
        return RequestMeter(self, self.model_label(model), stream, started, clock)

    def refused(self, status: int, reason: str) -> None:
        """The node answered 429 or 503 itself, for ``reason`` (its error code)."""
        self.refusals.labels(str(status), reason).inc()

    def reload_done(self, result: str) -> None:
        """A config reload ended: ``applied``, ``unchanged`` or ``rejected``."""
        if result not in RELOAD_RESULTS:
            raise ValueError(f"reload result must be one of {', '.join(RELOAD_RESULTS)}, got {result!r}")
        self.reloads.labels(result).inc()

    def slot_event(self, event: str, fields: dict[str, Any]) -> None:
        """A DeviceSlot listener."""
        device, model = fields["device"], self.model_label(fields.get("model"))
        if event == "start":
            self.child_starts.labels(device, model).inc()
        elif event == "ready":
            self.child_ready.labels(device, model).observe(fields.get("seconds") or 0.0)
            switching = self._switching.pop(device, None)
            if switching is not None and switching[0] == fields.get("model"):
                seconds = self.node.reactor.seconds() - switching[2]
                self.switch_time.labels(device, model, switching[1]).observe(max(0.0, seconds))
        elif event == "failed":
            self.child_failed_starts.labels(device, model).inc()
            self._switching.pop(device, None)
        elif event == "crash":
            self.child_crashes.labels(device, model).inc()
        elif event == "idle_unload":
            self.child_idle_unloads.labels(device, model).inc()

    def switch_event(self, event: str, fields: dict[str, Any]) -> None:
        """A Coordinator listener: a switch is counted once, when decided, and timed until its child is ready."""
        if event != "switch":
            return
        device, reason = fields["device"], fields["reason"]
        if reason in SWITCH_REASONS:
            self.switches.labels(device, self.model_label(fields.get("model")), reason).inc()
            self._switching[device] = (fields.get("model"), reason, self.node.reactor.seconds())
        elif reason == "resume":
            self._switching.pop(device, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMeter:
    """What one proxied request tells the metrics: its grant, each relayed chunk, its end."""

    __slots__ = ("metrics", "model", "stream", "started", "clock", "first_at", "window")

    def __init__(self, metrics: NodeMetrics, model: str, stream: bool, started: float,
                 clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self.model = model
        self.stream = stream
        self.started = started
        self.clock = clock
        self.first_at: float | None = None
        self.window = TailWindow()

    def granted(self, waited_s: float) -> None:
        """A device took the request after ``waited_s`` in the queue."""
        self.metrics.child(self.metrics.queue_wait, self.model).observe(max(0.0, waited_s))

    def chunk(self, data: bytes, framed: bool = False) -> None:
        """A chunk of the child's body was relayed (the hot path: no parsing here); ``framed``:
        ``data`` is whole HTTP chunks, framing included."""
        if self.first_at is None:
            self.first_at = self.clock()
        self.window.feed(data, framed)

    def done(self, status: int) -> None:
        """The child's body ended: time to first token (streams), tokens (from the last chunks)."""
        if status != 200:
            return
        metrics = self.metrics
        if self.stream and self.first_at is not None:
            metrics.child(metrics.ttft, self.model).observe(self.first_at - self.started)
        counts = read_counts(self.window.text(unframe))
        if counts is not None:
            metrics.child(metrics.tokens, self.model, "prompt").inc(counts.prompt)
            metrics.child(metrics.tokens, self.model, "completion").inc(counts.completion)


class _NullMeter:
    """The meter of a proxy without metrics."""

    __slots__ = ()

    def granted(self, waited_s: float) -> None:
        pass

    def chunk(self, data: bytes, framed: bool = False) -> None:
        pass

    def done(self, status: int) -> None:
        pass


NULL_METER = _NullMeter()


class _StateCollector:
    """Gauges read from the node at scrape time."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        node = self.metrics.node
        up = GaugeMetricFamily("rolemesh_node_uptime_seconds", "Seconds since the node started")
        up.add_metric([], node.uptime_s())
        yield up
        in_flight = GaugeMetricFamily("rolemesh_device_in_flight", "Requests being served", labels=["device"])
        waiting = GaugeMetricFamily("rolemesh_device_queue_depth",
                                    "Requests waiting node-wide for the model the device holds or switches to",
                                    labels=["device"])
        state = GaugeMetricFamily("rolemesh_device_child_state", "1 for the state the device's child is in",
                                  labels=["device", "state"])
        for snap in node.snapshots():
            in_flight.add_metric([snap.device_id], snap.in_flight)
            waiting.add_metric([snap.device_id], snap.waiting)
            for name in CHILD_STATES:
                state.add_metric([snap.device_id, name], 1.0 if snap.phase.value == name else 0.0)
        yield in_flight
        yield waiting
        yield state
        model_waiting = GaugeMetricFamily("rolemesh_model_waiting", "Requests waiting for a device, by model",
                                          labels=["model"])
        for name in node.config.models:
            model_waiting.add_metric([name], node.coordinator.waiting(name))
        yield model_waiting
        switch_cost = GaugeMetricFamily("rolemesh_model_switch_cost_seconds",
                                        "Measured load time (spawn to ready), moving average, by model and device",
                                        labels=["model", "device"])
        for row in node.costs.switch_table():
            switch_cost.add_metric([self.metrics.model_label(row["model"]), row["device"]], row["seconds"])
        yield switch_cost
        gauges = {
            "memory_total_bytes": GaugeMetricFamily("rolemesh_device_memory_total_bytes", "Device memory",
                                                    labels=["device"]),
            "memory_used_bytes": GaugeMetricFamily("rolemesh_device_memory_used_bytes", "Device memory used",
                                                   labels=["device"]),
            "memory_free_bytes": GaugeMetricFamily("rolemesh_device_memory_free_bytes", "Device memory free",
                                                   labels=["device"]),
            "utilization_pct": GaugeMetricFamily("rolemesh_device_utilization_percent", "Device utilization",
                                                 labels=["device"]),
            "temperature_c": GaugeMetricFamily("rolemesh_device_temperature_celsius", "Device temperature",
                                               labels=["device"]),
        }
        for device_id, sample in node.metrics.items():
            for field, family in gauges.items():
                value = getattr(sample, field)
                if value is not None:
                    family.add_metric([device_id], float(value))
        yield from gauges.values()
        link = self.metrics.dispatcher
        if link is not None:
            beats = CounterMetricFamily("rolemesh_dispatcher_heartbeats", "Heartbeats sent to the dispatcher",
                                        labels=["result"])
            beats.add_metric(["ok"], link.counts["heartbeat_ok"])
            beats.add_metric(["failed"], link.counts["heartbeat_failed"])
            yield beats
            regs = CounterMetricFamily("rolemesh_dispatcher_registrations", "Registration attempts",
                                       labels=["result"])
            regs.add_metric(["ok"], link.counts["register_ok"])
            regs.add_metric(["failed"], link.counts["register_failed"])
            yield regs
            state = GaugeMetricFamily("rolemesh_dispatcher_link_state", "1 for the state the dispatcher link is in",
                                      labels=["state"])
            for value in type(link.state):
                state.add_metric([value.value], 1.0 if link.state is value else 0.0)
            yield state
