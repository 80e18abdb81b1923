"""Deflated and other hostile inputs: bounded inflation, fixed ErrorComments, no false warnings."""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from dicom_adapter.dicom import deflate, transcode
from dicom_adapter.dicom.attributes import read_filter_attributes, read_identity
from dicom_adapter.dicom.deflate import check_inflated_size
from dicom_adapter.dicom.redact import RedactionStep, Redactor, parse_tag_list
from dicom_adapter.dicom.transcode import Outcome, TooSlowError, Transcoder, codestream_shape
from dicom_adapter.errors import InvalidDatasetError
from dicom_adapter.importer.handlers import CStoreHandler
from dicom_adapter.status import Status

PATIENT_NAME = 0x00100010


def _header(uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.PatientName = "Secret^Patient"
    return ds


def write_deflated(path: Path, padding: int = 0, *, corrupt: bool = False) -> str:
    """A Deflated Part-10 file whose data set carries `padding` zero bytes (a small file)."""
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, _header(uid))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as out:
        out.write(b"\0" * 128 + b"DICM")
        meta_buffer = DicomBytesIO()
        write_file_meta_info(meta_buffer, meta, enforce_standard=True)
        out.write(meta_buffer.getvalue())
        if corrupt:
            out.write(b"\xff" * 64)  # not a deflate stream (invalid block type)
            return uid
        out.write(deflater.compress(buffer.getvalue()))
        if padding:  # (0009,0010) private OB: pydicom reads it whole, we never need it
            out.write(deflater.compress(struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, padding)))
            zeros = bytes(1 << 20)
            for start in range(0, padding, len(zeros)):
                out.write(deflater.compress(zeros[: padding - start]))
        out.write(deflater.flush())
    return uid


def _event(path: Path, uid: str) -> SimpleNamespace:
    return SimpleNamespace(
        dataset_path=path,
        request=SimpleNamespace(AffectedSOPInstanceUID=uid),
        assoc=SimpleNamespace(name="assoc-1", requestor=SimpleNamespace(ae_title="MODALITY")),
    )


class _FilterRouter:
    """Routing on PatientName, with the real attribute reader."""

    def __init__(self) -> None:
        self.calls = 0

    def destinations(self, path: Path, calling_aet: str) -> list[Any]:
        self.calls += 1
        read_filter_attributes(path, [PATIENT_NAME])
        return []


def _peak(action: Callable[[], object]) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def _refused(action: Callable[[], object]) -> InvalidDatasetError:
    with pytest.raises(InvalidDatasetError) as caught:
        action()
    return caught.value


def test_a_small_deflated_file_that_inflates_past_the_cap_is_refused_before_any_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deflate, "MAX_INFLATED_BYTES", 1 << 20)
    path = tmp_path / "cstore-bomb.dcm"
    uid = write_deflated(path, 8 << 20)
    router = _FilterRouter()
    handler = CStoreHandler(
        cast(Any, None),
        cast(Any, None),
        1.0,
        router=cast(Any, router),
        prepare=cast(Any, RedactionStep(Redactor(parse_tag_list("PatientName")))),
    )
    answer, peak = _peak(lambda: handler(_event(path, uid)))
    assert isinstance(answer, Dataset)
    assert answer.Status == Status.CANNOT_UNDERSTAND
    assert answer.ErrorComment == "deflated data set too large"
    assert router.calls == 0
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_the_default_cap_bounds_memory_while_measuring(tmp_path: Path) -> None:
    path = tmp_path / "cstore-bomb.dcm"
    write_deflated(path, 80 << 20)
    assert path.stat().st_size < 1 << 20
    caught, peak = _peak(lambda: _refused(lambda: check_inflated_size(path)))
    assert cast(InvalidDatasetError, caught).comment == "deflated data set too large"
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"  # pydicom's whole read: 160 MiB


def test_a_deflated_file_under_the_cap_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "cstore-small.dcm"
    uid = write_deflated(path, 4096)
    check_inflated_size(path)
    assert read_identity(path).sop_instance_uid == uid


def test_a_corrupt_deflate_stream_is_cannot_understand_not_processing_failure(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cstore-corrupt.dcm"
    uid = write_deflated(path, corrupt=True)
    answer = CStoreHandler(cast(Any, None), cast(Any, None), 1.0)(_event(path, uid))
    assert isinstance(answer, Dataset)
    assert answer.Status == Status.CANNOT_UNDERSTAND
    assert answer.ErrorComment == "dataset cannot be parsed"


@pytest.mark.parametrize(
    "reader",
    [
        lambda path: read_filter_attributes(path, [PATIENT_NAME]),
        read_identity,
        lambda path: Redactor(parse_tag_list("PatientName")).redact_file(
            path, path.with_name("out.dcm")
        ),
    ],
    ids=["routing", "identity", "redaction"],
)
def test_each_reader_refuses_a_corrupt_deflate_stream_as_invalid(
    tmp_path: Path, reader: Callable[[Path], object]
) -> None:
    path = tmp_path / "cstore-corrupt.dcm"
    write_deflated(path, corrupt=True)
    with pytest.raises(InvalidDatasetError) as caught:
        reader(path)
    assert caught.value.status == Status.CANNOT_UNDERSTAND


@pytest.mark.parametrize(
    "reader",
    [lambda path: read_filter_attributes(path, [PATIENT_NAME]), read_identity],
    ids=["routing", "identity"],
)
def test_a_parse_failure_sends_a_fixed_comment_not_pydicom_text(
    tmp_path: Path, reader: Callable[[Path], object]
) -> None:
    path = tmp_path / "cstore-corrupt.dcm"
    write_deflated(path, corrupt=True)
    with pytest.raises(InvalidDatasetError) as caught:
        reader(path)
    assert caught.value.comment == "dataset cannot be parsed"
    assert str(caught.value) == "dataset cannot be parsed (error)"  # zlib.error, no zlib text


def test_redaction_refuses_a_deflated_file_over_its_in_memory_cap(tmp_path: Path) -> None:
    path = tmp_path / "cstore-bomb.dcm"
    write_deflated(path, 8 << 20)
    redactor = Redactor(parse_tag_list("PatientName"), max_in_memory=1 << 20)
    caught, peak = _peak(lambda: _refused(lambda: redactor.redact_file(path, tmp_path / "o.dcm")))
    assert cast(InvalidDatasetError, caught).comment == "dataset too large to redact"
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"  # reading it whole: about 18 MiB


@pytest.mark.filterwarnings("ignore:Expected explicit VR, but found implicit VR:UserWarning")
def test_redaction_refuses_a_misencoded_file_over_its_in_memory_cap(tmp_path: Path) -> None:
    source = get_testdata_file("SC_rgb_jpeg.dcm")  # says explicit VR, holds implicit VR elements
    assert source is not None
    redactor = Redactor(parse_tag_list("PatientName"), max_in_memory=1000)
    with pytest.raises(InvalidDatasetError) as caught:
        redactor.redact_file(Path(source), tmp_path / "out.dcm")
    assert caught.value.comment == "dataset too large to redact"
    assert not (tmp_path / "out.dcm").exists()


def test_emptied_encapsulated_pixel_data_drops_the_extended_offset_table(tmp_path: Path) -> None:
    source = get_testdata_file("JPEG2000.dcm")
    assert source is not None
    ds = dcmread(source)
    ds.ExtendedOffsetTable = struct.pack("<Q", 0)
    ds.ExtendedOffsetTableLengths = struct.pack("<Q", len(ds.PixelData))
    path = tmp_path / "in.dcm"
    ds.save_as(path)
    Redactor(parse_tag_list("PixelData")).redact_file(path, tmp_path / "out.dcm")
    out = dcmread(tmp_path / "out.dcm")
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert "ExtendedOffsetTable" not in out and "ExtendedOffsetTableLengths" not in out


def test_transcoding_emptied_pixel_data_is_no_pixels_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cstore-emptied.dcm"
    ds = _header(generate_uid())
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 4, 4, 16, 1
    ds.add_new(0x7FE00010, "OW", None)  # what redaction leaves
    ds.save_as(path, enforce_file_format=True)
    with caplog.at_level("WARNING", logger=transcode.logger.name):
        assert Transcoder(RLELossless).transcode_file(path) is Outcome.NO_PIXELS
    assert not caplog.records


def _sof(rows: int, columns: int) -> bytes:
    return b"\xff\xc0\x00\x0b\x08" + struct.pack(">HH", rows, columns) + b"\x01\x01\x11\x00"


def test_a_jpeg_header_after_a_long_walk_or_with_zero_rows_is_unreadable() -> None:
    assert codestream_shape(b"\xff\xd8" + _sof(64, 64)) == (64, 64, 1)
    icc = b"\xff\xe2\xff\xff" + bytes(0xFFFD)  # large APP2 segments: one step each
    assert codestream_shape(b"\xff\xd8" + icc * 4 + _sof(64, 64)) == (64, 64, 1)
    assert codestream_shape(b"\xff\xd8" + b"\xff" * (64 << 10) + _sof(64, 64)) is None
    assert codestream_shape(b"\xff\xd8" + _sof(0, 64)) is None
    assert codestream_shape(b"\xff\xd8" + _sof(64, 0)) is None


def test_a_frame_of_fill_bytes_costs_little_time() -> None:
    frame = b"\xff\xd8" + b"\xff" * (8 << 20)
    started = time.perf_counter()
    assert codestream_shape(frame) is None
    assert time.perf_counter() - started < 0.1  # was 0.12 s per MiB: about 1 s


def test_the_codestream_check_stops_at_the_deadline() -> None:
    source = get_testdata_file("JPEG2000.dcm")
    assert source is not None
    ds = dcmread(source)
    with pytest.raises(TooSlowError):
        transcode._check_codestreams(ds, time.monotonic() - 1)
