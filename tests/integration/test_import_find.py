"""C-FIND through the adapter (QIDO-RS to Orthanc) against Orthanc's own C-FIND: the oracle.

Both answer from the same data, so for every query the adapter's answers must carry the same
values for the requested keys as Orthanc's DIMSE answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE

from dicom_adapter.status import Status
from tests.rig import Importer, Orthanc, c_find, dcmsend, run_dcmtk
from tests.rig.find import (
    PATIENT_COUNTS,
    PATIENT_ROOT_FIND,
    STUDY_COUNTS,
    STUDY_ROOT_FIND,
    identifier,
    write_dataset,
)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, Importer]]:
    """A fresh Orthanc holding only the query data set, and an importer in front of it."""
    work = tmp_path_factory.mktemp("find")
    write_dataset(work / "data")
    with Orthanc(workdir=work / "orthanc") as orthanc:
        sent = dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, [work / "data"])
        assert sent.returncode == 0, sent.stderr
        with Importer(orthanc.dicomweb_url, aet="ADAPTER", log_dir=work) as importer:
            yield orthanc, importer


def values(answers: list[Dataset], keys: list[str]) -> list[tuple[str, ...]]:
    return sorted(tuple(str(a.get(k, "") or "").strip() for k in keys) for a in answers)


CASES = [
    (
        "study-all",
        STUDY_ROOT_FIND,
        identifier(
            "STUDY",
            PatientID="FP*",
            PatientName="",
            StudyInstanceUID="",
            StudyDate="",
            StudyDescription="",
            AccessionNumber="",
        ),
    ),
    (
        "study-name-wildcard",
        STUDY_ROOT_FIND,
        identifier("STUDY", PatientName="Doe^*", PatientID="", StudyDate="", StudyDescription=""),
    ),
    (
        "study-date-range",
        STUDY_ROOT_FIND,
        identifier("STUDY", PatientID="FP*", StudyDate="20200101-20211231", StudyDescription=""),
    ),
    (
        "study-open-date-range",
        STUDY_ROOT_FIND,
        identifier("STUDY", PatientID="FP*", StudyDate="20210101-", StudyDescription=""),
    ),
    (
        "series-all",
        STUDY_ROOT_FIND,
        identifier("SERIES", PatientID="FP*", Modality="", SeriesNumber="", StudyDate=""),
    ),
    (
        "series-mr",
        STUDY_ROOT_FIND,
        identifier("SERIES", PatientID="FP*", Modality="MR", SeriesNumber="", StudyDescription=""),
    ),
    (
        "patient-all",
        PATIENT_ROOT_FIND,
        identifier("PATIENT", PatientID="FP*", PatientName="", PatientBirthDate=""),
    ),
    (
        "patient-name",
        PATIENT_ROOT_FIND,
        identifier("PATIENT", PatientName="Smith^Anna*", PatientID="", PatientBirthDate=""),
    ),
    (
        "patient-root-study",
        PATIENT_ROOT_FIND,
        identifier("STUDY", PatientID="FP001", StudyDate="", StudyDescription=""),
    ),
    # The Number-of-related keys of each level: QIDO gives the study and series ones, the
    # patient ones are counted (from the listing, or per patient when matching on more).
    (
        "patient-counts",
        PATIENT_ROOT_FIND,
        identifier("PATIENT", PatientID="FP*", **dict.fromkeys(PATIENT_COUNTS, "")),
    ),
    (
        "patient-name-counts",
        PATIENT_ROOT_FIND,
        identifier(
            "PATIENT", PatientName="Doe^*", PatientID="", **dict.fromkeys(PATIENT_COUNTS, "")
        ),
    ),
    (
        "study-counts",
        STUDY_ROOT_FIND,
        identifier(
            "STUDY", PatientID="FP*", StudyInstanceUID="", **dict.fromkeys(STUDY_COUNTS, "")
        ),
    ),
    (
        "patient-root-study-counts",
        PATIENT_ROOT_FIND,
        identifier("STUDY", PatientID="FP003", StudyDate="", **dict.fromkeys(STUDY_COUNTS, "")),
    ),
    (
        "series-counts",
        STUDY_ROOT_FIND,
        identifier(
            "SERIES", PatientID="FP*", SeriesInstanceUID="", NumberOfSeriesRelatedInstances=""
        ),
    ),
]


@pytest.mark.parametrize(("name", "sop_class", "query"), CASES, ids=[c[0] for c in CASES])
def test_answers_match_orthanc_dimse(
    pacs: tuple[Orthanc, Importer], name: str, sop_class: str, query: Dataset
) -> None:
    orthanc, importer = pacs
    keys = [element.keyword for element in query if element.keyword != "QueryRetrieveLevel"]
    expected = c_find(orthanc.dicom_port, orthanc.aet, sop_class, query)
    got = c_find(importer.port, importer.aet, sop_class, query)
    assert expected, "the oracle found nothing: the test data is wrong"
    assert values(got, keys) == values(expected, keys)
    counts = [key for key in keys if key.startswith("NumberOf")]
    assert all(str(a.get(key) or "") for a in got for key in counts), "a count is empty"
    for answer in got:
        present = {e.keyword for e in answer}
        assert present - {"SpecificCharacterSet", "RetrieveAETitle"} == set(keys) | {
            "QueryRetrieveLevel"
        }, "answers carry exactly the requested keys"
        assert answer.QueryRetrieveLevel == query.QueryRetrieveLevel


def test_series_and_image_levels_follow_the_hierarchy(pacs: tuple[Orthanc, Importer]) -> None:
    orthanc, importer = pacs
    studies = c_find(
        orthanc.dicom_port,
        orthanc.aet,
        STUDY_ROOT_FIND,
        identifier("STUDY", PatientID="FP001", StudyInstanceUID="", StudyDescription=""),
    )
    study_uid = next(s.StudyInstanceUID for s in studies if s.StudyDescription == "CT HEAD")
    series_query = identifier(
        "SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", Modality="", SeriesNumber=""
    )
    series = c_find(importer.port, importer.aet, STUDY_ROOT_FIND, series_query)
    keys = ["SeriesInstanceUID", "Modality", "SeriesNumber"]
    assert values(series, keys) == values(
        c_find(orthanc.dicom_port, orthanc.aet, STUDY_ROOT_FIND, series_query), keys
    )
    assert len(series) == 2
    image_query = identifier(
        "IMAGE",
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=series[0].SeriesInstanceUID,
        SOPInstanceUID="",
        InstanceNumber="",
    )
    images = c_find(importer.port, importer.aet, STUDY_ROOT_FIND, image_query)
    keys = ["SOPInstanceUID", "InstanceNumber"]
    assert values(images, keys) == values(
        c_find(orthanc.dicom_port, orthanc.aet, STUDY_ROOT_FIND, image_query), keys
    )
    assert len(images) in (2, 3)


def test_multi_valued_modalities_in_study_merges_without_repeats(
    pacs: tuple[Orthanc, Importer],
) -> None:
    _, importer = pacs
    query = identifier(
        "STUDY",
        PatientID="FP*",
        ModalitiesInStudy=["CT", "US"],
        StudyInstanceUID="",
        StudyDescription="",
    )
    got = c_find(importer.port, importer.aet, STUDY_ROOT_FIND, query)
    descriptions = [a.StudyDescription for a in got]
    assert sorted(descriptions) == ["CT CHEST", "CT HEAD", "US ABDOMEN"]
    assert len({a.StudyInstanceUID for a in got}) == len(got)


def test_findscu_study_and_patient_root(pacs: tuple[Orthanc, Importer], tmp_path: Path) -> None:
    _, importer = pacs
    for root, level in (("-S", "STUDY"), ("-P", "PATIENT")):
        out = tmp_path / level
        out.mkdir()
        result = run_dcmtk(
            [
                "findscu",
                root,
                "-aec",
                importer.aet,
                "-X",
                "-od",
                str(out),
                "-k",
                f"QueryRetrieveLevel={level}",
                "-k",
                "PatientID=FP00*",
                "-k",
                "PatientName",
                "127.0.0.1",
                str(importer.port),
            ],
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        answers = [dcmread(p) for p in sorted(out.iterdir())]
        names = sorted(str(a.PatientName) for a in answers)
        expected = ["Doe^Jane", "Doe^John", "Doe^John", "Smith^Anna^Marie", "Smith^Anna^Marie"]
        assert names == (expected if level == "STUDY" else sorted(set(expected)))


def test_unknown_level_is_cannot_understand(pacs: tuple[Orthanc, Importer]) -> None:
    _, importer = pacs
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    try:
        statuses = [
            s.Status
            for s, _ in assoc.send_c_find(identifier("WARD", PatientID=""), STUDY_ROOT_FIND)
        ]
    finally:
        assoc.release()
    assert statuses == [Status.CANNOT_UNDERSTAND]
