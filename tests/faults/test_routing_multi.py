"""--send_to_all_matching_destinations (issue 10 points 1 and 5): each destination is delivered
and retried on its own, from one acknowledged spool entry; nothing acknowledged is lost.

dcmsend -> dicom-import (auto-ack) -> a DICOMweb destination (fault proxy -> Orthanc) and a
DIMSE destination (DCMTK storescp), both down at first; unmatched instances go to the default
--dicomweb_address (Orthanc, up).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_adapter.spool import command
from dicom_adapter.status import Status
from tests.rig import (
    DELIVERY_TIMEOUT,
    Fault,
    FaultProxy,
    Importer,
    Orthanc,
    StoreSCP,
    free_port,
    new_instances,
    send,
    spool_args,
)
from tests.rig.poll import wait_until

N_CT = 4
N_MG = 2
OUTAGE = 20.0  # seconds both destinations stay down (issue 10 point 5): many upload attempts each


def relabel_mg(instances: dict[str, Path]) -> None:
    for path in instances.values():
        ds = dcmread(path)
        ds.Modality = "MG"
        ds.save_as(path, enforce_file_format=True)


def queued(spool: Path, kind: str) -> list[Path]:
    """The instances waiting in the queue of the one destination whose id starts with kind."""
    [directory] = (spool / "dest").glob(f"{kind}-*")
    return sorted((directory / "queue").glob("*.dcm"))


def test_each_destination_retried_on_its_own_until_all_are_complete(
    orthanc: Orthanc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = tmp_path / "spool"
    ct = new_instances(tmp_path, N_CT)
    mg = new_instances(tmp_path, N_MG)
    relabel_mg(mg)
    scp_port = free_port()  # nothing listens there yet: the DIMSE destination is down
    with FaultProxy("127.0.0.1", orthanc.http_port) as proxy:
        routes = [
            {"filter": "Modality=CT", "dicomweb_destination": proxy.url + "/dicom-web"},
            {"filter": "Modality=CT", "name": "STORESCP", "host": "127.0.0.1", "port": scp_port},
        ]
        proxy.set(Fault.UNAVAILABLE)  # the DICOMweb destination is down too
        with Importer(
            orthanc.dicomweb_url,
            *spool_args(
                spool,
                "--auto_ack_cstore",
                "--send_to_all_matching_destinations",
                f"--destination_config_inline={json.dumps(routes)}",
                "--dimse_cmove_aet=ROUTER",
            ),
            log_dir=tmp_path / "logs",
        ) as importer:
            statuses = send(importer, {**ct, **mg})
            # the sender saw only successes: every instance is durable in the spool
            assert statuses == dict.fromkeys({**ct, **mg}, Status.SUCCESS)
            # unmatched (MG) -> the default address, which is up
            wait_until(
                lambda: all(orthanc.find_instance(uid) for uid in mg),
                DELIVERY_TIMEOUT,
                "the unmatched instances at --dicomweb_address",
            )
            # both stay down for more than two upload attempts of each (every DICOMweb attempt
            # gives up after --upstream_retry_deadline, every DIMSE one at once): nothing fails
            time.sleep(OUTAGE)
            assert len(queued(spool, "web")) == N_CT
            assert len(queued(spool, "dimse")) == N_CT
            assert not list(spool.glob("**/failed/*.dcm"))
            assert not any(orthanc.find_instance(uid) for uid in ct)

            command.main(["status", f"--persistent_file_storage_location={spool}"])
            shown = capsys.readouterr().out
            assert f"({proxy.url}/dicom-web/studies): queue {N_CT}, failed 0" in shown
            assert f"(STORESCP@127.0.0.1:{scp_port}): queue {N_CT}, failed 0" in shown

            # the DIMSE destination comes back: its queue drains, the DICOMweb one still waits
            with StoreSCP(tmp_path / "scp", aet="STORESCP", port=scp_port, fork=True) as scp:
                wait_until(lambda: scp.received_uids() >= set(ct), DELIVERY_TIMEOUT, "storescp")
                wait_until(lambda: not queued(spool, "dimse"), 5.0, "an empty DIMSE queue")
                assert len(queued(spool, "web")) == N_CT
                assert scp.received_uids() == set(ct)  # not the unmatched MG ones
                for received in scp.files():
                    stored = dcmread(received)
                    assert str(stored.file_meta.SourceApplicationEntityTitle).strip() == "ROUTER"
                    sent = dcmread(ct[str(stored.SOPInstanceUID)])
                    assert stored.PixelData == sent.PixelData
                    assert stored.PatientName == sent.PatientName

                # the DICOMweb destination comes back
                proxy.clear()
                wait_until(
                    lambda: all(orthanc.find_instance(uid) for uid in ct),
                    DELIVERY_TIMEOUT,
                    "the CT instances at the DICOMweb destination",
                )
                wait_until(lambda: not queued(spool, "web"), 5.0, "an empty DICOMweb queue")
            for uid, path in ct.items():
                orthanc_id = orthanc.find_instance(uid)
                assert orthanc_id is not None
                stored = dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
                assert stored.PixelData == dcmread(path).PixelData
    # every link is gone: nothing queued or failed anywhere, the received files were removed
    assert not list(spool.glob("**/queue/*.dcm"))
    assert not list(spool.glob("**/failed/*.dcm"))


def test_a_refusing_dimse_destination_fails_alone(orthanc: Orthanc, tmp_path: Path) -> None:
    """A peer that accepts only Implicit VR LE refuses an Explicit VR LE instance for good
    (0x0122 in negotiation, no transcoding): it lands in that destination's failed/ with a
    reason; the DICOMweb destination still gets it."""
    spool = tmp_path / "spool"
    instances = new_instances(tmp_path, 2)
    with StoreSCP(tmp_path / "scp", aet="IMPLICIT", accept="implicit", fork=True) as scp:
        routes = [
            {"filter": "", "name": "IMPLICIT", "host": "127.0.0.1", "port": scp.port},
            {"filter": "", "dicomweb_destination": orthanc.dicomweb_url},
        ]
        with Importer(
            f"http://127.0.0.1:{free_port()}/dicom-web",  # the default: never used here
            *spool_args(
                spool,
                "--auto_ack_cstore",
                "--send_to_all_matching_destinations",
                f"--destination_config_inline={json.dumps(routes)}",
            ),
            log_dir=tmp_path / "logs",
        ) as importer:
            assert send(importer, instances) == dict.fromkeys(instances, Status.SUCCESS)
            wait_until(
                lambda: all(orthanc.find_instance(uid) for uid in instances),
                DELIVERY_TIMEOUT,
                "the instances at the DICOMweb destination",
            )
            [dimse_dir] = (spool / "dest").glob("dimse-*")
            wait_until(
                lambda: len(list((dimse_dir / "failed").glob("*.dcm"))) == 2,
                DELIVERY_TIMEOUT,
                "both instances in the DIMSE destination's failed/",
            )
            assert scp.count() == 0
            for note in (dimse_dir / "failed").glob("*.json"):
                reason = json.loads(note.read_text())
                assert reason["dimse_status"] == "0x0122"
                assert "accepts no context" in reason["body_excerpt"]
                assert reason["attempts"] == 1  # permanent: not retried
    assert not list(spool.glob("**/queue/*.dcm"))
