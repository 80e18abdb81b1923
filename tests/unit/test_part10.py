"""Unit tests for the pure Part-10 meta group reader in dicom_adapter.dicom.part10.

pydicom (and pynetdicom's `split_dataset`, built on it) is the oracle: the UIDs must match
what pydicom reads from the meta group, and the data set must start where pydicom's does.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.dsutils import create_file_meta, split_dataset

from dicom_adapter.dicom.part10 import (
    MAX_META_BYTES,
    META_READ,
    PREAMBLE,
    FileMeta,
    NeedMoreData,
    NotPart10Error,
    file_meta_group,
    read_file_meta,
    read_path_meta,
)

BUNDLED = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",  # deflated
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "rtplan.dcm",
]

GENERATED_SYNTAXES = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
]


def _bundled(name: str) -> Path:
    """A test file shipped inside the pydicom wheel (never downloaded)."""
    found = get_testdata_file(name, download=False)
    if not isinstance(found, str):
        pytest.fail(f"pydicom test file {name} is not bundled with the installed pydicom")
    return Path(found)


def _explicit(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element."""
    if vr in (b"OB", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _hand_made(*elements: bytes, dataset: bytes = b"") -> bytes:
    """Preamble, DICM, the given group 0002 elements (no group length), then `dataset`."""
    return bytes(PREAMBLE) + b"DICM" + b"".join(elements) + dataset


SOP_CLASS = _explicit(2, 0x0002, b"UI", _ui(CTImageStorage))
SOP_INSTANCE = _explicit(2, 0x0003, b"UI", _ui("1.2.3.4.5"))
SYNTAX = _explicit(2, 0x0010, b"UI", _ui(ExplicitVRLittleEndian))
FIRST_DATASET_ELEMENT = _explicit(8, 0x0016, b"UI", _ui(CTImageStorage))


def _decode_dataset(raw: bytes, transfer_syntax: str) -> Dataset:
    """pydicom's decoding of an encoded data set (no meta) in `transfer_syntax`."""
    uid = UID(transfer_syntax)
    if uid == DeflatedExplicitVRLittleEndian:
        raw = zlib.decompress(raw, -zlib.MAX_WBITS)
    return read_dataset(BytesIO(raw), uid.is_implicit_VR, uid.is_little_endian)


def _generate(path: Path, transfer_syntax: str, sop_instance_uid: str) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta.SourceApplicationEntityTitle = "SOURCE_AE"
    ds.file_meta.PrivateInformationCreatorUID = UID("1.2.3.4")
    ds.file_meta.PrivateInformation = b"\x01\x02\x03\x04\x05\x06"  # OB: a 4-byte length
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.PatientName = "Part^Ten"
    ds.PatientID = "P10"
    ds.Modality = "OT"
    ds.ImageComments = "X" * 301
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------
# Files pydicom wrote


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_files(name: str) -> None:
    path = _bundled(name)
    raw = path.read_bytes()
    pydicom_meta = read_file_meta_info(path)
    meta = read_file_meta(raw)
    assert meta == FileMeta(
        pydicom_meta.MediaStorageSOPClassUID,
        pydicom_meta.MediaStorageSOPInstanceUID,
        pydicom_meta.TransferSyntaxUID,
        split_dataset(path)[1],
    )
    assert read_file_meta(raw, complete=True) == meta
    decoded = _decode_dataset(raw[meta.dataset_offset :], meta.transfer_syntax)
    assert decoded == dcmread(path)


@pytest.mark.parametrize("transfer_syntax", GENERATED_SYNTAXES)
@pytest.mark.parametrize("sop_instance_uid", ["1.2.826.0.1.3680043.8.498.1", "1.2.3.44"])
def test_generated_files(tmp_path: Path, transfer_syntax: str, sop_instance_uid: str) -> None:
    path = _generate(tmp_path / "x.dcm", transfer_syntax, sop_instance_uid)
    raw = path.read_bytes()
    written = dcmread(path)
    encoded_meta = DicomBytesIO()
    write_file_meta_info(encoded_meta, written.file_meta)
    meta = read_file_meta(raw)
    assert meta == FileMeta(
        SecondaryCaptureImageStorage,
        sop_instance_uid,
        transfer_syntax,
        len(written.preamble or b"") + 4 + len(encoded_meta.getvalue()),
    )
    assert meta.dataset_offset == split_dataset(path)[1]
    assert _decode_dataset(raw[meta.dataset_offset :], transfer_syntax) == written


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_any_buffer(kind: type[bytes | bytearray | memoryview]) -> None:
    raw = _bundled("CT_small.dcm").read_bytes()
    assert read_file_meta(kind(raw)) == read_file_meta(raw)


# --------------------------------------------------------------------------------------------
# Truncated heads


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm"])
def test_every_cut_inside_the_meta(name: str) -> None:
    raw = _bundled(name).read_bytes()
    whole = read_file_meta(raw)
    view = memoryview(raw)
    # Until the first data set element's tag and length are in, the meta may go on
    for cut in range(whole.dataset_offset + 8):
        with pytest.raises(NeedMoreData):
            read_file_meta(view[:cut])
    # ... and for the whole file that means it ends inside its meta group
    for cut in range(whole.dataset_offset):
        with pytest.raises(NotPart10Error):
            read_file_meta(view[:cut], complete=True)
    assert read_file_meta(view[: whole.dataset_offset + 8]) == whole


def test_cut_in_the_first_data_set_element_of_a_complete_file() -> None:
    raw = _hand_made(SOP_CLASS, SOP_INSTANCE, SYNTAX, dataset=FIRST_DATASET_ELEMENT)
    offset = len(raw) - len(FIRST_DATASET_ELEMENT)
    for cut in range(offset + 1, offset + 8):
        with pytest.raises(NotPart10Error):
            read_file_meta(raw[:cut], complete=True)
    assert read_file_meta(raw[: offset + 8], complete=True).dataset_offset == offset


def test_complete_file_without_a_data_set() -> None:
    raw = _hand_made(SOP_CLASS, SOP_INSTANCE, SYNTAX)
    with pytest.raises(NeedMoreData):
        read_file_meta(raw)
    assert read_file_meta(raw, complete=True) == FileMeta(
        CTImageStorage, "1.2.3.4.5", ExplicitVRLittleEndian, len(raw)
    )


def test_group_length_shows_a_complete_file_was_cut() -> None:
    """A whole file that stops at an element boundary short of its group length is truncated."""
    rest = SOP_CLASS + SOP_INSTANCE + SYNTAX
    implementation = _explicit(2, 0x0012, b"UI", _ui("1.2.3"))
    group_length = _explicit(2, 0x0000, b"UL", struct.pack("<I", len(rest + implementation)))
    raw = _hand_made(group_length, rest, implementation)
    assert read_file_meta(raw, complete=True).dataset_offset == len(raw)
    with pytest.raises(NotPart10Error, match="ends inside its meta group"):
        read_file_meta(raw[: -len(implementation)], complete=True)


# --------------------------------------------------------------------------------------------
# Not Part-10, or not usable


def test_data_set_without_preamble() -> None:
    raw = _bundled("no_meta.dcm").read_bytes()
    with pytest.raises(NotPart10Error, match="DICM"):
        read_file_meta(raw)


@pytest.mark.parametrize("magic", [b"DICX", b"dicm", b"\x00\x00\x00\x00"])
def test_wrong_magic(magic: bytes) -> None:
    raw = bytes(PREAMBLE) + magic + SOP_CLASS + SOP_INSTANCE + SYNTAX + FIRST_DATASET_ELEMENT
    for complete in (False, True):
        with pytest.raises(NotPart10Error, match="DICM"):
            read_file_meta(raw, complete=complete)
        with pytest.raises(NotPart10Error, match="DICM"):
            read_file_meta(raw[: PREAMBLE + 4], complete=complete)


def test_short_of_the_magic() -> None:
    for cut in (0, 1, PREAMBLE, PREAMBLE + 3):
        with pytest.raises(NeedMoreData):
            read_file_meta(bytes(cut))
        with pytest.raises(NotPart10Error):
            read_file_meta(bytes(cut), complete=True)


def test_bundled_file_without_transfer_syntax() -> None:
    raw = _bundled("meta_missing_tsyntax.dcm").read_bytes()
    with pytest.raises(NotPart10Error, match="transfer_syntax_uid"):
        read_file_meta(raw)


@pytest.mark.parametrize(
    ("elements", "missing"),
    [
        ((SOP_INSTANCE, SYNTAX), "media_storage_sop_class_uid"),
        ((SOP_CLASS, SYNTAX), "media_storage_sop_instance_uid"),
        ((SOP_CLASS, SOP_INSTANCE), "transfer_syntax_uid"),
        ((), "media_storage_sop_class_uid, media_storage_sop_instance_uid, transfer_syntax_uid"),
        ((SOP_CLASS, _explicit(2, 0x0003, b"UI", b""), SYNTAX), "media_storage_sop_instance_uid"),
        ((SOP_CLASS, _explicit(2, 0x0003, b"UI", b"\x00\x00"), SYNTAX), "sop_instance_uid"),
    ],
)
def test_missing_uids(elements: tuple[bytes, ...], missing: str) -> None:
    raw = _hand_made(*elements, dataset=FIRST_DATASET_ELEMENT)
    with pytest.raises(NotPart10Error, match=missing):
        read_file_meta(raw)


def test_undefined_length_in_the_meta() -> None:
    undefined = struct.pack("<HH2sHI", 2, 0x0102, b"OB", 0, 0xFFFFFFFF)
    raw = _hand_made(SOP_CLASS, SOP_INSTANCE, SYNTAX, undefined, dataset=bytes(16))
    with pytest.raises(NotPart10Error, match="undefined length"):
        read_file_meta(raw)


def test_uid_padding_and_long_vr_elements() -> None:
    private = _explicit(2, 0x0102, b"OB", b"\x00\x01\x02\x03")
    source = _explicit(2, 0x0016, b"AE", b"ME")
    padded_syntax = _explicit(2, 0x0010, b"UI", b"1.2.840.10008.1.2 ")  # space padded (wrongly)
    raw = _hand_made(SOP_CLASS, SOP_INSTANCE, padded_syntax, source, private)
    meta = read_file_meta(raw + FIRST_DATASET_ELEMENT)
    assert meta == FileMeta(CTImageStorage, "1.2.3.4.5", ImplicitVRLittleEndian, len(raw))


# --------------------------------------------------------------------------------------------
# Reading a file: the one reader of spooled and fetched files


def test_a_file_meta_group_longer_than_one_read_is_read_whole(tmp_path: Path) -> None:
    private = _explicit(2, 0x0102, b"OB", bytes(3 * META_READ))
    raw = _hand_made(SOP_CLASS, SOP_INSTANCE, SYNTAX, private)
    path = tmp_path / "long-meta.dcm"
    path.write_bytes(raw + FIRST_DATASET_ELEMENT)
    assert read_path_meta(path) == FileMeta(
        CTImageStorage, "1.2.3.4.5", ExplicitVRLittleEndian, len(raw)
    )


def test_a_file_meta_group_that_does_not_end_is_refused_in_bounded_memory(
    tmp_path: Path,
) -> None:
    private = _explicit(2, 0x0102, b"OB", bytes(16 * MAX_META_BYTES))
    path = tmp_path / "endless-meta.dcm"
    path.write_bytes(_hand_made(SOP_CLASS, SOP_INSTANCE, SYNTAX, private))
    tracemalloc.start()
    try:
        with pytest.raises(NotPart10Error, match="does not end"):
            read_path_meta(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_META_BYTES, f"peak {peak / 2**20:.1f} MiB"


def test_a_short_file_is_not_part10(tmp_path: Path) -> None:
    path = tmp_path / "short.dcm"
    path.write_bytes(_hand_made(SOP_CLASS, SOP_INSTANCE))
    with pytest.raises(NotPart10Error):
        read_path_meta(path)


def _pydicom_meta(sop_class: str, sop_instance: str, syntax: str, version: str | None) -> bytes:
    buffer = DicomBytesIO()
    write_file_meta_info(
        buffer,
        create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
            implementation_version=version,  # type: ignore[arg-type]
        ),
    )
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("sop_instance", "syntax", "version"),
    [
        ("1.2.826.0.1.3680043.8.498.1", "1.2.840.10008.1.2.1", "PYNETDICOM_300"),
        ("1.2.826.0.1.3680043.8.498.12", "1.2.840.10008.1.2", "ODD"),  # even UID, odd name
        ("1." + "9" * 62, "1.2.840.10008.1.2.4.90", "X" * 16),  # longest UI and SH
        ("1.2.3", "1.2.840.10008.1.2.1.99", None),  # no name: an empty (0002,0013)
    ],
)
def test_file_meta_group_is_what_pydicom_writes(
    sop_instance: str, syntax: str, version: str | None
) -> None:
    ct = str(CTImageStorage)
    ours = file_meta_group(ct, sop_instance, syntax, PYNETDICOM_IMPLEMENTATION_UID, version)
    assert ours == _pydicom_meta(ct, sop_instance, syntax, version)
    meta = read_file_meta(b"\0" * 128 + b"DICM" + ours, complete=True)
    assert (meta.sop_instance_uid, meta.transfer_syntax) == (sop_instance, syntax)


@pytest.mark.parametrize(
    ("sop_instance", "version"),
    [("1.2.3\u00e9", "X"), ("1." + "9" * 63, "X"), ("1.2.3", "X" * 17), ("1.2.3", "\u00e9")],
)
def test_file_meta_group_refuses_what_it_does_not_carry(sop_instance: str, version: str) -> None:
    with pytest.raises(ValueError):
        file_meta_group(CTImageStorage, sop_instance, ExplicitVRLittleEndian, "1.2", version)
