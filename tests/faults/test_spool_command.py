"""`dicom-spool requeue` while dicom-import runs: a refused instance arrives once fixed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dicom_adapter.status import Status
from tests.rig import (
    Fault,
    FaultProxy,
    Importer,
    Orthanc,
    assert_all_in_orthanc,
    new_instances,
    queued,
    send,
    spool_args,
)
from tests.rig.poll import wait_until


def dicom_spool(*args: str) -> subprocess.CompletedProcess[str]:
    """The console command as an operator runs it (a separate process)."""
    return subprocess.run(
        [sys.executable, "-m", "dicom_adapter.spool.command", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def test_refused_instances_are_requeued_by_the_command_while_the_daemon_runs(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    location = f"--persistent_file_storage_location={spool}"
    instances = new_instances(tmp_path, 2)
    with (
        FaultProxy("127.0.0.1", orthanc.http_port) as proxy,
        Importer(
            proxy.url + "/dicom-web",
            *spool_args(spool, "--auto_ack_cstore"),
            log_dir=tmp_path / "logs",
        ) as importer,
    ):
        proxy.set(Fault.FORBIDDEN)
        assert send(importer, instances) == dict.fromkeys(instances, Status.SUCCESS)
        wait_until(
            lambda: len(list((spool / "failed").glob("*.json"))) == 2, 10.0, "2 reason files"
        )
        shown = dicom_spool("status", location)
        assert shown.returncode == 0, shown.stderr
        assert "failed: 2 instances" in shown.stdout and "HTTP 403" in shown.stdout
        note = json.loads(next((spool / "failed").glob("*.json")).read_text())
        study = note["study_instance_uid"]
        assert all(orthanc.find_instance(uid) is None for uid in instances)

        proxy.clear()  # the cause is fixed
        done = dicom_spool("requeue", location, f"--study_uid={study}")
        assert done.returncode == 0, done.stderr
        assert "requeued 2 instances" in done.stdout
        assert_all_in_orthanc(orthanc, instances)  # uploaded by the running daemon
        wait_until(lambda: not queued(spool), 5.0, "an empty queue/")
        assert not list((spool / "failed").iterdir())
        assert "failed: 0 instances" in dicom_spool("status", location).stdout
