"""The instance identity read on every C-STORE: the fast reader agrees with pydicom's or
leaves the file to it."""

from __future__ import annotations

from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from dicom_adapter.dicom import attributes
from dicom_adapter.dicom.attributes import InstanceIdentity, read_identity, read_until
from dicom_adapter.errors import InvalidDatasetError


def by_pydicom(source: Path | bytes) -> InstanceIdentity:
    ds = read_until(source, [0x00080016, 0x00080018, 0x0020000D, 0x0020000E])
    return InstanceIdentity(
        str(ds.get("SOPClassUID", "") or "").strip(),
        str(ds.get("SOPInstanceUID", "") or "").strip(),
        str(ds.get("StudyInstanceUID", "") or "").strip(),
        str(ds.get("SeriesInstanceUID", "") or "").strip(),
    )


def test_the_fast_reader_agrees_with_pydicom_on_every_bundled_file() -> None:
    handled = []
    bundled = Path(pydicom.data.__file__).parent / "test_files"  # no download of the rest
    for path in sorted(bundled.rglob("*.dcm")):
        try:
            expected = by_pydicom(path)
        except InvalidDatasetError:
            continue
        fast = attributes._fast_identity(path)
        if fast is not None:
            assert fast == expected, path.name
            handled.append(path.name)
    # the plain little endian files, implicit and explicit, compressed pixel data included
    assert {"CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm"} <= set(handled)
    assert len(handled) > 50


def _file(
    tmp_path: Path, syntax: str, *, undefined: bool, implicit: bool = False, **extra: object
) -> Path:
    """A CT instance with sequences before the study and series UIDs."""
    inner = Dataset()
    inner.CodeValue = "X"
    inner.ConceptNameCodeSequence = Sequence([Dataset()])
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds.PatientName = "Test^Fast"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1 "
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.Modality = "CT"
    for sequence in (ds["ReferencedImageSequence"], item["PurposeOfReferenceCodeSequence"]):
        sequence.is_undefined_length = undefined
        for entry in sequence.value:
            entry.is_undefined_length_sequence_item = undefined
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [True, False])
def test_sequences_of_either_length_before_the_uids_are_skipped(
    tmp_path: Path, syntax: str, undefined: bool
) -> None:
    path = _file(tmp_path, syntax, undefined=undefined)
    fast = attributes._fast_identity(path)
    assert fast == by_pydicom(path) == read_identity(path)
    assert fast is not None
    assert fast.study_uid == "1.2.826.0.1.3680043.8.498.1"  # trailing space trimmed
    assert attributes._fast_identity(path.read_bytes()) == fast  # bytes, as for a refetch


@pytest.mark.parametrize("syntax", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_deflated_and_big_endian_files_are_read_by_pydicom(tmp_path: Path, syntax: str) -> None:
    path = _file(tmp_path, syntax, undefined=True)
    assert attributes._fast_identity(path) is None
    assert read_identity(path).sop_instance_uid == "1.2.826.0.1.3680043.8.498.77"


def test_a_head_that_ends_before_the_uids_is_read_by_pydicom(tmp_path: Path) -> None:
    path = _file(tmp_path, ExplicitVRLittleEndian, undefined=True, StudyDescription="x" * 20000)
    assert attributes._fast_identity(path) is None
    assert read_identity(path) == by_pydicom(path)


def test_uids_that_are_not_digits_and_dots_are_left_to_pydicom(tmp_path: Path) -> None:
    path = _file(tmp_path, ExplicitVRLittleEndian, undefined=False)
    raw = path.read_bytes().replace(b"1.2.826.0.1.3680043.8.498.2", b"1.2.826.0.1.3680043.8.49\\.2")
    assert attributes._fast_identity(raw) is None
    assert read_identity(raw) == by_pydicom(raw)


def test_a_missing_sop_instance_uid_gets_pydicoms_error(tmp_path: Path) -> None:
    path = _file(tmp_path, ImplicitVRLittleEndian, undefined=True)
    ds = dcmread(path)
    del ds.SOPInstanceUID
    ds.save_as(path)
    assert attributes._fast_identity(path) is None
    with pytest.raises(InvalidDatasetError, match="SOPInstanceUID"):
        read_identity(path)


def test_jpeg_baseline_is_read_fast() -> None:
    path = Path(str(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")))
    assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    fast = attributes._fast_identity(path)
    assert fast is not None and fast == by_pydicom(path)
