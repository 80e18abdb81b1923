"""Redaction end to end (issue 10 point 2): dcmsend -> dicom-import (CHC_BASIC) -> Orthanc.

What Orthanc stores has every CHC_BASIC attribute empty at every depth and the UIDs of the Java
formula; with the durable spool (auto-ack) the spooled file itself is the redacted one.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_adapter.dicom.redact import chc_basic_tags, java_uid
from tests.rig import (
    Orthanc,
    StartImporter,
    dcmsend,
    free_port,
    generate_ct_series,
    send_file,
    wait_until,
)

CHC_BASIC_FLAG = "--redact_filter_profile=CHC_BASIC"
CANNOT_UNDERSTAND = 0xC000
DELIVERY_TIMEOUT = 30.0
PHI = ("PatientName", "PatientID", "PatientBirthDate", "ReferringPhysicianName", "StudyDate")


def _with_nested_phi(folder: Path, tag: str, count: int = 3) -> list[Dataset]:
    """Small CTs whose PatientName etc. also sit in sequence items at depth 2 and 3."""
    paths = generate_ct_series(folder, count, rows=16, cols=16, patient_id=f"RED-{tag}")
    originals: list[Dataset] = []
    for path in paths:
        ds = dcmread(path)
        inner = Dataset()
        inner.PatientName = "Depth^Three"
        inner.CodeMeaning = "not on the list"
        middle = Dataset()
        middle.PatientName = "Depth^Two"
        middle.PatientID = "NESTED"
        middle.ConceptNameCodeSequence = Sequence([inner])
        ds.AnatomicRegionSequence = Sequence([middle])
        reference = Dataset()
        reference.SeriesInstanceUID = ds.SeriesInstanceUID
        reference.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        ds.ReferencedSeriesSequence = Sequence([reference])
        ds.PatientBirthDate = "19700101"
        ds.ReferringPhysicianName = "Referring^Doctor"
        ds.save_as(path, enforce_file_format=True)
        originals.append(ds)
    return originals


def _datasets(ds: Dataset) -> list[Dataset]:
    """`ds` and every sequence item in it, at any depth."""
    found = [ds]
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                found.extend(_datasets(item))
    return found


def _assert_redacted(stored: Dataset, original: Dataset) -> None:
    """CHC_BASIC attributes empty at every depth (present, zero length); Java-formula UIDs."""
    listed = chc_basic_tags()
    for ds in _datasets(stored):
        for element in ds:
            if int(element.tag) in listed:
                assert element.is_empty, f"{element.keyword} kept a value"
    assert stored.PatientName == "" and stored.PatientID == ""
    middle = stored.AnatomicRegionSequence[0]
    assert "PatientName" in middle and middle.PatientName == ""
    inner = middle.ConceptNameCodeSequence[0]
    assert "PatientName" in inner and inner.PatientName == ""
    assert inner.CodeMeaning == "not on the list"
    assert stored.SOPInstanceUID == java_uid(original.SOPInstanceUID)
    assert stored.file_meta.MediaStorageSOPInstanceUID == stored.SOPInstanceUID
    assert stored.StudyInstanceUID == java_uid(original.StudyInstanceUID)
    assert stored.SeriesInstanceUID == java_uid(original.SeriesInstanceUID)
    assert stored.ReferencedSeriesSequence[0].SeriesInstanceUID == stored.SeriesInstanceUID
    assert stored.Modality == "CT"
    assert stored.PixelData == original.PixelData


def _assert_in_orthanc_redacted(orthanc: Orthanc, originals: list[Dataset]) -> None:
    redacted_uids = [java_uid(original.SOPInstanceUID) for original in originals]
    wait_until(
        lambda: all(orthanc.find_instance(uid) is not None for uid in redacted_uids),
        DELIVERY_TIMEOUT,
        "every redacted instance in Orthanc",
    )
    for original, uid in zip(originals, redacted_uids, strict=True):
        assert orthanc.find_instance(str(original.SOPInstanceUID)) is None
        orthanc_id = orthanc.find_instance(uid)
        assert orthanc_id is not None
        _assert_redacted(orthanc.instance_dataset(orthanc_id), original)


def test_chc_basic_redacts_what_orthanc_stores(
    orthanc: Orthanc, start_importer: StartImporter, tmp_path: Path
) -> None:
    originals = _with_nested_phi(tmp_path / "sent", "SYNC")
    importer = start_importer(CHC_BASIC_FLAG)
    messages = [record.get("message") for record in importer.log_records()]
    assert "C-STORE redaction on: profile CHC_BASIC of 286 tags" in messages
    sent = dcmsend("127.0.0.1", importer.port, importer.aet, [tmp_path / "sent"])
    assert sent.returncode == 0, sent.stderr
    _assert_in_orthanc_redacted(orthanc, originals)
    # an instance that cannot be redacted (pixel data cut short) is refused, never forwarded
    broken = _with_nested_phi(tmp_path / "broken", "BROKEN", count=1)[0]
    path = next((tmp_path / "broken").iterdir())
    path.write_bytes(path.read_bytes()[:-100])
    assert send_file("127.0.0.1", importer.port, importer.aet, path) == CANNOT_UNDERSTAND
    assert orthanc.find_instance(str(broken.SOPInstanceUID)) is None
    assert orthanc.find_instance(java_uid(broken.SOPInstanceUID)) is None


def test_the_spool_holds_the_redacted_file(
    orthanc: Orthanc, start_importer: StartImporter, tmp_path: Path
) -> None:
    """Auto-ack with the upstream down: queue/ holds redacted files; a run without redaction
    then replays them into Orthanc, redacted."""
    originals = _with_nested_phi(tmp_path / "sent", "SPOOL")
    spool = tmp_path / "spool"
    spool_flags = [
        f"--persistent_file_storage_location={spool}",
        "--auto_ack_cstore",
        "--persistent_file_upload_retry_amount=1000",
        "--min_upload_delay=50",
        "--max_waiting_time_between_uploads=300",
        "--http_timeout=1",
        "--upstream_retry_deadline=1.5",
        "--shutdown_grace_period=2",
    ]
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    first = start_importer(CHC_BASIC_FLAG, *spool_flags, dicomweb_address=down)
    sent = dcmsend("127.0.0.1", first.port, first.aet, [tmp_path / "sent"])
    assert sent.returncode == 0, sent.stderr
    queued = sorted((spool / "queue").glob("*.dcm"))
    assert len(queued) == len(originals)
    by_uid = {str(original.SOPInstanceUID): original for original in originals}
    for path in queued:
        stored = dcmread(path)
        original = next(
            o for uid, o in by_uid.items() if java_uid(uid) == str(stored.SOPInstanceUID)
        )
        _assert_redacted(stored, original)
    assert first.stop() == 0
    start_importer(*spool_flags[:1], "--shutdown_grace_period=2")  # no redaction flag now
    _assert_in_orthanc_redacted(orthanc, originals)
