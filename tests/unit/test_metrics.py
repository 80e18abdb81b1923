"""Unit tests for the metrics registry (prometheus-client) and its text exposition (0.0.4)."""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import pytest
from tests.rig import parse_metrics

from dicom_adapter.observability.metrics import (
    LATENCY_BUCKETS,
    ExportMetrics,
    ImportMetrics,
    MetricsRegistry,
)


def test_small_registry_renders_exactly() -> None:
    registry = MetricsRegistry()
    requests = registry.counter("app_requests", "Requests handled.")
    by_status = registry.counter("app_answers", "Answers by status.", ["status"])
    open_now = registry.gauge("app_open", "Open connections.")
    latency = registry.histogram("app_seconds", "Latency.", buckets=[0.1, 1.0])
    requests.inc()
    requests.inc(2)
    by_status.labels(status="0xA700").inc()
    open_now.set(3)
    open_now.dec()
    latency.observe(0.05)
    latency.observe(0.1)  # le is inclusive
    latency.observe(0.5)
    latency.observe(7.0)

    assert registry.render() == (
        "# HELP app_requests_total Requests handled.\n"
        "# TYPE app_requests_total counter\n"
        "app_requests_total 3.0\n"
        "# HELP app_answers_total Answers by status.\n"
        "# TYPE app_answers_total counter\n"
        'app_answers_total{status="0xA700"} 1.0\n'
        "# HELP app_open Open connections.\n"
        "# TYPE app_open gauge\n"
        "app_open 2.0\n"
        "# HELP app_seconds Latency.\n"
        "# TYPE app_seconds histogram\n"
        'app_seconds_bucket{le="0.1"} 2.0\n'
        'app_seconds_bucket{le="1.0"} 3.0\n'
        'app_seconds_bucket{le="+Inf"} 4.0\n'
        "app_seconds_count 4.0\n"
        "app_seconds_sum 7.65\n"
    )


def test_empty_registry_renders_nothing() -> None:
    assert MetricsRegistry().render() == ""


def test_labelled_metric_without_children_renders_only_its_header() -> None:
    registry = MetricsRegistry()
    registry.counter("x", "X.", ["peer"])
    assert registry.render() == "# HELP x_total X.\n# TYPE x_total counter\n"


def test_histogram_buckets_are_cumulative_with_labels() -> None:
    registry = MetricsRegistry()
    latency = registry.histogram("op_seconds", "Op.", ["op"], buckets=[1, 2, 3])
    for value in (0.5, 1.5, 1.7, 2.5, 2.9, 2.95, 10):
        latency.labels(op="find").observe(value)
    buckets, total, count = latency.labels(op="find").snapshot()
    assert buckets == [(1.0, 1), (2.0, 3), (3.0, 6), (math.inf, 7)]
    assert count == 7
    assert total == pytest.approx(22.05)
    text = registry.render()
    samples = parse_metrics(text)
    assert samples['op_seconds_bucket{le="1.0",op="find"}'] == 1
    assert samples['op_seconds_bucket{le="2.0",op="find"}'] == 3
    assert samples['op_seconds_bucket{le="3.0",op="find"}'] == 6
    assert samples['op_seconds_bucket{le="+Inf",op="find"}'] == 7
    assert samples['op_seconds_count{op="find"}'] == 7
    counts = [float(n) for n in re.findall(r"_bucket\{[^}]*\} (\S+)", text)]
    assert counts == sorted(counts)


def test_default_buckets_suit_latencies_in_seconds() -> None:
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    assert LATENCY_BUCKETS[0] <= 0.005
    assert LATENCY_BUCKETS[-1] >= 120


def test_label_values_and_help_are_escaped() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("esc", 'Help with \\ and\nnewline and "quotes".', ["aet"])
    counter.labels(aet='A"B\\C\nD').inc()
    assert registry.render() == (
        '# HELP esc_total Help with \\\\ and\\nnewline and "quotes".\n'
        "# TYPE esc_total counter\n"
        'esc_total{aet="A\\"B\\\\C\\nD"} 1.0\n'
    )


def test_gauge_function_is_sampled_at_render_and_failures_are_nan() -> None:
    registry = MetricsRegistry()
    gauge = registry.gauge("depth", "Depth.")
    depth = [5]
    gauge.set_function(lambda: depth[0])
    assert "depth 5.0\n" in registry.render()
    depth[0] = 7
    assert gauge.value() == 7

    def broken() -> float:
        raise RuntimeError("gone")

    gauge.set_function(broken)
    assert "depth NaN\n" in registry.render()


def test_gauge_tracks_in_progress() -> None:
    gauge = MetricsRegistry().gauge("busy", "Busy.")
    with gauge.track_inprogress():
        assert gauge.value() == 1
    assert gauge.value() == 0


def test_histogram_time_observes_duration() -> None:
    histogram = MetricsRegistry().histogram("t", "T.")
    with histogram.time():
        pass
    _, total, count = histogram.snapshot()
    assert count == 1
    assert 0 <= total < 1


def test_misuse_is_refused() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("c", "C.")
    with pytest.raises(ValueError):
        counter.inc(-1)
    with pytest.raises(ValueError):
        registry.counter("c", "again")
    with pytest.raises(ValueError):
        registry.counter("bad name", "B.")
    with pytest.raises(ValueError):
        registry.counter("c_total", "already suffixed")
    with pytest.raises(ValueError):
        registry.histogram("h", "H.", buckets=[2, 1])
    with pytest.raises(ValueError):
        registry.histogram("h2", "H.", ["le"])
    labelled = registry.counter("l", "L.", ["a"])
    with pytest.raises(ValueError):
        labelled.inc()
    with pytest.raises(ValueError):
        labelled.labels(b="x")


def test_concurrent_recording_loses_nothing() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("hits", "Hits.")
    labelled = registry.counter("by_thread", "By thread.", ["thread"])
    gauge = registry.gauge("level", "Level.")
    histogram = registry.histogram("lat", "Lat.")
    threads, per_thread = 8, 5000
    start = threading.Barrier(threads + 1)

    def work(n: int) -> None:
        start.wait()
        for i in range(per_thread):
            counter.inc()
            labelled.labels(thread=str(n % 2)).inc()
            gauge.inc()
            gauge.dec()
            histogram.observe(i / per_thread)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    while any(w.is_alive() for w in workers):
        registry.render()  # scraping while recording must not break either
    for worker in workers:
        worker.join()
    total = threads * per_thread
    assert counter.value() == total
    assert labelled.labels(thread="0").value() + labelled.labels(thread="1").value() == total
    assert gauge.value() == 0
    assert histogram.snapshot()[2] == total
    assert parse_metrics(registry.render())["hits_total"] == total


def test_import_and_export_metric_names() -> None:
    registry = MetricsRegistry()
    ImportMetrics(registry)
    ExportMetrics(registry)
    text = registry.render()
    names = set(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    java_import = [
        "started",
        "cstore_requests",
        "cstore_errors",
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
        "cstore_backup_errors",
    ]
    java_export = ["started", "total_requests", "total_errors", "total_bytes"]
    expected = {(f"dicomadapter_import_{n}_total", "counter") for n in java_import}
    expected |= {(f"dicomadapter_export_{n}_total", "counter") for n in java_export}
    expected |= {
        ("dicomadapter_import_associations", "gauge"),
        ("dicomadapter_import_pending_associations", "gauge"),
        ("dicomadapter_import_pending_dropped_total", "counter"),
        ("dicomadapter_import_cstore_seconds", "histogram"),
        ("dicomadapter_import_cfind_seconds", "histogram"),
        ("dicomadapter_import_cmove_seconds", "histogram"),
        ("dicomadapter_import_spool_depth", "gauge"),
        ("dicomadapter_import_spool_oldest_age_seconds", "gauge"),
        ("dicomadapter_export_permanent_failures_total", "counter"),
        ("dicomadapter_export_transient_failures_total", "counter"),
        ("dicomadapter_export_in_flight", "gauge"),
        ("dicomadapter_export_seconds", "histogram"),
        ("dicomadapter_export_attempts_total", "counter"),
        ("dicomadapter_export_breaker_open", "gauge"),
    }
    cget = ["requests", "errors", "warnings", "cancels", "qidors_requests", "qidors_errors"]
    cget += ["cstore_requests", "cstore_errors", "cstore_bytes"]
    expected |= {(f"dicomadapter_import_cget_{n}_total", "counter") for n in cget}
    expected.add(("dicomadapter_import_cget_seconds", "histogram"))
    assert names == expected


def exposed_types(registry: MetricsRegistry) -> set[tuple[str, str]]:
    """(name, type) of every metric family the registry renders."""
    return set(re.findall(r"^# TYPE (\S+) (\S+)$", registry.render(), re.MULTILINE))


def test_readme_metric_tables_list_exactly_what_the_services_serve() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Metrics and health\n", 1)[1].split("\n## ", 1)[0]
    documented = set(
        re.findall(r"^\| `([a-z_:]+)` \| (counter|gauge|histogram) \|", section, re.MULTILINE)
    )
    import_registry, export_registry = MetricsRegistry(process=True), MetricsRegistry(process=True)
    ImportMetrics(import_registry)
    ExportMetrics(export_registry)
    served = exposed_types(import_registry) | exposed_types(export_registry)
    assert ("process_resident_memory_bytes", "gauge") in served
    assert ("process_open_fds", "gauge") in served
    assert ("process_cpu_seconds_total", "counter") in served
    assert documented == served


def test_service_registries_are_independent() -> None:
    first, second = ImportMetrics(MetricsRegistry()), ImportMetrics(MetricsRegistry())
    first.cstore_requests.inc(3)
    assert (first.cstore_requests.value(), second.cstore_requests.value()) == (3, 0)
