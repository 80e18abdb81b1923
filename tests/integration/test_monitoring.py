"""--monitoring_project_id end to end: dicom-import / dicom-export write Cloud Monitoring.

The services run as subprocesses with the real MetricServiceClient pointed at the fake
Monitoring gRPC server (MONITORING_EMULATOR_HOST) and at a fake GCE metadata server
(GCE_METADATA_HOST); a short --monitoring_flush_interval, and the tests poll the fake.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydicom import dcmread

from tests.monitoring_server import MetadataServer, MonitoringServer
from tests.pubsub_server import PubSubServer
from tests.rig import (
    Importer,
    LoggedProcess,
    Orthanc,
    StoreSCP,
    dcmsend,
    free_port,
    generate_ct_series,
    scrape_metrics,
)

PROJECT = "demo-project"
IMPORT = "custom.googleapis.com/dicomadapter/import/"
EXPORT = "custom.googleapis.com/dicomadapter/export/"
POD = {
    "ENV_POD_NAME": "dicom-import-5c8d7-x2x9q",
    "ENV_POD_NAMESPACE": "radiology",
    "ENV_CONTAINER_NAME": "dicom-import",
}
MONITORING_FLAGS = (f"--monitoring_project_id={PROJECT}", "--monitoring_flush_interval=0.2")


def test_cstores_reach_cloud_monitoring_on_the_k8s_container_resource(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """Also: the first two writes fail; logged once, the service carries on, nothing lost."""
    files = generate_ct_series(tmp_path / "ct", 3, rows=16, cols=16, patient_id="MONITORED")
    with (
        MonitoringServer() as monitoring,
        MetadataServer(cluster_name="gke-imaging", zone="us-central1-c") as metadata,
    ):
        env = {
            "MONITORING_EMULATOR_HOST": monitoring.host,
            "GCE_METADATA_HOST": metadata.host,
            **POD,
        }
        monitoring.fail_next(2)
        with Importer(
            orthanc.dicomweb_url, *MONITORING_FLAGS, env=env, log_dir=tmp_path / "logs"
        ) as importer:
            result = dcmsend("127.0.0.1", importer.port, importer.aet, files)
            assert result.returncode == 0, result.stderr
            monitoring.wait_for(lambda s: s.totals().get(IMPORT + "cstore_requests") == 3)
            prometheus = scrape_metrics(importer.metrics_url)
            assert importer.stop() == 0
        totals = monitoring.totals()
        points = monitoring.points()
        failures = [r for r in importer.log_records() if "write failed" in r["message"]]
    assert monitoring.failed_calls == 2
    assert [r["severity"] for r in failures] == ["WARNING"]
    # the same counters feed both: Cloud Monitoring's sums are Prometheus' values
    assert totals[IMPORT + "started"] == prometheus["dicomadapter_import_started_total"] == 1
    assert totals[IMPORT + "cstore_requests"] == 3
    assert prometheus["dicomadapter_import_cstore_requests_total"] == 3
    assert totals[IMPORT + "cstore_bytes"] == prometheus["dicomadapter_import_cstore_bytes_total"]
    assert totals[IMPORT + "cstore_bytes"] > sum(f.stat().st_size for f in files) / 2
    assert IMPORT + "cstore_errors" not in totals  # nothing failed: no point written
    assert {p.resource_type for p in points} == {"k8s_container"}
    assert points[0].resource_labels == {
        "project_id": PROJECT,
        "location": "us-central1-c",
        "cluster_name": "gke-imaging",
        "namespace_name": "radiology",
        "pod_name": "dicom-import-5c8d7-x2x9q",
        "container_name": "dicom-import",
    }


def test_exports_reach_cloud_monitoring_on_the_global_resource(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    files = generate_ct_series(tmp_path / "ct", 2, rows=16, cols=16, patient_id="EXPORTMON")
    assert dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, files).returncode == 0
    paths = []
    for f in files:
        ds = dcmread(f)
        paths.append(
            f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        )
    topic = f"projects/{PROJECT}/topics/instances"
    subscription = f"projects/{PROJECT}/subscriptions/monitored"
    with (
        MonitoringServer() as monitoring,
        PubSubServer() as pubsub,
        StoreSCP(tmp_path / "scp", aet="STORESCP") as scp,
    ):
        pubsub.create_topic(topic)
        pubsub.create_subscription(subscription, topic)
        metrics_port = free_port()
        args = [
            str(Path(sys.executable).with_name("dicom-export")),
            f"--metrics_port={metrics_port}",
            f"--dicomweb_addr={orthanc.dicomweb_url}",
            f"--project_id={PROJECT}",
            "--subscription_id=monitored",
            "--peer_dimse_aet=STORESCP",
            "--peer_dimse_ip=127.0.0.1",
            f"--peer_dimse_port={scp.port}",
            *MONITORING_FLAGS,
        ]
        env = {"PUBSUB_EMULATOR_HOST": pubsub.host, "MONITORING_EMULATOR_HOST": monitoring.host}
        with LoggedProcess(
            args, tmp_path / "export.log", ready="dicom-export pulling", env=env
        ) as exporter:
            for path in paths:
                pubsub.publish(topic, path.encode())
            monitoring.wait_for(lambda s: s.totals().get(EXPORT + "total_requests") == 2)
            prometheus = scrape_metrics(f"http://127.0.0.1:{metrics_port}")
            assert exporter.stop() == 0
        totals = monitoring.totals()
        points = monitoring.points()
    assert scp.count() == 2
    assert totals[EXPORT + "started"] == 1
    assert totals[EXPORT + "total_bytes"] == prometheus["dicomadapter_export_total_bytes_total"]
    assert EXPORT + "total_errors" not in totals
    assert {(p.resource_type, tuple(p.resource_labels.items())) for p in points} == {
        ("global", (("project_id", PROJECT),))
    }
