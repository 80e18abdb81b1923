"""In-process dicom-import with a scripted DICOMweb upstream (httpx.MockTransport), or a real
server through the production transport: the helpers of tests/component and the retrieve faults.

The scripted upstream and the running importer, the C-MOVE harness (archive, destination SCP,
move SCU), C-STORE, C-FIND and C-GET requesters. Their fixtures (`start_importer`, `setup`) are
in tests/rig/component_fixtures.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import socketserver
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from dicom_adapter.dicomweb.multipart import (
    body_tail,
    new_boundary,
    part_head,
    related_content_type,
)
from dicom_adapter.dimse.server import STUDY_ROOT_MOVE
from dicom_adapter.importer.app import ImportService
from dicom_adapter.status import Status
from tests.rig import VERIFICATION, scrape_metrics
from tests.rig.find import STUDY_ROOT_FIND

# A coroutine is awaited by httpx.MockTransport: an answer that waits without blocking the loop.
Responder = Callable[[httpx.Request], httpx.Response | Coroutine[Any, Any, httpx.Response]]


@dataclass
class Upstream:
    """A scripted DICOMweb server: records requests, answers with `responder`."""

    responder: Responder | None = None
    requests: list[httpx.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        self.requests.append(request)
        self.bodies.append(body)
        assert self.responder is not None, "test did not script the upstream"
        answer = self.responder(request)
        return answer if isinstance(answer, httpx.Response) else await answer


@dataclass
class RunningImporter:
    """An ImportService running on its own loop thread."""

    port: int
    aet: str
    upstream: Upstream
    service: ImportService
    loop: asyncio.AbstractEventLoop

    @property
    def metrics_url(self) -> str:
        """Root of the service's metrics and health endpoints (bound to a free port)."""
        return f"http://127.0.0.1:{self.service.metrics_port}"


# --- C-MOVE harness: upstream archive, destination SCP, move SCU (test_move, retrieve faults)

ROOT_PATH = "/dicom-web/"
DEST_AET = "STORESCP"
SCU_AET = "MOVESCU"
MSG_ID = 4242
JSON = {"Content-Type": "application/dicom+json"}
MOVE_MODEL = STUDY_ROOT_MOVE  # Study Root Query/Retrieve Information Model - MOVE


# --- test data ---------------------------------------------------------------------------


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dataset_bytes(part10: bytes) -> bytes:
    """The encoded data set of a Part-10 file (everything after the file meta group)."""
    assert part10[128:132] == b"DICM"
    assert part10[132:138] == b"\x02\x00\x00\x00UL", "file meta group length first"
    group_length = int.from_bytes(part10[140:144], "little")
    return part10[144 + group_length :]


@dataclass(frozen=True)
class Instance:
    """One stored CT image: Explicit VR Little Endian as stored, Implicit VR as transcoded."""

    study: str
    series: str
    uid: str
    stored: bytes
    implicit: bytes
    sop_class: str = CTImageStorage


def _ct_image(sop_class: str, uid: str, study: str, series: str, *, size: int) -> Dataset:
    """A CT image's identity, patient and size x size 16-bit pixel module (no pixels yet)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P1"
    ds.Modality = "CT"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def make_instance(
    study: str, series: str, number: int, pixel_bytes: int = 512, sop_class: str = CTImageStorage
) -> Instance:
    uid = generate_uid()
    ds = _ct_image(sop_class, uid, study, series, size=16)
    ds.InstanceNumber = number
    unique = hashlib.sha256(uid.encode()).digest()  # pixels unique per instance
    ds.PixelData = (unique * (pixel_bytes // len(unique) + 1))[:pixel_bytes]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    stored = _part10(ds)
    transcoded = dcmread(io.BytesIO(stored))
    transcoded.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = _part10(transcoded)
    assert dataset_bytes(implicit) != dataset_bytes(stored)
    return Instance(study, series, uid, stored, implicit, sop_class)


def make_study(*series_sizes: int) -> list[Instance]:
    study = generate_uid()
    instances: list[Instance] = []
    for size in series_sizes:
        series = generate_uid()
        instances.extend(make_instance(study, series, n + 1) for n in range(size))
    return instances


# --- the scripted DICOMweb server --------------------------------------------------------


def accept_params(request: httpx.Request) -> dict[str, str]:
    """The parameters of the request's Accept header (`type`, `transfer-syntax`)."""
    _, *params = request.headers.get("Accept", "").split(";")
    pairs = (p.strip().split("=", 1) for p in params if "=" in p)
    return {key.strip(): value.strip().strip('"') for key, value in pairs}


def is_qido(request: httpx.Request) -> bool:
    """QIDO-RS at instance or series level (WADO-RS paths end with a UID)."""
    return request.url.path.endswith(("/instances", "/series"))


@dataclass
class Archive:
    """QIDO-RS and WADO-RS over a list of instances, with scripted faults."""

    instances: list[Instance]
    omit_from_series: set[str] = field(default_factory=set)  # series WADO leaves these out
    qido_status: int | None = None  # answer QIDO-RS with this error
    wado_status: int | None = None  # answer WADO-RS with this error
    truncate_after_parts: int | None = None  # WADO-RS body stops inside the next part
    series_counts: bool = True  # series-level QIDO-RS gives NumberOfSeriesRelatedInstances
    count_offset: int = 0  # ... off by this many (each series)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "GET"
        assert request.url.path.startswith(ROOT_PATH)
        parts = request.url.path[len(ROOT_PATH) :].strip("/").split("/")
        if parts[-1] == "instances":
            return self.qido(request, parts)
        if parts[-1] == "series":
            return self.qido_series(request, parts)
        return self.wado(request, parts)

    def qido(self, request: httpx.Request, parts: list[str]) -> httpx.Response:
        assert "application/dicom+json" in request.headers.get("Accept", "")
        if self.qido_status is not None:
            return httpx.Response(self.qido_status, text="bad query")
        params = request.url.params
        study = parts[1] if parts[0] == "studies" else None
        series = (
            set(params["SeriesInstanceUID"].split(",")) if "SeriesInstanceUID" in params else None
        )
        sops = set(params["SOPInstanceUID"].split(",")) if "SOPInstanceUID" in params else None
        matches = [
            {
                "0020000D": {"vr": "UI", "Value": [i.study]},
                "0020000E": {"vr": "UI", "Value": [i.series]},
                "00080018": {"vr": "UI", "Value": [i.uid]},
                "00080016": {"vr": "UI", "Value": [i.sop_class]},
            }
            for i in self.instances
            if (study is None or i.study == study)
            and (series is None or i.series in series)
            and (sops is None or i.uid in sops)
        ]
        offset = int(params.get("offset", "0"))
        limit = int(params.get("limit", "1000"))
        body = json.dumps(matches[offset : offset + limit]).encode()
        return httpx.Response(200, headers=JSON, content=body)

    def qido_series(self, request: httpx.Request, parts: list[str]) -> httpx.Response:
        """One row per series, with its instance count (unless `series_counts` is off)."""
        assert "application/dicom+json" in request.headers.get("Accept", "")
        if self.qido_status is not None:
            return httpx.Response(self.qido_status, text="bad query")
        params = request.url.params
        if parts[0] == "studies":
            studies = {parts[1]}
        else:
            studies = set(params["StudyInstanceUID"].split(","))
        wanted = (
            set(params["SeriesInstanceUID"].split(",")) if "SeriesInstanceUID" in params else None
        )
        counts: dict[tuple[str, str], int] = {}
        for i in self.instances:
            if i.study in studies and (wanted is None or i.series in wanted):
                counts[(i.study, i.series)] = counts.get((i.study, i.series), 0) + 1
        rows: list[dict[str, Any]] = []
        for (study, series), count in counts.items():
            row: dict[str, Any] = {
                "0020000D": {"vr": "UI", "Value": [study]},
                "0020000E": {"vr": "UI", "Value": [series]},
            }
            if self.series_counts:
                row["00201209"] = {"vr": "IS", "Value": [count + self.count_offset]}
            rows.append(row)
        offset = int(params.get("offset", "0"))
        limit = int(params.get("limit", "1000"))
        body = json.dumps(rows[offset : offset + limit]).encode()
        return httpx.Response(200, headers=JSON, content=body)

    def wado(self, request: httpx.Request, parts: list[str]) -> httpx.Response:
        if self.wado_status is not None:
            return httpx.Response(self.wado_status, text="not here")
        syntax = accept_params(request).get("transfer-syntax")
        if parts[0:1] != ["studies"] or len(parts) not in (2, 4, 6):
            return httpx.Response(404, text="no such resource")
        if len(parts) > 2 and parts[2] != "series":
            return httpx.Response(404, text="no such resource")
        study = parts[1]
        selected = [i for i in self.instances if i.study == study]
        if len(parts) > 2:
            selected = [i for i in selected if i.series == parts[3]]
        if len(parts) == 6:
            assert parts[4] == "instances"
            selected = [i for i in selected if i.uid == parts[5]]
        else:
            selected = [i for i in selected if i.uid not in self.omit_from_series]
        if not selected:
            return httpx.Response(404, text="no such instance")
        if syntax == "*":
            payloads = [i.stored for i in selected]
        elif syntax == ImplicitVRLittleEndian:
            payloads = [i.implicit for i in selected]
        else:
            return httpx.Response(406, text=f"cannot transcode to {syntax}")
        boundary = new_boundary()
        pieces = [part_head(boundary, first=(n == 0)) + p for n, p in enumerate(payloads)]
        headers = {"Content-Type": related_content_type(boundary)}
        if self.truncate_after_parts is not None:
            cut = self.truncate_after_parts
            broken = b"".join(pieces[:cut]) + pieces[cut][: len(pieces[cut]) // 2]
            return httpx.Response(200, headers=headers, content=broken)
        body = b"".join(pieces) + body_tail(boundary)
        return httpx.Response(200, headers=headers, content=body)


def wado_requests(importer: RunningImporter) -> list[httpx.Request]:
    return [r for r in importer.upstream.requests if not is_qido(r)]


def qido_requests(importer: RunningImporter) -> list[httpx.Request]:
    return [r for r in importer.upstream.requests if is_qido(r)]


def relative_path(request: httpx.Request) -> str:
    return request.url.path[len(ROOT_PATH) :]


# --- the move destination ----------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """What one C-STORE sub-operation carried."""

    sop_instance_uid: str
    calling_aet: str
    called_aet: str
    originator_aet: str
    originator_message_id: int | None
    transfer_syntax: str
    dataset: bytes  # the encoded data set as received
    association: str


class Destination:
    """A storage SCP on a free port: records sub-operations, answers scripted statuses."""

    def __init__(
        self,
        contexts: Sequence[tuple[str, Sequence[str]]],
        statuses: dict[str, int],
    ) -> None:
        self.statuses = statuses
        self.requested = 0
        self.proposed: list[set[str]] = []  # the SOP classes each association proposed
        self.accepted = 0
        self.received: list[Received] = []
        self.hold_at = 0  # the hold_at-th C-STORE (1-based) waits for `release` first
        # (request number, SOP classes proposed) -> True: rejected, transiently, with "local
        # limit exceeded" (a PACS limiting associations answers so)
        self.refuse: Callable[[int, set[str]], bool] = lambda number, classes: False
        self.release = threading.Event()
        self.holding = threading.Event()  # set while the held C-STORE waits
        self.stall_after = 0  # stop reading the socket once this many P-DATA bytes arrived
        self.stalled = threading.Event()
        self.resume = threading.Event()  # reading goes on once this is set
        self.p_data_bytes = 0
        self._lock = threading.Lock()
        ae = AE(ae_title=DEST_AET)
        ae.require_called_aet = True
        for sop_class, syntaxes in contexts:
            ae.add_supported_context(sop_class, list(syntaxes))
        self.server: Any = ae.make_server(
            ("127.0.0.1", 0),
            evt_handlers=[
                (evt.EVT_REQUESTED, self._on_requested),
                (evt.EVT_ACCEPTED, self._on_accepted),
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_DATA_RECV, self._on_data),
            ],
            server_class=ThreadedAssociationServer,
        )
        self.port = int(self.server.server_address[1])
        # pynetdicom's own thread polls for shutdown every 0.5 s; this one is quicker to stop
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        socketserver.BaseServer.shutdown(self.server)  # not in ae's server list to remove from
        self.server.server_close()
        self._thread.join(5)

    def _on_requested(self, event: Any) -> None:
        classes = {str(cx.abstract_syntax) for cx in event.assoc.requestor.requested_contexts}
        with self._lock:
            self.requested += 1
            self.proposed.append(classes)
            number = self.requested
        if self.refuse(number, classes):
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)

    def _on_accepted(self, event: Any) -> None:
        with self._lock:
            self.accepted += 1

    def _on_data(self, event: Any) -> None:
        """In the DUL reader thread: blocking here stops reading, so the sender's TCP stalls."""
        if not self.stall_after or event.data[:1] != b"\x04":  # P-DATA-TF only
            return
        self.p_data_bytes += len(event.data)
        if self.p_data_bytes > self.stall_after and not self.stalled.is_set():
            self.stalled.set()
            self.resume.wait(20)

    def _on_store(self, event: Any) -> int:
        request = event.request
        try:  # pynetdicom spools the data set to a Part-10 file when configured so
            data = dataset_bytes(event.dataset_path.read_bytes())
        except AttributeError:
            data = request.DataSet.getvalue()
        uid = str(request.AffectedSOPInstanceUID)
        originator_id = request.MoveOriginatorMessageID
        item = Received(
            sop_instance_uid=uid,
            calling_aet=str(event.assoc.requestor.ae_title).strip(),
            called_aet=str(event.assoc.acceptor.ae_title).strip(),
            originator_aet=str(request.MoveOriginatorApplicationEntityTitle or "").strip(),
            originator_message_id=None if originator_id is None else int(originator_id),
            transfer_syntax=str(event.context.transfer_syntax),
            dataset=data,
            association=str(event.assoc.name),
        )
        with self._lock:
            self.received.append(item)
            arrived = len(self.received)
        if arrived == self.hold_at:
            self.holding.set()
            assert self.release.wait(10), "the test never released the held C-STORE"
        return self.statuses.get(uid, int(Status.SUCCESS))

    def by_uid(self) -> dict[str, Received]:
        return {item.sop_instance_uid: item for item in self.received}


def dictionary_flag(port: int) -> str:
    entries = [{"name": DEST_AET, "host": "127.0.0.1", "port": port}]
    return "--aet_dictionary_inline=" + json.dumps(entries)


CT_BOTH = ((CTImageStorage, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),)
Setup = Callable[..., tuple[RunningImporter, Destination]]


# --- the move SCU ------------------------------------------------------------------------


@dataclass
class MoveResult:
    pending: list[Dataset]
    final: Dataset
    identifier: Dataset | None
    seconds: float

    @property
    def status(self) -> int:
        return int(self.final.Status)

    def counts(self) -> tuple[int, int, int]:
        """(completed, failed, warning) of the final response."""
        return (
            int(self.final.get("NumberOfCompletedSuboperations", 0) or 0),
            int(self.final.get("NumberOfFailedSuboperations", 0) or 0),
            int(self.final.get("NumberOfWarningSuboperations", 0) or 0),
        )

    def failed_uids(self) -> list[str]:
        if self.identifier is None or "FailedSOPInstanceUIDList" not in self.identifier:
            return []
        value = self.identifier.FailedSOPInstanceUIDList
        values = list(value) if isinstance(value, MultiValue | list) else [value]
        return sorted(str(v) for v in values)


def move_association(importer: RunningImporter, dimse_timeout: float = 15) -> Association:
    """An established association of the move SCU with `importer`."""
    ae = AE(ae_title=SCU_AET)
    ae.dimse_timeout = dimse_timeout  # a hung adapter fails the test instead of hanging it
    ae.add_requested_context(MOVE_MODEL)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    return assoc


def cancel_at_second_pending(
    importer: RunningImporter,
    destination: Destination,
    study: str,
    before_cancel: Callable[[], None] = lambda: None,
) -> list[Dataset]:
    """Every C-MOVE response of `study`; C-CANCEL sent at the second pending one.

    The destination is released (after the cancel, or on any failure) so a held C-STORE ends.
    """
    assoc = move_association(importer)
    statuses: list[Dataset] = []
    try:
        for status, _ in assoc.send_c_move(study_level(study), DEST_AET, MOVE_MODEL, msg_id=MSG_ID):
            assert "Status" in status, "no C-MOVE response (DIMSE timeout or abort)"
            statuses.append(status)
            if status.Status == Status.PENDING and len(statuses) == 2:
                before_cancel()
                assoc.send_c_cancel(MSG_ID, assoc.accepted_contexts[0].context_id)
                destination.release.set()
    finally:
        destination.release.set()
        assoc.release()
    return statuses


def c_move(
    importer: RunningImporter,
    identifier: Dataset,
    destination: str = DEST_AET,
    *,
    dimse_timeout: float = 15,
) -> MoveResult:
    assoc = move_association(importer, dimse_timeout)
    pending: list[Dataset] = []
    started = time.monotonic()
    try:
        for status, answer in assoc.send_c_move(identifier, destination, MOVE_MODEL, msg_id=MSG_ID):
            assert "Status" in status, "no C-MOVE response (DIMSE timeout or abort)"
            if status.Status == Status.PENDING:
                pending.append(status)
                continue
            return MoveResult(pending, status, answer, time.monotonic() - started)
        raise AssertionError("no final C-MOVE response")
    finally:
        assoc.release()


def study_level(study: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study
    return ds


def image_level(study: str, series: str, uids: Sequence[str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = list(uids)
    return ds


def remaining(result: MoveResult) -> list[int]:
    return [int(p.NumberOfRemainingSuboperations) for p in result.pending]


# --- C-STORE helpers shared by the component tests ---------------------------------------


JSON = {"Content-Type": "application/dicom+json"}


def make_ct(transfer_syntax: UID = ExplicitVRLittleEndian) -> Dataset:
    ds = _ct_image(CTImageStorage, generate_uid(), generate_uid(), generate_uid(), size=4)
    ds.PixelData = bytes(range(32))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def stow_json(
    referenced: Sequence[tuple[str, int | None]] = (),
    failed: Sequence[tuple[str, int | None]] = (),
) -> bytes:
    def item(uid: str, tag: str, reason: int | None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "00081150": {"vr": "UI", "Value": [CTImageStorage]},
            "00081155": {"vr": "UI", "Value": [uid]},
        }
        if reason is not None:
            entry[tag] = {"vr": "US", "Value": [reason]}
        return entry

    body: dict[str, Any] = {}
    if referenced:
        body["00081199"] = {
            "vr": "SQ",
            "Value": [item(uid, "00081196", reason) for uid, reason in referenced],
        }
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [item(uid, "00081197", reason) for uid, reason in failed],
        }
    return json.dumps(body).encode()


def c_store(importer: RunningImporter, ds: Dataset, ts: UID = ExplicitVRLittleEndian) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ts)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
        assert rsp, "no C-STORE response"
        return int(rsp.Status)
    finally:
        assoc.release()


def write_without(tmp_path: Path, keyword: str) -> tuple[Path, str]:
    ds = make_ct()
    sop_class, sop_instance = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    delattr(ds, keyword)
    path = tmp_path / f"no-{keyword}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, sop_class


# --- C-FIND against a paged QIDO-RS upstream ---------------------------------------------


def study(n: int) -> dict[str, object]:
    """QIDO-RS JSON of study `n`, with one attribute a C-FIND must not pass on."""
    return {
        "0020000D": {"vr": "UI", "Value": [f"1.2.3.{n}"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": f"Doe^Patient{n}"}]},
        "00100020": {"vr": "LO", "Value": [f"P{n}"]},
        "00081030": {"vr": "LO", "Value": ["extra attribute that must not leak"]},
    }


def paged_studies(total: int, cap: int = 10**9) -> Callable[[httpx.Request], httpx.Response]:
    """A QIDO server over `total` studies that answers at most `cap` per page."""

    def respond(request: httpx.Request) -> httpx.Response:
        query = dict(parse_qsl(request.url.query.decode()))
        offset, limit = int(query["offset"]), min(cap, int(query["limit"]))
        page = [study(n) for n in range(offset, min(total, offset + limit))]
        return httpx.Response(200, headers=JSON, content=json.dumps(page).encode())

    return respond


def query() -> Dataset:
    """A study-level C-FIND identifier matching every `study(n)`."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "Doe^*"
    ds.StudyInstanceUID = ""
    return ds


def find(importer: RunningImporter, cancel_after: int | None = None) -> tuple[int, list[Dataset]]:
    """C-FIND `query()`; C-CANCEL after `cancel_after` answers; (final status, answers)."""
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


# --- C-GET requester ---------------------------------------------------------------------

STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
CGET = "dicomadapter_import_cget_"
GET_MSG_ID = 7


@dataclass
class GetScu:
    """A pynetdicom C-GET requester: what it stored, the P-DATA PDU sizes it received."""

    syntaxes: Sequence[str] = (ExplicitVRLittleEndian,)
    statuses: dict[str, int] = field(default_factory=dict)  # C-STORE-RSP status per UID
    max_pdu: int = 16382
    on_store: Callable[[Association, int], None] = lambda assoc, n: None  # nth C-STORE
    on_data: Callable[[Any], None] = lambda event: None  # EVT_DATA_RECV, in the DUL thread
    stored: dict[str, bytes] = field(default_factory=dict)
    syntax_of: dict[str, str] = field(default_factory=dict)
    p_data_sizes: list[int] = field(default_factory=list)

    def _store(self, event: Any) -> int:
        try:  # pynetdicom spools the data set to a Part-10 file when configured so
            data = dataset_bytes(event.dataset_path.read_bytes())
        except AttributeError:
            data = event.request.DataSet.getvalue()
        uid = str(event.request.AffectedSOPInstanceUID)
        self.stored[uid] = data
        self.syntax_of[uid] = str(event.context.transfer_syntax)
        self.on_store(event.assoc, len(self.stored))
        return self.statuses.get(uid, 0x0000)

    def _data(self, event: Any) -> None:
        if event.data[:1] == b"\x04":  # P-DATA-TF: the whole PDU, header included
            self.p_data_sizes.append(len(event.data) - 6)
        self.on_data(event)

    @contextlib.contextmanager
    def associate(self, importer: RunningImporter) -> Iterator[Association]:
        ae = AE(ae_title="GETSCU")
        ae.maximum_pdu_size = self.max_pdu
        ae.dimse_timeout = 15  # a hung adapter fails the test instead of hanging it
        ae.add_requested_context(STUDY_ROOT_GET)
        ae.add_requested_context(VERIFICATION)
        ae.add_requested_context(CTImageStorage, list(self.syntaxes))
        assoc = ae.associate(
            "127.0.0.1",
            importer.port,
            ae_title=importer.aet,
            ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_DATA_RECV, self._data)],
        )
        assert assoc.is_established
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def get(self, importer: RunningImporter, identifier: Dataset) -> list[tuple[Dataset, Any]]:
        """Every C-GET response (status, identifier) of one request."""
        with self.associate(importer) as assoc:
            return list(assoc.send_c_get(identifier, STUDY_ROOT_GET, msg_id=GET_MSG_ID))


def c_get(importer: RunningImporter, identifier: Dataset) -> tuple[list[Dataset], list[str]]:
    """The responses of one C-GET and the SOP Instance UIDs stored on the association."""
    scu = GetScu()
    responses = [status for status, _ in scu.get(importer, identifier)]
    return responses, list(scu.stored)


def failed_uids(identifier: Dataset | None) -> list[str]:
    if identifier is None or "FailedSOPInstanceUIDList" not in identifier:
        return []
    value = identifier.FailedSOPInstanceUIDList
    return sorted(str(v) for v in (value if isinstance(value, MultiValue | list) else [value]))


def cget_metric(
    importer: RunningImporter, name: str, expected: float, timeout: float = 5.0
) -> None:
    """Poll /metrics until CGET+name reads `expected` (final counts land after the answer)."""
    deadline = time.monotonic() + timeout
    while (value := scrape_metrics(importer.metrics_url).get(CGET + name)) != expected:
        assert time.monotonic() < deadline, f"{CGET}{name} is {value}, expected {expected}"
        time.sleep(0.02)
