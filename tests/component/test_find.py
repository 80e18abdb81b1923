"""C-FIND over a real association with a scripted QIDO-RS upstream: paging, cancel, errors."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from urllib.parse import parse_qsl

import httpx
import pytest
from pydicom import Dataset

from dicom_adapter.importer import find as find_module
from dicom_adapter.status import Status
from tests import rig
from tests.rig.component import RunningImporter, find, paged_studies
from tests.rig.find import STUDY_ROOT_FIND


def test_pages_until_exhausted_and_answers_only_requested_keys(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    importer.upstream.responder = paged_studies(2500)
    final, answers = find(importer)
    assert final == Status.SUCCESS
    assert len(answers) == 2500  # never silently truncated
    offsets = [dict(parse_qsl(r.url.query.decode()))["offset"] for r in importer.upstream.requests]
    assert offsets == ["0", "1000", "2000", "2500"]  # the empty page ends paging
    assert {e.keyword for e in answers[0]} == {
        "QueryRetrieveLevel",
        "PatientName",
        "StudyInstanceUID",
    }
    assert str(answers[1].PatientName) == "Doe^Patient1"
    raw = importer.upstream.requests[0].url.raw_path.decode()
    assert "PatientName=Doe^*" in raw  # ^ and * are not percent-encoded


def test_server_capping_limit_is_paged_to_the_end(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    importer.upstream.responder = paged_studies(10, cap=3)
    final, answers = find(importer)
    assert final == Status.SUCCESS
    assert [str(a.PatientName) for a in answers] == [f"Doe^Patient{n}" for n in range(10)]
    assert len(importer.upstream.requests) == 5  # 3 + 3 + 3 + 1, then the empty page


def test_cancel_stops_paging_with_fe00(start_importer: Callable[..., RunningImporter]) -> None:
    importer = start_importer()
    importer.upstream.responder = paged_studies(100_000)
    final, answers = find(importer, cancel_after=5)
    assert final == Status.CANCEL
    assert len(answers) < 100_000
    assert len(importer.upstream.requests) < 100  # paging stopped


def test_unavailable_upstream_is_out_of_resources(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer("--upstream_retry_deadline=0.3", "--http_timeout=0.2")
    importer.upstream.responder = lambda r: httpx.Response(503)
    assert find(importer) == (Status.OUT_OF_RESOURCES, [])


def test_refused_credentials_are_not_authorized(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    importer.upstream.responder = lambda r: httpx.Response(403)
    assert find(importer) == (Status.NOT_AUTHORIZED, [])


def test_no_match_is_plain_success(start_importer: Callable[..., RunningImporter]) -> None:
    importer = start_importer()
    importer.upstream.responder = lambda r: httpx.Response(204)
    assert find(importer) == (Status.SUCCESS, [])


# --- Number-of-related counts -----------------------------------------------------------------

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
# (patient id, patient name, study, series, number of instances)
ARCHIVE = [
    ("P1", "Doe^John", "1.1", "1.1.1", 3),
    ("P1", "Doe^John", "1.1", "1.1.2", 2),
    ("P1", "Doe^Johnny", "1.2", "1.2.1", 2),  # the same patient, named differently later
    ("P2", "Roe^Jane", "2.1", "2.1.1", 1),
    ("P3", "Doe^Anna", "3.1", "3.1.1", 4),
]
PATIENT_COUNTS = {"P1": ("2", "3", "7"), "P2": ("1", "1", "1"), "P3": ("1", "1", "4")}


def matches(value: str, pattern: str | None) -> bool:
    return pattern is None or fnmatch.fnmatchcase(value, pattern)


def archive(*, gives_counts: bool) -> Callable[[httpx.Request], httpx.Response]:
    """QIDO-RS over ARCHIVE: studies, series, instances; counts only when `gives_counts`."""

    def respond(request: httpx.Request) -> httpx.Response:
        parts = request.url.path.removeprefix("/dicom-web/").split("/")
        params = request.url.params
        study_filter = parts[1] if len(parts) > 2 else params.get("StudyInstanceUID")
        series_filter = parts[3] if len(parts) > 4 else params.get("SeriesInstanceUID")
        rows = [
            row
            for row in ARCHIVE
            if matches(row[0], params.get("PatientID"))
            and matches(row[1], params.get("PatientName"))
            and matches(row[2], study_filter)
            and matches(row[3], series_filter)
        ]
        items: list[dict[str, object]] = []
        if parts[-1] == "studies":
            for study_uid in dict.fromkeys(row[2] for row in rows):
                series = [r for r in ARCHIVE if r[2] == study_uid]
                item = patient_json(series[0]) | {"0020000D": {"vr": "UI", "Value": [study_uid]}}
                if gives_counts:
                    item["00201206"] = {"vr": "IS", "Value": [len(series)]}
                    item["00201208"] = {"vr": "IS", "Value": [sum(r[4] for r in series)]}
                items.append(item)
        elif parts[-1] == "series":
            for row in rows:
                item = patient_json(row) | {
                    "0020000D": {"vr": "UI", "Value": [row[2]]},
                    "0020000E": {"vr": "UI", "Value": [row[3]]},
                }
                if gives_counts:
                    item["00201209"] = {"vr": "IS", "Value": [row[4]]}
                items.append(item)
        else:
            for row in rows:
                items += [
                    {"00080018": {"vr": "UI", "Value": [f"{row[3]}.{n}"]}} for n in range(row[4])
                ]
        if "00100021" in params.get_list("includefield"):  # every patient has an issuer
            items = [item | {"00100021": {"vr": "LO", "Value": ["HOSP"]}} for item in items]
        offset, limit = int(params["offset"]), min(2, int(params["limit"]))  # capped pages
        return httpx.Response(200, json=items[offset : offset + limit])

    return respond


def patient_json(row: tuple[str, str, str, str, int]) -> dict[str, object]:
    return {
        "00100020": {"vr": "LO", "Value": [row[0]]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": row[1]}]},
    }


def c_find(importer: RunningImporter, identifier: Dataset, sop_class: str) -> list[Dataset]:
    return rig.c_find(importer.port, importer.aet, sop_class, identifier)


def patient_query(**keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "PATIENT"
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    ds.NumberOfPatientRelatedStudies = ""
    ds.NumberOfPatientRelatedSeries = ""
    ds.NumberOfPatientRelatedInstances = ""
    return ds


def patient_counts(answers: list[Dataset]) -> dict[str, tuple[str, ...]]:
    keys = [
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    ]
    return {str(a.PatientID): tuple(str(a.get(k) or "") for k in keys) for a in answers}


def test_patient_counts_come_from_the_listing_without_a_request_per_patient(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    importer.upstream.responder = archive(gives_counts=True)
    answers = c_find(importer, patient_query(PatientID="P*"), PATIENT_ROOT_FIND)
    assert patient_counts(answers) == PATIENT_COUNTS
    assert len(importer.upstream.requests) == 3  # 4 studies, 2 a page, then the empty page


@pytest.mark.parametrize("issuer", [False, True], ids=["id", "id-and-issuer"])
def test_patient_counts_when_matching_on_more_than_identity_are_looked_up_per_patient(
    start_importer: Callable[..., RunningImporter], issuer: bool
) -> None:
    importer = start_importer()
    importer.upstream.responder = archive(gives_counts=True)
    keys = {"PatientName": "Doe^*", "PatientID": ""} | ({"IssuerOfPatientID": ""} if issuer else {})
    answers = c_find(importer, patient_query(**keys), PATIENT_ROOT_FIND)
    assert patient_counts(answers) == {"P1": PATIENT_COUNTS["P1"], "P3": PATIENT_COUNTS["P3"]}


def test_patient_counts_from_a_server_that_gives_no_study_counts(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    importer.upstream.responder = archive(gives_counts=False)
    answers = c_find(importer, patient_query(PatientID="P*"), PATIENT_ROOT_FIND)
    assert patient_counts(answers) == PATIENT_COUNTS


@pytest.mark.parametrize("gives_counts", [True, False], ids=["qido-counts", "counted"])
def test_study_and_series_counts(
    start_importer: Callable[..., RunningImporter], gives_counts: bool
) -> None:
    importer = start_importer()
    importer.upstream.responder = archive(gives_counts=gives_counts)
    studies = Dataset()
    studies.QueryRetrieveLevel = "STUDY"
    studies.PatientID = "P1"
    studies.StudyInstanceUID = ""
    studies.NumberOfStudyRelatedSeries = ""
    studies.NumberOfStudyRelatedInstances = ""
    answers = c_find(importer, studies, STUDY_ROOT_FIND)
    assert sorted(
        (
            a.StudyInstanceUID,
            str(a.NumberOfStudyRelatedSeries),
            str(a.NumberOfStudyRelatedInstances),
        )
        for a in answers
    ) == [("1.1", "2", "5"), ("1.2", "1", "2")]
    series = Dataset()
    series.QueryRetrieveLevel = "SERIES"
    series.StudyInstanceUID = "1.1"
    series.SeriesInstanceUID = ""
    series.NumberOfSeriesRelatedInstances = ""
    answers = c_find(importer, series, STUDY_ROOT_FIND)
    assert sorted(
        (a.SeriesInstanceUID, str(a.NumberOfSeriesRelatedInstances)) for a in answers
    ) == [
        ("1.1.1", "3"),
        ("1.1.2", "2"),
    ]


def test_counting_requests_per_answer_are_bounded(
    start_importer: Callable[..., RunningImporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(find_module, "MAX_COUNT_LOOKUPS", 1)
    importer = start_importer()
    importer.upstream.responder = archive(gives_counts=True)
    answers = c_find(importer, patient_query(PatientName="Doe^*", PatientID=""), PATIENT_ROOT_FIND)
    assert patient_counts(answers) == {"P1": PATIENT_COUNTS["P1"], "P3": ("", "", "")}
    assert len(importer.upstream.requests) == 5  # 3 listing the studies, 2 counting P1's
