"""Unit tests for the pure C-FIND <-> QIDO-RS mapping in dicom_adapter.dicomweb.qido."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import pytest
from pydicom import Dataset, config
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.valuerep import PersonName

from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy, make_http_client
from dicom_adapter.dicomweb.qido import (
    IdentifierError,
    QidoQuery,
    QueryLevel,
    QueryRoot,
    build_queries,
    count_of,
    dataset_from_json,
    lists_whole_patients,
    path_uid,
    patient_key,
    requested_counts,
    set_count,
    shape_response,
)
from dicom_adapter.errors import InvalidDatasetError, UpstreamError
from dicom_adapter.status import Status

STUDY_UID = "1.2.840.10008.99.1"
SERIES_UID = "1.2.840.10008.99.1.2"
SOP_UID = "1.2.840.10008.99.1.2.3"


def identifier(level: str | None, **keys: Any) -> Dataset:
    """A C-FIND identifier with the given level and keyword keys."""
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def lax(ds: Dataset, tag: int, vr: str, value: Any) -> Dataset:
    """Add an element whose value pydicom would warn about (wildcard UIDs, lower-case CS)."""
    ds.add(DataElement(tag, vr, value, validation_mode=config.IGNORE))
    return ds


def one(ds: Dataset, root: QueryRoot = QueryRoot.STUDY, *, fuzzy: bool = False) -> QidoQuery:
    """The single query built for an identifier."""
    queries = build_queries(ds, root, fuzzy=fuzzy)
    assert len(queries) == 1
    return queries[0]


def tags(ds: Dataset) -> list[int]:
    """Top-level tags of a dataset, as ints, in order."""
    return [int(elem.tag) for elem in ds]


# --------------------------------------------------------------------------- levels and roots


def test_error_is_cannot_understand() -> None:
    err = IdentifierError("x")
    assert isinstance(err, InvalidDatasetError)
    assert err.status is Status.CANNOT_UNDERSTAND


@pytest.mark.parametrize("level", [None, "", "FOO", "FRAME"])
def test_missing_or_unknown_level_is_rejected(level: str | None) -> None:
    with pytest.raises(IdentifierError):
        build_queries(identifier(level, PatientName="DOE"), QueryRoot.STUDY)


def test_level_is_case_and_padding_tolerant() -> None:
    ds = lax(identifier(None, PatientName="DOE"), 0x00080052, "CS", "study ")
    assert one(ds).level is QueryLevel.STUDY


def test_patient_level_needs_patient_root() -> None:
    with pytest.raises(IdentifierError):
        build_queries(identifier("PATIENT", PatientID="P1"), QueryRoot.STUDY)


def test_patient_level_with_patient_root_queries_studies() -> None:
    ds = identifier("PATIENT", PatientName="DOE^J*", PatientID="", PatientBirthDate="")
    assert one(ds, QueryRoot.PATIENT) == QidoQuery(
        level=QueryLevel.PATIENT,
        path="studies",
        params=(
            ("PatientName", "DOE^J*"),
            ("includefield", "00100020"),
            ("includefield", "00100030"),
        ),
        requested=(0x00080052, 0x00100010, 0x00100020, 0x00100030),
    )


def test_study_level_study_root() -> None:
    ds = identifier(
        "STUDY",
        StudyDate="20200101-20201231",
        PatientName="DOE^JOHN",
        StudyInstanceUID="",
        AccessionNumber="",
    )
    assert one(ds) == QidoQuery(
        level=QueryLevel.STUDY,
        path="studies",
        params=(
            ("StudyDate", "20200101-20201231"),
            ("PatientName", "DOE^JOHN"),
            ("includefield", "00080050"),
            ("includefield", "0020000D"),
        ),
        requested=(0x00080020, 0x00080050, 0x00080052, 0x00100010, 0x0020000D),
    )


def test_patient_root_study_level_patient_keys_are_match_params() -> None:
    ds = identifier("STUDY", PatientID="P1", IssuerOfPatientID="HOSP", StudyDate="")
    assert one(ds, QueryRoot.PATIENT).params == (
        ("PatientID", "P1"),
        ("IssuerOfPatientID", "HOSP"),
        ("includefield", "00080020"),
    )


def test_patient_root_series_level_uses_hierarchy_too() -> None:
    ds = identifier("SERIES", PatientID="P1", StudyInstanceUID=STUDY_UID, Modality="")
    q = one(ds, QueryRoot.PATIENT)
    assert q.path == f"studies/{STUDY_UID}/series"
    assert q.params == (("PatientID", "P1"), ("includefield", "00080060"))


def test_study_uid_at_study_level_stays_a_param() -> None:
    q = one(identifier("STUDY", StudyInstanceUID=STUDY_UID))
    assert q.path == "studies"
    assert q.params == (("StudyInstanceUID", STUDY_UID),)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "value",
    ["20200101-20201231", "-20201231", "20200101-", "20200101"],
)
def test_date_ranges_pass_through(value: str) -> None:
    assert one(identifier("STUDY", StudyDate=value)).params == (("StudyDate", value),)


@pytest.mark.parametrize("value", ["DOE^J*", "D?E^JOHN", "*OE*", "DOE^JOHN^^DR^"])
def test_wildcards_and_pn_pass_through(value: str) -> None:
    assert one(identifier("STUDY", PatientName=value)).params == (("PatientName", value),)


def test_trailing_spaces_are_stripped() -> None:
    q = one(identifier("STUDY", AccessionNumber="A123  ", PatientID="P 1 "))
    assert q.params == (("AccessionNumber", "A123"), ("PatientID", "P 1"))


def test_lone_asterisk_is_universal_matching() -> None:
    q = one(identifier("STUDY", PatientName="*"))
    assert q.params == (("includefield", "00100010"),)
    assert q.requested == (0x00080052, 0x00100010)


def test_numeric_values_are_sent_as_text() -> None:
    ds = identifier("SERIES", SeriesNumber="7")
    ds.add_new(0x00280010, "US", 512)
    assert one(ds).params == (("SeriesNumber", "7"), ("Rows", "512"))


def test_at_value_is_hex() -> None:
    ds = identifier("IMAGE")
    ds.add_new(0x00209165, "AT", Tag(0x00100010))
    assert one(ds).params == (("DimensionIndexPointer", "00100010"),)


def test_binary_value_cannot_be_matched() -> None:
    ds = identifier("STUDY")
    ds.add_new(0x00091010, "OB", b"\x01\x02")
    with pytest.raises(IdentifierError):
        build_queries(ds, QueryRoot.STUDY)


def test_empty_binary_key_is_includefield() -> None:
    ds = identifier("STUDY")
    ds.add_new(0x00091010, "OB", b"")
    assert one(ds).params == (("includefield", "00091010"),)


def test_never_sends_level_or_charset() -> None:
    ds = identifier("STUDY", SpecificCharacterSet="ISO_IR 100", PatientName="M\u00fcller")
    q = one(ds)
    assert q.params == (("PatientName", "M\u00fcller"),)
    assert q.requested == (0x00080005, 0x00080052, 0x00100010)


def test_empty_charset_is_not_sent_either() -> None:
    ds = identifier("STUDY", SpecificCharacterSet="", PatientID="")
    assert one(ds).params == (("includefield", "00100020"),)


def test_private_and_unknown_tags_use_upper_hex() -> None:
    ds = identifier("STUDY")
    ds.add_new(0x0009101A, "LO", "abc")
    ds.add_new(0x0011100B, "LO", "")
    q = one(ds)
    assert q.params == (("0009101A", "abc"), ("includefield", "0011100B"))
    assert q.requested == (0x00080052, 0x0009101A, 0x0011100B)


def test_repeater_tag_uses_hex_not_generic_keyword() -> None:
    ds = identifier("IMAGE")
    ds.add_new(0x60020010, "US", 4)
    assert one(ds).params == (("60020010", "4"),)


def test_sequence_keys_are_includefield_even_with_items() -> None:
    item = Dataset()
    item.CodeValue = "X"
    ds = identifier("STUDY", ProcedureCodeSequence=Sequence([item]), ReferencedStudySequence=[])
    q = one(ds)
    assert q.params == (("includefield", "00081032"), ("includefield", "00081110"))
    assert q.requested == (0x00080052, 0x00081032, 0x00081110)


def test_fuzzy_adds_fuzzymatching() -> None:
    q = one(identifier("STUDY", PatientName="DOE", StudyDate=""), fuzzy=True)
    assert q.params == (
        ("PatientName", "DOE"),
        ("includefield", "00080020"),
        ("fuzzymatching", "true"),
    )


def test_lower_level_keys_are_sent_leniently() -> None:
    ds = identifier("STUDY", SOPInstanceUID=SOP_UID, InstanceNumber="", PatientID="P")
    q = one(ds)
    assert q.path == "studies"
    assert q.params == (
        ("SOPInstanceUID", SOP_UID),
        ("PatientID", "P"),
        ("includefield", "00200013"),
    )
    assert q.requested == (0x00080018, 0x00080052, 0x00100020, 0x00200013)


def test_requested_keeps_identifier_order_and_everything() -> None:
    ds = identifier("IMAGE", SOPInstanceUID="", StudyInstanceUID=STUDY_UID, PatientName="")
    assert one(ds).requested == (0x00080018, 0x00080052, 0x00100010, 0x0020000D)


# --------------------------------------------------------------------------- multiple values


def test_multi_valued_uid_becomes_uid_list() -> None:
    ds = identifier("STUDY", StudyInstanceUID=["1.2.3", "1.2.4", "1.2.5"])
    assert one(ds).params == (("StudyInstanceUID", "1.2.3,1.2.4,1.2.5"),)


def test_multi_valued_sop_uid_at_image_level() -> None:
    ds = identifier(
        "IMAGE",
        StudyInstanceUID=STUDY_UID,
        SeriesInstanceUID=SERIES_UID,
        SOPInstanceUID=["1.2.3", "1.2.4"],
    )
    q = one(ds)
    assert q.path == f"studies/{STUDY_UID}/series/{SERIES_UID}/instances"
    assert q.params == (("SOPInstanceUID", "1.2.3,1.2.4"),)


def test_multi_valued_study_uid_is_not_unique_so_no_hierarchy() -> None:
    ds = identifier("SERIES", StudyInstanceUID=["1.2.3", "1.2.4"], Modality="MR")
    q = one(ds)
    assert q.path == "series"
    assert q.params == (("Modality", "MR"), ("StudyInstanceUID", "1.2.3,1.2.4"))


def test_multi_valued_modalities_fan_out() -> None:
    ds = identifier(
        "STUDY",
        ModalitiesInStudy=["MR", "CT", "MR"],
        PatientName="DOE*",
        StudyDate="",
    )
    queries = build_queries(ds, QueryRoot.STUDY, fuzzy=True)
    requested = (0x00080020, 0x00080052, 0x00080061, 0x00100010)
    assert queries == [
        QidoQuery(
            QueryLevel.STUDY,
            "studies",
            (
                ("ModalitiesInStudy", modality),
                ("PatientName", "DOE*"),
                ("includefield", "00080020"),
                ("fuzzymatching", "true"),
            ),
            requested,
        )
        for modality in ("MR", "CT")
    ]


def test_multi_valued_modalities_with_hierarchy() -> None:
    ds = identifier(
        "SERIES", StudyInstanceUID=STUDY_UID, ModalitiesInStudy=["CT", "PT"], SeriesNumber=""
    )
    queries = build_queries(ds, QueryRoot.STUDY)
    assert [q.path for q in queries] == [f"studies/{STUDY_UID}/series"] * 2
    assert [q.params for q in queries] == [
        (("ModalitiesInStudy", "CT"), ("includefield", "00200011")),
        (("ModalitiesInStudy", "PT"), ("includefield", "00200011")),
    ]


def test_single_modality_is_plain_param() -> None:
    assert build_queries(identifier("STUDY", ModalitiesInStudy="CT"), QueryRoot.STUDY) == [
        QidoQuery(QueryLevel.STUDY, "studies", (("ModalitiesInStudy", "CT"),), (0x80052, 0x80061))
    ]


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("PatientName", ["DOE", "ROE"]), ("Modality", ["CT", "MR"]), ("PatientID", ["A", "B"])],
)
def test_other_multi_valued_keys_are_untranslatable(keyword: str, value: list[str]) -> None:
    with pytest.raises(IdentifierError):
        build_queries(identifier("SERIES", **{keyword: value}), QueryRoot.STUDY)


def test_empty_values_inside_multi_value_are_ignored() -> None:
    ds = identifier("STUDY", StudyInstanceUID="1.2.3\\", PatientName="")
    assert one(ds).params == (("StudyInstanceUID", "1.2.3"), ("includefield", "00100010"))


# --------------------------------------------------------------------------- hierarchy


def test_series_level_with_unique_study_uses_path() -> None:
    ds = identifier("SERIES", StudyInstanceUID=STUDY_UID, Modality="CT", SeriesInstanceUID="")
    assert one(ds) == QidoQuery(
        level=QueryLevel.SERIES,
        path=f"studies/{STUDY_UID}/series",
        params=(("Modality", "CT"), ("includefield", "0020000E")),
        requested=(0x00080052, 0x00080060, 0x0020000D, 0x0020000E),
    )


def test_series_level_without_study_uid() -> None:
    ds = identifier("SERIES", Modality="CT", StudyInstanceUID="")
    q = one(ds)
    assert q.path == "series"
    assert q.params == (("Modality", "CT"), ("includefield", "0020000D"))


def test_series_level_series_uid_stays_a_param() -> None:
    ds = identifier("SERIES", StudyInstanceUID=STUDY_UID, SeriesInstanceUID=SERIES_UID)
    q = one(ds)
    assert q.path == f"studies/{STUDY_UID}/series"
    assert q.params == (("SeriesInstanceUID", SERIES_UID),)


def test_image_level_with_study_and_series() -> None:
    ds = identifier(
        "IMAGE",
        StudyInstanceUID=STUDY_UID,
        SeriesInstanceUID=SERIES_UID,
        SOPInstanceUID="",
        InstanceNumber="5",
    )
    assert one(ds) == QidoQuery(
        level=QueryLevel.IMAGE,
        path=f"studies/{STUDY_UID}/series/{SERIES_UID}/instances",
        params=(("InstanceNumber", "5"), ("includefield", "00080018")),
        requested=(0x00080018, 0x00080052, 0x0020000D, 0x0020000E, 0x00200013),
    )


def test_image_level_with_study_only() -> None:
    ds = identifier("IMAGE", StudyInstanceUID=STUDY_UID, SeriesInstanceUID="", SOPInstanceUID="")
    q = one(ds)
    assert q.path == f"studies/{STUDY_UID}/instances"
    assert q.params == (("includefield", "00080018"), ("includefield", "0020000E"))


def test_image_level_with_series_only() -> None:
    ds = identifier("IMAGE", SeriesInstanceUID=SERIES_UID, SOPInstanceUID="")
    q = one(ds)
    assert q.path == "instances"
    assert q.params == (("SeriesInstanceUID", SERIES_UID), ("includefield", "00080018"))


def test_image_level_without_uids() -> None:
    q = one(identifier("IMAGE", SOPClassUID="1.2.840.10008.5.1.4.1.1.2"))
    assert q.path == "instances"
    assert q.params == (("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"),)


@pytest.mark.parametrize("uid", ["1.2.3*", "1.2.?", "*"])
def test_wildcard_uid_is_not_unique(uid: str) -> None:
    q = one(lax(identifier("SERIES"), 0x0020000D, "UI", uid))
    assert q.path == "series"
    if uid == "*":
        assert q.params == (("includefield", "0020000D"),)
    else:
        assert q.params == (("StudyInstanceUID", uid),)


def test_image_level_wildcard_series_uid_keeps_study_path() -> None:
    ds = lax(identifier("IMAGE", StudyInstanceUID=STUDY_UID), 0x0020000E, "UI", "1.2.*")
    q = one(ds)
    assert q.path == f"studies/{STUDY_UID}/instances"
    assert q.params == (("SeriesInstanceUID", "1.2.*"),)


def test_uid_with_unsafe_characters_never_goes_into_path() -> None:
    ds = lax(identifier("SERIES"), 0x0020000D, "UI", "1.2/../x")
    q = one(ds)
    assert q.path == "series"
    assert q.params == (("StudyInstanceUID", "1.2/../x"),)


# --------------------------------------------------------------------------- DICOM JSON


def test_json_strings_and_multi_values() -> None:
    ds = dataset_from_json(
        {
            "00080060": {"vr": "CS", "Value": ["CT"]},
            "00080061": {"vr": "CS", "Value": ["CT", "PT"]},
            "0020000D": {"vr": "UI", "Value": [STUDY_UID]},
            "00081030": {"vr": "LO", "Value": ["Brain \u00e9"]},
            "00080020": {"vr": "DA", "Value": ["20200102"]},
            "00080030": {"vr": "TM", "Value": ["101010.5"]},
            "00081190": {"vr": "UR", "Value": ["http://x/studies/1"]},
        }
    )
    assert ds.Modality == "CT"
    assert isinstance(ds.ModalitiesInStudy, MultiValue)
    assert list(ds.ModalitiesInStudy) == ["CT", "PT"]
    assert ds.StudyInstanceUID == STUDY_UID
    assert ds.StudyDescription == "Brain \u00e9"
    assert ds.StudyDate == "20200102"
    assert ds.StudyTime == "101010.5"
    assert ds.RetrieveURL == "http://x/studies/1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"Alphabetic": "Yamada^Tarou"}, "Yamada^Tarou"),
        (
            {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"},
            "Yamada^Tarou=山田^太郎=やまだ^たろう",
        ),
        ({"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}, "Yamada^Tarou=山田^太郎"),
        ({"Ideographic": "山田^太郎"}, "=山田^太郎"),
        ({"Phonetic": "やまだ"}, "==やまだ"),
        ({"Alphabetic": "A", "Ideographic": "", "Phonetic": ""}, "A"),
        ({}, ""),
    ],
)
def test_json_pn_groups(value: dict[str, str], expected: str) -> None:
    ds = dataset_from_json({"00100010": {"vr": "PN", "Value": [value]}})
    assert isinstance(ds.PatientName, PersonName)
    assert str(ds.PatientName) == expected


def test_json_pn_multiple_names_and_null() -> None:
    ds = dataset_from_json(
        {"00081060": {"vr": "PN", "Value": [{"Alphabetic": "A^B"}, None, {"Alphabetic": "C"}]}}
    )
    assert [str(n) for n in ds.NameOfPhysiciansReadingStudy] == ["A^B", "", "C"]


def test_json_numbers() -> None:
    ds = dataset_from_json(
        {
            "00201208": {"vr": "IS", "Value": [12]},
            "00201206": {"vr": "IS", "Value": ["3"]},
            "00200013": {"vr": "IS", "Value": [4.0]},
            "00280030": {"vr": "DS", "Value": [0.5, "0.25"]},
            "00101030": {"vr": "DS", "Value": [72]},
            "00181050": {"vr": "DS", "Value": [0.1234567890123456789]},
            "00280010": {"vr": "US", "Value": [512]},
            "00186020": {"vr": "SL", "Value": [-7]},
            "00189087": {"vr": "FD", "Value": [1000.5]},
            "00189089": {"vr": "FD", "Value": [1, 0, "0.5"]},
            "00420011": {"vr": "FL", "Value": [2.5]},
        }
    )
    assert ds.NumberOfStudyRelatedInstances == 12
    assert ds.NumberOfStudyRelatedSeries == 3
    assert ds.InstanceNumber == 4
    assert [float(v) for v in ds.PixelSpacing] == [0.5, 0.25]
    assert float(ds.PatientWeight) == 72.0
    assert abs(float(ds.SpatialResolution) - 0.1234567890123456789) < 1e-12
    assert len(str(ds.SpatialResolution)) <= 16
    assert ds.Rows == 512
    assert ds.ReferencePixelX0 == -7
    assert ds.DiffusionBValue == 1000.5
    assert list(ds.DiffusionGradientOrientation) == [1.0, 0.0, 0.5]
    assert ds[0x00420011].value == 2.5


@pytest.mark.parametrize("vr", ["OB", "OD", "OF", "OL", "OV", "OW", "UN"])
def test_json_inline_binary_for_every_binary_vr(vr: str) -> None:
    payload = bytes(range(16))
    ds = dataset_from_json(
        {"00091010": {"vr": vr, "InlineBinary": base64.b64encode(payload).decode()}}
    )
    elem = ds[0x00091010]
    assert (elem.VR, elem.value) == (vr, payload)


def test_json_bulkdata_uri_leaves_element_empty() -> None:
    ds = dataset_from_json(
        {
            "7FE00010": {"vr": "OW", "BulkDataURI": "http://x/bulk/1"},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "A"}]},
        }
    )
    assert 0x7FE00010 in ds
    assert ds[0x7FE00010].VR == "OW"
    assert ds[0x7FE00010].value is None
    assert str(ds.PatientName) == "A"


def test_json_at_values() -> None:
    ds = dataset_from_json({"00209165": {"vr": "AT", "Value": ["00100010", "0020000d"]}})
    assert list(ds.DimensionIndexPointer) == [Tag(0x00100010), Tag(0x0020000D)]
    single = dataset_from_json({"00209165": {"vr": "AT", "Value": ["7FE00010"]}})
    assert single.DimensionIndexPointer == Tag(0x7FE00010)


def test_json_sequences_nest() -> None:
    ds = dataset_from_json(
        {
            "00081032": {
                "vr": "SQ",
                "Value": [
                    {
                        "00080100": {"vr": "SH", "Value": ["X1"]},
                        "00080104": {"vr": "LO", "Value": ["Proc"]},
                        "00081110": {
                            "vr": "SQ",
                            "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}}],
                        },
                    },
                    {"00080100": {"vr": "SH", "Value": ["X2"]}},
                    "garbage item",
                ],
            },
            "00081115": {"vr": "SQ", "Value": []},
            "00081111": {"vr": "SQ"},
        }
    )
    seq = ds.ProcedureCodeSequence
    assert len(seq) == 2
    assert seq[0].CodeValue == "X1"
    assert seq[0].CodeMeaning == "Proc"
    assert seq[0].ReferencedStudySequence[0].ReferencedSOPInstanceUID == "1.2.3"
    assert seq[1].CodeValue == "X2"
    assert len(ds.ReferencedSeriesSequence) == 0
    assert len(ds.ReferencedPerformedProcedureStepSequence) == 0


def test_json_missing_value_gives_empty_element() -> None:
    ds = dataset_from_json(
        {
            "00100010": {"vr": "PN"},
            "00100030": {"vr": "DA"},
            "00280010": {"vr": "US"},
            "00081190": {"vr": "UR", "Value": []},
        }
    )
    assert tags(ds) == [0x00081190, 0x00100010, 0x00100030, 0x00280010]
    assert not ds.PatientName
    assert ds.PatientBirthDate == ""
    assert ds[0x00280010].value is None
    assert not ds.RetrieveURL


def test_json_null_string_values() -> None:
    ds = dataset_from_json({"00080061": {"vr": "CS", "Value": [None, "CT"]}})
    assert list(ds.ModalitiesInStudy) == ["", "CT"]


def test_json_private_and_unknown_tags_keep_their_vr() -> None:
    ds = dataset_from_json(
        {
            "00091010": {"vr": "LO", "Value": ["private"]},
            "00191001": {"vr": "US", "Value": [7]},
            "0009ABCD": {"Value": ["no vr"]},
        }
    )
    assert ds[0x00091010].VR == "LO"
    assert ds[0x00091010].value == "private"
    assert ds[0x00191001].value == 7
    assert 0x0009ABCD not in ds  # UN cannot carry a JSON "Value": skipped


def test_json_missing_vr_uses_dictionary() -> None:
    ds = dataset_from_json(
        {
            "00100010": {"Value": [{"Alphabetic": "DOE^J"}]},
            "00280010": {"Value": [256]},
            "00091001": {"InlineBinary": base64.b64encode(b"\x01").decode()},
        }
    )
    assert ds[0x00100010].VR == "PN"
    assert str(ds.PatientName) == "DOE^J"
    assert ds[0x00280010].VR == "US"
    assert ds.Rows == 256
    assert ds[0x00091001].VR == "UN"
    assert ds[0x00091001].value == b"\x01"


def test_json_ambiguous_dictionary_vr_is_resolved() -> None:
    ds = dataset_from_json({"00280106": {"Value": [3]}})
    assert ds[0x00280106].VR == "US"
    assert ds[0x00280106].value == 3


@pytest.mark.parametrize(
    "body",
    [
        {"vr": "CS", "Value": "CT"},
        {"vr": "CS", "Value": {"a": 1}},
        {"vr": "CS", "Value": [["nested"]]},
        {"vr": "IS", "Value": ["abc"]},
        {"vr": "IS", "Value": [1.5]},
        {"vr": "US", "Value": ["x"]},
        {"vr": "US", "Value": [True]},
        {"vr": "DS", "Value": ["1,5"]},
        {"vr": "FD", "Value": [{}]},
        {"vr": "AT", "Value": ["xyz"]},
        {"vr": "AT", "Value": [None]},
        {"vr": "PN", "Value": [{"Alphabetic": 5}]},
        {"vr": "PN", "Value": [["A"]]},
        {"vr": "OB", "InlineBinary": "not base64!!"},
        {"vr": "OB", "InlineBinary": 12},
        {"vr": "OB", "Value": [1, 2]},
        {"vr": "LO", "InlineBinary": "AAEC"},
    ],
)
def test_json_bad_element_is_skipped(body: dict[str, Any]) -> None:
    ds = dataset_from_json({"00080060": body, "00100020": {"vr": "LO", "Value": ["P1"]}})
    assert 0x00080060 not in ds
    assert ds.PatientID == "P1"


@pytest.mark.parametrize(
    "obj",
    [
        {"not-a-tag": {"vr": "LO", "Value": ["x"]}},
        {"0010002": {"vr": "LO", "Value": ["x"]}},
        {"00100030": "garbage"},
        {"00100030": None},
        {"00100030": ["x"]},
    ],
)
def test_json_bad_keys_and_bodies_are_skipped(obj: dict[str, Any]) -> None:
    obj = {**obj, "00100020": {"vr": "LO", "Value": ["P1"]}}
    ds = dataset_from_json(obj)
    assert tags(ds) == [0x00100020]


def test_json_not_a_mapping_gives_empty_dataset() -> None:
    assert len(dataset_from_json([1, 2])) == 0  # type: ignore[arg-type]


def test_json_unknown_vr_string_falls_back_to_dictionary() -> None:
    ds = dataset_from_json({"00100020": {"vr": "XX", "Value": ["P1"]}})
    assert ds[0x00100020].VR == "LO"
    assert ds.PatientID == "P1"


# --------------------------------------------------------------------------- shape_response


def qido_study_result() -> Dataset:
    """A typical QIDO study match, with many attributes nobody asked for."""
    return dataset_from_json(
        {
            "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
            "00080020": {"vr": "DA", "Value": ["20200102"]},
            "00080050": {"vr": "SH", "Value": ["ACC1"]},
            "00080061": {"vr": "CS", "Value": ["CT", "PT"]},
            "00080090": {"vr": "PN", "Value": [{"Alphabetic": "REF^DOC"}]},
            "00081190": {"vr": "UR", "Value": ["http://x/studies/1.2.3"]},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]},
            "00100020": {"vr": "LO", "Value": ["P1"]},
            "00100030": {"vr": "DA", "Value": ["19700101"]},
            "0020000D": {"vr": "UI", "Value": [STUDY_UID]},
            "00201206": {"vr": "IS", "Value": [2]},
            "00201208": {"vr": "IS", "Value": [40]},
            "00081032": {
                "vr": "SQ",
                "Value": [{"00080100": {"vr": "SH", "Value": ["P1"]}}],
            },
        }
    )


def test_shape_exactly_requested_keys() -> None:
    ident = identifier("STUDY", PatientName="DOE*", StudyDate="", StudyInstanceUID="")
    answer = shape_response(qido_study_result(), ident, QueryLevel.STUDY)
    assert tags(answer) == [0x00080005, 0x00080020, 0x00080052, 0x00100010, 0x0020000D]
    assert answer.QueryRetrieveLevel == "STUDY"
    assert answer.StudyDate == "20200102"
    assert str(answer.PatientName) == "DOE^JOHN"
    assert answer.StudyInstanceUID == STUDY_UID
    assert answer.SpecificCharacterSet == "ISO_IR 100"


def test_shape_missing_key_is_empty_with_dictionary_vr() -> None:
    ident = identifier("STUDY", StudyDescription="", PatientID="", NumberOfStudyRelatedSeries="")
    answer = shape_response(qido_study_result(), ident, QueryLevel.STUDY)
    assert tags(answer) == [0x00080005, 0x00080052, 0x00081030, 0x00100020, 0x00201206]
    assert answer[0x00081030].VR == "LO"
    assert answer.StudyDescription == ""
    assert answer.PatientID == "P1"
    assert answer.NumberOfStudyRelatedSeries == 2


def test_shape_missing_private_key_uses_identifier_vr() -> None:
    ident = identifier("STUDY")
    ident.add_new(0x00091010, "SH", "")
    answer = shape_response(qido_study_result(), ident, QueryLevel.STUDY)
    assert answer[0x00091010].VR == "SH"
    assert not answer[0x00091010].value


def test_shape_copies_sequences_whole() -> None:
    ident = identifier("STUDY", ProcedureCodeSequence=[], ReferencedStudySequence=[])
    result = qido_study_result()
    answer = shape_response(result, ident, QueryLevel.STUDY)
    assert answer.ProcedureCodeSequence[0].CodeValue == "P1"
    assert answer[0x00081110].VR == "SQ"
    assert len(answer.ReferencedStudySequence) == 0
    answer.ProcedureCodeSequence[0].CodeValue = "changed"
    assert result.ProcedureCodeSequence[0].CodeValue == "P1"  # a copy, not shared


def test_shape_retrieve_aet() -> None:
    ident = identifier("STUDY", RetrieveAETitle="", StudyInstanceUID="")
    answer = shape_response(qido_study_result(), ident, QueryLevel.STUDY, retrieve_aet="ADAPTER")
    assert answer.RetrieveAETitle == "ADAPTER"
    assert tags(answer) == [0x00080005, 0x00080052, 0x00080054, 0x0020000D]


def test_shape_retrieve_aet_added_even_when_not_requested() -> None:
    answer = shape_response(
        qido_study_result(), identifier("STUDY"), QueryLevel.STUDY, retrieve_aet="ADAPTER"
    )
    assert tags(answer) == [0x00080005, 0x00080052, 0x00080054]


def test_shape_without_retrieve_aet_has_none() -> None:
    answer = shape_response(qido_study_result(), identifier("STUDY"), QueryLevel.STUDY)
    assert 0x00080054 not in answer


def test_shape_level_is_the_query_level_not_the_identifiers() -> None:
    answer = shape_response(
        qido_study_result(), identifier("PATIENT", PatientID=""), QueryLevel.PATIENT
    )
    assert answer.QueryRetrieveLevel == "PATIENT"
    assert tags(answer) == [0x00080005, 0x00080052, 0x00100020]


def test_shape_charset_from_identifier_when_result_has_none() -> None:
    result = dataset_from_json({"00100020": {"vr": "LO", "Value": ["P1"]}})
    ident = identifier("STUDY", SpecificCharacterSet="ISO_IR 100", PatientID="")
    answer = shape_response(result, ident, QueryLevel.STUDY)
    assert answer.SpecificCharacterSet == "ISO_IR 100"


def test_shape_no_charset_when_neither_has_one_and_ascii() -> None:
    result = dataset_from_json({"00100020": {"vr": "LO", "Value": ["P1"]}})
    answer = shape_response(result, identifier("STUDY", PatientID=""), QueryLevel.STUDY)
    assert tags(answer) == [0x00080052, 0x00100020]


def test_shape_utf8_charset_when_needed() -> None:
    result = dataset_from_json(
        {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Yamada", "Ideographic": "山田"}]}}
    )
    answer = shape_response(result, identifier("STUDY", PatientName=""), QueryLevel.STUDY)
    assert answer.SpecificCharacterSet == "ISO_IR 192"
    assert str(answer.PatientName) == "Yamada=山田"


def test_shape_unique_uid_from_path_is_answered_from_identifier() -> None:
    result = dataset_from_json(
        {
            "0020000E": {"vr": "UI", "Value": [SERIES_UID]},
            "00080060": {"vr": "CS", "Value": ["CT"]},
        }
    )
    ident = identifier("SERIES", StudyInstanceUID=STUDY_UID, SeriesInstanceUID="", Modality="")
    answer = shape_response(result, ident, QueryLevel.SERIES)
    assert answer.StudyInstanceUID == STUDY_UID
    assert answer.SeriesInstanceUID == SERIES_UID
    assert answer.Modality == "CT"


def test_shape_wildcard_uid_is_not_invented() -> None:
    result = dataset_from_json({"00080060": {"vr": "CS", "Value": ["CT"]}})
    ident = lax(identifier("SERIES", Modality=""), 0x0020000D, "UI", "1.2.*")
    answer = shape_response(result, ident, QueryLevel.SERIES)
    assert answer.StudyInstanceUID == ""


def test_shape_never_leaks_extras() -> None:
    result = qido_study_result()
    ident = identifier("STUDY", AccessionNumber="")
    answer = shape_response(result, ident, QueryLevel.STUDY)
    for leaked in (0x00081190, 0x00100010, 0x00080061, 0x00081032, 0x00201208):
        assert leaked not in answer
    assert tags(answer) == [0x00080005, 0x00080050, 0x00080052]


def test_shape_keeps_binary_and_bulk_values() -> None:
    result = dataset_from_json(
        {
            "00091010": {"vr": "OB", "InlineBinary": base64.b64encode(b"ab").decode()},
            "00091011": {"vr": "OB", "BulkDataURI": "http://x"},
        }
    )
    ident = identifier("IMAGE")
    ident.add_new(0x00091010, "OB", b"")
    ident.add_new(0x00091011, "OB", b"")
    answer = shape_response(result, ident, QueryLevel.IMAGE)
    assert answer[0x00091010].value == b"ab"
    assert answer[0x00091011].value is None


def test_shape_answer_is_encodable() -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ident = identifier(
        "STUDY",
        PatientName="",
        StudyDate="",
        NumberOfStudyRelatedInstances="",
        ProcedureCodeSequence=[],
        StudyDescription="",
    )
    answer = shape_response(qido_study_result(), ident, QueryLevel.STUDY, retrieve_aet="AE1")
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = False
    write_dataset(buf, answer)
    assert buf.getvalue()


# --------------------------------------------------------------------------- patient_key


def test_patient_key() -> None:
    result = dataset_from_json(
        {
            "00100020": {"vr": "LO", "Value": ["P1 "]},
            "00100021": {"vr": "LO", "Value": ["HOSP"]},
        }
    )
    assert patient_key(result) == ("P1", "HOSP")


def test_patient_key_without_issuer_or_id() -> None:
    assert patient_key(dataset_from_json({"00100020": {"vr": "LO", "Value": ["P1"]}})) == (
        "P1",
        "",
    )
    assert patient_key(dataset_from_json({"00100020": {"vr": "LO"}})) == ("", "")
    assert patient_key(Dataset()) == ("", "")


def test_patient_key_dedups_studies() -> None:
    studies = [
        dataset_from_json(
            {
                "00100020": {"vr": "LO", "Value": [pid]},
                "00100021": {"vr": "LO", "Value": [issuer]},
                "0020000D": {"vr": "UI", "Value": [uid]},
            }
        )
        for pid, issuer, uid in [
            ("P1", "A", "1.1"),
            ("P1", "A", "1.2"),
            ("P1", "B", "1.3"),
            ("P2", "A", "1.4"),
        ]
    ]
    keys = list(dict.fromkeys(patient_key(s) for s in studies))
    assert keys == [("P1", "A"), ("P1", "B"), ("P2", "A")]


# ------------------------------------------------------------------ QIDO paging (client.qido)


def paged_upstream(
    total: int,
    requests: list[httpx.Request],
    *,
    cap: int | None = None,
    ignores_offset: bool = False,
    ignores_limit: bool = False,
) -> httpx.MockTransport:
    """A QIDO server over `total` studies that may cap `limit` or ignore offset and limit."""
    items = [{"0020000D": {"vr": "UI", "Value": [f"1.2.3.{n}"]}} for n in range(total)]

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        limit = total if ignores_limit else int(request.url.params["limit"])
        if cap is not None:
            limit = min(limit, cap)
        offset = 0 if ignores_offset else int(request.url.params["offset"])
        return httpx.Response(200, json=items[offset : offset + limit])

    return httpx.MockTransport(handle)


def list_studies(transport: httpx.MockTransport, page_size: int) -> list[str]:
    """Study UIDs the client lists from the transport's server."""

    async def main() -> list[str]:
        async with make_http_client(timeout=5.0, transport=transport) as http:
            client = DicomwebClient(http, RetryPolicy(deadline=1.0))
            pages = client.qido("http://qido.test/studies", [], page_size=page_size)
            return [item["0020000D"]["Value"][0] async for item in pages]

    return asyncio.run(main())


def uids(numbers: range) -> list[str]:
    return [f"1.2.3.{n}" for n in numbers]


def offsets(requests: list[httpx.Request]) -> list[str]:
    return [r.url.params["offset"] for r in requests]


def test_server_capping_limit_below_ours_is_paged_to_the_end() -> None:
    requests: list[httpx.Request] = []
    assert list_studies(paged_upstream(10, requests, cap=3), page_size=1000) == uids(range(10))
    assert offsets(requests) == ["0", "3", "6", "9", "10"]  # stops at the empty page


@pytest.mark.parametrize(
    ("total", "page_size", "pages"), [(0, 1000, 1), (1, 1000, 1), (2500, 1000, 3), (2000, 1000, 2)]
)
def test_paging_costs_at_most_one_extra_request(total: int, page_size: int, pages: int) -> None:
    requests: list[httpx.Request] = []
    assert list_studies(paged_upstream(total, requests), page_size) == uids(range(total))
    assert len(requests) <= pages + 1


def test_server_ignoring_offset_and_limit_is_listed_once() -> None:
    requests: list[httpx.Request] = []
    transport = paged_upstream(5, requests, ignores_offset=True, ignores_limit=True)
    assert list_studies(transport, page_size=2) == uids(range(5))
    assert len(requests) == 2  # the repeated page ends paging, it is not yielded again


def test_server_ignoring_offset_with_fewer_results_than_limit_is_complete() -> None:
    requests: list[httpx.Request] = []
    transport = paged_upstream(5, requests, ignores_offset=True)
    assert list_studies(transport, page_size=1000) == uids(range(5))
    assert len(requests) == 2


def test_server_ignoring_offset_beyond_one_full_page_is_an_error_not_a_loop() -> None:
    requests: list[httpx.Request] = []
    transport = paged_upstream(50, requests, ignores_offset=True)
    with pytest.raises(UpstreamError, match="ignores offset"):
        list_studies(transport, page_size=10)
    assert len(requests) == 2


# ------------------------------------------------------------------ Number-of-related counts


def test_requested_counts_are_those_of_the_query_level() -> None:
    ident = identifier(
        "PATIENT",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedInstances="",
        NumberOfStudyRelatedSeries="",
    )
    assert requested_counts(ident, QueryLevel.PATIENT) == {0x00201200, 0x00201204}
    assert requested_counts(ident, QueryLevel.STUDY) == {0x00201206}
    assert requested_counts(ident, QueryLevel.IMAGE) == frozenset()


@pytest.mark.parametrize(
    ("body", "count"),
    [
        ({"vr": "IS", "Value": [7]}, 7),
        ({"vr": "IS", "Value": ["12 "]}, 12),
        ({"vr": "IS", "Value": [0]}, 0),
        ({"vr": "IS"}, None),
        ({"vr": "IS", "Value": [-1]}, None),
        ({"vr": "IS", "Value": [1, 2]}, None),
        ({"vr": "IS", "Value": ["many"]}, None),
    ],
)
def test_count_of_reads_qido_counts(body: dict[str, Any], count: int | None) -> None:
    assert count_of(dataset_from_json({"00201208": body}), 0x00201208) == count


def test_set_count_is_answered_as_is() -> None:
    result = dataset_from_json({"00100020": {"vr": "LO", "Value": ["P1"]}})
    set_count(result, 0x00201200, 2)
    answer = shape_response(
        result, identifier("PATIENT", NumberOfPatientRelatedStudies=""), QueryLevel.PATIENT
    )
    assert answer["NumberOfPatientRelatedStudies"].VR == "IS"
    assert answer.NumberOfPatientRelatedStudies == 2


@pytest.mark.parametrize(
    ("keys", "whole"),
    [
        ({"PatientID": "P*", "PatientName": ""}, True),
        ({"PatientID": "P1", "IssuerOfPatientID": "HOSP"}, True),
        ({"PatientName": "Doe^*"}, False),
        ({"PatientID": "P1", "PatientBirthDate": "19700101"}, False),
    ],
)
def test_lists_whole_patients_only_when_matching_on_identity(
    keys: dict[str, str], whole: bool
) -> None:
    (query,) = build_queries(identifier("PATIENT", **keys), QueryRoot.PATIENT, fuzzy=True)
    assert lists_whole_patients(query) is whole


def test_path_uid_refuses_what_cannot_go_in_a_path() -> None:
    assert path_uid("1.2.3 ") == "1.2.3"
    assert path_uid("1.2/../3") is None
    assert path_uid(None) is None
    assert path_uid("1." + "2" * 70) is None


def test_patient_counts_ask_qido_for_the_study_counts_instead() -> None:
    ident = identifier(
        "PATIENT",
        PatientID="P*",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedInstances="",
        NumberOfStudyRelatedSeries="",
    )
    assert one(ident, QueryRoot.PATIENT).params == (
        ("PatientID", "P*"),
        ("includefield", "00201206"),
        ("includefield", "00201208"),
    )
