"""``rolemesh_node.promtext`` writes what ``prometheus_client.generate_latest`` writes for the same metrics."""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import prometheus_client
import pytest
from prometheus_client import core as prom_core

from rolemesh_node import promtext


def build(lib: ModuleType, families: Any) -> bytes:
    registry = lib.CollectorRegistry()
    requests = lib.Counter("x_requests", "Requests, by route and model", ["route", "model"], registry=registry)
    plain = lib.Counter("x_plain_total", "An unlabelled counter", registry=registry)
    latency = lib.Histogram("x_seconds", "Latency\nwith a \\ in its help", ["model"], registry=registry,
                            buckets=(0.001, 0.0025, 1, 300))
    lonely = lib.Histogram("x_lonely_seconds", "An unlabelled histogram", registry=registry, buckets=(1, 2))
    unused = lib.Counter("x_unused", "Never incremented", ["reason"], registry=registry)
    assert unused is not None
    requests.labels("chat", "a").inc()
    requests.labels("chat", 'we"ird\\\nmodel').inc(2.5)
    requests.labels("completions", "a").inc(0)
    plain.inc(3)
    for seconds in (0.0004, 0.001, 0.0011, 0.5, 299.9, 1e6):
        latency.labels("a").observe(seconds)
    latency.labels("b").observe(1)
    lonely.observe(1.5)

    class Collector:
        def describe(self) -> list[Any]:
            return []

        def collect(self) -> Any:
            gauge = families.GaugeMetricFamily("x_state", "1 for the state", labels=["device", "state"])
            gauge.add_metric(["cpu:0", "ready"], 1)
            gauge.add_metric(["cpu:1", "idle"], 0.0)
            yield gauge
            yield families.GaugeMetricFamily("x_empty", "No samples", labels=["device"])
            up = families.GaugeMetricFamily("x_uptime_seconds", "Uptime")
            up.add_metric([], 12345678.25)
            yield up
            beats = families.CounterMetricFamily("x_beats", "Heartbeats", labels=["result"])
            beats.add_metric(["ok"], 7)
            beats.add_metric(["failed"], 0)
            yield beats

    registry.register(Collector())
    return lib.generate_latest(registry)


def test_the_same_text_as_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1764000123.456789)  # the _created samples
    ours = build(promtext, promtext)
    theirs = build(prometheus_client, prom_core)
    assert ours == theirs
    assert b"x_requests_created" in ours and b'le="+Inf"' in ours and b"1.764000123456789e+09" in ours


@pytest.mark.parametrize("value, text", [(1, "1.0"), (0.0025, "0.0025"), (float("inf"), "+Inf"),
                                         (float("-inf"), "-Inf"), (1234567.0, "1.234567e+06"), (-2.5, "-2.5")])
def test_numbers_as_go_writes_them(value: float, text: str) -> None:
    assert promtext.go_float(value) == text


def test_misuse_is_refused() -> None:
    registry = promtext.CollectorRegistry()
    counter = promtext.Counter("x", "x", ["a"], registry=registry)
    with pytest.raises(ValueError):
        counter.labels("1", "2")
    with pytest.raises(ValueError):
        counter.labels("1").inc(-1)
    with pytest.raises(ValueError):
        promtext.Histogram("h", "h", buckets=(2, 1))
