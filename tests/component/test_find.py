"""C-FIND over a real association with a scripted QIDO-RS upstream: paging, cancel, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import parse_qsl

import httpx
from pydicom import Dataset
from pynetdicom import AE

from dicom_adapter.status import Status
from tests.component.conftest import RunningImporter

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
JSON = {"Content-Type": "application/dicom+json"}


def study(n: int) -> dict[str, object]:
    return {
        "0020000D": {"vr": "UI", "Value": [f"1.2.3.{n}"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": f"Doe^Patient{n}"}]},
        "00100020": {"vr": "LO", "Value": [f"P{n}"]},
        "00081030": {"vr": "LO", "Value": ["extra attribute that must not leak"]},
    }


def paged_studies(total: int) -> Callable[[httpx.Request], httpx.Response]:
    def respond(request: httpx.Request) -> httpx.Response:
        query = dict(parse_qsl(request.url.query.decode()))
        offset, limit = int(query["offset"]), int(query["limit"])
        page = [study(n) for n in range(offset, min(total, offset + limit))]
        return httpx.Response(200, headers=JSON, content=json.dumps(page).encode())

    return respond


def query() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "Doe^*"
    ds.StudyInstanceUID = ""
    return ds


def find(importer: RunningImporter, cancel_after: int | None = None) -> tuple[int, list[Dataset]]:
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    answers: list[Dataset] = []
    final = -1
    try:
        for status, answer in assoc.send_c_find(query(), STUDY_ROOT_FIND, msg_id=7):
            if status.Status == Status.PENDING:
                assert answer is not None
                answers.append(answer)
                if cancel_after is not None and len(answers) == cancel_after:
                    assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    return final, answers


def test_pages_until_exhausted_and_answers_only_requested_keys(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    importer.upstream.responder = paged_studies(2500)
    final, answers = find(importer)
    assert final == Status.SUCCESS
    assert len(answers) == 2500  # never silently truncated
    offsets = [dict(parse_qsl(r.url.query.decode()))["offset"] for r in importer.upstream.requests]
    assert offsets == ["0", "1000", "2000"]
    assert {e.keyword for e in answers[0]} == {
        "QueryRetrieveLevel",
        "PatientName",
        "StudyInstanceUID",
    }
    assert str(answers[1].PatientName) == "Doe^Patient1"
    raw = importer.upstream.requests[0].url.raw_path.decode()
    assert "PatientName=Doe^*" in raw  # ^ and * are not percent-encoded


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
