"""Prometheus metrics on prometheus-client: one CollectorRegistry per service instance.

Thread-safe: pynetdicom handler threads, Pub/Sub callback threads, the event loop and the
Cloud Monitoring flush thread all record or read. The thin wrappers here keep the call style
the services use (`.inc()`, `.observe()`, `.set_function()`, `.labels()`) and add `.value()`
and `.snapshot()`, read through prometheus-client's public `collect()`, so Prometheus and
Cloud Monitoring read the very same numbers. Exposition: prometheus-client, text format 0.0.4.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

# `<name>_created` series would double every counter and histogram in the text format; no
# dashboard of ours uses them (process_start_time_seconds tells the start): off, process-wide.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
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


# The classic name syntax: prometheus-client would also take (quoted) UTF-8 names.
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _check_names(name: str, labelnames: Sequence[str]) -> None:
    if not _NAME.match(name):
        raise ValueError(f"invalid metric name {name!r}")
    for label in labelnames:
        if not _LABEL.match(label):
            raise ValueError(f"invalid label name {label!r} for {name}")


def _le(text: str) -> float:
    return math.inf if text == "+Inf" else float(text)


class _Series:
    """One prometheus-client metric, or one labelled child of it, with reads by collect()."""

    def __init__(self, metric: Any, labelnames: tuple[str, ...], labels: Mapping[str, str]) -> None:
        self._metric = metric
        self._labelnames = labelnames
        self._labels = dict(labels)
        # What to record on, looked up once: the metric, its child, or None (labelled parent).
        self._recorder: Any = (
            metric.labels(**self._labels) if self._labels else None if labelnames else metric
        )

    def _target(self) -> Any:
        """The prometheus-client object to record on (ValueError for a labelled parent)."""
        if self._recorder is None:
            raise ValueError(f"metric has labels {list(self._labelnames)}: use .labels()")
        return self._recorder

    def _child_labels(self, labels: Mapping[str, str]) -> dict[str, str]:
        if self._labels:
            raise ValueError("labels() on a series that already has its labels")
        if set(labels) != set(self._labelnames):
            raise ValueError(f"metric takes labels {list(self._labelnames)}, got {sorted(labels)}")
        return {name: str(value) for name, value in labels.items()}

    def _samples(self, suffix: str) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of this series' samples named `<name><suffix>`."""
        self._target()  # the same refusal as a write to a labelled parent
        found: list[tuple[dict[str, str], float]] = []
        for family in self._metric.collect():
            for sample in family.samples:
                if sample.name != family.name + suffix:
                    continue
                if all(sample.labels.get(k) == v for k, v in self._labels.items()):
                    found.append((dict(sample.labels), float(sample.value)))
        return found

    def _one(self, suffix: str) -> float:
        samples = self._samples(suffix)
        return samples[0][1] if samples else 0.0


class Counter(_Series):
    """A monotonically increasing count; exposed as `<name>_total`."""

    def labels(self, **labels: str) -> Counter:
        """The series for these label values (created on first use)."""
        return Counter(self._metric, self._labelnames, self._child_labels(labels))

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` (>= 0; ValueError otherwise: counters never go down)."""
        self._target().inc(amount)

    def value(self) -> float:
        """The current value."""
        return self._one("_total")


class Gauge(_Series):
    """A value that goes up and down, or is sampled from a function at every read."""

    def labels(self, **labels: str) -> Gauge:
        """The series for these label values (created on first use)."""
        return Gauge(self._metric, self._labelnames, self._child_labels(labels))

    def set(self, value: float) -> None:
        """Set the value."""
        self._target().set(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount`."""
        self._target().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        """Subtract `amount`."""
        self._target().dec(amount)

    def set_function(self, function: Callable[[], float]) -> None:
        """Sample `function()` at every read; a function that raises reads as NaN.

        NaN rather than the exception: one broken probe must not fail the whole scrape.
        """

        def sample() -> float:
            try:
                return float(function())
            except Exception:
                return math.nan

        self._target().set_function(sample)

    def track_inprogress(self) -> AbstractContextManager[Any]:
        """+1 while the block runs."""
        tracker: AbstractContextManager[Any] = self._target().track_inprogress()
        return tracker

    def value(self) -> float:
        """The current value (NaN when the sampling function fails)."""
        return self._one("")


class Histogram(_Series):
    """Observations counted into fixed buckets; `_bucket{le=...}`, `_sum` and `_count`."""

    def labels(self, **labels: str) -> Histogram:
        """The series for these label values (created on first use)."""
        return Histogram(self._metric, self._labelnames, self._child_labels(labels))

    def observe(self, value: float) -> None:
        """Record one observation (e.g. a duration in seconds)."""
        self._target().observe(value)

    def time(self) -> AbstractContextManager[Any]:
        """Observe how long the block took, in seconds."""
        timer: AbstractContextManager[Any] = self._target().time()
        return timer

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """Cumulative (upper bound, count) pairs ending with +Inf, the sum and the count."""
        buckets = sorted(
            (_le(labels["le"]), int(value)) for labels, value in self._samples("_bucket")
        )
        return buckets, self._one("_sum"), int(self._one("_count"))


class MetricsRegistry:
    """The metrics of one service instance (its own CollectorRegistry), in registration order.

    `process=True` adds prometheus-client's process collector (RSS, virtual memory, open and
    max file descriptors, CPU seconds, start time) and platform collector (Python version).
    """

    def __init__(self, *, process: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """A new counter; `name` without `_total` (it is added)."""
        if name.endswith("_total"):
            raise ValueError(f"{name}: give the counter name without _total")
        _check_names(name, labelnames)
        metric = prometheus_client.Counter(
            name, documentation, list(labelnames), registry=self.registry
        )
        return Counter(metric, tuple(labelnames), {})

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        """A new gauge."""
        _check_names(name, labelnames)
        metric = prometheus_client.Gauge(
            name, documentation, list(labelnames), registry=self.registry
        )
        return Gauge(metric, tuple(labelnames), {})

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        """A new histogram with fixed buckets (seconds-scale latency buckets by default)."""
        _check_names(name, labelnames)
        metric = prometheus_client.Histogram(
            name, documentation, list(labelnames), registry=self.registry, buckets=list(buckets)
        )
        return Histogram(metric, tuple(labelnames), {})

    def render(self) -> str:
        """Every metric in the Prometheus text exposition format 0.0.4."""
        return generate_latest(self.registry).decode("utf-8")


IMPORT_PREFIX = "dicomadapter_import_"
EXPORT_PREFIX = "dicomadapter_export_"

# The Java adapter's Cloud Monitoring events (custom.googleapis.com/dicomadapter/<service>/<e>).
IMPORT_EVENTS: tuple[str, ...] = (
    "started",
    "cstore_requests",
    "cstore_errors",
    "cstore_backup_errors",
    "cstore_bytes",
    "cfind_requests",
    "cfind_errors",
    "cfind_cancels",
    "cfind_qidors_requests",
    "cfind_qidors_errors",
    "cmove_requests",
    "cmove_errors",
    "cmove_warnings",
    "cmove_cancels",
    "cmove_qidors_requests",
    "cmove_qidors_errors",
    "cmove_cstore_requests",
    "cmove_cstore_errors",
    "cmove_cstore_bytes",
    "commitment_requests",
    "commitment_errors",
    "commitment_qidors_errors",
)
EXPORT_EVENTS: tuple[str, ...] = ("started", "total_requests", "total_errors", "total_bytes")


@dataclass(frozen=True)
class RetrieveCounters:
    """One retrieve service's metrics (C-MOVE's `cmove_*` or C-GET's `cget_*`)."""

    requests: Counter
    errors: Counter
    warnings: Counter
    cancels: Counter
    qidors_requests: Counter
    qidors_errors: Counter
    cstore_requests: Counter
    cstore_errors: Counter
    cstore_bytes: Counter
    seconds: Histogram


class ImportMetrics:
    """dicom-import's metrics: the Java adapter's Cloud Monitoring names, plus latencies."""

    service = "import"

    def events(self) -> dict[str, Counter]:
        """The Java adapter's monitoring events and the counters that count them."""
        return {name: getattr(self, name) for name in IMPORT_EVENTS}

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
        self.cmove = RetrieveCounters(
            self.cmove_requests,
            self.cmove_errors,
            self.cmove_warnings,
            self.cmove_cancels,
            self.cmove_qidors_requests,
            self.cmove_qidors_errors,
            self.cmove_cstore_requests,
            self.cmove_cstore_errors,
            self.cmove_cstore_bytes,
            self.cmove_seconds,
        )
        # C-GET: counted like C-MOVE (Prometheus only: the Java adapter has no C-GET events)
        self.cget = RetrieveCounters(
            counter("cget_requests", "C-GET requests received."),
            counter("cget_errors", "C-GET requests answered with a final failure status."),
            counter(
                "cget_warnings",
                "C-GET requests answered with 0xB000 (some sub-operations failed or warned).",
            ),
            counter("cget_cancels", "C-GET requests cancelled by the peer."),
            counter("cget_qidors_requests", "QIDO-RS queries listing the instances of a C-GET."),
            counter("cget_qidors_errors", "QIDO-RS queries for C-GET that failed."),
            counter("cget_cstore_requests", "C-STORE sub-operations of C-GET attempted."),
            counter("cget_cstore_errors", "C-STORE sub-operations of C-GET that failed."),
            counter("cget_cstore_bytes", "Bytes of data sets delivered by C-GET sub-operations."),
            latency("cget_seconds", "C-GET handling time in seconds."),
        )


class ExportMetrics:
    """dicom-export's metrics: the Java adapter's Cloud Monitoring names, plus ours."""

    service = "export"

    def events(self) -> dict[str, Counter]:
        """The Java adapter's monitoring events and the counters that count them."""
        return {name: getattr(self, name) for name in EXPORT_EVENTS}

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
