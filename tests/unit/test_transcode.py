"""Transcoding during C-STORE (issue 10 point 3, SPEC §1.9): dicom/transcode.py and its flags."""

from __future__ import annotations

import logging
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from openjpeg.utils import encode_array
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)
from tests.rig import generate_ct_series

from dicom_adapter.cli import run_import
from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.config.parse import flag_status, parse_settings
from dicom_adapter.dicom.deflate import inflated_bytes
from dicom_adapter.dicom.part10 import read_file_meta
from dicom_adapter.dicom.transcode import (
    CODEC_MODULES,
    TARGETS,
    Outcome,
    Transcoder,
    codestream_shape,
    decoded_pixel_bytes,
    transcoding_step,
)
from dicom_adapter.errors import ConfigError

BASE = ["--dimse_aet=ADAPTER", "--dicomweb_address=http://dicomweb.example/dicom-web"]
FLAG = "--store_compress_to_transfer_syntax"
COMPRESSED_TARGETS = [JPEG2000Lossless, JPEGLSLossless, RLELossless]
LOGGER = "dicom_adapter.dicom.transcode"


def bundled(name: str, dest: Path) -> Path:
    """A copy of a pydicom test file, named as the C-STORE spool names received files."""
    source = get_testdata_file(name)
    if source is None:
        pytest.fail(f"pydicom test file {name} is not bundled with the installed pydicom")
    path = dest / f"cstore-{name}"
    shutil.copyfile(source, path)
    return path


def ct_instance(dest: Path, rows: int = 64, cols: int = 64) -> Path:
    """An uncompressed CT instance (Explicit VR Little Endian, 12 bits in 16), image-like pixels."""
    (path,) = generate_ct_series(dest / "ct", 1, rows=rows, cols=cols)
    ds = pydicom.dcmread(path)
    y, x = np.mgrid[0:rows, 0:cols]
    noise = np.random.default_rng(3).integers(0, 8, size=(rows, cols))
    ds.PixelData = ((x * 40 + y * 20 + noise) % 4096).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def multiframe_ct(dest: Path, frames: int = 3) -> Path:
    """An uncompressed multi-frame instance: the CT above with `frames` random frames."""
    ds = pydicom.dcmread(ct_instance(dest))
    rng = np.random.default_rng(7)
    ds.NumberOfFrames = frames
    ds.PixelData = rng.integers(0, 4096, size=(frames, ds.Rows, ds.Columns), dtype="<u2").tobytes()
    path = dest / "cstore-multiframe.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == LOGGER]


def assert_meta_consistent(path: Path, target: str, sop_instance_uid: str) -> None:
    """Group length, transfer syntax and instance UID of the rewritten file's meta group."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    assert struct.unpack_from("<HH2s", data, 132) == (0x0002, 0x0000, b"UL")
    (group_length,) = struct.unpack_from("<I", data, 140)
    meta = read_file_meta(data, complete=True)
    assert meta.dataset_offset == 144 + group_length  # (0002,0000) says where group 2 ends
    assert meta.transfer_syntax == target
    assert meta.sop_instance_uid == sop_instance_uid


def transcode(path: Path, target: str, **kwargs: int) -> tuple[Outcome, Dataset, Dataset]:
    """(outcome, data set before, data set after) of transcoding `path` to `target`."""
    before = pydicom.dcmread(path)
    outcome = Transcoder(target, **kwargs).transcode_file(path)
    return outcome, before, pydicom.dcmread(path)


def assert_same_pixels(before: Dataset, after: Dataset) -> None:
    original = before.pixel_array
    decoded = after.pixel_array
    assert decoded.shape == original.shape
    assert decoded.dtype == original.dtype
    assert np.array_equal(decoded, original)


# --------------------------------------------------------------------------------------------
# every target from an uncompressed CT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [*COMPRESSED_TARGETS, DeflatedExplicitVRLittleEndian])
def test_uncompressed_ct_to_each_target_round_trips_exactly(tmp_path: Path, target: str) -> None:
    path = ct_instance(tmp_path)
    outcome, before, after = transcode(path, target)
    assert outcome is Outcome.TRANSCODED
    assert after.file_meta.TransferSyntaxUID == target
    assert after.SOPInstanceUID == before.SOPInstanceUID  # compress() would make a new one
    assert after.PatientName == before.PatientName
    assert_meta_consistent(path, target, before.SOPInstanceUID)
    assert_same_pixels(before, after)
    if target in COMPRESSED_TARGETS:
        assert after["PixelData"].is_undefined_length  # encapsulated
        assert len(after.PixelData) < len(before.PixelData)
    else:  # deflated: the whole data set is compressed
        assert path.stat().st_size < len(before.PixelData)


def test_implicit_vr_ct_to_explicit_vr_little_endian(tmp_path: Path) -> None:
    ds = pydicom.dcmread(ct_instance(tmp_path))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "cstore-implicit.dcm"
    ds.save_as(path, enforce_file_format=True)
    outcome, before, after = transcode(path, ExplicitVRLittleEndian)
    assert outcome is Outcome.TRANSCODED
    assert after.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not after.original_encoding[0]  # explicit VR on disk
    assert_meta_consistent(path, ExplicitVRLittleEndian, before.SOPInstanceUID)
    assert_same_pixels(before, after)


@pytest.mark.parametrize("target", [*COMPRESSED_TARGETS, ExplicitVRLittleEndian])
def test_jpeg_baseline_input(tmp_path: Path, target: str) -> None:
    path = bundled("SC_rgb_dcmtk_+eb+cy+n1.dcm", tmp_path)
    outcome, before, after = transcode(path, target)
    assert before.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert outcome is Outcome.TRANSCODED
    assert after.file_meta.TransferSyntaxUID == target
    assert after.PhotometricInterpretation == "RGB"  # decoded as pydicom shows it
    assert_meta_consistent(path, target, before.SOPInstanceUID)
    assert_same_pixels(before, after)


@pytest.mark.parametrize("target", [JPEG2000Lossless, JPEGLSLossless, ExplicitVRLittleEndian])
def test_rle_input(tmp_path: Path, target: str) -> None:
    path = bundled("MR_small_RLE.dcm", tmp_path)
    outcome, before, after = transcode(path, target)
    assert before.file_meta.TransferSyntaxUID == RLELossless
    assert outcome is Outcome.TRANSCODED
    assert after.file_meta.TransferSyntaxUID == target
    assert_same_pixels(before, after)


@pytest.mark.parametrize(
    "name", ["MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm"]
)
def test_other_compressed_inputs_to_rle(tmp_path: Path, name: str) -> None:
    path = bundled(name, tmp_path)
    outcome, before, after = transcode(path, RLELossless)
    assert outcome is Outcome.TRANSCODED
    assert after.file_meta.TransferSyntaxUID == RLELossless
    assert_same_pixels(before, after)


@pytest.mark.parametrize("target", [JPEG2000Lossless, RLELossless])
def test_multiframe_instance(tmp_path: Path, target: str) -> None:
    path = multiframe_ct(tmp_path, frames=3)
    outcome, before, after = transcode(path, target)
    assert outcome is Outcome.TRANSCODED
    assert after.NumberOfFrames == 3
    assert after.pixel_array.shape == (3, 64, 64)
    assert_meta_consistent(path, target, before.SOPInstanceUID)
    assert_same_pixels(before, after)


@pytest.mark.parametrize("target", [JPEG2000Lossless, ExplicitVRLittleEndian])
def test_attributes_after_pixel_data_are_kept(tmp_path: Path, target: str) -> None:
    ds = pydicom.dcmread(bundled("MR_small_RLE.dcm", tmp_path))
    block = ds.private_block(0x7FE1, "dicom-adapter tests", create=True)
    block.add_new(0x01, "LO", "after the pixels")
    ds.DataSetTrailingPadding = b"\x00" * 8
    path = tmp_path / "cstore-trailing.dcm"
    ds.save_as(path, enforce_file_format=True)
    outcome, before, after = transcode(path, target)
    assert outcome is Outcome.TRANSCODED
    assert after.private_block(0x7FE1, "dicom-adapter tests")[0x01].value == "after the pixels"
    assert after.DataSetTrailingPadding == b"\x00" * 8
    assert_same_pixels(before, after)


def test_compressed_multiframe_input(tmp_path: Path) -> None:
    path = bundled("SC_rgb_rle_2frame.dcm", tmp_path)
    outcome, before, after = transcode(path, JPEG2000Lossless)
    assert outcome is Outcome.TRANSCODED
    assert after.pixel_array.shape == (2, 100, 100, 3)
    assert_same_pixels(before, after)


# --------------------------------------------------------------------------------------------
# what is stored as received
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "target"),
    [("MR_small_RLE.dcm", RLELossless), ("MR_small_jp2klossless.dcm", JPEG2000Lossless)],
)
def test_already_in_target_syntax_is_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, target: str
) -> None:
    path = bundled(name, tmp_path)
    original = path.read_bytes()
    assert Transcoder(target).transcode_file(path) is Outcome.ALREADY
    assert path.read_bytes() == original
    assert not warnings_of(caplog)


def corrupt_j2k(dest: Path) -> tuple[Path, str]:
    """A JPEG 2000 instance whose one fragment is not a codestream (no decoder takes it)."""
    source = bundled("MR_small_jp2klossless.dcm", dest)
    ds = pydicom.dcmread(source)
    source.unlink()
    ds.PixelData = encapsulate([bytes(range(256)) * 8])
    uid = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = dest / "cstore-corrupt.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, uid


@pytest.mark.parametrize("target", [RLELossless, ExplicitVRLittleEndian])
def test_corrupt_compressed_pixel_data_stores_original_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    path, uid = corrupt_j2k(tmp_path)
    original = path.read_bytes()
    with caplog.at_level(logging.INFO):
        outcome = Transcoder(target).transcode_file(path)
    assert outcome is Outcome.FAILED
    assert path.read_bytes() == original
    assert list(tmp_path.iterdir()) == [path]  # no sibling left behind
    (warning,) = warnings_of(caplog)
    assert uid in warning.getMessage()
    assert "stored as received" in warning.getMessage()
    assert "\n" not in warning.getMessage()
    assert warning.__dict__["sop_instance_uid"] == uid
    # pydicom's per-plugin tracebacks are not logged on top of our one line
    assert not [r for r in caplog.records if r.name.startswith("pydicom") and r.exc_info]


def test_pixels_a_codec_refuses_store_original(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = bundled("SC_rgb_rle_32bit.dcm", tmp_path)  # 32-bit RGB: no JPEG-LS profile
    original = path.read_bytes()
    assert Transcoder(JPEGLSLossless).transcode_file(path) is Outcome.FAILED
    assert path.read_bytes() == original
    assert len(warnings_of(caplog)) == 1


def test_not_a_dicom_file_stores_original(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cstore-garbage.dcm"
    path.write_bytes(b"\x00" * 10 + b"not DICOM at all")
    assert Transcoder(JPEG2000Lossless).transcode_file(path) is Outcome.FAILED
    assert path.read_bytes() == b"\x00" * 10 + b"not DICOM at all"
    assert len(warnings_of(caplog)) == 1


def test_a_step_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Transcoder(JPEG2000Lossless)(tmp_path / "cstore-vanished.dcm")  # the file is gone
    assert len(warnings_of(caplog)) == 1


def test_over_the_size_cap_is_untouched(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = ct_instance(tmp_path)  # 64x64x2 = 8192 bytes of pixels
    original = path.read_bytes()
    outcome = Transcoder(JPEG2000Lossless, max_bytes=8191).transcode_file(path)
    assert outcome is Outcome.TOO_LARGE
    assert path.read_bytes() == original
    (warning,) = warnings_of(caplog)
    assert pydicom.dcmread(path).SOPInstanceUID in warning.getMessage()
    assert "--transcode_max_bytes" in warning.getMessage()


@pytest.mark.parametrize("target", [JPEG2000Lossless, ExplicitVRLittleEndian])
def test_over_the_time_cap_is_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    path = bundled("SC_rgb_rle_2frame.dcm", tmp_path)  # checked between frames, and at the end
    original = path.read_bytes()
    outcome = Transcoder(target, max_seconds=1e-9).transcode_file(path)
    assert outcome is Outcome.TOO_SLOW
    assert path.read_bytes() == original
    assert list(tmp_path.iterdir()) == [path]
    (warning,) = warnings_of(caplog)
    assert pydicom.dcmread(path).SOPInstanceUID in warning.getMessage()
    assert "--transcode_max_seconds" in warning.getMessage()


def test_waiting_for_another_transcode_counts_against_the_time_cap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = ct_instance(tmp_path)
    original = path.read_bytes()
    transcoder = Transcoder(JPEG2000Lossless, max_seconds=0.05)
    with transcoder._one_at_a_time:  # another association's instance is being transcoded
        assert transcoder.transcode_file(path) is Outcome.TOO_SLOW
    assert path.read_bytes() == original
    assert len(warnings_of(caplog)) == 1
    assert transcoder.transcode_file(path) is Outcome.TRANSCODED  # the lock was not kept


def test_cap_counts_the_decoded_size_the_header_claims(tmp_path: Path) -> None:
    """A small compressed file whose header claims huge pixels is never decoded."""
    path, _ = corrupt_j2k(tmp_path)
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 100
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 10_000
    outcome = Transcoder(RLELossless, max_bytes=512 << 20).transcode_file(path)
    assert outcome is Outcome.TOO_LARGE


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_dcmtk_+eb+cy+n1.dcm",  # JPEG baseline
        "JPEG2000.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless
    ],
)
def test_codestream_shape_of_bundled_frames(tmp_path: Path, name: str) -> None:
    ds = pydicom.dcmread(bundled(name, tmp_path))
    frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))
    assert codestream_shape(frame) == (ds.Rows, ds.Columns, ds.SamplesPerPixel)


def test_codestream_shape_of_garbage() -> None:
    assert codestream_shape(b"") is None
    assert codestream_shape(bytes(range(256))) is None
    assert codestream_shape(b"\xff\xd8\xff\xda\x00\x02") is None  # scan before frame header


def test_codestream_claiming_more_pixels_than_the_data_set_is_never_decoded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A few hundred bytes of JPEG 2000 that decode to 64 MB are refused from their header."""
    codestream = encode_array(np.zeros((2000, 2000), dtype=np.uint8), bits_stored=8)
    source = bundled("MR_small_jp2klossless.dcm", tmp_path)  # says 64x64
    ds = pydicom.dcmread(source)
    ds.PixelData = encapsulate([codestream])
    path = tmp_path / "cstore-bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    original = path.read_bytes()
    assert Transcoder(RLELossless).transcode_file(path) is Outcome.FAILED
    assert path.read_bytes() == original
    (warning,) = warnings_of(caplog)
    assert "claims 2000x2000x1 pixels, the data set 64x64x1" in warning.getMessage()


def test_inflated_bytes_of_a_deflated_file(tmp_path: Path) -> None:
    path = bundled("image_dfl.dcm", tmp_path)
    meta = pydicom.filereader.read_file_meta_info(path)
    body = path.read_bytes()[144 + meta.FileMetaInformationGroupLength :]
    size = len(zlib.decompress(body, -zlib.MAX_WBITS))
    assert inflated_bytes(path, 1 << 30) == size
    assert inflated_bytes(path, 1000) == 1000  # counting stops at the limit


def test_deflated_file_that_inflates_past_the_cap_is_never_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A few kB of Deflated data set that inflate to 8 MiB, against a 1 MiB cap."""
    ds = pydicom.dcmread(ct_instance(tmp_path))
    block = ds.private_block(0x0009, "dicom-adapter tests", create=True)
    block.add_new(0x01, "OB", bytes(8 << 20))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "cstore-deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 64 << 10
    original = path.read_bytes()
    outcome = Transcoder(RLELossless, max_bytes=1 << 20).transcode_file(path)
    assert outcome is Outcome.TOO_LARGE
    assert path.read_bytes() == original
    (warning,) = warnings_of(caplog)
    assert ds.SOPInstanceUID in warning.getMessage()


def test_decoded_pixel_bytes() -> None:
    ds = Dataset()
    assert decoded_pixel_bytes(ds) == 0
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 512, 512, 16, 1
    assert decoded_pixel_bytes(ds) == 512 * 512 * 2
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.BitsAllocated = 4, 3, 8
    assert decoded_pixel_bytes(ds) == 4 * 512 * 512 * 3
    ds.BitsAllocated, ds.SamplesPerPixel, ds.Rows, ds.Columns, ds.NumberOfFrames = 1, 1, 3, 3, 1
    assert decoded_pixel_bytes(ds) == 2  # 9 bits


def test_no_pixel_data_is_untouched_for_a_compressed_target(tmp_path: Path) -> None:
    ds = pydicom.dcmread(ct_instance(tmp_path))
    del ds.PixelData
    path = tmp_path / "cstore-nopixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    original = path.read_bytes()
    assert Transcoder(JPEG2000Lossless).transcode_file(path) is Outcome.NO_PIXELS
    assert path.read_bytes() == original


# --------------------------------------------------------------------------------------------
# flags and startup
# --------------------------------------------------------------------------------------------


def parse(*argv: str) -> ImporterSettings:
    return parse_settings(
        ImporterSettings, [*BASE, *argv], prog="dicom-import", description="t", environ={}
    )


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_supported_targets_are_accepted(target: str) -> None:
    settings = parse(f"{FLAG}={target}")
    assert settings.store_compress_to_transfer_syntax == target
    assert settings.transcode_max_bytes == 512 << 20
    assert flag_status(ImporterSettings.model_fields["store_compress_to_transfer_syntax"]) == ""


@pytest.mark.parametrize("target", ["1.2.840.10008.1.2.4.50", "1.2.3", "jpeg2000"])
def test_unsupported_target_is_a_config_error(target: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(f"{FLAG}={target}")
    assert info.value.flag == "store_compress_to_transfer_syntax"
    assert target in str(info.value)
    assert JPEG2000Lossless in str(info.value)


@pytest.mark.parametrize("flag", ["transcode_max_bytes", "transcode_max_seconds"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_transcode_caps_must_be_positive(flag: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(f"--{flag}={value}")
    assert info.value.flag == flag


def test_caps_reach_the_step() -> None:
    settings = parse(
        f"{FLAG}={RLELossless}", "--transcode_max_bytes=1000", "--transcode_max_seconds=2.5"
    )
    assert (settings.transcode_max_bytes, settings.transcode_max_seconds) == (1000, 2.5)


def test_unsupported_target_stops_the_console_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_import([*BASE, f"{FLAG}=1.2.840.10008.1.2.4.50"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--store_compress_to_transfer_syntax" in err[0]


@pytest.mark.parametrize("module", CODEC_MODULES)
def test_missing_codecs_refuse_the_step_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    with pytest.raises(ConfigError) as info:
        transcoding_step(JPEG2000Lossless, 1 << 20)
    assert info.value.flag == "store_compress_to_transfer_syntax"
    assert "pip install 'dicom-adapter[codecs]'" in str(info.value)
    assert module in str(info.value)


# dicom-import in a child process where importing any codec package fails: no extra installed
WITHOUT_CODECS = """
import sys
from dicom_adapter.dicom.transcode import CODEC_MODULES
for name in CODEC_MODULES:
    sys.modules[name] = None
from dicom_adapter.cli import run_import
sys.exit(run_import(sys.argv[1:]))
"""


def test_missing_codecs_stop_dicom_import_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_CODECS, *BASE, f"{FLAG}={JPEG2000Lossless}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dicom-import: --store_compress_to_transfer_syntax: needs the image")
    assert "pip install 'dicom-adapter[codecs]'" in last
    assert "numpy, pylibjpeg, openjpeg, libjpeg, rle, jpeg_ls missing" in last


def test_no_step_without_the_flag() -> None:
    assert transcoding_step("", 1 << 20) is None
    step = transcoding_step(JPEG2000Lossless, 1 << 20)
    assert isinstance(step, Transcoder)
    assert step.max_bytes == 1 << 20
