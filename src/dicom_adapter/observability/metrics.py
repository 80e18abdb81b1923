"""Prometheus metrics without a client library: counters, gauges, histograms, text exposition.

Thread-safe: pynetdicom handler threads, Pub/Sub callback threads and the event loop all
record. Each metric guards its values with its own lock; `render` snapshots one metric at a
time, so a scrape never blocks recording for longer than one copy. Text format 0.0.4:
https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import math
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Generic, TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Latencies in seconds: a C-ECHO-sized round trip up to a long C-MOVE.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED_LABELS = frozenset({"le"})

LabelValues = tuple[str, ...]


def format_value(value: float) -> str:
    """A sample value as Prometheus text: integers without a fraction, Go's Inf/NaN spelling."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def escape_label_value(value: str) -> str:
    """Backslash, double quote and line feed escaped, as the text format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """Backslash and line feed escaped (HELP lines)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_text(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{escape_label_value(value)}"' for name, value in pairs) + "}"


class _Metric:
    """Name, help, label names and the lock shared by every child of one metric."""

    kind = ""
    suffix = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL.match(label) or label.startswith("__") or label in _RESERVED_LABELS:
                raise ValueError(f"invalid label name {label!r} for {name}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names for {name}")
        self.name = name + self.suffix
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}"
            )
        return tuple(str(labels[name]) for name in self.labelnames)

    def _check_unlabelled(self) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {list(self.labelnames)}: use .labels()")

    def header(self) -> list[str]:
        """The HELP and TYPE lines."""
        return [
            f"# HELP {self.name} {escape_help(self.documentation)}",
            f"# TYPE {self.name} {self.kind}",
        ]

    def samples(self) -> list[str]:
        """The sample lines (no header)."""
        raise NotImplementedError

    def render(self) -> str:
        """HELP, TYPE and sample lines, each ending in a line feed."""
        return "".join(line + "\n" for line in [*self.header(), *self.samples()])

    def _pairs(self, key: LabelValues) -> list[tuple[str, str]]:
        return list(zip(self.labelnames, key, strict=True))


ChildT = TypeVar("ChildT")


class _Labelled(_Metric, Generic[ChildT]):
    """A metric whose children are created per label-value combination."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        super().__init__(name, documentation, labelnames)
        self._children: dict[LabelValues, ChildT] = {}
        if not self.labelnames:
            self._children[()] = self._new_child(())

    def _new_child(self, key: LabelValues) -> ChildT:
        raise NotImplementedError

    def labels(self, **labels: str) -> ChildT:
        """The child for these label values (created on first use)."""
        key = self._key(labels)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child(key)
            return child

    def _only(self) -> ChildT:
        self._check_unlabelled()
        return self._children[()]

    def _snapshot_keys(self) -> list[LabelValues]:
        with self._lock:
            return list(self._children)


class _CounterValue:
    """One counter series."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` (>= 0; counters never go down)."""
        if amount < 0:
            raise ValueError("a counter cannot decrease")
        with self._lock:
            self._value += amount

    def value(self) -> float:
        """The current value."""
        with self._lock:
            return self._value


class Counter(_Labelled[_CounterValue]):
    """A monotonically increasing count; exposed as `<name>_total`."""

    kind = "counter"
    suffix = "_total"

    def _new_child(self, key: LabelValues) -> _CounterValue:
        return _CounterValue(self._lock)

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` to the unlabelled counter."""
        self._only().inc(amount)

    def value(self) -> float:
        """The unlabelled counter's value."""
        return self._only().value()

    def samples(self) -> list[str]:
        with self._lock:
            values = [(key, child._value) for key, child in self._children.items()]
        return [
            f"{self.name}{_label_text(self._pairs(key))} {format_value(value)}"
            for key, value in values
        ]


class _GaugeValue:
    """One gauge series: set directly, or sampled from a function at render time."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._value = 0.0
        self._function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        """Set the value."""
        with self._lock:
            self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount`."""
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Subtract `amount`."""
        with self._lock:
            self._value -= amount

    def set_function(self, function: Callable[[], float]) -> None:
        """Sample `function()` at every read instead of a stored value."""
        with self._lock:
            self._function = function

    @contextmanager
    def track_inprogress(self) -> Iterator[None]:
        """+1 while the block runs."""
        self.inc()
        try:
            yield
        finally:
            self.dec()

    def value(self) -> float:
        """The current value (NaN when the sampling function fails)."""
        with self._lock:
            function, value = self._function, self._value
        if function is None:
            return value
        try:
            return float(function())
        except Exception:
            return math.nan


class Gauge(_Labelled[_GaugeValue]):
    """A value that goes up and down."""

    kind = "gauge"

    def _new_child(self, key: LabelValues) -> _GaugeValue:
        return _GaugeValue(self._lock)

    def set(self, value: float) -> None:
        """Set the unlabelled gauge."""
        self._only().set(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add to the unlabelled gauge."""
        self._only().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        """Subtract from the unlabelled gauge."""
        self._only().dec(amount)

    def set_function(self, function: Callable[[], float]) -> None:
        """Sample the unlabelled gauge from `function()` at every read."""
        self._only().set_function(function)

    def track_inprogress(self) -> AbstractContextManager[None]:
        """+1 on the unlabelled gauge while the block runs."""
        return self._only().track_inprogress()

    def value(self) -> float:
        """The unlabelled gauge's value."""
        return self._only().value()

    def samples(self) -> list[str]:
        with self._lock:
            children = list(self._children.items())
        # Values are read outside the metric lock: a sampling function may take time.
        return [
            f"{self.name}{_label_text(self._pairs(key))} {format_value(child.value())}"
            for key, child in children
        ]


class _HistogramValue:
    """One histogram series: per-bucket counts (not cumulative), sum and count."""

    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...]) -> None:
        self._lock = lock
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Record one observation (e.g. a duration in seconds)."""
        index = bisect_left(self._bounds, value)  # the first bound >= value: le is inclusive
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    @contextmanager
    def time(self) -> Iterator[None]:
        """Observe how long the block took, in seconds."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - started)

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """Cumulative (upper bound, count) pairs ending with +Inf, the sum and the count."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self._bounds, math.inf), counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return cumulative, total, running


class Histogram(_Labelled[_HistogramValue]):
    """Observations counted into fixed buckets; `_bucket{le=...}`, `_sum` and `_count`."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be distinct and increasing")
        self.buckets = bounds
        super().__init__(name, documentation, labelnames)

    def _new_child(self, key: LabelValues) -> _HistogramValue:
        return _HistogramValue(self._lock, self.buckets)

    def observe(self, value: float) -> None:
        """Record one observation on the unlabelled histogram."""
        self._only().observe(value)

    def time(self) -> AbstractContextManager[None]:
        """Observe the duration of a block on the unlabelled histogram."""
        return self._only().time()

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """The unlabelled histogram's cumulative buckets, sum and count."""
        return self._only().snapshot()

    def samples(self) -> list[str]:
        with self._lock:
            children = list(self._children.items())
        lines: list[str] = []
        for key, child in children:
            pairs = self._pairs(key)
            buckets, total, count = child.snapshot()
            for bound, cumulative in buckets:
                le = _label_text([*pairs, ("le", format_value(bound))])
                lines.append(f"{self.name}_bucket{le} {cumulative}")
            labels = _label_text(pairs)
            lines.append(f"{self.name}_sum{labels} {format_value(total)}")
            lines.append(f"{self.name}_count{labels} {count}")
        return lines


class MetricsRegistry:
    """The metrics of one process, rendered in registration order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}

    def _register(self, metric: _Metric) -> None:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """A new counter; `name` without `_total` (it is added)."""
        if name.endswith("_total"):
            raise ValueError(f"{name}: give the counter name without _total")
        metric = Counter(name, documentation, labelnames)
        self._register(metric)
        return metric

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        """A new gauge."""
        metric = Gauge(name, documentation, labelnames)
        self._register(metric)
        return metric

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        """A new histogram with fixed buckets (seconds-scale latency buckets by default)."""
        metric = Histogram(name, documentation, labelnames, buckets)
        self._register(metric)
        return metric

    def render(self) -> str:
        """Every metric in the Prometheus text exposition format 0.0.4."""
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(metric.render() for metric in metrics)


IMPORT_PREFIX = "dicomadapter_import_"
EXPORT_PREFIX = "dicomadapter_export_"


class ImportMetrics:
    """dicom-import's metrics: the Java adapter's Cloud Monitoring names, plus latencies."""

    def __init__(self, registry: MetricsRegistry) -> None:
        def counter(name: str, documentation: str) -> Counter:
            return registry.counter(IMPORT_PREFIX + name, documentation)

        def latency(name: str, documentation: str) -> Histogram:
            return registry.histogram(IMPORT_PREFIX + name, documentation)

        self.started = counter("started", "Times dicom-import started.")
        self.cstore_requests = counter("cstore_requests", "C-STORE requests received.")
        self.cstore_errors = counter(
            "cstore_errors", "C-STORE requests answered with a failure status."
        )
        self.cstore_bytes = counter(
            "cstore_bytes", "Bytes stored by C-STORE (Part-10 files as received and spooled)."
        )
        self.cfind_requests = counter("cfind_requests", "C-FIND requests received.")
        self.cfind_errors = counter("cfind_errors", "C-FIND requests that ended in a failure.")
        self.cfind_cancels = counter("cfind_cancels", "C-FIND requests cancelled by the peer.")
        self.cfind_qidors_requests = counter(
            "cfind_qidors_requests", "QIDO-RS queries made for C-FIND."
        )
        self.cfind_qidors_errors = counter(
            "cfind_qidors_errors", "QIDO-RS queries for C-FIND that failed."
        )
        self.cmove_requests = counter("cmove_requests", "C-MOVE requests received.")
        self.cmove_errors = counter(
            "cmove_errors", "C-MOVE requests answered with a final failure status."
        )
        self.cmove_warnings = counter(
            "cmove_warnings",
            "C-MOVE requests answered with 0xB000 (some sub-operations failed or warned).",
        )
        self.cmove_cancels = counter("cmove_cancels", "C-MOVE requests cancelled by the peer.")
        self.cmove_qidors_requests = counter(
            "cmove_qidors_requests", "QIDO-RS queries listing the instances of a C-MOVE."
        )
        self.cmove_qidors_errors = counter(
            "cmove_qidors_errors", "QIDO-RS queries for C-MOVE that failed."
        )
        self.cmove_cstore_requests = counter(
            "cmove_cstore_requests", "C-STORE sub-operations of C-MOVE attempted."
        )
        self.cmove_cstore_errors = counter(
            "cmove_cstore_errors", "C-STORE sub-operations of C-MOVE that failed."
        )
        self.cmove_cstore_bytes = counter(
            "cmove_cstore_bytes", "Bytes of data sets delivered by C-MOVE sub-operations."
        )
        self.commitment_requests = counter(
            "commitment_requests", "Storage commitment N-ACTION requests received."
        )
        self.commitment_errors = counter(
            "commitment_errors",
            "Storage commitment requests refused, or whose report could not be delivered.",
        )
        self.commitment_qidors_errors = counter(
            "commitment_qidors_errors", "QIDO-RS queries verifying storage commitment that failed."
        )
        self.associations = registry.gauge(
            IMPORT_PREFIX + "associations", "DIMSE associations open right now."
        )
        self.pending_associations = registry.gauge(
            IMPORT_PREFIX + "pending_associations",
            "Connections still negotiating an association (holding no association slot).",
        )
        self.pending_dropped = counter(
            "pending_dropped",
            "Negotiating connections closed because --max_pending_associations were waiting.",
        )
        self.cstore_seconds = latency("cstore_seconds", "C-STORE handling time in seconds.")
        self.cfind_seconds = latency("cfind_seconds", "C-FIND handling time in seconds.")
        self.cmove_seconds = latency("cmove_seconds", "C-MOVE handling time in seconds.")
        self.cstore_backup_errors = counter(
            "cstore_backup_errors",
            "Spooled instances that exhausted their upload retries (moved to failed/).",
        )
        self.spool_depth = registry.gauge(
            IMPORT_PREFIX + "spool_depth", "Instances waiting in the spool's queue/."
        )
        self.spool_oldest_age = registry.gauge(
            IMPORT_PREFIX + "spool_oldest_age_seconds",
            "Seconds since the oldest instance waiting in the spool's queue/ arrived.",
        )


class ExportMetrics:
    """dicom-export's metrics: the Java adapter's Cloud Monitoring names, plus ours."""

    def __init__(self, registry: MetricsRegistry) -> None:
        def counter(name: str, documentation: str) -> Counter:
            return registry.counter(EXPORT_PREFIX + name, documentation)

        self.started = counter("started", "Times dicom-export started.")
        self.total_requests = counter("total_requests", "Pub/Sub messages handled.")
        self.total_errors = counter("total_errors", "Pub/Sub messages that failed.")
        self.total_bytes = counter(
            "total_bytes", "Bytes of instances delivered (as fetched with WADO-RS)."
        )
        self.permanent_failures = counter(
            "permanent_failures",
            "Messages that can never succeed (malformed, source gone); acked unless "
            "--nack_permanent_failures.",
        )
        self.transient_failures = counter(
            "transient_failures", "Messages that failed for now and were nacked for redelivery."
        )
        self.attempts = counter(
            "attempts",
            "Export attempts (WADO-RS fetch, then the sink), counting in-process retries after "
            "the circuit breaker closed.",
        )
        self.breaker_open = registry.gauge(
            EXPORT_PREFIX + "breaker_open",
            "1 while exports are held because the sink is unreachable.",
        )
        self.in_flight = registry.gauge(EXPORT_PREFIX + "in_flight", "Messages being handled now.")
        self.seconds = registry.histogram(
            EXPORT_PREFIX + "seconds", "Time to handle one message, in seconds."
        )
