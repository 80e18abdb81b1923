"""Smoke tests of the rig itself: Orthanc, DCMTK and the data generators, without the importer."""

from __future__ import annotations

from pathlib import Path

import pydicom

from tests.rig import (
    Orthanc,
    dcmsend,
    echo,
    generate_ct_series,
    parse_dcmsend_debug,
    run_dcmtk,
    write_large_instance,
)


def test_dcmsend_straight_to_orthanc_arrives(orthanc: Orthanc, tmp_path: Path) -> None:
    paths = generate_ct_series(tmp_path / "ct", 3, rows=32, cols=32, seed=1)
    sent = [pydicom.dcmread(p) for p in paths]

    result = dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, [tmp_path / "ct"], extra=["-d"])

    assert result.returncode == 0, result.stdout + result.stderr
    assert parse_dcmsend_debug(result.stdout + result.stderr) == {
        ds.SOPInstanceUID: 0x0000 for ds in sent
    }
    for ds in sent:
        orthanc_id = orthanc.find_instance(ds.SOPInstanceUID)
        assert orthanc_id is not None, f"{ds.SOPInstanceUID} not in Orthanc"
        stored = orthanc.instance_dataset(orthanc_id)
        assert stored.PixelData == ds.PixelData
        assert orthanc.instance_tags(orthanc_id)["PatientID"] == "PAT1"


def test_echo_reaches_orthanc(orthanc: Orthanc) -> None:
    assert echo("127.0.0.1", orthanc.dicom_port, orthanc.aet)
    result = run_dcmtk(["echoscu", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port)], 30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lookup_of_unknown_uid_is_none(orthanc: Orthanc) -> None:
    assert orthanc.find_instance("1.2.3.4.5.6.7.8.9") is None


def test_large_instance_is_valid_dicom(tmp_path: Path) -> None:
    path = tmp_path / "large.dcm"
    uid = write_large_instance(path, 20 * 1024 * 1024)

    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID == uid
    frames = int(ds.NumberOfFrames)
    assert len(ds.PixelData) == frames * ds.Rows * ds.Columns
    assert abs(len(ds.PixelData) - 20 * 1024 * 1024) <= ds.Rows * ds.Columns
    assert ds.pixel_array.shape == (frames, ds.Rows, ds.Columns)
