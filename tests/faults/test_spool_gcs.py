"""The gs://bucket/prefix spool against gcp-storage-emulator: the local spool's guarantees.

Real processes: dcmsend -> dicom-import (HOSTNAME = replica, STORAGE_EMULATOR_HOST) ->
fault proxy or nothing -> Orthanc; dicom-spool as an operator runs it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from pydicom import dcmread

from dicom_adapter.spool import command
from dicom_adapter.spool.gcs import RESCAN_SECONDS
from dicom_adapter.status import Status
from tests.gcs_emulator import StorageEmulator
from tests.rig import (
    Fault,
    FaultProxy,
    Importer,
    Orthanc,
    StoreSCP,
    assert_all_in_orthanc,
    free_port,
    new_instances,
    scrape_metrics,
    send,
    spool_args,
)
from tests.rig.poll import wait_until

PREFIX = "spool/import"


@pytest.fixture
def gcs(tmp_path: Path) -> Iterator[StorageEmulator]:
    with StorageEmulator(log_dir=tmp_path / "logs") as emulator:
        yield emulator


def location(gcs: StorageEmulator) -> str:
    return f"gs://{gcs.bucket}/{PREFIX}"


def replica(gcs: StorageEmulator, name: str, upstream: str, *extra: str, log_dir: Path) -> Importer:
    """dicom-import as pod `name` with the gs:// spool (and the local spool's fast retries)."""
    args = spool_args(Path("unused"), *extra)
    args[0] = f"--persistent_file_storage_location={location(gcs)}"
    scratch = log_dir.parent / f"tmp-{name}"  # TMPDIR: where C-STOREs are received
    scratch.mkdir(exist_ok=True)
    env = {**gcs.env, "HOSTNAME": name, "TMPDIR": str(scratch)}
    return Importer(upstream, *args, log_dir=log_dir, env=env)


def objects(gcs: StorageEmulator, name: str, area: str) -> list[str]:
    return [n.rsplit("/", 1)[-1] for n in gcs.names(f"{PREFIX}/{name}/{area}/")]


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def dicom_spool(gcs: StorageEmulator, name: str, *args: str) -> Ran:
    """The console command as run in pod `name` (in this process: a new one costs seconds)."""
    out, err = io.StringIO(), io.StringIO()
    env = {**gcs.env, "HOSTNAME": name}
    with (
        mock.patch.dict(os.environ, env),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        code = command.main([*args, f"--persistent_file_storage_location={location(gcs)}"])
    return Ran(code, out.getvalue(), err.getvalue())


def nowhere() -> str:
    """An upstream where nothing listens: every STOW fails with connection refused."""
    return f"http://127.0.0.1:{free_port()}/dicom-web"


def test_auto_ack_upstream_down_objects_then_all_delivered_and_prefix_empty(
    orthanc: Orthanc, gcs: StorageEmulator, tmp_path: Path
) -> None:
    """503 upstream: successes, one queue object each; upstream back: all stored, prefix empty."""
    instances = new_instances(tmp_path, 6)
    with (
        FaultProxy("127.0.0.1", orthanc.http_port) as proxy,
        replica(
            gcs, "pod-a", proxy.url + "/dicom-web", "--auto_ack_cstore", log_dir=tmp_path / "l"
        ) as importer,
    ):
        proxy.set(Fault.UNAVAILABLE)
        assert send(importer, instances) == dict.fromkeys(instances, Status.SUCCESS)
        queued = objects(gcs, "pod-a", "queue")
        assert sorted(name.split("-", 2)[2].removesuffix(".dcm") for name in queued) == sorted(
            instances
        )
        assert all(orthanc.find_instance(uid) is None for uid in instances)
        local = [p.name for p in (tmp_path / "tmp-pod-a").rglob("*.dcm")]
        # received files are removed once written; the downloads of the requests in flight
        # are released after each attempt (retried all along: a leak would pile up copies)
        assert all(name.startswith("cstore-gcs-") for name in local), local
        assert len(local) <= len(instances)
        assert scrape_metrics(importer.metrics_url)["dicomadapter_import_spool_depth"] == 6
        proxy.clear()
        assert_all_in_orthanc(orthanc, instances)
        wait_until(lambda: not gcs.names(f"{PREFIX}/"), 10.0, "an empty prefix")
        metrics = scrape_metrics(importer.metrics_url)
        assert metrics["dicomadapter_import_spool_depth"] == 0
        assert metrics["dicomadapter_import_cstore_backup_errors_total"] == 0


def test_kill_9_then_restart_replays_the_queue_objects(
    orthanc: Orthanc, gcs: StorageEmulator, tmp_path: Path
) -> None:
    instances = new_instances(tmp_path, 5)
    first = replica(gcs, "pod-a", nowhere(), "--auto_ack_cstore", log_dir=tmp_path / "l1")
    with first:
        assert send(first, instances) == dict.fromkeys(instances, Status.SUCCESS)
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert len(objects(gcs, "pod-a", "queue")) == 5
    later = new_instances(tmp_path, 1)
    with replica(gcs, "pod-a", orthanc.dicomweb_url, log_dir=tmp_path / "l2") as second:
        assert_all_in_orthanc(orthanc, instances)
        # synchronous mode (no --auto_ack_cstore): success once STOW-RS stored it
        assert send(second, later) == dict.fromkeys(later, Status.SUCCESS)
        assert all(orthanc.find_instance(uid) is not None for uid in later)
        wait_until(lambda: not gcs.names(f"{PREFIX}/"), 10.0, "an empty prefix")


def test_failed_object_write_answers_a700(gcs: StorageEmulator, tmp_path: Path) -> None:
    """Cloud Storage unreachable: nothing is acknowledged, nothing left on the local disk."""
    instances = new_instances(tmp_path, 1)
    with replica(gcs, "pod-a", nowhere(), "--auto_ack_cstore", log_dir=tmp_path / "l") as pod:
        gcs.stop()
        assert send(pod, instances) == dict.fromkeys(instances, Status.OUT_OF_RESOURCES)
        assert not list((tmp_path / "tmp-pod-a").rglob("*.dcm"))


def test_replicas_keep_to_their_prefix_and_adopt_takes_over_a_gone_one(
    orthanc: Orthanc, gcs: StorageEmulator, tmp_path: Path
) -> None:
    """pod-b never uploads pod-a's items; once pod-a is gone, adopt hands them to pod-b."""
    of_a, of_b = new_instances(tmp_path, 3), new_instances(tmp_path, 3)
    pod_a = replica(gcs, "pod-a", nowhere(), "--auto_ack_cstore", log_dir=tmp_path / "la")
    with (
        pod_a,
        replica(
            gcs, "pod-b", orthanc.dicomweb_url, "--auto_ack_cstore", log_dir=tmp_path / "lb"
        ) as pod_b,
    ):
        assert send(pod_a, of_a) == dict.fromkeys(of_a, Status.SUCCESS)
        assert send(pod_b, of_b) == dict.fromkeys(of_b, Status.SUCCESS)
        assert_all_in_orthanc(orthanc, of_b)
        time.sleep(1.2 * RESCAN_SECONDS)  # pod-b lists its queue/ again meanwhile
        assert len(objects(gcs, "pod-a", "queue")) == 3
        assert all(orthanc.find_instance(uid) is None for uid in of_a)
        shown = dicom_spool(gcs, "pod-b", "status")
        assert shown.returncode == 0, shown.stderr
        assert "replica pod-a: queue 3, failed 0" in shown.stdout

        assert pod_a.stop(signal.SIGKILL) == -signal.SIGKILL  # the pod is gone
        done = dicom_spool(gcs, "pod-b", "adopt", "--from_replica=pod-a")
        assert done.returncode == 0, done.stderr
        assert "adopted 3 queued and 0 failed instances of replica pod-a" in done.stdout
        assert not objects(gcs, "pod-a", "queue")
        assert_all_in_orthanc(orthanc, of_a)  # uploaded by the running pod-b
        wait_until(lambda: not gcs.names(f"{PREFIX}/"), 10.0, "an empty prefix")


def test_refused_instance_lands_in_failed_with_its_reason_and_is_requeued(
    orthanc: Orthanc, gcs: StorageEmulator, tmp_path: Path
) -> None:
    instances = new_instances(tmp_path, 1)
    [uid] = instances
    with (
        FaultProxy("127.0.0.1", orthanc.http_port) as proxy,
        replica(
            gcs, "pod-a", proxy.url + "/dicom-web", "--auto_ack_cstore", log_dir=tmp_path / "l"
        ) as importer,
    ):
        proxy.set(Fault.FORBIDDEN)
        assert send(importer, instances) == {uid: Status.SUCCESS}
        wait_until(
            lambda: len(objects(gcs, "pod-a", "failed")) == 2, 10.0, "failed/ item and reason"
        )
        name, note = sorted(objects(gcs, "pod-a", "failed"))
        assert note == name + ".json"
        bucket = gcs.client()
        failed = bucket.blob(f"{PREFIX}/pod-a/failed/{name}").download_as_bytes()
        assert dcmread(io.BytesIO(failed)) == dcmread(instances[uid])
        reason = json.loads(bucket.blob(f"{PREFIX}/pod-a/failed/{note}").download_as_bytes())
        assert reason["http_status"] == 403
        assert reason["sop_instance_uid"] == uid
        assert reason["attempts"] == 1
        assert reason["study_instance_uid"] == dcmread(instances[uid]).StudyInstanceUID
        assert "forbidden" in reason["body_excerpt"]
        assert not objects(gcs, "pod-a", "queue")
        shown = dicom_spool(gcs, "pod-a", "status")
        assert "failed: 1 instances" in shown.stdout and "HTTP 403" in shown.stdout, shown

        proxy.clear()
        done = dicom_spool(gcs, "pod-a", "requeue", f"--study_uid={reason['study_instance_uid']}")
        assert "requeued 1 instances" in done.stdout, done
        assert_all_in_orthanc(orthanc, instances)
        wait_until(lambda: not gcs.names(f"{PREFIX}/"), 10.0, "an empty prefix")


def test_routing_with_a_gs_spool_queues_per_destination_and_survives_a_restart(
    orthanc: Orthanc, gcs: StorageEmulator, tmp_path: Path
) -> None:
    """MG to a DIMSE destination (down at first), CT to the default: each in its own prefix;
    after kill -9 and a restart WITHOUT the rules, the recorded destination still gets its
    queue; in the end every prefix is empty."""
    ct = new_instances(tmp_path, 3)
    mg = new_instances(tmp_path, 2)
    for path in mg.values():
        ds = dcmread(path)
        ds.Modality = "MG"
        ds.save_as(path, enforce_file_format=True)
    scp_port = free_port()
    routes = [{"filter": "Modality=MG", "name": "STORESCP", "host": "127.0.0.1", "port": scp_port}]
    rules = [
        "--auto_ack_cstore",
        "--send_to_all_matching_destinations",
        f"--destination_config_inline={json.dumps(routes)}",
    ]
    first = replica(gcs, "pod-r", orthanc.dicomweb_url, *rules, log_dir=tmp_path / "l1")
    with first:
        assert send(first, {**ct, **mg}) == dict.fromkeys({**ct, **mg}, Status.SUCCESS)
        assert_all_in_orthanc(orthanc, ct)  # no rule matched: the default address
        [dest_id] = gcs_folders(gcs, f"{PREFIX}/pod-r/dest/")
        queued = objects(gcs, "pod-r", f"dest/{dest_id}/queue")
        assert sorted(n.split("-", 2)[2].removesuffix(".dcm") for n in queued) == sorted(mg)
        assert first.proc is not None
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
    second = replica(
        gcs, "pod-r", orthanc.dicomweb_url, "--auto_ack_cstore", log_dir=tmp_path / "l2"
    )
    with second, StoreSCP(tmp_path / "scp", aet="STORESCP", port=scp_port, fork=True) as scp:
        wait_until(lambda: scp.received_uids() == set(mg), 30.0, "the MG instances at storescp")
        wait_until(
            lambda: not objects(gcs, "pod-r", f"dest/{dest_id}/queue"), 10.0, "empty dest queue"
        )
        assert "no longer configured" in second.log_text()
    assert not [n for n in gcs.names(f"{PREFIX}/") if "/queue/" in n or "/failed/" in n]
    assert all(orthanc.find_instance(uid) is None for uid in mg)  # routed away, not default


def gcs_folders(gcs: StorageEmulator, prefix: str) -> list[str]:
    """The 'directories' right under a prefix."""
    return sorted({n[len(prefix) :].split("/", 1)[0] for n in gcs.names(prefix)})
