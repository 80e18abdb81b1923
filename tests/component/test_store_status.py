"""C-STORE over a real association, upstream scripted: every row of the SPEC §1.3 table."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import cast

import httpx
import pytest
from pydicom import Dataset, dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

from dicom_adapter.dicomweb.multipart import (
    MultipartParser,
    PartData,
    PartStart,
    boundary_from_content_type,
)
from dicom_adapter.dimse import pdu
from dicom_adapter.status import Status
from tests.rig import p_data, raw_associate, wait_until
from tests.rig.component import (
    JSON,
    Responder,
    RunningImporter,
    c_store,
    make_ct,
    stow_json,
    write_without,
)

Script = Callable[[str], Callable[[httpx.Request], httpx.Response]]


def answer(code: int, *, stored: bool = False, warning: int | None = None) -> Script:
    """Upstream answers `code`; the body references our instance when stored/warning."""

    def script(uid: str) -> Callable[[httpx.Request], httpx.Response]:
        if stored or warning is not None:
            body = stow_json([(uid, warning)])
            return lambda r: httpx.Response(code, headers=JSON, content=body)
        return lambda r: httpx.Response(code, text="upstream says no")

    return script


def failed_with(reason: int) -> Script:
    """Upstream answers 409 with our instance in FailedSOPSequence."""

    def script(uid: str) -> Callable[[httpx.Request], httpx.Response]:
        body = stow_json(failed=[(uid, reason)])
        return lambda r: httpx.Response(409, headers=JSON, content=body)

    return script


def raises(exc: Callable[[httpx.Request], Exception]) -> Script:
    """Upstream transport raises."""

    def script(uid: str) -> Callable[[httpx.Request], httpx.Response]:
        def respond(request: httpx.Request) -> httpx.Response:
            raise exc(request)

        return respond

    return script


def nothing_stored(uid: str) -> Callable[[httpx.Request], httpx.Response]:
    """Orthanc's answer to a malformed body: 200 with no ReferencedSOPSequence."""
    return lambda r: httpx.Response(200, headers=JSON, content=b"{}")


ROWS: list[tuple[str, Script, int]] = [
    ("stored", answer(200, stored=True), Status.SUCCESS),
    ("warning-B000", answer(202, warning=0xB000), Status.COERCION_OF_DATA_ELEMENTS),
    ("warning-B006", answer(202, warning=0xB006), Status.ELEMENTS_DISCARDED),
    ("warning-B007", answer(202, warning=0xB007), Status.DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING),
    ("failure-A900", failed_with(0xA900), Status.DATASET_DOES_NOT_MATCH_SOP_CLASS),
    ("failure-C000", failed_with(0xC000), Status.CANNOT_UNDERSTAND),
    ("failure-0122", failed_with(0x0122), Status.SOP_CLASS_NOT_SUPPORTED),
    ("400", answer(400), Status.CANNOT_UNDERSTAND),
    ("401", answer(401), Status.NOT_AUTHORIZED),
    ("403", answer(403), Status.NOT_AUTHORIZED),
    ("409", answer(409), Status.PROCESSING_FAILURE),
    ("413", answer(413), Status.OUT_OF_RESOURCES),
    ("408", answer(408), Status.OUT_OF_RESOURCES),
    ("429", answer(429), Status.OUT_OF_RESOURCES),
    ("500", answer(500), Status.OUT_OF_RESOURCES),
    ("503", answer(503), Status.OUT_OF_RESOURCES),
    ("404", answer(404), Status.PROCESSING_FAILURE),
    ("orthanc-200-nothing-stored", nothing_stored, Status.PROCESSING_FAILURE),
    ("orthanc-400-but-stored", answer(400, stored=True), Status.SUCCESS),
    (
        "connection-refused",
        raises(lambda r: httpx.ConnectError("refused", request=r)),
        Status.OUT_OF_RESOURCES,
    ),
    (
        "read-timeout",
        raises(lambda r: httpx.ReadTimeout("slow", request=r)),
        Status.OUT_OF_RESOURCES,
    ),
    ("unexpected-exception", raises(lambda r: RuntimeError("boom")), Status.PROCESSING_FAILURE),
]


@pytest.mark.parametrize(("name", "script", "expected"), ROWS, ids=[r[0] for r in ROWS])
def test_status_table_row(
    start_importer: Callable[..., RunningImporter], name: str, script: Script, expected: int
) -> None:
    importer = start_importer("--upstream_retry_deadline=0.3", "--http_timeout=0.2")
    ds = make_ct()
    importer.upstream.responder = script(str(ds.SOPInstanceUID))
    assert c_store(importer, ds) == expected
    assert importer.upstream.requests, "the upstream was never asked"
    assert importer.upstream.requests[0].url.path == "/dicom-web/studies"


def answers_then_stored(
    ds: Dataset, answers: list[httpx.Response]
) -> Callable[[httpx.Request], httpx.Response]:
    """Upstream gives `answers` in turn, then stores the instance."""

    def responder(request: httpx.Request) -> httpx.Response:
        if answers:
            return answers.pop(0)
        return httpx.Response(200, headers=JSON, content=stow_json([(ds.SOPInstanceUID, None)]))

    return responder


def test_transient_failure_is_retried_then_stored(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer("--upstream_retry_deadline=10", "--http_timeout=5")
    ds = make_ct()
    importer.upstream.responder = answers_then_stored(
        ds, [httpx.Response(503), httpx.Response(429, headers={"Retry-After": "0"})]
    )
    assert c_store(importer, ds) == Status.SUCCESS
    assert len(importer.upstream.requests) == 3
    # every attempt carried the whole instance
    assert len({len(b) for b in importer.upstream.bodies}) == 1


def test_extra_retry_code_is_retried(start_importer: Callable[..., RunningImporter]) -> None:
    importer = start_importer(
        "--upstream_retry_deadline=10", "--http_timeout=5", "--http_error_codes_to_retry=409"
    )
    ds = make_ct()
    importer.upstream.responder = answers_then_stored(ds, [httpx.Response(409)])
    assert c_store(importer, ds) == Status.SUCCESS
    assert len(importer.upstream.requests) == 2


def test_conflict_with_stow_overwrite_deletes_and_stores_again(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer("--stow_overwrite")
    ds = make_ct()
    stored = {"deleted": False}

    def responder(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            stored["deleted"] = True
            return httpx.Response(200)
        if not stored["deleted"]:
            return httpx.Response(409)
        return httpx.Response(200, headers=JSON, content=stow_json([(ds.SOPInstanceUID, None)]))

    importer.upstream.responder = responder
    assert c_store(importer, ds) == Status.SUCCESS
    methods = [(r.method, r.url.path) for r in importer.upstream.requests]
    assert methods == [
        ("POST", "/dicom-web/studies"),
        (
            "DELETE",
            f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}",
        ),
        ("POST", "/dicom-web/studies"),
    ]


@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_stow_body_is_the_peer_dataset_in_its_own_syntax(
    start_importer: Callable[..., RunningImporter], ts: UID
) -> None:
    importer = start_importer()
    ds = make_ct(ts)
    importer.upstream.responder = lambda r: httpx.Response(
        200, headers=JSON, content=stow_json([(ds.SOPInstanceUID, None)])
    )
    assert c_store(importer, ds, ts) == Status.SUCCESS
    request = importer.upstream.requests[0]
    content_type = request.headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    parser = MultipartParser(boundary_from_content_type(content_type))
    events = parser.feed(importer.upstream.bodies[0])
    parser.close()
    starts = [e for e in events if isinstance(e, PartStart)]
    assert len(starts) == 1
    assert starts[0].headers["content-type"] == "application/dicom"
    part = b"".join(e.data for e in events if isinstance(e, PartData))
    assert int(request.headers["Content-Length"]) == len(importer.upstream.bodies[0])
    received = dcmread(io.BytesIO(part))
    assert received.file_meta.TransferSyntaxUID == ts
    assert received.SOPInstanceUID == ds.SOPInstanceUID
    assert received.PatientName == "Doe^Jane"
    assert received.PixelData == ds.PixelData


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "SOPClassUID"])
def test_dataset_without_sop_uid_gets_cannot_understand(
    start_importer: Callable[..., RunningImporter],
    tmp_path: Path,
    keyword: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pynetdicom refuses to send such a dataset unless it streams the file as-is
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    importer = start_importer()
    importer.upstream.responder = lambda r: httpx.Response(500)
    path, sop_class = write_without(tmp_path, keyword)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        assert int(rsp.Status) == Status.CANNOT_UNDERSTAND
    finally:
        assoc.release()
    assert importer.upstream.requests == [], "an invalid dataset must not be uploaded"


def answer_lost_then_conflict(
    ds: Dataset, *, conflict: httpx.Response, sop_class_upstream: str | None
) -> Callable[[httpx.Request], httpx.Response]:
    """The first STOW is processed upstream but its answer is lost (connection reset); the
    retry gets `conflict`; QIDO finds the instance with `sop_class_upstream` (None: absent)."""
    posts: list[int] = []

    def responder(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            if sop_class_upstream is None or request.url.params.get("offset", "0") != "0":
                return httpx.Response(200, headers=JSON, content=b"[]")
            match = {
                "00080016": {"vr": "UI", "Value": [sop_class_upstream]},
                "00080018": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]},
            }
            return httpx.Response(200, headers=JSON, content=json.dumps([match]).encode())
        posts.append(1)
        if len(posts) == 1:
            raise httpx.ReadError("connection reset by peer", request=request)
        return conflict

    return responder


def conflict_409(ds: Dataset) -> httpx.Response:
    return httpx.Response(409, text="instance exists")


def conflict_0111(ds: Dataset) -> httpx.Response:
    body = stow_json(failed=[(str(ds.SOPInstanceUID), Status.DUPLICATE_SOP_INSTANCE)])
    return httpx.Response(409, headers=JSON, content=body)


@pytest.mark.parametrize("conflict", [conflict_409, conflict_0111], ids=["409", "0111"])
def test_retry_that_finds_the_instance_stored_is_success(
    start_importer: Callable[..., RunningImporter],
    conflict: Callable[[Dataset], httpx.Response],
) -> None:
    """The lost answer stored it: success, after a QIDO by UID with the SOP class."""
    importer = start_importer("--upstream_retry_deadline=10", "--http_timeout=5")
    ds = make_ct()
    importer.upstream.responder = answer_lost_then_conflict(
        ds, conflict=conflict(ds), sop_class_upstream=str(ds.SOPClassUID)
    )
    assert c_store(importer, ds) == Status.SUCCESS
    query = importer.upstream.requests[-1]
    assert query.method == "GET"
    assert query.url.path == (
        f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances"
    )
    assert query.url.params["SOPInstanceUID"] == ds.SOPInstanceUID
    assert query.url.params["includefield"] == "00080016"


@pytest.mark.parametrize(
    ("upstream_class", "expected"),
    [(None, Status.PROCESSING_FAILURE), ("1.2.840.10008.5.1.4.1.1.7", Status.PROCESSING_FAILURE)],
    ids=["absent", "other-sop-class"],
)
def test_retry_conflict_without_the_instance_upstream_is_failure(
    start_importer: Callable[..., RunningImporter], upstream_class: str | None, expected: int
) -> None:
    importer = start_importer("--upstream_retry_deadline=10", "--http_timeout=5")
    ds = make_ct()
    importer.upstream.responder = answer_lost_then_conflict(
        ds, conflict=conflict_409(ds), sop_class_upstream=upstream_class
    )
    assert c_store(importer, ds) == expected
    methods = [r.method for r in importer.upstream.requests]
    assert methods[:3] == ["POST", "POST", "GET"]
    assert set(methods[2:]) == {"GET"}  # the check only lists (paged until an empty page)


def test_first_attempt_conflict_keeps_its_meaning(
    start_importer: Callable[..., RunningImporter],
) -> None:
    """No answer was lost: a 409 is the peer's duplicate, 0x0110, and nothing is asked."""
    importer = start_importer()
    ds = make_ct()
    importer.upstream.responder = lambda r: httpx.Response(409)
    assert c_store(importer, ds) == Status.PROCESSING_FAILURE
    assert [r.method for r in importer.upstream.requests] == ["POST"]


def store_twice_then_abort(importer: RunningImporter, path: Path) -> None:
    """Send two whole C-STOREs over a raw socket without waiting for answers, then A-ABORT."""
    meta = read_file_meta_info(path)
    sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    dataset = path.read_bytes()[split_dataset(path)[1] :]
    assert len(dataset) < 16000, "one P-DATA fragment each"
    with socket.create_connection(("127.0.0.1", importer.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw_associate(sock, importer.aet, "MODALITY", [(sop_class, syntax)])
        command = pdu.c_store_rq(1, sop_class, str(meta.MediaStorageSOPInstanceUID))
        for _ in range(2):
            sock.sendall(
                p_data(1, command, command=True, last=True)
                + p_data(1, dataset, command=False, last=True)
            )
        sock.sendall(pdu.abort())


@pytest.mark.parametrize(
    "flags", [(), ("--pynetdicom_storage",)], ids=["adapter-scp", "pynetdicom"]
)
def test_abort_after_whole_data_sets_leaves_no_file(
    start_importer: Callable[..., RunningImporter],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    flags: tuple[str, ...],
) -> None:
    """Data sets that were complete but never answered: gone with their association."""
    importer = start_importer(
        "--http_timeout=0.5", "--upstream_retry_deadline=1", "--cstore_answer_deadline=2", *flags
    )

    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    importer.upstream.responder = cast(Responder, hang)
    ds = make_ct()
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    service = importer.service
    store_twice_then_abort(importer, path)
    spool = service.cstore_spool_dir
    assert spool is not None
    # The association was accepted before the data sets were sent, and its thread ends only
    # after the DUL read the A-ABORT, which follows both data sets: they were spooled by then.
    wait_until(
        lambda: not list(spool.iterdir()) and not service.active_associations,
        10.0,
        "an empty spool and no association",
        detail=lambda: f"{list(spool.iterdir())} left",
    )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    if flags:
        # pynetdicom's DUL thread reads the A-ABORT while the handler waits for the upstream:
        # a data set dispatched after its file was removed is not an error of ours
        assert errors == []
    else:
        # the adapter's SCP reads the A-ABORT after its handler: each whole data set was
        # offered upstream, and that upstream failing is logged like any other
        assert errors == ["C-STORE failed: STOW-RS: TimeoutError (after 1 tries) -> 0xA700"] * 2
