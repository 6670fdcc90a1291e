"""The Prometheus text format (0.0.4): the part of ``prometheus-client`` the node used, in one module.

Counters and histograms with labels, gauge and counter families built at scrape
time by a collector, one registry per service, and the text ``generate_latest``
writes — written the same way: ``_total`` for counters; ``_bucket`` (cumulative,
``le`` up to ``+Inf``), ``_count`` and ``_sum`` for histograms; the ``_created``
timestamps of both as a gauge family after each family's samples; labels sorted
by name; numbers as Go formats them (``1.0``, ``+Inf``, ``1.7e+09``).

Why not ``prometheus-client`` itself: it imports ``ssl`` (for its push gateway
and its own HTTP server), and with it OpenSSL's libcrypto, ≈5 MB of resident
memory in a node that never speaks TLS unless its dispatcher is ``https``
(:mod:`rolemesh_node.tls`); and its thread locks on every update, which the
node, whose metrics are only touched from the reactor thread, does not need.
Its parser still checks this output in the tests.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any, Iterable, Iterator, Sequence

INF = float("inf")

Sample = tuple[str, tuple[tuple[str, str], ...], float]  # name, (label, value) pairs, value


def go_float(value: float) -> str:
    """A number as Go (and so Prometheus, and ``prometheus_client.utils.floatToGoString``) writes it."""
    value = float(value)
    if value == INF:
        return "+Inf"
    if value == -INF:
        return "-Inf"
    if value != value:
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class MetricFamily:
    """A family built at scrape time (``prometheus_client.core``'s ``GaugeMetricFamily`` and kin)."""

    type = "untyped"
    suffix = ""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labels)
        self.samples: list[Sample] = []

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append((self.name + self.suffix, tuple(zip(self.labelnames, labels)), value))


class GaugeMetricFamily(MetricFamily):
    type = "gauge"


class CounterMetricFamily(MetricFamily):
    type = "counter"
    suffix = "_total"

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labels)


class _CounterValue:
    __slots__ = ("value", "created")

    def __init__(self, bounds: tuple[float, ...] = ()) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount

    def samples(self, name: str, labels: tuple[tuple[str, str], ...]) -> Iterator[Sample]:
        yield name + "_total", labels, self.value
        yield name + "_created", labels, self.created


class _HistogramValue:
    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...] = ()) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bucket whose bound is >= amount
        self.sum += amount

    def samples(self, name: str, labels: tuple[tuple[str, str], ...]) -> Iterator[Sample]:
        total = 0.0
        for bound, count in zip(self.bounds, self.counts):
            total += count
            yield name + "_bucket", labels + (("le", go_float(bound)),), total
        yield name + "_count", labels, total
        yield name + "_sum", labels, self.sum
        yield name + "_created", labels, self.created


class _Metric:
    """A counter or histogram: one value per combination of label values, made on first use."""

    type = ""
    _value: Any = None

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: "CollectorRegistry | None" = None, bounds: tuple[float, ...] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = bounds
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._children[()] = self._value(bounds)
        if registry is not None:
            registry.register(self)

    def labels(self, *values: Any) -> Any:
        key = tuple(str(value) for value in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames) or not key:
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {key}")
            child = self._children[key] = self._value(self._bounds)
        return child

    def collect(self) -> list[MetricFamily]:
        family = MetricFamily(self.name, self.documentation, self.labelnames)
        family.type = self.type
        for key, child in self._children.items():
            family.samples.extend(child.samples(self.name, tuple(zip(self.labelnames, key))))
        return [family]


class Counter(_Metric):
    type = "counter"
    _value = _CounterValue

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: "CollectorRegistry | None" = None) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)

    def inc(self, amount: float = 1) -> None:
        """An unlabelled counter."""
        self._children[()].inc(amount)


class Histogram(_Metric):
    type = "histogram"
    _value = _HistogramValue

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: "CollectorRegistry | None" = None, buckets: Sequence[float] = ()) -> None:
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(bounds) or not bounds:
            raise ValueError(f"{name}: buckets must be given, in increasing order")
        if bounds[-1] != INF:
            bounds += (INF,)
        super().__init__(name, documentation, labelnames, registry, bounds)

    def observe(self, amount: float) -> None:
        """An unlabelled histogram."""
        self._children[()].observe(amount)


class CollectorRegistry:
    """The collectors of one service, in the order they were registered (anything with ``collect()``)."""

    def __init__(self) -> None:
        self._collectors: list[Any] = []

    def register(self, collector: Any) -> None:
        self._collectors.append(collector)

    def collect(self) -> Iterator[MetricFamily]:
        for collector in self._collectors:
            yield from collector.collect()


def generate_latest(registry: CollectorRegistry) -> bytes:
    """The registry in the text format, as ``prometheus_client.generate_latest`` writes it."""
    out: list[str] = []
    for family in registry.collect():
        _family_text(family, out)
    return "".join(out).encode("utf-8")


def _family_text(family: MetricFamily, out: list[str]) -> None:
    name = family.name + "_total" if family.type == "counter" else family.name
    doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
    out.append(f"# HELP {name} {doc}\n# TYPE {name} {family.type}\n")
    created_name = family.name + "_created"
    created: list[str] = []
    for sample_name, labels, value in family.samples:
        line = f"{sample_name}{_label_text(labels)} {go_float(value)}\n"
        (created if sample_name == created_name else out).append(line)
    if created:
        out.append(f"# HELP {created_name} {doc}\n# TYPE {created_name} gauge\n")
        out.extend(created)


def _label_text(labels: Iterable[tuple[str, str]]) -> str:
    pairs = sorted(labels)
    if not pairs:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in pairs) + "}"
