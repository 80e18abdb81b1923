"""--store_compress_to_transfer_syntax end to end: dcmsend -> dicom-import -> STOW-RS -> Orthanc.

Issue 10 point 3: Orthanc stores what the importer transcoded (JPEG 2000 lossless), the decoded
pixels equal the originals, and an instance that cannot be transcoded is stored as received
with one WARNING naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from tests.rig import Orthanc, StartImporter, dcmsend, generate_ct_series, parse_dcmsend_debug

HOST = "127.0.0.1"
SUCCESS = 0x0000
FLAG = "--store_compress_to_transfer_syntax"


def _stored(orthanc: Orthanc, uid: str) -> str:
    orthanc_id = orthanc.find_instance(uid)
    assert orthanc_id is not None, f"instance {uid} did not arrive in Orthanc"
    return orthanc_id


@pytest.mark.parametrize("spool", [False, True], ids=["synchronous", "durable-spool"])
def test_dcmsend_ct_arrives_as_jpeg2000_lossless_with_identical_pixels(
    start_importer: StartImporter, orthanc: Orthanc, tmp_path: Path, spool: bool
) -> None:
    extra = [f"{FLAG}={JPEG2000Lossless}"]
    if spool:
        extra.append(f"--persistent_file_storage_location={tmp_path / 'spool'}")
    importer = start_importer(*extra)
    paths = generate_ct_series(tmp_path / "ct", 3, rows=512, cols=512, seed=10)
    sent = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, paths)}

    result = dcmsend(HOST, importer.port, importer.aet, [tmp_path / "ct"], extra=["-d"])

    assert result.returncode == 0, result.stderr[-3000:]
    assert parse_dcmsend_debug(result.stdout + result.stderr) == dict.fromkeys(sent, SUCCESS)
    for uid, original in sent.items():
        orthanc_id = _stored(orthanc, uid)
        assert orthanc.transfer_syntax(orthanc_id) == JPEG2000Lossless
        stored = orthanc.instance_dataset(orthanc_id)
        assert stored.SOPInstanceUID == uid
        assert stored.file_meta.MediaStorageSOPInstanceUID == uid
        assert stored.PatientName == original.PatientName
        assert np.array_equal(stored.pixel_array, original.pixel_array)
    records = importer.log_records()
    assert not [r for r in records if r.get("severity") == "WARNING"]
    assert not [r for r in records if r.get("logger", "").startswith("openjpeg")]  # per frame


def test_corrupt_compressed_pixel_data_is_stored_as_received_with_a_warning(
    start_importer: StartImporter, orthanc: Orthanc, tmp_path: Path
) -> None:
    importer = start_importer(f"{FLAG}={RLELossless}")
    source = get_testdata_file("MR_small_jp2klossless.dcm")
    assert source is not None, "pydicom test file MR_small_jp2klossless.dcm is not bundled"
    ds = pydicom.dcmread(source)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PixelData = encapsulate([bytes(range(256)) * 8])  # no decoder takes this fragment
    path = tmp_path / "corrupt" / "corrupt.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True)

    # -dn: dcmsend sends the file's own syntax and never tries to decode it itself
    result = dcmsend(HOST, importer.port, importer.aet, [path], extra=["-dn", "-d"])

    assert result.returncode == 0, result.stderr[-3000:]
    assert parse_dcmsend_debug(result.stdout + result.stderr) == {uid: SUCCESS}
    orthanc_id = _stored(orthanc, uid)
    assert orthanc.transfer_syntax(orthanc_id) == JPEG2000Lossless  # as received
    assert orthanc.instance_dataset(orthanc_id).PixelData == ds.PixelData
    warnings = [r for r in importer.log_records() if r.get("severity") == "WARNING"]
    assert len(warnings) == 1, warnings
    assert uid in warnings[0]["message"]
    assert "stored as received" in warnings[0]["message"]
