"""A stalled Cloud Monitoring endpoint must not slow C-STOREs or the metrics endpoint.

The writes run on their own thread: while every CreateTimeSeries hangs, dcmsend's C-STOREs
are answered and stored, /metrics and /readyz answer; once the endpoint recovers, the counts
of the stalled period arrive (carried, not lost).
"""

from __future__ import annotations

import time
from pathlib import Path

from pydicom import dcmread

from tests.monitoring_server import MonitoringServer
from tests.rig import Importer, Orthanc, dcmsend, generate_ct_series, http_get, scrape_metrics

IMPORT = "custom.googleapis.com/dicomadapter/import/"
STALLED_WRITE = 12.0  # seconds a hung CreateTimeSeries holds its thread (the call's deadline)


def test_a_stalled_monitoring_endpoint_delays_no_c_store(orthanc: Orthanc, tmp_path: Path) -> None:
    files = generate_ct_series(tmp_path / "ct", 3, rows=16, cols=16, patient_id="STALLED")
    uids = [str(dcmread(f).SOPInstanceUID) for f in files]
    with MonitoringServer() as monitoring:
        monitoring.hold()
        with Importer(
            orthanc.dicomweb_url,
            "--monitoring_project_id=demo-project",
            "--monitoring_flush_interval=0.2",
            env={"MONITORING_EMULATOR_HOST": monitoring.host},
            log_dir=tmp_path / "logs",
        ) as importer:
            monitoring.wait_for(lambda s: s.held_calls >= 1)  # the write of `started` hangs
            started = time.monotonic()
            result = dcmsend("127.0.0.1", importer.port, importer.aet, files)
            elapsed = time.monotonic() - started
            assert result.returncode == 0, result.stderr[-2000:]
            # a write on the event loop would block every STOW-RS for the stalled call
            assert elapsed < STALLED_WRITE
            assert all(orthanc.find_instance(uid) for uid in uids)
            assert http_get(importer.metrics_url + "/readyz").status_code == 200
            prometheus = scrape_metrics(importer.metrics_url)
            assert prometheus["dicomadapter_import_cstore_requests_total"] == 3
            assert monitoring.totals() == {}
            monitoring.release()
            monitoring.wait_for(lambda s: s.totals().get(IMPORT + "cstore_requests") == 3)
            assert importer.stop() == 0
        assert monitoring.totals()[IMPORT + "started"] == 1
