"""Prometheus metrics (``GET /metrics``) through ``prometheus-client``.

Events are counted as they happen (requests, child starts, crashes, switch
durations); state that already lives in the node (queue depth, in-flight,
child state, device memory and utilization, dispatcher link counts) is read at
scrape time by a collector, so nothing is duplicated or can drift. Each
service has its own ``CollectorRegistry`` (no process-global state).

The ``model`` label only ever takes configured model names (anything else is
``-``), so a client cannot grow the label space.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .snapshot import Phase

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
START_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CHILD_STATES = tuple(phase.value for phase in Phase)


class NodeMetrics:
    def __init__(self, node: Any, dispatcher: Any = None) -> None:
        self.node = node
        self.dispatcher = dispatcher
        self.registry = CollectorRegistry(auto_describe=True)
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
                                     "Switch/start duration: request for a model until its child was ready",
                                     labels, buckets=START_BUCKETS, registry=self.registry)
        self.child_failed_starts = Counter("rolemesh_child_failed_starts", "Children that never became ready",
                                           labels, registry=self.registry)
        self.child_crashes = Counter("rolemesh_child_crashes", "Children that died while serving", labels,
                                     registry=self.registry)
        self.child_idle_unloads = Counter("rolemesh_child_idle_unloads", "Children stopped after ttl_s idle",
                                          labels, registry=self.registry)
        self.switches = Counter("rolemesh_scheduler_switches",
                                "Model switches the scheduler decided, by device, model switched to and reason "
                                "(load, overdue, replica, drained, resume)",
                                ["device", "model", "reason"], registry=self.registry)
        self.reloads = Counter("rolemesh_config_reloads", "Config reloads (SIGHUP, POST /v1/node/reload), by "
                               "result: applied, unchanged, rejected", ["result"], registry=self.registry)
        self.registry.register(_StateCollector(self))

    def model_label(self, name: Any) -> str:
        return name if isinstance(name, str) and name in self.node.config.models else "-"

    def request_done(self, route: str, model: Any, status: int, seconds: float) -> None:
        label = self.model_label(model)
        self.requests.labels(route, label, str(status)).inc()
        self.latency.labels(route, label).observe(seconds)

    def slot_event(self, event: str, fields: dict[str, Any]) -> None:
        """A DeviceSlot listener."""
        device, model = fields["device"], self.model_label(fields.get("model"))
        if event == "start":
            self.child_starts.labels(device, model).inc()
        elif event == "ready":
            self.child_ready.labels(device, model).observe(fields.get("seconds") or 0.0)
        elif event == "failed":
            self.child_failed_starts.labels(device, model).inc()
        elif event == "crash":
            self.child_crashes.labels(device, model).inc()
        elif event == "idle_unload":
            self.child_idle_unloads.labels(device, model).inc()

    def switch_event(self, event: str, fields: dict[str, Any]) -> None:
        """A Coordinator listener."""
        if event == "switch" and fields.get("reason") != "resume":
            self.switches.labels(fields["device"], self.model_label(fields.get("model")), fields["reason"]).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
