"""Cloud Monitoring export: the real MetricServiceClient against a fake gRPC server."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from tests.monitoring_server import MetadataServer, MonitoringServer

from dicom_adapter.config.exporter import ExporterSettings
from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.config.parse import parse_settings
from dicom_adapter.errors import ConfigError
from dicom_adapter.observability.cloud_monitoring import EMULATOR_ENV, MonitoringExporter
from dicom_adapter.observability.metrics import (
    EXPORT_EVENTS,
    IMPORT_EVENTS,
    ExportMetrics,
    ImportMetrics,
    MetricsRegistry,
)

PROJECT = "demo-project"
IMPORT = "custom.googleapis.com/dicomadapter/import/"
GAUGE, INT64 = 1, 2  # google.api.MetricDescriptor.MetricKind / ValueType
POD = {
    "ENV_POD_NAME": "dicom-import-7d9f-abcde",
    "ENV_POD_NAMESPACE": "imaging",
    "ENV_CONTAINER_NAME": "dicom-import",
}


@pytest.fixture
def server() -> Iterator[MonitoringServer]:
    with MonitoringServer() as fake:
        yield fake


def exporter(
    server: MonitoringServer,
    metrics: ImportMetrics | ExportMetrics,
    interval: float = 3600.0,
    environ: dict[str, str] | None = None,
) -> MonitoringExporter:
    env = {EMULATOR_ENV: server.host, **(environ or {})}
    return MonitoringExporter(PROJECT, metrics.service, metrics.events(), env, interval=interval)


def test_every_java_event_is_exported() -> None:
    registry = MetricsRegistry()
    assert list(ImportMetrics(registry).events()) == list(IMPORT_EVENTS)
    assert list(ExportMetrics(registry).events()) == list(EXPORT_EVENTS)
    assert len(IMPORT_EVENTS) == 22


def test_counts_since_the_last_write_go_out_as_java_gauges_on_the_global_resource(
    server: MonitoringServer,
) -> None:
    metrics = ImportMetrics(MetricsRegistry())
    monitoring = exporter(server, metrics, interval=0.05)
    monitoring.start()
    try:
        for _ in range(3):
            metrics.cstore_requests.inc()
        metrics.cstore_bytes.inc(1000)
        metrics.cstore_errors.inc()
        server.wait_for(lambda s: s.totals().get(IMPORT + "cstore_requests") == 3)
        metrics.cstore_requests.inc(2)
        server.wait_for(lambda s: s.totals().get(IMPORT + "cstore_requests") == 5)
    finally:
        monitoring.stop()
    assert server.totals() == {
        IMPORT + "cstore_requests": 5,
        IMPORT + "cstore_bytes": 1000,
        IMPORT + "cstore_errors": 1,
    }
    points = server.points()
    assert {p.project for p in points} == {f"projects/{PROJECT}"}
    assert {(p.metric_kind, p.value_type) for p in points} == {(GAUGE, INT64)}
    assert {p.resource_type for p in points} == {"global"}
    assert all(p.resource_labels == {"project_id": PROJECT} for p in points)
    # a count since the last write, not a running total: 3 then 2, never 5
    requests = [p.value for p in points if p.metric_type == IMPORT + "cstore_requests"]
    assert sorted(requests) == [2, 3]
    # one call per period holds every event that changed in it; idle periods make no call
    assert all(
        len(r.time_series) == len({s.metric.type for s in r.time_series}) for r in server.requests
    )
    assert len(server.requests) <= 3


def test_k8s_container_resource_from_the_pod_variables_and_the_metadata_server(
    server: MonitoringServer,
) -> None:
    metrics = ExportMetrics(MetricsRegistry())
    with MetadataServer(cluster_name="imaging-cluster", zone="europe-west4-b") as metadata:
        monitoring = exporter(server, metrics, environ={"GCE_METADATA_HOST": metadata.host, **POD})
        metrics.started.inc()
        metrics.total_requests.inc(4)
        assert monitoring.flush()
    assert {p.resource_type for p in server.points()} == {"k8s_container"}
    assert server.points()[0].resource_labels == {
        "project_id": PROJECT,
        "location": "europe-west4-b",
        "cluster_name": "imaging-cluster",
        "namespace_name": "imaging",
        "pod_name": "dicom-import-7d9f-abcde",
        "container_name": "dicom-import",
    }
    assert server.totals() == {
        "custom.googleapis.com/dicomadapter/export/started": 1,
        "custom.googleapis.com/dicomadapter/export/total_requests": 4,
    }


@pytest.mark.parametrize(
    ("answers", "environ"),
    [
        pytest.param({"zone": "us-central1-a"}, POD, id="no-cluster-name"),
        pytest.param({"cluster_name": "c"}, POD, id="no-zone"),
        pytest.param(
            {"cluster_name": "c", "zone": "us-central1-a"},
            {k: v for k, v in POD.items() if k != "ENV_CONTAINER_NAME"},
            id="no-container-name",
        ),
    ],
)
def test_global_resource_unless_pod_and_cluster_are_all_known(
    server: MonitoringServer, answers: dict[str, str], environ: dict[str, str]
) -> None:
    metrics = ImportMetrics(MetricsRegistry())
    with MetadataServer(**answers) as metadata:
        monitoring = exporter(
            server, metrics, environ={"GCE_METADATA_HOST": metadata.host, **environ}
        )
        metrics.started.inc()
        assert monitoring.flush()
    [point] = server.points()
    assert (point.resource_type, point.resource_labels) == ("global", {"project_id": PROJECT})


def test_failed_writes_are_logged_once_and_their_counts_carried(
    server: MonitoringServer, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = ImportMetrics(MetricsRegistry())
    monitoring = exporter(server, metrics)
    server.fail_next(3)
    caplog.set_level(logging.INFO, logger="dicom_adapter.observability.cloud_monitoring")
    metrics.cfind_requests.inc(2)
    assert not monitoring.flush()
    metrics.cfind_requests.inc()
    assert not monitoring.flush()
    assert not monitoring.flush()
    metrics.cfind_requests.inc()
    assert monitoring.flush()
    assert server.failed_calls == 3
    [point] = server.points()  # everything the failed writes held, in the next one
    assert (point.metric_type, point.value) == (IMPORT + "cfind_requests", 4)
    failed = [r for r in caplog.records if "write failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING
    assert sum("succeed again" in r.getMessage() for r in caplog.records) == 1
    server.fail_next(1)
    metrics.cfind_requests.inc()
    assert not monitoring.flush()  # a new streak is logged again
    assert sum("write failed" in r.getMessage() for r in caplog.records) == 2


def test_an_unreachable_endpoint_does_not_stop_the_exporter(server: MonitoringServer) -> None:
    metrics = ImportMetrics(MetricsRegistry())
    port = server.port
    server.stop()
    monitoring = MonitoringExporter(
        PROJECT,
        "import",
        metrics.events(),
        {EMULATOR_ENV: f"127.0.0.1:{port}"},
        interval=3600,
    )
    metrics.started.inc()
    assert not monitoring.flush()


def test_stop_writes_what_the_last_period_counted(server: MonitoringServer) -> None:
    metrics = ImportMetrics(MetricsRegistry())
    monitoring = exporter(server, metrics, interval=3600)  # no periodic write in this test
    monitoring.start()
    metrics.cmove_requests.inc()
    metrics.cmove_cstore_bytes.inc(512)
    monitoring.stop()
    assert server.totals() == {IMPORT + "cmove_requests": 1, IMPORT + "cmove_cstore_bytes": 512}


@pytest.mark.parametrize(
    ("model", "base"),
    [
        (ImporterSettings, ["--dimse_aet=A", "--dicomweb_address=http://h/dicom-web"]),
        (
            ExporterSettings,
            [
                "--dicomweb_addr=http://h/dicom-web",
                "--project_id=p",
                "--subscription_id=s",
                "--peer_dimse_aet=B",
                "--peer_dimse_ip=127.0.0.1",
                "--peer_dimse_port=104",
            ],
        ),
    ],
    ids=["import", "export"],
)
def test_both_services_take_the_monitoring_flags(
    model: type[ImporterSettings] | type[ExporterSettings], base: list[str]
) -> None:
    flags = [*base, f"--monitoring_project_id={PROJECT}", "--monitoring_flush_interval=15"]
    settings = parse_settings(model, flags, prog="x", description="x", environ={})
    assert (settings.monitoring_project_id, settings.monitoring_flush_interval) == (PROJECT, 15)
    with pytest.raises(ConfigError) as error:
        parse_settings(
            model, [*base, "--monitoring_flush_interval=0"], prog="x", description="x", environ={}
        )
    assert error.value.flag == "monitoring_flush_interval"
