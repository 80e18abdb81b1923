"""Storage commitment through the adapter subprocess, verified against a real Orthanc."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_adapter.status import Status
from tests.rig import Importer, Orthanc, dcmsend, free_port
from tests.rig.commitment import (
    REQUESTER_AET,
    Requester,
    action_information,
    references,
)
from tests.rig.find import write_dataset


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Importer, Requester, list[tuple[str, str]]]]:
    write_dataset(tmp_path / "data")
    stored = []
    for path in sorted((tmp_path / "data").iterdir())[:6]:
        ds = dcmread(path, stop_before_pixels=True)
        stored.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    requester = Requester(free_port())
    requester.listen()
    aets = json.dumps([{"name": REQUESTER_AET, "host": "127.0.0.1", "port": requester.port}])
    try:
        with Orthanc(workdir=tmp_path / "orthanc") as orthanc:
            sent = dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, [tmp_path / "data"])
            assert sent.returncode == 0
            with Importer(
                orthanc.dicomweb_url,
                f"--aet_dictionary_inline={aets}",
                aet="ADAPTER",
                log_dir=tmp_path,
            ) as importer:
                yield importer, requester, stored
    finally:
        requester.stop()


def test_all_present_is_event_1(
    setup: tuple[Importer, Requester, list[tuple[str, str]]],
) -> None:
    importer, requester, stored = setup
    status = requester.request(importer.port, action_information(stored))
    assert status.Status == Status.SUCCESS
    report = requester.wait_report()
    assert report.event_type == 1
    assert sorted(references(report.info.ReferencedSOPSequence)) == sorted(stored)
    assert report.calling_aet == "ADAPTER"


def test_missing_instance_is_event_2_with_0112(
    setup: tuple[Importer, Requester, list[tuple[str, str]]],
) -> None:
    importer, requester, stored = setup
    missing = (stored[0][0], generate_uid())
    status = requester.request(importer.port, action_information([*stored, missing]))
    assert status.Status == Status.SUCCESS
    report = requester.wait_report()
    assert report.event_type == 2
    assert sorted(references(report.info.ReferencedSOPSequence)) == sorted(stored)
    (failed,) = report.info.FailedSOPSequence
    assert str(failed.ReferencedSOPInstanceUID) == missing[1]
    assert failed.FailureReason == Status.NO_SUCH_OBJECT_INSTANCE


def test_unknown_requester_is_refused(
    setup: tuple[Importer, Requester, list[tuple[str, str]]],
) -> None:
    importer, requester, stored = setup
    status = requester.request(importer.port, action_information(stored), aet="STRANGER")
    assert status.Status == Status.PROCESSING_FAILURE
    assert "STRANGER" in str(status.get("ErrorComment", ""))
