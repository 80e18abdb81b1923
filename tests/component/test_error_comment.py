"""Failure responses carry an ErrorComment the modality's operator can act on (issue 11.3).

Real associations against the in-process importer; the upstream is scripted (MockTransport).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config

from dicom_adapter.status import Status
from tests.rig import free_port, refused_port
from tests.rig.component import (
    Archive,
    RunningImporter,
    c_move,
    dictionary_flag,
    make_ct,
    make_study,
    query,
    study_level,
    write_without,
)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
FAST = ("--upstream_retry_deadline=0.6", "--http_timeout=0.5")

GOOGLE_403 = {
    "api": (
        "Cloud Healthcare API has not been used in project 42 before or it is disabled.",
        "Http_403, PERMISSION_DENIED, Cloud Healthcare API has not been u",
    ),
    "scopes": (
        "Request had insufficient authentication scopes.",
        "Http_403, PERMISSION_DENIED, Request had insufficient authentica",
    ),
    "role": (
        "Permission 'healthcare.dicomStores.dicomWebWrite' denied on resource 'x'.",
        "Http_403, PERMISSION_DENIED, Permission 'healthcare.dicomStores.",
    ),
}


def forbidden(message: str) -> Callable[[httpx.Request], httpx.Response]:
    body = {"error": {"code": 403, "message": message, "status": "PERMISSION_DENIED"}}
    return lambda request: httpx.Response(403, json=body)


def store(importer: RunningImporter, item: Dataset | Path, sop_class: str) -> Dataset:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(item)
        assert "Status" in rsp, "no C-STORE response"
        return rsp
    finally:
        assoc.release()


@pytest.mark.parametrize("case", sorted(GOOGLE_403))
def test_c_store_refused_by_google_shows_the_java_comment(
    start_importer: Callable[..., RunningImporter], case: str
) -> None:
    message, comment = GOOGLE_403[case]
    importer = start_importer()
    importer.upstream.responder = forbidden(message)
    ds = make_ct()

    rsp = store(importer, ds, ds.SOPClassUID)

    assert rsp.Status == Status.NOT_AUTHORIZED
    assert rsp.ErrorComment == comment


def test_c_store_upstream_refusing_connections_says_so(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer(*FAST)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    importer.upstream.responder = refuse
    ds = make_ct()

    rsp = store(importer, ds, ds.SOPClassUID)

    assert rsp.Status == Status.OUT_OF_RESOURCES
    assert rsp.ErrorComment == "connection refused"


def test_c_store_of_a_data_set_without_uid_says_which(
    start_importer: Callable[..., RunningImporter],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    importer = start_importer()
    path, sop_class = write_without(tmp_path, "SOPInstanceUID")

    rsp = store(importer, path, sop_class)

    assert rsp.Status == Status.CANNOT_UNDERSTAND
    assert rsp.ErrorComment == "dataset has no SOPInstanceUID"


def test_c_store_400_does_not_echo_the_upstream_message(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    body = {
        "error": {"code": 400, "message": "bad PatientName Doe^Jane", "status": "INVALID_ARGUMENT"}
    }
    importer.upstream.responder = lambda request: httpx.Response(400, json=body)
    ds = make_ct()

    rsp = store(importer, ds, ds.SOPClassUID)

    assert rsp.Status == Status.CANNOT_UNDERSTAND
    assert rsp.ErrorComment == "Http_400, INVALID_ARGUMENT"


def test_c_find_refused_by_google_shows_the_comment(
    start_importer: Callable[..., RunningImporter],
) -> None:
    message, comment = GOOGLE_403["scopes"]
    importer = start_importer()
    importer.upstream.responder = forbidden(message)
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    try:
        responses = [status for status, _ in assoc.send_c_find(query(), STUDY_ROOT_FIND)]
    finally:
        assoc.release()

    (final,) = responses
    assert final.Status == Status.NOT_AUTHORIZED
    assert final.ErrorComment == comment


def test_c_get_refused_by_google_shows_the_comment(
    start_importer: Callable[..., RunningImporter],
) -> None:
    message, comment = GOOGLE_403["role"]
    importer = start_importer()
    importer.upstream.responder = forbidden(message)
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(STUDY_ROOT_GET)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    try:
        identifier = study_level("1.2.3.4")
        responses = [status for status, _ in assoc.send_c_get(identifier, STUDY_ROOT_GET)]
    finally:
        assoc.release()

    final = responses[-1]
    assert final.Status == Status.NOT_AUTHORIZED
    assert final.ErrorComment == comment


def test_c_move_listing_refused_by_google_shows_the_comment(
    start_importer: Callable[..., RunningImporter],
) -> None:
    message, comment = GOOGLE_403["api"]
    importer = start_importer(dictionary_flag(free_port()))
    importer.upstream.responder = forbidden(message)

    result = c_move(importer, study_level("1.2.3.4"))

    assert result.status == Status.NOT_AUTHORIZED
    assert result.final.ErrorComment == comment


def test_c_move_to_an_unreachable_destination_says_so(
    start_importer: Callable[..., RunningImporter],
) -> None:
    instances = make_study(2)
    with refused_port() as port:  # not free_port(): the importer on port 0 could take it
        importer = start_importer(dictionary_flag(port), "--shutdown_grace_period=0.5")
        importer.upstream.responder = Archive(instances)

        result = c_move(importer, study_level(instances[0].study), dimse_timeout=5)

    assert result.status == Status.OUT_OF_RESOURCES_SUBOPERATIONS
    # the cause first and whole: the modality's operator reads "connection refused"
    assert result.final.ErrorComment == "destination STORESCP: connection refused"


def test_c_move_to_an_unknown_destination_names_the_fix(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer(dictionary_flag(free_port()))

    result = c_move(importer, study_level("1.2.3.4"), destination="NOWHERE")

    assert result.status == Status.MOVE_DESTINATION_UNKNOWN
    assert result.final.ErrorComment == "destination NOWHERE not in the AET dictionary"


def test_spooled_c_store_refused_by_google_shows_the_comment(
    start_importer: Callable[..., RunningImporter], tmp_path: Path
) -> None:
    message, comment = GOOGLE_403["role"]
    importer = start_importer(
        f"--persistent_file_storage_location={tmp_path}", "--spool_free_space_headroom=0"
    )
    importer.upstream.responder = forbidden(message)
    ds = make_ct()

    rsp = store(importer, ds, ds.SOPClassUID)

    assert rsp.Status == Status.NOT_AUTHORIZED
    assert rsp.ErrorComment == comment


def test_c_store_into_a_full_spool_says_so(
    start_importer: Callable[..., RunningImporter], tmp_path: Path
) -> None:
    importer = start_importer(
        f"--persistent_file_storage_location={tmp_path}",
        f"--spool_free_space_headroom={1 << 60}",
        "--shutdown_grace_period=0.5",
    )
    ds = make_ct()

    rsp = store(importer, ds, ds.SOPClassUID)

    assert rsp.Status == Status.OUT_OF_RESOURCES
    assert rsp.ErrorComment == "adapter spool volume full"
    assert importer.upstream.requests == []
