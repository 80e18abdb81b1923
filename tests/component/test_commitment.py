"""Storage commitment over real associations: N-ACTION in, QIDO-RS (scripted), report out."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
from pynetdicom import evt

from dicom_adapter.aets import AetDictionary, Peer
from dicom_adapter.bridge import Bridge
from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy, make_http_client
from dicom_adapter.dimse.scu import ScuTimeouts
from dicom_adapter.dimse.server import STORAGE_COMMITMENT_PUSH_MODEL, build_ae, start_server
from dicom_adapter.importer.commitment import CommitmentService
from dicom_adapter.importer.handlers import CommitmentHandler
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry
from dicom_adapter.status import Status
from tests.rig import free_port
from tests.rig.commitment import (
    OUR_AET,
    REQUESTER_AET,
    SYNTAXES,
    WAIT,
    Requester,
    action_information,
    references,
)

ROOT = "http://dicomweb.test/dicom-web"


@dataclass
class Upstream:
    """QIDO-RS over a dict of stored instances (SOP Instance UID -> SOP Class UID)."""

    stored: dict[str, str] = field(default_factory=dict)
    failures_first: int = 0  # answer this many requests with 503 before answering properly
    queried: list[list[str]] = field(default_factory=list)
    page_cap: int | None = None  # a server answering at most this many per page, whatever limit

    def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/dicom-web/instances"
        if self.failures_first > 0:
            self.failures_first -= 1
            return httpx.Response(503, text="busy")
        uids = request.url.params["SOPInstanceUID"].split(",")
        assert request.url.params["includefield"] == "00080016"
        self.queried.append(uids)
        matches = [
            {
                "00080016": {"vr": "UI", "Value": [self.stored[uid]]},
                "00080018": {"vr": "UI", "Value": [uid]},
            }
            for uid in uids
            if uid in self.stored
        ]
        offset = int(request.url.params.get("offset", "0"))
        limit = int(request.url.params.get("limit", "1000"))
        limit = limit if self.page_cap is None else min(limit, self.page_cap)
        body = json.dumps(matches[offset : offset + limit]).encode()
        return httpx.Response(200, headers={"Content-Type": "application/dicom+json"}, content=body)


@dataclass
class Harness:
    """A CommitmentService behind a real SCP, its upstream and one requester."""

    port: int
    upstream: Upstream
    requester: Requester
    bridge: Bridge
    service: CommitmentService
    metrics: ImportMetrics


@pytest.fixture
def start_commitment() -> Iterator[Callable[..., Harness]]:
    """Factory: a commitment SCP on a loop thread; everything is stopped at teardown."""
    stops: list[Callable[[], None]] = []

    def start(
        *, listen: bool = True, accept_roles: bool = False, batch_size: int = 100, **kw: Any
    ) -> Harness:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        bridge = Bridge(loop)
        upstream = Upstream()
        http = make_http_client(timeout=5, transport=httpx.MockTransport(upstream.handle))
        retry = kw.pop("retry", RetryPolicy(deadline=5, first_delay=0.01, max_delay=0.05))
        client = DicomwebClient(http, retry)
        requester = Requester(free_port(), accept_roles=accept_roles)
        aets = AetDictionary([Peer(REQUESTER_AET, "127.0.0.1", requester.port)])
        service = CommitmentService(
            client,
            ROOT,
            aets,
            aet=OUR_AET,
            bridge=bridge,
            report_attempts=kw.pop("report_attempts", 5),
            report_first_delay=kw.pop("report_first_delay", 0.05),
            report_max_delay=kw.pop("report_max_delay", 0.2),
            batch_size=batch_size,
            scu_timeouts=ScuTimeouts(connection=2, acse=5, dimse=5, network=10),
        )
        ae = build_ae(
            aet=OUR_AET,
            max_associations=4,
            max_pdu_size=0,
            acse_timeout=5,
            dimse_timeout=5,
            network_timeout=10,
        )
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, SYNTAXES)
        metrics = ImportMetrics(MetricsRegistry())
        handler = CommitmentHandler(service, metrics=metrics)
        server = start_server(ae, "127.0.0.1", 0, [(evt.EVT_N_ACTION, handler)])
        if listen:
            requester.listen()

        def stop() -> None:
            server.shutdown()
            requester.stop()
            asyncio.run_coroutine_threadsafe(bridge.close(grace=5), loop).result(10)
            asyncio.run_coroutine_threadsafe(http.aclose(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

        stops.append(stop)
        port = int(server.server_address[1])
        return Harness(port, upstream, requester, bridge, service, metrics)

    yield start
    for stop in stops:
        stop()


def store(harness: Harness, count: int, sop_class: str = CTImageStorage) -> list[tuple[str, str]]:
    instances = [(sop_class, str(generate_uid())) for _ in range(count)]
    harness.upstream.stored.update({uid: cls for cls, uid in instances})
    return instances


@pytest.mark.parametrize("accept_roles", [False, True], ids=["default-roles", "role-selection"])
def test_all_present_reports_event_1(
    start_commitment: Callable[..., Harness], accept_roles: bool
) -> None:
    h = start_commitment(accept_roles=accept_roles)
    instances = store(h, 3)
    info = action_information(instances)

    status = h.requester.request(h.port, info)

    assert status.Status == Status.SUCCESS
    report = h.requester.wait_report()
    assert report.event_type == 1
    assert report.calling_aet == OUR_AET
    assert report.called_aet == REQUESTER_AET
    # We propose the SCP role for ourselves (PS3.4 J.3.3); a requester that takes part in role
    # selection ends up as the SCU of the report, one that ignores it keeps the default roles.
    assert report.roles == ((True, False) if accept_roles else (False, True))
    assert report.info.TransactionUID == info.TransactionUID
    assert references(report.info.ReferencedSOPSequence) == instances
    assert "FailedSOPSequence" not in report.info


def test_missing_instance_fails_with_no_such_object(
    start_commitment: Callable[..., Harness],
) -> None:
    h = start_commitment()
    present = store(h, 2)
    missing = (CTImageStorage, generate_uid())
    info = action_information([present[0], missing, present[1]])

    assert h.requester.request(h.port, info).Status == Status.SUCCESS

    report = h.requester.wait_report()
    assert report.event_type == 2
    assert report.info.TransactionUID == info.TransactionUID
    assert references(report.info.ReferencedSOPSequence) == present
    assert references(report.info.FailedSOPSequence) == [missing]
    assert report.info.FailedSOPSequence[0].FailureReason == Status.NO_SUCH_OBJECT_INSTANCE


def test_sop_class_mismatch_fails(start_commitment: Callable[..., Harness]) -> None:
    h = start_commitment()
    (stored,) = store(h, 1, sop_class=MRImageStorage)
    claimed = (CTImageStorage, stored[1])

    assert h.requester.request(h.port, action_information([claimed])).Status == Status.SUCCESS

    report = h.requester.wait_report()
    assert report.event_type == 2
    assert "ReferencedSOPSequence" not in report.info
    assert references(report.info.FailedSOPSequence) == [claimed]
    assert report.info.FailedSOPSequence[0].FailureReason == Status.CLASS_INSTANCE_CONFLICT


def test_unknown_requester_is_refused_without_report(
    start_commitment: Callable[..., Harness],
) -> None:
    h = start_commitment()
    info = action_information(store(h, 1))

    status = h.requester.request(h.port, info, aet="STRANGER")

    assert status.Status == Status.PROCESSING_FAILURE
    assert "STRANGER" in str(status.ErrorComment)
    assert "AET dictionary" in str(status.ErrorComment)
    assert h.bridge.pending_tasks == 0  # nothing was scheduled: no QIDO, no report
    assert h.upstream.queried == []
    assert not h.requester.received.is_set()
    # A known requester's transaction afterwards is the only one verified and reported.
    assert h.requester.request(h.port, action_information(store(h, 1))).Status == 0
    assert h.requester.wait_report().event_type == 1
    assert len(h.upstream.queried) == 1


def test_malformed_request_is_refused(start_commitment: Callable[..., Harness]) -> None:
    h = start_commitment()
    info = Dataset()
    info.TransactionUID = generate_uid()  # but no ReferencedSOPSequence

    status = h.requester.request(h.port, info)

    assert status.Status == Status.PROCESSING_FAILURE
    assert "ReferencedSOPSequence" in str(status.ErrorComment)
    assert h.bridge.pending_tasks == 0


def test_other_action_types_are_no_such_action_and_counted(
    start_commitment: Callable[..., Harness],
) -> None:
    h = start_commitment()
    info = action_information(store(h, 1))

    status = h.requester.request(h.port, info, action_type=2)

    assert status.Status == Status.NO_SUCH_ACTION
    assert status.ErrorComment == "only action type 1 is supported"
    assert h.bridge.pending_tasks == 0
    assert h.requester.request(h.port, info).Status == Status.SUCCESS
    assert h.requester.wait_report().event_type == 1
    assert h.metrics.commitment_requests.value() == 2
    assert h.metrics.commitment_errors.value() == 1


def test_a_request_during_shutdown_asks_to_retry_later(
    start_commitment: Callable[..., Harness],
) -> None:
    h = start_commitment()
    asyncio.run_coroutine_threadsafe(h.bridge.close(grace=1), h.bridge.loop).result(WAIT)

    status = h.requester.request(h.port, action_information(store(h, 1)))

    assert status.Status == Status.OUT_OF_RESOURCES  # 0xA7xx: the modality retries later
    assert status.ErrorComment == "the adapter is shutting down"
    assert h.upstream.queried == []


class _Signal(logging.Handler):
    """Sets an event when a log message containing `text` is emitted."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


def test_report_retried_until_requester_listens(
    start_commitment: Callable[..., Harness],
) -> None:
    h = start_commitment(listen=False, report_first_delay=0.3, report_max_delay=0.5)
    signal = _Signal("attempt 1 failed")
    logger = logging.getLogger("dicom_adapter.importer.commitment")
    logger.addHandler(signal)
    previous_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        instances = store(h, 2)
        assert h.requester.request(h.port, action_information(instances)).Status == 0
        assert signal.seen.wait(WAIT), "the first report attempt did not fail"
        h.requester.listen()
        report = h.requester.wait_report()
    finally:
        logger.removeHandler(signal)
        logger.setLevel(previous_level)
    assert report.event_type == 1
    assert references(report.info.ReferencedSOPSequence) == instances


def test_upstream_503_then_ok_still_correct(start_commitment: Callable[..., Harness]) -> None:
    h = start_commitment()
    h.upstream.failures_first = 1
    instances = store(h, 2)

    assert h.requester.request(h.port, action_information(instances)).Status == 0

    report = h.requester.wait_report()
    assert report.event_type == 1
    assert references(report.info.ReferencedSOPSequence) == instances
    assert h.upstream.failures_first == 0


def test_uids_are_queried_in_batches(start_commitment: Callable[..., Harness]) -> None:
    h = start_commitment(batch_size=2)
    instances = store(h, 5)

    assert h.requester.request(h.port, action_information(instances)).Status == 0

    report = h.requester.wait_report()
    assert report.event_type == 1
    assert references(report.info.ReferencedSOPSequence) == instances
    assert [len(batch) for batch in h.upstream.queried] == [2, 2, 1]
    assert sorted(uid for batch in h.upstream.queried for uid in batch) == sorted(
        uid for _, uid in instances
    )


def test_upstream_down_reports_processing_failure(
    start_commitment: Callable[..., Harness],
) -> None:
    h = start_commitment(retry=RetryPolicy(deadline=0.2, first_delay=0.01, max_delay=0.05))
    h.upstream.failures_first = 10_000  # the client's retry deadline runs out
    instances = store(h, 2)

    assert h.requester.request(h.port, action_information(instances)).Status == 0

    report = h.requester.wait_report()
    assert report.event_type == 2
    assert references(report.info.FailedSOPSequence) == instances
    assert {int(i.FailureReason) for i in report.info.FailedSOPSequence} == {
        Status.PROCESSING_FAILURE
    }


def test_server_capping_qido_limit_still_commits_everything(
    start_commitment: Callable[..., Harness],
) -> None:
    h = start_commitment()
    h.upstream.page_cap = 2
    instances = store(h, 5)

    assert h.requester.request(h.port, action_information(instances)).Status == Status.SUCCESS

    report = h.requester.wait_report()
    assert report.event_type == 1
    assert references(report.info.ReferencedSOPSequence) == instances
