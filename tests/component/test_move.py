"""C-MOVE over real associations: scripted QIDO-RS/WADO-RS upstream, in-process storage SCP.

The requester is a pynetdicom move SCU; the destination is a pynetdicom storage SCP on a free
port that records what each C-STORE sub-operation carried and answers a scripted status.
"""

from __future__ import annotations

import hashlib
import io
import json
import socketserver
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config, evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_adapter.dicomweb.multipart import (
    body_tail,
    new_boundary,
    part_head,
    related_content_type,
)
from dicom_adapter.dimse.server import STUDY_ROOT_MOVE
from dicom_adapter.status import Status
from tests.component.conftest import RunningImporter
from tests.rig import free_port

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


def make_instance(study: str, series: str, number: int, pixel_bytes: int = 512) -> Instance:
    uid = generate_uid()
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P1"
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.Rows = 16
    ds.Columns = 16
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    unique = hashlib.sha256(uid.encode()).digest()  # pixels unique per instance
    ds.PixelData = (unique * (pixel_bytes // len(unique) + 1))[:pixel_bytes]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    stored = _part10(ds)
    transcoded = dcmread(io.BytesIO(stored))
    transcoded.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = _part10(transcoded)
    assert dataset_bytes(implicit) != dataset_bytes(stored)
    return Instance(study, series, uid, stored, implicit)


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
    return request.url.path.endswith("/instances")


@dataclass
class Archive:
    """QIDO-RS and WADO-RS over a list of instances, with scripted faults."""

    instances: list[Instance]
    omit_from_series: set[str] = field(default_factory=set)  # series WADO leaves these out
    qido_status: int | None = None  # answer QIDO-RS with this error
    wado_status: int | None = None  # answer WADO-RS with this error
    truncate_after_parts: int | None = None  # WADO-RS body stops inside the next part

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "GET"
        assert request.url.path.startswith(ROOT_PATH)
        parts = request.url.path[len(ROOT_PATH) :].strip("/").split("/")
        if parts[-1] == "instances":
            return self.qido(request, parts)
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
                "00080016": {"vr": "UI", "Value": [CTImageStorage]},
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
        self.accepted = 0
        self.received: list[Received] = []
        self.hold_at = 0  # the hold_at-th C-STORE (1-based) waits for `release` first
        self.release = threading.Event()
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
        with self._lock:
            self.requested += 1

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
            assert self.release.wait(10), "the test never released the held C-STORE"
        return self.statuses.get(uid, int(Status.SUCCESS))

    def by_uid(self) -> dict[str, Received]:
        return {item.sop_instance_uid: item for item in self.received}


def dictionary_flag(port: int) -> str:
    entries = [{"name": DEST_AET, "host": "127.0.0.1", "port": port}]
    return "--aet_dictionary_inline=" + json.dumps(entries)


CT_BOTH = ((CTImageStorage, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),)
Setup = Callable[..., tuple[RunningImporter, Destination]]


@pytest.fixture
def setup(
    start_importer: Callable[..., RunningImporter], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Setup]:
    """Factory: (importer scripted with `archive`, destination in its AET dictionary)."""
    destinations: list[Destination] = []

    def start(
        archive: Archive,
        *flags: str,
        contexts: Sequence[tuple[str, Sequence[str]]] = CT_BOTH,
        statuses: dict[str, int] | None = None,
    ) -> tuple[RunningImporter, Destination]:
        destination = Destination(contexts, statuses or {})
        destinations.append(destination)
        importer = start_importer(dictionary_flag(destination.port), *flags)
        importer.upstream.responder = archive
        # Starting the importer turns on pynetdicom's process-wide unrestricted storage
        # (every storage context accepted in the first syntax offered); the destination
        # negotiates like an ordinary SCP with the contexts it was given.
        monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
        return importer, destination

    yield start
    for destination in destinations:
        destination.stop()


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


def c_move(
    importer: RunningImporter,
    identifier: Dataset,
    destination: str = DEST_AET,
    *,
    dimse_timeout: float = 15,
) -> MoveResult:
    ae = AE(ae_title=SCU_AET)
    ae.dimse_timeout = dimse_timeout  # a hung adapter fails the test instead of hanging it
    ae.add_requested_context(MOVE_MODEL)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
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


# --- the cases ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "calling_aet"),
    [((), "ADAPTER"), (("--dimse_cmove_aet=MOVER",), "MOVER")],
    ids=["default-calling-aet", "dimse-cmove-aet"],
)
def test_study_moves_every_series_over_one_association(
    setup: Setup, flags: tuple[str, ...], calling_aet: str
) -> None:
    instances = make_study(3, 2)
    importer, destination = setup(Archive(instances), *flags)

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUCCESS
    assert result.counts() == (5, 0, 0)
    assert result.failed_uids() == []
    assert remaining(result) == [4, 3, 2, 1, 0]
    assert [int(p.NumberOfCompletedSuboperations) for p in result.pending] == [1, 2, 3, 4, 5]
    assert all(int(p.NumberOfFailedSuboperations) == 0 for p in result.pending)

    qidos = qido_requests(importer)
    assert len(qidos) == 2  # the second, at offset 5, is empty and ends paging
    assert relative_path(qidos[0]) == f"studies/{instances[0].study}/instances"
    wados = wado_requests(importer)  # the whole study in one request, both series
    assert [relative_path(r) for r in wados] == [f"studies/{instances[0].study}"]
    for request in wados:
        assert accept_params(request) == {"type": "application/dicom", "transfer-syntax": "*"}
        assert request.headers["Accept"].startswith("multipart/related;")
        assert request.headers["Accept-Encoding"] == "identity"
    assert len(importer.upstream.requests) == 3

    assert (destination.requested, destination.accepted) == (1, 1)
    assert len({r.association for r in destination.received}) == 1
    received = destination.by_uid()
    assert len(destination.received) == 5
    assert set(received) == {i.uid for i in instances}
    for instance in instances:
        item = received[instance.uid]
        assert item.dataset == dataset_bytes(instance.stored)  # byte for byte, pixels included
        assert dcmread(io.BytesIO(instance.stored)).SOPInstanceUID == item.sop_instance_uid
        assert item.transfer_syntax == ExplicitVRLittleEndian
        assert item.calling_aet == calling_aet
        assert item.called_aet == DEST_AET
        assert item.originator_aet == SCU_AET
        assert item.originator_message_id == MSG_ID


def test_instance_missing_from_series_response_is_a_failed_sub_operation(setup: Setup) -> None:
    instances = make_study(3)
    missing = instances[1].uid
    importer, destination = setup(Archive(instances, omit_from_series={missing}))

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert result.counts() == (2, 1, 0)
    assert result.failed_uids() == [missing]
    assert remaining(result) == [2, 1, 0]
    assert set(destination.by_uid()) == {instances[0].uid, instances[2].uid}


def test_series_not_found_fails_every_sub_operation(setup: Setup) -> None:
    instances = make_study(3)
    importer, destination = setup(Archive(instances, wado_status=404))

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.OUT_OF_RESOURCES_SUBOPERATIONS
    assert result.counts() == (0, 3, 0)
    assert result.failed_uids() == sorted(i.uid for i in instances)
    assert destination.received == []
    assert len(wado_requests(importer)) == 1  # a 404 is not retried


@pytest.mark.parametrize("count", [3, 12])  # 12: more than the send queue holds
def test_unreachable_destination_fails_everything_promptly(
    start_importer: Callable[..., RunningImporter], count: int
) -> None:
    instances = make_study(count)
    importer = start_importer(dictionary_flag(free_port()), "--shutdown_grace_period=0.5")
    importer.upstream.responder = Archive(instances)

    result = c_move(importer, study_level(instances[0].study), dimse_timeout=2)

    assert result.status == Status.OUT_OF_RESOURCES_SUBOPERATIONS
    assert result.counts() == (0, count, 0)
    assert result.failed_uids() == sorted(i.uid for i in instances)
    assert result.seconds < 1.5


def test_refused_and_warned_sub_operations_are_counted(setup: Setup) -> None:
    instances = make_study(5)
    refused, warned = instances[1].uid, instances[3].uid
    statuses = {
        refused: int(Status.OUT_OF_RESOURCES),
        warned: int(Status.COERCION_OF_DATA_ELEMENTS),
    }
    importer, destination = setup(Archive(instances), statuses=statuses)

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert result.counts() == (3, 1, 1)
    assert result.failed_uids() == [refused]
    assert remaining(result) == [4, 3, 2, 1, 0]
    assert len(destination.received) == 5
    assert destination.accepted == 1  # a refused instance does not end the association


def test_refused_stored_syntax_is_refetched_in_one_the_destination_accepts(setup: Setup) -> None:
    instances = make_study(3)
    importer, destination = setup(
        Archive(instances), contexts=((CTImageStorage, (ImplicitVRLittleEndian,)),)
    )

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUCCESS
    assert result.counts() == (3, 0, 0)
    study, series = instances[0].study, instances[0].series
    wados = wado_requests(importer)
    assert relative_path(wados[0]) == f"studies/{study}"
    assert accept_params(wados[0])["transfer-syntax"] == "*"
    refetches = wados[1:]
    assert sorted(relative_path(r) for r in refetches) == sorted(
        f"studies/{study}/series/{series}/instances/{i.uid}" for i in instances
    )
    for request in refetches:
        assert accept_params(request)["transfer-syntax"] == ImplicitVRLittleEndian
        assert request.headers["Accept-Encoding"] == "identity"
    assert destination.accepted == 1
    received = destination.by_uid()
    assert set(received) == {i.uid for i in instances}
    for instance in instances:
        item = received[instance.uid]
        assert item.transfer_syntax == ImplicitVRLittleEndian
        assert item.dataset == dataset_bytes(instance.implicit)


def test_image_level_fetches_each_instance(setup: Setup) -> None:
    instances = make_study(3)
    wanted = [instances[0], instances[2]]
    study, series = instances[0].study, instances[0].series
    importer, destination = setup(Archive(instances))

    result = c_move(importer, image_level(study, series, [i.uid for i in wanted]))

    assert result.status == Status.SUCCESS
    assert result.counts() == (2, 0, 0)
    qidos = qido_requests(importer)
    assert len(qidos) == 2  # the second is the empty page that ends paging
    assert sorted(qidos[0].url.params["SOPInstanceUID"].split(",")) == sorted(i.uid for i in wanted)
    assert sorted(relative_path(r) for r in wado_requests(importer)) == sorted(
        f"studies/{study}/series/{series}/instances/{i.uid}" for i in wanted
    )
    received = destination.by_uid()
    assert set(received) == {i.uid for i in wanted}
    for instance in wanted:
        assert received[instance.uid].dataset == dataset_bytes(instance.stored)


def test_failed_listing_opens_no_association(setup: Setup) -> None:
    instances = make_study(2)
    importer, destination = setup(Archive(instances, qido_status=400))

    result = c_move(importer, study_level(instances[0].study))

    assert result.pending == []
    assert result.status == Status.PROCESSING_FAILURE  # UpstreamError of a 4xx
    assert len(importer.upstream.requests) == 1  # the QIDO; no WADO
    assert (destination.requested, destination.received) == (0, [])


def test_unknown_destination_is_a801_and_nothing_else(setup: Setup) -> None:
    instances = make_study(2)
    importer, destination = setup(Archive(instances))

    result = c_move(importer, study_level(instances[0].study), destination="NOWHERE")

    assert result.pending == []
    assert result.status == Status.MOVE_DESTINATION_UNKNOWN
    assert importer.upstream.requests == []
    assert destination.requested == 0


def test_cancel_stops_the_sub_operations_and_reports_what_was_done(setup: Setup) -> None:
    instances = make_study(40)
    importer, destination = setup(Archive(instances))
    destination.hold_at = 3  # the third C-STORE waits until the C-CANCEL has been sent

    ae = AE(ae_title=SCU_AET)
    ae.dimse_timeout = 15
    ae.add_requested_context(MOVE_MODEL)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    statuses: list[Dataset] = []
    try:
        for status, _ in assoc.send_c_move(
            study_level(instances[0].study), DEST_AET, MOVE_MODEL, msg_id=MSG_ID
        ):
            assert "Status" in status, "no C-MOVE response (DIMSE timeout or abort)"
            statuses.append(status)
            if status.Status == Status.PENDING and len(statuses) == 2:
                assoc.send_c_cancel(MSG_ID, assoc.accepted_contexts[0].context_id)
                destination.release.set()
    finally:
        destination.release.set()
        assoc.release()

    final = statuses[-1]
    assert final.Status == Status.CANCEL
    completed = int(final.NumberOfCompletedSuboperations)
    assert completed >= 3  # the two reported before the cancel, and the held one
    assert int(final.NumberOfRemainingSuboperations) == 40 - completed
    assert int(final.NumberOfFailedSuboperations) == 0
    assert len(destination.received) < 40
    assert destination.accepted == 1


def test_cancel_while_a_data_set_is_half_sent_aborts_and_answers_within_2_s(
    setup: Setup,
) -> None:
    study = generate_uid()
    series = generate_uid()
    big = make_instance(study, series, 2, pixel_bytes=48 << 20)  # more than TCP buffers hold
    instances = [make_instance(study, series, 1), big, make_instance(study, series, 3)]
    importer, destination = setup(Archive(instances))
    destination.stall_after = 1 << 20  # the big one stops flowing after 1 MiB

    ae = AE(ae_title=SCU_AET)
    ae.dimse_timeout = 15
    ae.add_requested_context(MOVE_MODEL)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    cancelled_at: list[float] = []

    def cancel_once_stalled() -> None:
        if destination.stalled.wait(15):
            cancelled_at.append(time.monotonic())
            assoc.send_c_cancel(MSG_ID, assoc.accepted_contexts[0].context_id)

    canceller = threading.Thread(target=cancel_once_stalled, daemon=True)
    canceller.start()
    statuses: list[Dataset] = []
    try:
        for status, _ in assoc.send_c_move(study_level(study), DEST_AET, MOVE_MODEL, msg_id=MSG_ID):
            assert "Status" in status, "no C-MOVE response (DIMSE timeout or abort)"
            statuses.append(status)
        answered_at = time.monotonic()
    finally:
        destination.resume.set()
        canceller.join(5)
        assoc.release()

    assert cancelled_at, "the destination never stalled: the big data set went through"
    final = statuses[-1]
    assert final.Status == Status.CANCEL
    assert answered_at - cancelled_at[0] < 2.0
    assert int(final.NumberOfCompletedSuboperations) == 1
    assert int(final.NumberOfRemainingSuboperations) == 2
    assert int(final.NumberOfFailedSuboperations) == 0
    assert [r.sop_instance_uid for r in destination.received] == [instances[0].uid]


def test_wado_stream_breaking_mid_study_fails_the_rest(setup: Setup) -> None:
    instances = make_study(5)
    importer, destination = setup(Archive(instances, truncate_after_parts=2))

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert result.counts() == (2, 3, 0)
    delivered = {item.sop_instance_uid for item in destination.received}
    assert len(delivered) == 2
    assert result.failed_uids() == sorted({i.uid for i in instances} - delivered)


def test_server_capping_qido_limit_moves_every_instance(setup: Setup) -> None:
    instances = make_study(4, 3)  # 7 instances listed 3 at a time
    archive = Archive(instances)

    def capped(request: httpx.Request) -> httpx.Response:
        if is_qido(request):
            limit = min(3, int(request.url.params["limit"]))
            request = httpx.Request(
                "GET", request.url.copy_set_param("limit", limit), headers=request.headers
            )
        return archive(request)

    importer, destination = setup(archive)
    importer.upstream.responder = capped

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUCCESS
    assert result.counts() == (7, 0, 0)
    assert set(destination.by_uid()) == {i.uid for i in instances}
    assert [r.url.params["offset"] for r in qido_requests(importer)] == ["0", "3", "6", "7"]
