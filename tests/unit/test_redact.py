"""Redaction (issue 10 point 2): the Java adapter's semantics, at any depth, streamed pixels."""

from __future__ import annotations

import re
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from tests.rig import write_large_instance

from dicom_adapter.cli import run_import
from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.config.parse import parse_settings
from dicom_adapter.dicom.redact import (
    RedactionConfigError,
    RedactionStep,
    Redactor,
    chc_basic_keywords,
    java_uid,
    parse_tag,
    parse_tag_list,
    redactor_from_flags,
)
from dicom_adapter.errors import ConfigError, InvalidDatasetError

BASE = ["--dimse_aet=IMPORTER", "--dicomweb_address=http://127.0.0.1:8042/dicom-web"]
CHC_BASIC = redactor_from_flags("", "", "CHC_BASIC")


def _settings(argv: Sequence[str]) -> ImporterSettings:
    return parse_settings(ImporterSettings, argv, prog="dicom-import", description="", environ={})


def _person(name: str) -> Dataset:
    item = Dataset()
    item.PatientName = name
    item.PatientID = "NESTED-ID"
    item.CodeMeaning = "kept"
    return item


def _instance(path: Path, syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """A small CT with PatientName at depth 1, 2 and 3 and a series reference in a sequence."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Top^Level"
    ds.PatientID = "TOP-ID"
    ds.Modality = "CT"
    ds.StudyDescription = "kept description"
    inner = _person("Depth^Three")
    middle = _person("Depth^Two")
    middle.ConceptNameCodeSequence = DicomSequence([inner])
    ds.AnatomicRegionSequence = DicomSequence([middle])
    reference = Dataset()
    reference.SeriesInstanceUID = ds.SeriesInstanceUID
    reference.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedSeriesSequence = DicomSequence([reference])
    ds.OtherPatientIDsSequence = DicomSequence([_person("Other^Name")])
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 4, 4, 16, 12, 11
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = bytes(range(32))
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return ds


def _redacted(redactor: Redactor, source: Path, tmp_path: Path) -> Dataset:
    target = tmp_path / "redacted.dcm"
    redactor.redact_file(source, target)
    return dcmread(target)


# --------------------------------------------------------------------------------------------
# UIDs, tag lists, the shipped profile
# --------------------------------------------------------------------------------------------


def test_uid_formula_matches_the_java_adapters_test_vector() -> None:
    assert java_uid("111") == "2.25.140302709094137852884202099990798014056"


def test_tags_by_keyword_or_eight_hex_digits() -> None:
    assert parse_tag("PatientName") == 0x00100010
    assert parse_tag(" 00100020 ") == 0x00100020
    assert parse_tag("0009100a") == 0x0009100A  # a private tag, by number
    assert parse_tag_list("PatientName, 00100020,,") == {0x00100010, 0x00100020}


@pytest.mark.parametrize("text", ["PatientNam", "0010002", "x0100010", "0010002G"])
def test_unknown_tag_is_named(text: str) -> None:
    with pytest.raises(RedactionConfigError, match=re.escape(repr(text))):
        parse_tag_list(f"PatientID,{text}")


def test_chc_basic_ships_in_the_package_with_the_java_list() -> None:
    keywords = chc_basic_keywords()
    assert len(keywords) == 286
    assert len(set(keywords)) == 286
    assert keywords[:3] == ["AccessionNumber", "ConsultingPhysicianName", "ContentCreatorName"]
    assert keywords[-1] == "VerifyingOrganization"
    for known in ("PatientName", "PatientID", "PatientBirthDate", "ReferencedSOPInstanceUID"):
        assert known in keywords
    assert "SOPClassUID" not in keywords and "PixelData" not in keywords
    assert CHC_BASIC is not None and len(CHC_BASIC.tags) == 286


# --------------------------------------------------------------------------------------------
# remove list, keep list, sequences, UIDs
# --------------------------------------------------------------------------------------------


def test_chc_basic_empties_at_every_depth_and_replaces_uids(tmp_path: Path) -> None:
    original = _instance(tmp_path / "in.dcm")
    assert CHC_BASIC is not None
    out = _redacted(CHC_BASIC, tmp_path / "in.dcm", tmp_path)
    # emptied, not deleted, at depth 1, 2 and 3
    assert "PatientName" in out and out.PatientName == ""
    middle = out.AnatomicRegionSequence[0]
    inner = middle.ConceptNameCodeSequence[0]
    for ds in (out, middle, inner):
        assert ds["PatientName"].is_empty and ds["PatientID"].is_empty
    assert middle.CodeMeaning == inner.CodeMeaning == "kept"
    assert out.Modality == "CT" and out.Rows == 4
    # a sequence on the list keeps its attribute, with no items
    assert "OtherPatientIDsSequence" in out and len(out.OtherPatientIDsSequence) == 0
    # the four UIDs: the Java formula, also inside sequences; ReferencedSOPInstanceUID emptied
    assert out.SOPInstanceUID == java_uid(original.SOPInstanceUID)
    assert out.file_meta.MediaStorageSOPInstanceUID == java_uid(original.SOPInstanceUID)
    assert out.StudyInstanceUID == java_uid(original.StudyInstanceUID)
    assert out.SeriesInstanceUID == java_uid(original.SeriesInstanceUID)
    reference = out.ReferencedSeriesSequence[0]
    assert reference.SeriesInstanceUID == out.SeriesInstanceUID
    assert reference["ReferencedSOPInstanceUID"].is_empty
    assert out.SOPClassUID == CTImageStorage
    assert out.PixelData == original.PixelData
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_remove_list_by_number_leaves_the_rest_byte_identical(tmp_path: Path) -> None:
    original = _instance(tmp_path / "in.dcm")
    out = _redacted(Redactor(parse_tag_list("00100020")), tmp_path / "in.dcm", tmp_path)
    assert out.PatientID == "" and out.AnatomicRegionSequence[0].PatientID == ""
    assert out.PatientName == "Top^Level"
    assert out.AnatomicRegionSequence[0].ConceptNameCodeSequence[0].PatientName == "Depth^Three"
    unchanged = {"PatientID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"}
    unchanged |= {"AnatomicRegionSequence", "OtherPatientIDsSequence", "ReferencedSeriesSequence"}
    for element in original:
        if element.keyword not in unchanged:
            assert out[element.tag].value == element.value, element.keyword


def test_keep_list_empties_everything_else_and_keeps_what_storing_needs(tmp_path: Path) -> None:
    original = _instance(tmp_path / "in.dcm")
    redactor = redactor_from_flags(
        "",
        "StudyDescription,AnatomicRegionSequence,ConceptNameCodeSequence,CodeMeaning,PixelData",
        "",
    )
    assert redactor is not None
    out = _redacted(redactor, tmp_path / "in.dcm", tmp_path)
    assert out.StudyDescription == "kept description"
    assert out["PatientName"].is_empty and out["Modality"].is_empty
    # a kept sequence keeps its items; inside them too only kept attributes keep values
    middle = out.AnatomicRegionSequence[0]
    assert middle.CodeMeaning == "kept" and middle["PatientName"].is_empty
    assert middle.ConceptNameCodeSequence[0].CodeMeaning == "kept"
    assert middle.ConceptNameCodeSequence[0]["PatientName"].is_empty
    assert len(out.ReferencedSeriesSequence) == 0  # not kept: no items
    # always replaced, never emptied
    assert out.SOPInstanceUID == java_uid(original.SOPInstanceUID)
    assert out.StudyInstanceUID == java_uid(original.StudyInstanceUID)
    # kept without being listed: what storing and decoding the kept pixels need
    assert out.SOPClassUID == CTImageStorage and out.SpecificCharacterSet == "ISO_IR 100"
    assert (out.Rows, out.Columns, out.BitsAllocated) == (4, 4, 16)
    assert out.PixelData == original.PixelData


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_emptied_compressed_pixel_data_makes_it_explicit_vr_little_endian(
    name: str, tmp_path: Path
) -> None:
    source = get_testdata_file(name)
    assert source is not None
    original = dcmread(source)
    assert original.file_meta.TransferSyntaxUID.is_compressed
    out = _redacted(Redactor(parse_tag_list("PixelData")), Path(source), tmp_path)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out["PixelData"].is_empty
    assert out.Rows == original.Rows


@pytest.mark.parametrize(
    "name",
    [
        "JPEG2000.dcm",
        "MR_small_RLE.dcm",
        "CT_small.dcm",
        "MR_small_bigendian.dcm",  # Explicit VR Big Endian
        "SC_rgb_jpeg.dcm",  # says explicit VR, holds implicit VR elements
    ],
)
@pytest.mark.filterwarnings("ignore:Expected explicit VR, but found implicit VR:UserWarning")
def test_kept_pixel_data_is_copied_unchanged(name: str, tmp_path: Path) -> None:
    source = get_testdata_file(name)
    assert source is not None
    original = dcmread(source)
    assert CHC_BASIC is not None
    out = _redacted(CHC_BASIC, Path(source), tmp_path)
    assert out.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert out.PixelData == original.PixelData
    assert out["PatientName"].is_empty


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_implicit_and_deflated_instances(syntax: str, tmp_path: Path) -> None:
    original = _instance(tmp_path / "in.dcm", syntax)
    assert CHC_BASIC is not None
    out = _redacted(CHC_BASIC, tmp_path / "in.dcm", tmp_path)
    assert out.file_meta.TransferSyntaxUID == syntax
    assert (
        out.PatientName == ""
        and out.AnatomicRegionSequence[0].ConceptNameCodeSequence[0].PatientName == ""
    )
    assert out.SOPInstanceUID == java_uid(original.SOPInstanceUID)
    assert out.PixelData == original.PixelData


def test_pixel_data_is_streamed_not_loaded(tmp_path: Path) -> None:
    """A 64 MiB instance is redacted with a few MiB of Python memory at most."""
    source = tmp_path / "large.dcm"
    write_large_instance(source, 64 << 20)
    assert CHC_BASIC is not None
    tracemalloc.start()
    try:
        CHC_BASIC.redact_file(source, tmp_path / "out.dcm")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"
    out = dcmread(tmp_path / "out.dcm", stop_before_pixels=True)
    assert out.PatientName == ""
    assert (tmp_path / "out.dcm").stat().st_size > 64 << 20


# --------------------------------------------------------------------------------------------
# the preparation step
# --------------------------------------------------------------------------------------------


def test_step_rewrites_the_file_in_place(tmp_path: Path) -> None:
    path = tmp_path / "received.dcm"
    original = _instance(path)
    assert CHC_BASIC is not None
    RedactionStep(CHC_BASIC)(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["received.dcm"]
    out = dcmread(path)
    assert out.PatientName == "" and out.SOPInstanceUID == java_uid(original.SOPInstanceUID)


def test_step_refuses_what_it_cannot_parse_and_leaves_no_sibling(tmp_path: Path) -> None:
    path = tmp_path / "received.dcm"
    _instance(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 20])  # pixel data cut short
    assert CHC_BASIC is not None
    with pytest.raises(InvalidDatasetError):
        RedactionStep(CHC_BASIC)(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["received.dcm"]
    path.write_bytes(b"not DICOM at all")
    with pytest.raises(InvalidDatasetError):
        RedactionStep(CHC_BASIC)(path)
    assert path.read_bytes() == b"not DICOM at all"


# --------------------------------------------------------------------------------------------
# the flags
# --------------------------------------------------------------------------------------------


def test_flags_are_supported() -> None:
    settings = _settings([*BASE, "--redact_filter_profile=CHC_BASIC"])
    assert settings.redact_filter_profile == "CHC_BASIC"
    settings = _settings([*BASE, "--redact_remove_list=PatientName,00100020"])
    assert settings.redact_remove_list == "PatientName,00100020"
    settings = _settings([*BASE, "--redact_keep_list=PatientSex"])
    assert settings.redact_keep_list == "PatientSex"


@pytest.mark.parametrize(
    ("argv", "flag", "named"),
    [
        (["--redact_remove_list=PatientName,Nonsense"], "redact_remove_list", "'Nonsense'"),
        (["--redact_keep_list=1234"], "redact_keep_list", "'1234'"),
        (["--redact_filter_profile=CHC_FULL"], "redact_filter_profile", "'CHC_FULL'"),
        (
            ["--redact_remove_list=PatientName", "--redact_keep_list=PatientID"],
            "redact_keep_list",
            "only one of",
        ),
        (
            ["--redact_remove_list=PatientName", "--redact_filter_profile=CHC_BASIC"],
            "redact_filter_profile",
            "only one of",
        ),
    ],
)
def test_bad_redaction_flags_stop_startup(argv: list[str], flag: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        _settings([*BASE, *argv])
    assert info.value.flag == flag
    assert named in str(info.value)
    assert "\n" not in str(info.value) and "Value error" not in str(info.value)


def test_step_does_not_resurrect_a_file_its_association_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cstore-1.dcm"
    _instance(path)
    assert CHC_BASIC is not None
    redact_file = Redactor.redact_file

    def cleaned_up_meanwhile(self: Redactor, source: Path, target: Path) -> None:
        redact_file(self, source, target)
        source.unlink()  # what AssociationCleanup does when the peer aborts

    monkeypatch.setattr(Redactor, "redact_file", cleaned_up_meanwhile)
    with pytest.raises(FileNotFoundError):
        RedactionStep(CHC_BASIC)(path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--redact_keep_list=PatientID", "--redact_filter_profile=CHC_BASIC"],
        ["--redact_remove_list=PatientName,NoSuchKeyword"],
    ],
)
def test_cli_stops_with_one_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REDACT_REMOVE_LIST", "REDACT_KEEP_LIST", "REDACT_FILTER_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    assert run_import([*BASE, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dicom-import: --redact_") and err.count("\n") == 1
