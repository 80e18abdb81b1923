"""C-MOVE and C-GET through the adapter: QIDO + WADO-RS from Orthanc, C-STORE to DCMTK peers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_adapter.status import Status
from tests.rig import (
    Importer,
    Orthanc,
    StoreSCP,
    dcmsend,
    generate_ct_series,
    run_dcmtk,
    store_jpeg_instance,
)
from tests.rig.component import DEST_AET, Destination, dataset_bytes, dictionary_flag
from tests.rig.find import identifier, write_dataset

STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, Importer, StoreSCP]]:
    work = tmp_path_factory.mktemp("retrieve")
    write_dataset(work / "data")
    with StoreSCP(work / "received") as scp, Orthanc(workdir=work / "orthanc") as orthanc:
        assert (
            dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, [work / "data"]).returncode == 0
        )
        aets = json.dumps([{"name": scp.aet, "host": "127.0.0.1", "port": scp.port}])
        with Importer(
            orthanc.dicomweb_url, f"--aet_dictionary_inline={aets}", aet="ADAPTER", log_dir=work
        ) as importer:
            yield orthanc, importer, scp


def study_uids(orthanc: Orthanc) -> dict[str, str]:
    """StudyDescription -> StudyInstanceUID, from Orthanc's REST API."""
    out = {}
    for orthanc_id in orthanc.client.get("/studies").json():
        tags = orthanc.client.get(f"/studies/{orthanc_id}").json()["MainDicomTags"]
        out[tags.get("StudyDescription", "")] = tags["StudyInstanceUID"]
    return out


def movescu(importer: Importer, scp: StoreSCP, root: str, keys: dict[str, str]) -> None:
    """DCMTK movescu (`root` -S or -P) through the adapter to `scp`; must exit 0."""
    args = ["movescu", root, "-aet", "MOVESCU", "-aec", importer.aet, "-aem", scp.aet]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}"]
    result = run_dcmtk([*args, "127.0.0.1", str(importer.port)], timeout=60)
    assert result.returncode == 0, result.stderr


def move(importer: Importer, sop_class: str, query: Dataset, destination: str) -> list[Dataset]:
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    try:
        return [status for status, _ in assoc.send_c_move(query, destination, sop_class)]
    finally:
        assoc.release()


def test_move_study_with_movescu(setup: tuple[Orthanc, Importer, StoreSCP]) -> None:
    orthanc, importer, scp = setup
    scp.clear()
    study = study_uids(orthanc)["CT HEAD"]
    movescu(importer, scp, "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
    received = scp.received()
    assert len(received) == 5
    assert {str(d.StudyInstanceUID) for d in received} == {study}
    # the instances arrive exactly as Orthanc stored them (sent byte for byte, no re-encoding)
    for dataset in received:
        stored = orthanc.instance_dataset(orthanc.find_instance(str(dataset.SOPInstanceUID)) or "")
        assert dataset.PixelData == stored.PixelData
        assert dataset.PatientName == stored.PatientName


@pytest.mark.parametrize("level", ["SERIES", "IMAGE"])
def test_move_series_and_image(setup: tuple[Orthanc, Importer, StoreSCP], level: str) -> None:
    orthanc, importer, scp = setup
    scp.clear()
    study = study_uids(orthanc)["MR BRAIN"]
    series_query = identifier("SERIES", StudyInstanceUID=study, SeriesInstanceUID="")
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    series_uid = next(
        str(a.SeriesInstanceUID)
        for s, a in assoc.send_c_find(series_query, "1.2.840.10008.5.1.4.1.2.2.1")
        if s.Status == Status.PENDING and a is not None
    )
    assoc.release()
    query = identifier("SERIES", StudyInstanceUID=study, SeriesInstanceUID=series_uid)
    expected = 3
    if level == "IMAGE":
        instances = [dcmread(p) for p in sorted((Path(scp.folder).parent / "data").iterdir())]
        sop = next(
            str(d.SOPInstanceUID) for d in instances if str(d.SeriesInstanceUID) == series_uid
        )
        query = identifier(
            "IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series_uid, SOPInstanceUID=sop
        )
        expected = 1
    statuses = move(importer, STUDY_ROOT_MOVE, query, scp.aet)
    assert statuses[-1].Status == Status.SUCCESS
    assert statuses[-1].NumberOfCompletedSuboperations == expected
    assert len(scp.received()) == expected


def test_move_patient_root_patient_level(setup: tuple[Orthanc, Importer, StoreSCP]) -> None:
    _, importer, scp = setup
    scp.clear()
    statuses = move(importer, PATIENT_ROOT_MOVE, identifier("PATIENT", PatientID="FP003"), scp.aet)
    assert statuses[-1].Status == Status.SUCCESS
    assert statuses[-1].NumberOfCompletedSuboperations == 5
    pending = [s.NumberOfRemainingSuboperations for s in statuses[:-1]]
    # after the first sub-operation, then at most one per 0.1 s, and the last counts
    assert pending[0] == 4 and pending[-1] == 0 and pending == sorted(pending, reverse=True)
    assert {str(d.PatientID) for d in scp.received()} == {"FP003"}


def test_move_to_unknown_destination_sends_nothing(
    setup: tuple[Orthanc, Importer, StoreSCP],
) -> None:
    orthanc, importer, scp = setup
    scp.clear()
    study = study_uids(orthanc)["CT HEAD"]
    statuses = move(
        importer, STUDY_ROOT_MOVE, identifier("STUDY", StudyInstanceUID=study), "NOWHERE"
    )
    assert [s.Status for s in statuses] == [Status.MOVE_DESTINATION_UNKNOWN]
    assert scp.received() == []


def test_get_series_with_getscu(setup: tuple[Orthanc, Importer, StoreSCP], tmp_path: Path) -> None:
    orthanc, importer, _ = setup
    study = study_uids(orthanc)["US ABDOMEN"]
    result = run_dcmtk(
        [
            "getscu",
            "-S",
            "-aet",
            "GETSCU",
            "-aec",
            importer.aet,
            "-od",
            str(tmp_path),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "127.0.0.1",
            str(importer.port),
        ],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    received = [dcmread(p) for p in tmp_path.iterdir()]
    assert len(received) == 3
    assert {str(d.Modality) for d in received} == {"US", "CT"}
    # each data set byte for byte as Orthanc stored it (the same syntax: getscu took them all)
    for path in tmp_path.iterdir():
        got = path.read_bytes()
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        found = httpx.post(f"{orthanc.http_url}/tools/lookup", content=uid, timeout=10).json()
        stored = httpx.get(f"{orthanc.http_url}/instances/{found[0]['ID']}/file", timeout=10)
        assert dataset_bytes(got) == dataset_bytes(stored.content)


def test_move_without_unique_key_is_cannot_understand(
    setup: tuple[Orthanc, Importer, StoreSCP],
) -> None:
    _, importer, scp = setup
    scp.clear()
    statuses = move(importer, STUDY_ROOT_MOVE, identifier("STUDY", PatientName="Doe*"), scp.aet)
    assert statuses[-1].Status == Status.CANNOT_UNDERSTAND
    assert scp.received() == []


def test_cancel_during_a_large_move(
    setup: tuple[Orthanc, Importer, StoreSCP], tmp_path: Path
) -> None:
    """C-CANCEL while the destination holds the fifth C-STORE (sending starts with the first
    WADO-RS part, before any pending response: the cancel cannot wait for one)."""
    orthanc, _, _ = setup
    series = generate_ct_series(tmp_path / "big", 80, rows=64, cols=64)
    study = str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    assert dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, [tmp_path / "big"]).returncode == 0
    destination = Destination([(CTImageStorage, (ExplicitVRLittleEndian,))], {})
    destination.hold_at = 5
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(STUDY_ROOT_MOVE)
    try:
        with Importer(
            orthanc.dicomweb_url, dictionary_flag(destination.port), aet="ADAPTER2"
        ) as importer:
            assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
            assert assoc.is_established

            def cancel_when_held() -> None:
                if destination.holding.wait(30):
                    assoc.send_c_cancel(9, assoc.accepted_contexts[0].context_id)
                destination.release.set()

            canceller = threading.Thread(target=cancel_when_held, daemon=True)
            canceller.start()
            try:
                query = identifier("STUDY", StudyInstanceUID=study)
                statuses = [s for s, _ in assoc.send_c_move(query, DEST_AET, STUDY_ROOT_MOVE, 9)]
            finally:
                destination.release.set()
                canceller.join(5)
                assoc.release()
    finally:
        destination.stop()
    final = statuses[-1]
    assert final.Status == Status.CANCEL
    completed = final.NumberOfCompletedSuboperations
    assert completed >= 5  # the held one finished within the grace (seen within CANCEL_POLL)
    assert final.NumberOfRemainingSuboperations == 80 - completed > 0
    assert len(destination.received) == completed


def test_receiver_without_the_original_syntax_gets_it_uncompressed(
    setup: tuple[Orthanc, Importer, StoreSCP], tmp_path: Path
) -> None:
    orthanc, _, _ = setup
    ds = store_jpeg_instance(orthanc, tmp_path / "in", "JPEGPATIENT")
    # a second storescp that only accepts Implicit VR Little Endian (+xi)
    plain = StoreSCP(tmp_path / "plain", accept="implicit")
    aets = json.dumps([{"name": plain.aet, "host": "127.0.0.1", "port": plain.port}])
    with (
        plain,
        Importer(
            orthanc.dicomweb_url,
            f"--aet_dictionary_inline={aets}",
            aet="ADAPTER2",
            log_dir=tmp_path,
        ) as second,
    ):
        statuses = move(
            second,
            STUDY_ROOT_MOVE,
            identifier("STUDY", StudyInstanceUID=ds.StudyInstanceUID),
            plain.aet,
        )
        assert statuses[-1].Status == Status.SUCCESS
        (received,) = plain.received()
    assert received.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert received.SOPInstanceUID == ds.SOPInstanceUID


def first_series_and_instance(orthanc: Orthanc, study_uid: str) -> tuple[str, str, str, int]:
    """(PatientID, a SeriesInstanceUID, one of its SOPInstanceUIDs, that series' size)."""
    client = orthanc.client
    study_id = next(
        s
        for s in client.get("/studies").json()
        if client.get(f"/studies/{s}").json()["MainDicomTags"]["StudyInstanceUID"] == study_uid
    )
    study = client.get(f"/studies/{study_id}").json()
    series = client.get(f"/series/{study['Series'][0]}").json()
    instance = client.get(f"/instances/{series['Instances'][0]}").json()
    return (
        study["PatientMainDicomTags"]["PatientID"],
        series["MainDicomTags"]["SeriesInstanceUID"],
        instance["MainDicomTags"]["SOPInstanceUID"],
        len(series["Instances"]),
    )


@pytest.mark.parametrize(
    ("root", "level"),
    [
        ("-P", "PATIENT"),
        ("-P", "STUDY"),
        ("-P", "SERIES"),
        ("-P", "IMAGE"),
        ("-S", "STUDY"),
        ("-S", "SERIES"),
        ("-S", "IMAGE"),
    ],
)
def test_movescu_every_level_of_both_roots(
    setup: tuple[Orthanc, Importer, StoreSCP], root: str, level: str
) -> None:
    orthanc, importer, scp = setup
    scp.clear()
    study = study_uids(orthanc)["MR BRAIN"]
    patient, series, sop, series_size = first_series_and_instance(orthanc, study)
    keys = {"QueryRetrieveLevel": level}
    if root == "-P":
        keys["PatientID"] = patient
    if level != "PATIENT":
        keys["StudyInstanceUID"] = study
    if level in ("SERIES", "IMAGE"):
        keys["SeriesInstanceUID"] = series
    if level == "IMAGE":
        keys["SOPInstanceUID"] = sop
    movescu(importer, scp, root, keys)
    received = scp.received()
    if level == "PATIENT":
        expected = {
            orthanc.instance_dataset(i).SOPInstanceUID
            for i in orthanc.instances()
            if orthanc.instance_dataset(i).PatientID == patient
        }
        assert {d.SOPInstanceUID for d in received} == expected
    elif level == "STUDY":
        assert {str(d.StudyInstanceUID) for d in received} == {study}
        assert len(received) == sum(
            1 for i in orthanc.instances() if orthanc.instance_dataset(i).StudyInstanceUID == study
        )
    elif level == "SERIES":
        assert {str(d.SeriesInstanceUID) for d in received} == {series}
        assert len(received) == series_size
    else:
        assert [str(d.SOPInstanceUID) for d in received] == [sop]
