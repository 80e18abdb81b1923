"""The durable spool (--persistent_file_storage_location): what was acknowledged is delivered.

Real processes: dcmsend -> dicom-import (subprocess) -> fault proxy or nothing -> Orthanc.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_adapter.status import Status
from tests.rig import (
    Fault,
    FaultProxy,
    Importer,
    Orthanc,
    RestartableOrthanc,
    assert_all_in_orthanc,
    assert_identical_in_orthanc,
    dcmtk_env,
    dcmtk_tool,
    free_port,
    http_get,
    new_instances,
    parse_dcmsend_debug,
    queued,
    scrape_metrics,
    send,
    spool_args,
)
from tests.rig.poll import wait_until

N = 12
OUTAGE = 3.5  # seconds the upstream answers 503: more than 2 x --upstream_retry_deadline


def test_auto_ack_while_upstream_unavailable_then_all_delivered(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """Upstream answers 503: the sender sees only successes; once it is back, all arrive."""
    spool = tmp_path / "spool"
    instances = new_instances(tmp_path, N)
    with (
        FaultProxy("127.0.0.1", orthanc.http_port) as proxy,
        Importer(
            proxy.url + "/dicom-web",
            *spool_args(spool, "--auto_ack_cstore"),
            log_dir=tmp_path / "logs",
        ) as importer,
    ):
        proxy.set(Fault.UNAVAILABLE)
        statuses = send(importer, instances)
        assert statuses == dict.fromkeys(instances, Status.SUCCESS)
        assert all(orthanc.find_instance(uid) is None for uid in instances)
        assert len(queued(spool)) == N  # durable, waiting for the upstream
        # the outage outlasts two upload attempts (each gives up after --upstream_retry_deadline)
        time.sleep(OUTAGE)
        assert len(queued(spool)) == N and not list((spool / "failed").iterdir())
        proxy.clear()
        assert_all_in_orthanc(orthanc, instances)
        wait_until(lambda: not queued(spool), 5.0, "an empty queue/")
        metrics = scrape_metrics(importer.metrics_url)
        assert metrics["dicomadapter_import_spool_depth"] == 0
        assert metrics["dicomadapter_import_cstore_backup_errors_total"] == 0


def test_kill_9_with_queued_instances_loses_nothing(orthanc: Orthanc, tmp_path: Path) -> None:
    """kill -9 while acknowledged instances wait (upstream down); a restart delivers them."""
    spool = tmp_path / "spool"
    instances = new_instances(tmp_path, N)
    nowhere = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens: connection refused
    first = Importer(nowhere, *spool_args(spool, "--auto_ack_cstore"), log_dir=tmp_path / "l1")
    with first:
        statuses = send(first, instances)
        assert statuses == dict.fromkeys(instances, Status.SUCCESS)
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert len(queued(spool)) == N
    assert all(orthanc.find_instance(uid) is None for uid in instances)
    with Importer(orthanc.dicomweb_url, *spool_args(spool), log_dir=tmp_path / "l2"):
        assert_all_in_orthanc(orthanc, instances)
        wait_until(lambda: not queued(spool), 5.0, "an empty queue/")


def test_permanently_refused_instance_lands_in_failed_with_its_reason(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """A 403 is not retried: failed/ holds the instance and a JSON reason; counted once."""
    spool = tmp_path / "spool"
    instances = new_instances(tmp_path, 1)
    [uid] = instances
    with (
        FaultProxy("127.0.0.1", orthanc.http_port) as proxy,
        Importer(
            proxy.url + "/dicom-web",
            *spool_args(spool, "--auto_ack_cstore"),
            log_dir=tmp_path / "logs",
        ) as importer,
    ):
        proxy.set(Fault.FORBIDDEN)
        assert send(importer, instances) == {uid: Status.SUCCESS}
        wait_until(lambda: bool(list((spool / "failed").glob("*.json"))), 10.0, "a reason file")
        [failed] = (spool / "failed").glob("*.dcm")
        [note] = (spool / "failed").glob("*.json")
        assert note.name == failed.name + ".json"
        assert dcmread(failed).SOPInstanceUID == uid
        reason = json.loads(note.read_text())
        assert reason["http_status"] == 403
        assert reason["sop_instance_uid"] == uid
        assert "forbidden" in reason["body_excerpt"]
        assert reason["attempts"] == 1
        assert not queued(spool)
        wait_until(
            lambda: (
                scrape_metrics(importer.metrics_url)[
                    "dicomadapter_import_cstore_backup_errors_total"
                ]
                == 1
            ),
            5.0,
            "cstore_backup_errors 1",
        )
        errors = [r for r in importer.log_records() if r.get("severity") == "ERROR"]
        assert ["not uploaded" in str(r["message"]) for r in errors] == [True], errors


def test_no_headroom_refuses_with_a700_and_is_not_ready(orthanc: Orthanc, tmp_path: Path) -> None:
    """Below the free-space headroom: 0xA700, nothing acknowledged or queued, /readyz 503."""
    spool = tmp_path / "spool"
    instances = new_instances(tmp_path, 3)
    with Importer(
        orthanc.dicomweb_url,
        *spool_args(spool, "--auto_ack_cstore", f"--spool_free_space_headroom={1 << 60}"),
        log_dir=tmp_path / "logs",
    ) as importer:
        assert send(importer, instances) == dict.fromkeys(instances, Status.OUT_OF_RESOURCES)
        assert not queued(spool)
        assert not list((spool / "incoming").rglob("*.dcm"))
        assert http_get(importer.metrics_url + "/readyz").status_code == 503
    assert all(orthanc.find_instance(uid) is None for uid in instances)


def test_kill_9_before_the_answer_in_synchronous_mode_loses_nothing(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """Without auto-ack the C-STORE waits for its STOW; a crash meanwhile keeps the instance."""
    spool = tmp_path / "spool"
    instances = new_instances(tmp_path, 1)
    [uid] = instances
    with FaultProxy("127.0.0.1", orthanc.http_port) as proxy:
        proxy.set(Fault.HANG)  # the STOW never answers: the C-STORE stays unanswered
        first = Importer(
            proxy.url + "/dicom-web",
            *spool_args(spool, "--cstore_answer_deadline=20", "--upstream_retry_deadline=15"),
            log_dir=tmp_path / "l1",
        )
        with first:
            sender = threading.Thread(target=send, args=(first, instances), daemon=True)
            sender.start()
            wait_until(lambda: len(queued(spool)) == 1, 10.0, "the instance in queue/")
            wait_until(lambda: len(proxy.log) > 0, 10.0, "its STOW at the upstream")
            assert first.stop(signal.SIGKILL) == -signal.SIGKILL
            sender.join(30)
    assert orthanc.find_instance(uid) is None
    with Importer(orthanc.dicomweb_url, *spool_args(spool), log_dir=tmp_path / "l2"):
        assert_all_in_orthanc(orthanc, instances)
        wait_until(lambda: not queued(spool), 5.0, "an empty queue/")


def test_synchronous_mode_with_a_spool_answers_after_the_stow(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """Without auto-ack: success only once stored, and the STOW's failure reaches the sender."""
    spool = tmp_path / "spool"
    stored, refused = new_instances(tmp_path, 2), new_instances(tmp_path, 1)
    with (
        FaultProxy("127.0.0.1", orthanc.http_port) as proxy,
        Importer(proxy.url + "/dicom-web", *spool_args(spool), log_dir=tmp_path / "l") as importer,
    ):
        assert send(importer, stored) == dict.fromkeys(stored, Status.SUCCESS)
        assert all(orthanc.find_instance(uid) is not None for uid in stored)
        proxy.set(Fault.FORBIDDEN)
        assert send(importer, refused) == dict.fromkeys(refused, Status.NOT_AUTHORIZED)
        assert not queued(spool)  # the sender was told; it owns the retry


KILLED_TRANSFER = 500
KILL_AFTER = 250  # answers the sender has read before the kill: mid-transfer


def test_kill_9_during_dcmsend_of_500_every_acknowledged_instance_arrives_unchanged(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """dcmsend of 500 instances, auto-ack; kill -9 mid-transfer while uploads are under way.

    The restart (same spool) delivers every instance whose success the sender read, with
    the data set bytes it sent (the file meta group is the receiver's own).
    """
    spool = tmp_path / "spool"
    instances = new_instances(tmp_path, KILLED_TRANSFER)
    first = Importer(
        orthanc.dicomweb_url,
        # one upload at a time: uploads lag behind receiving, so the kill leaves a backlog
        *spool_args(spool, "--auto_ack_cstore", "--spool_upload_concurrency=1"),
        log_dir=tmp_path / "l1",
    )
    with first:
        out = tmp_path / "dcmsend.log"
        with out.open("w") as log:
            sender = subprocess.Popen(
                [
                    dcmtk_tool("dcmsend"),
                    "-d",
                    "-aet",
                    "DCMSEND",
                    "-aec",
                    first.aet,
                    "127.0.0.1",
                    str(first.port),
                    *(str(p) for p in instances.values()),
                ],
                env=dcmtk_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_until(
                    lambda: out.read_text(errors="replace").count("C-STORE RSP") >= KILL_AFTER,
                    30.0,
                    f"{KILL_AFTER} answers",
                )
                assert first.stop(signal.SIGKILL) == -signal.SIGKILL
            finally:
                sender.wait(30)
    statuses = parse_dcmsend_debug(out.read_text(errors="replace"))
    acknowledged = {uid: p for uid, p in instances.items() if statuses.get(uid) == Status.SUCCESS}
    assert set(statuses.values()) == {Status.SUCCESS}, "only successes before the kill"
    assert KILL_AFTER <= len(acknowledged) < len(instances), "the kill came too late"
    with Importer(orthanc.dicomweb_url, *spool_args(spool), log_dir=tmp_path / "l2"):
        assert_identical_in_orthanc(orthanc, acknowledged)
        wait_until(lambda: not queued(spool), 10.0, "an empty queue/")
    assert not list((spool / "failed").iterdir())


OUTAGE_SECONDS = 30.0  # the scenario of issue 9: Orthanc stopped for 30 s
OUTAGE_INSTANCES = 200


def test_orthanc_stopped_30_s_while_200_instances_arrive_all_are_stored(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Orthanc's process is stopped (connections refused) for 30 s; 200 instances arrive in
    two batches meanwhile. The sender sees only successes; once Orthanc is back, all 200
    are stored unchanged, nothing in failed/."""
    spool = tmp_path / "spool"
    batches = [new_instances(tmp_path, OUTAGE_INSTANCES // 2) for _ in range(2)]
    with (
        RestartableOrthanc(workdir=tmp_path_factory.mktemp("orthanc-outage")) as upstream,
        Importer(
            upstream.dicomweb_url,
            *spool_args(spool, "--auto_ack_cstore"),
            log_dir=tmp_path / "logs",
        ) as importer,
    ):
        upstream.halt()
        stopped = time.monotonic()
        assert send(importer, batches[0]) == dict.fromkeys(batches[0], Status.SUCCESS)
        time.sleep(OUTAGE_SECONDS / 2)  # the scenario's timing, not a readiness wait
        assert send(importer, batches[1]) == dict.fromkeys(batches[1], Status.SUCCESS)
        assert len(queued(spool)) == OUTAGE_INSTANCES
        time.sleep(max(0.0, stopped + OUTAGE_SECONDS - time.monotonic()))
        assert len(queued(spool)) == OUTAGE_INSTANCES and not list((spool / "failed").iterdir())
        upstream.resume()
        assert_identical_in_orthanc(upstream, {**batches[0], **batches[1]})
        wait_until(lambda: not queued(spool), 10.0, "an empty queue/")
        metrics = scrape_metrics(importer.metrics_url)
        assert metrics["dicomadapter_import_spool_depth"] == 0
        assert metrics["dicomadapter_import_cstore_backup_errors_total"] == 0
