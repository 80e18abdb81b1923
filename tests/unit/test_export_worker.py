"""Unit tests for the dicom-export worker: WADO-RS fetch (memory or spool), refetch, ack/nack.

WADO-RS is served by httpx.MockTransport (streamed bodies, as real transports deliver them);
the sink is a recording fake, or the real C-STORE sink over a fake association.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from tests.rig import part10_bytes as part10

from dicom_adapter.dicom.part10 import DatasetFile
from dicom_adapter.dicom.syntaxes import EXPLICIT_VR_LE
from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy, make_http_client
from dicom_adapter.dicomweb.instances import FetchedInstance
from dicom_adapter.dicomweb.multipart import body_tail, related_content_type
from dicom_adapter.dimse.scu import AssociationTarget
from dicom_adapter.dimse.store_scu import StoreResponse
from dicom_adapter.exporter.retry import Backoff
from dicom_adapter.exporter.sinks import (
    CStoreSink,
    PermanentFailure,
    Refetch,
    SinkUnavailable,
    TransientFailure,
)
from dicom_adapter.exporter.worker import ExportWorker, Outcome
from dicom_adapter.observability.metrics import ExportMetrics, MetricsRegistry

CT = "1.2.840.10008.5.1.4.1.1.2"
JPEG = "1.2.840.10008.1.2.4.50"
ROOT = "http://dicomweb.test/dicom-web"
PATH = "studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"
SOP_UID = "1.2.3.4.5"
BOUNDARY = "wado-boundary-5678"
FAST = RetryPolicy(deadline=0.2, first_delay=0.01, max_delay=0.02)
QUICK_BACKOFF = Backoff(initial=0.02, maximum=0.5)

Handler = Callable[[httpx.Request], httpx.Response]


async def chunked(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def wado_response(*payloads: bytes) -> httpx.Response:
    body = bytearray()
    for i, payload in enumerate(payloads):
        body += (b"\r\n" if i else b"") + f"--{BOUNDARY}\r\n".encode()
        body += b"Content-Type: application/dicom\r\n\r\n" + payload
    body += body_tail(BOUNDARY)
    return httpx.Response(
        200,
        headers={"Content-Type": related_content_type(BOUNDARY)},
        content=chunked(bytes(body)),
    )


class RecordingSink:
    """Records what it was given (data set bytes, whether spooled); optionally misbehaves."""

    def __init__(self, *, refetch_as: str | None = None, error: Exception | None = None) -> None:
        self.refetch_as = refetch_as
        self.error = error
        self.sent: list[tuple[str, str, bytes, bool]] = []
        self.instances: list[FetchedInstance] = []

    async def send(self, instance: FetchedInstance, refetch: Refetch | None = None) -> None:
        self.instances.append(instance)
        if self.error is not None:
            raise self.error
        if self.refetch_as is not None:
            assert refetch is not None
            again = await refetch(self.refetch_as)
            try:
                self._record(again)
            finally:
                again.discard()
            return
        self._record(instance)

    def _record(self, instance: FetchedInstance) -> None:
        assert instance.meta is not None
        source = instance.dataset()
        if isinstance(source, DatasetFile):
            with source.path.open("rb") as stream:
                stream.seek(source.offset)
                data, spooled = stream.read(), True
        else:
            data, spooled = bytes(source), False
        self.sent.append(
            (instance.meta.sop_instance_uid, instance.meta.transfer_syntax, data, spooled)
        )

    async def probe(self) -> None:
        pass

    async def close(self) -> None:
        pass


def handle(
    handler: Handler,
    sink: RecordingSink | CStoreSink,
    spool: Path,
    data: bytes = PATH.encode(),
    **options: object,
) -> Outcome:
    async def main() -> Outcome:
        http = make_http_client(timeout=10.0, transport=httpx.MockTransport(handler))
        async with http:
            worker = ExportWorker(
                DicomwebClient(http, FAST),
                ROOT + "/",
                sink,
                spool,
                **{"backoff": QUICK_BACKOFF, **options},  # type: ignore[arg-type]
            )
            try:
                return await worker.handle("message-1", data)
            finally:
                await worker.close()

    return asyncio.run(main())


def test_instance_fetched_in_memory_and_sent(tmp_path: Path) -> None:
    data = part10(CT, SOP_UID, EXPLICIT_VR_LE, b"slice")
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return wado_response(data)

    sink = RecordingSink()
    assert handle(handler, sink, tmp_path) is Outcome.ACK
    (request,) = requests
    assert str(request.url) == f"{ROOT}/{PATH}"
    assert request.headers["Accept"] == (
        'multipart/related; type="application/dicom"; transfer-syntax=*'
    )
    assert request.headers["Accept-Encoding"] == "identity"
    ((uid, syntax, sent, spooled),) = sink.sent
    assert (uid, syntax, spooled) == (SOP_UID, EXPLICIT_VR_LE, False)
    assert data.endswith(sent)
    assert sink.instances[0].data is None, "the worker discards the instance"
    assert list(tmp_path.iterdir()) == []


def test_large_instance_is_spooled_and_removed(tmp_path: Path) -> None:
    data = part10(CT, SOP_UID, EXPLICIT_VR_LE, b"x" * 50_000)
    sink = RecordingSink()
    outcome = handle(lambda r: wado_response(data), sink, tmp_path, memory_limit=10_000)
    assert outcome is Outcome.ACK
    ((_, _, sent, spooled),) = sink.sent
    assert spooled
    assert data.endswith(sent)
    assert list(tmp_path.iterdir()) == [], "the spool file is deleted"


def test_extra_parts_are_discarded(tmp_path: Path) -> None:
    first = part10(CT, SOP_UID, EXPLICIT_VR_LE, b"first" * 5000)
    second = part10(CT, "1.2.3.4.6", EXPLICIT_VR_LE, b"second" * 5000)
    sink = RecordingSink()
    outcome = handle(lambda r: wado_response(first, second), sink, tmp_path, memory_limit=1000)
    assert outcome is Outcome.ACK
    assert [uid for uid, *_ in sink.sent] == [SOP_UID]
    assert list(tmp_path.iterdir()) == []


def test_refetch_asks_for_the_transfer_syntax(tmp_path: Path) -> None:
    accepts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        accept = request.headers["Accept"]
        accepts.append(accept)
        syntax = JPEG if accept.endswith("transfer-syntax=*") else EXPLICIT_VR_LE
        return wado_response(part10(CT, SOP_UID, syntax, syntax.encode()))

    sink = RecordingSink(refetch_as=EXPLICIT_VR_LE)
    assert handle(handler, sink, tmp_path) is Outcome.ACK
    assert accepts[1] == (
        f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_VR_LE}'
    )
    ((_, syntax, _, _),) = sink.sent
    assert syntax == EXPLICIT_VR_LE


def test_response_without_parts_is_transient(tmp_path: Path) -> None:
    sink = RecordingSink()
    assert handle(lambda r: wado_response(), sink, tmp_path) is Outcome.NACK
    assert sink.instances == []


def test_unusable_meta_is_transient_and_not_sent(tmp_path: Path) -> None:
    sink = RecordingSink()
    outcome = handle(lambda r: wado_response(b"not a DICOM file"), sink, tmp_path)
    assert outcome is Outcome.NACK
    assert sink.instances == []


def test_permanent_failures_nacked_when_configured(tmp_path: Path) -> None:
    sink = RecordingSink()
    outcome = handle(lambda r: httpx.Response(404), sink, tmp_path, nack_permanent_failures=True)
    assert outcome is Outcome.NACK


def test_malformed_message_is_permanent(tmp_path: Path) -> None:
    sink = RecordingSink()
    outcome = handle(lambda r: wado_response(), sink, tmp_path, data=b"hello")
    assert outcome is Outcome.ACK


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (404, Outcome.ACK),
        (410, Outcome.ACK),
        (400, Outcome.NACK),
        (401, Outcome.NACK),
        (403, Outcome.NACK),
        (406, Outcome.NACK),
        (408, Outcome.NACK),
        (409, Outcome.NACK),
        (429, Outcome.NACK),
        (500, Outcome.NACK),
        (503, Outcome.NACK),
    ],
)
def test_wado_errors(tmp_path: Path, code: int, expected: Outcome) -> None:
    """Only a source that says the instance is gone (404, 410) is permanent."""
    sink = RecordingSink()
    assert handle(lambda r: httpx.Response(code), sink, tmp_path) is expected
    assert sink.instances == []


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (TransientFailure("peer busy"), Outcome.NACK),
        (PermanentFailure("refused"), Outcome.ACK),
        (RuntimeError("bug"), Outcome.NACK),
    ],
)
def test_sink_errors(tmp_path: Path, error: Exception, expected: Outcome) -> None:
    data = part10(CT, SOP_UID, EXPLICIT_VR_LE, b"x" * 20_000)
    sink = RecordingSink(error=error)
    outcome = handle(lambda r: wado_response(data), sink, tmp_path, memory_limit=1000)
    assert outcome is expected
    assert sink.instances[0].path is None
    assert list(tmp_path.iterdir()) == [], "discarded even when the sink fails"


def test_metrics_count_messages_outcomes_and_bytes(tmp_path: Path) -> None:
    registry = MetricsRegistry()
    metrics = ExportMetrics(registry)
    data = part10(CT, SOP_UID, EXPLICIT_VR_LE, b"slice")
    busy = RecordingSink(error=TransientFailure("peer busy"))
    in_flight_seen: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        in_flight_seen.append(metrics.in_flight.value())
        return wado_response(data)

    assert handle(handler, RecordingSink(), tmp_path, metrics=metrics) is Outcome.ACK
    assert handle(handler, busy, tmp_path, metrics=metrics) is Outcome.NACK
    assert handle(handler, RecordingSink(), tmp_path, b"junk", metrics=metrics) is Outcome.ACK

    assert in_flight_seen == [1, 1]
    assert metrics.in_flight.value() == 0
    assert metrics.total_requests.value() == 3
    assert metrics.total_errors.value() == 2
    assert metrics.permanent_failures.value() == 1
    assert metrics.transient_failures.value() == 1
    assert metrics.total_bytes.value() == len(data)  # the delivered instance only
    assert metrics.seconds.snapshot()[2] == 3
    assert "dicomadapter_export_permanent_failures_total 1.0\n" in registry.render()


# --------------------------------------------------------------------------------------------
# Point 8: ack only what was delivered or can never be (one row per case, real C-STORE sink)


class StatusAssociation:
    """A fake association that accepts everything and answers every C-STORE with `status`."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.is_open = True

    @property
    def accepted(self) -> dict[tuple[str, str], int]:
        return {(CT, EXPLICIT_VR_LE): 1}

    def context_for(self, sop_class_uid: str, transfer_syntax: str) -> int | None:
        return 1

    def accepted_syntaxes(self, sop_class_uid: str) -> list[str]:
        return [EXPLICIT_VR_LE]

    async def c_store(
        self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: object
    ) -> StoreResponse:
        return StoreResponse(self.status, "")

    async def release(self) -> None:
        self.is_open = False


def cstore_sink(status: int, permanent: frozenset[int] | None = None) -> CStoreSink:
    async def opener(target: AssociationTarget, contexts: object) -> StatusAssociation:
        return StatusAssociation(status)

    target = AssociationTarget("EXPORTADAPTER", "PEER", "127.0.0.1", 11112)
    if permanent is None:
        return CStoreSink(target, opener=opener)
    return CStoreSink(target, opener=opener, permanent_statuses=permanent)


PERMANENT_ROWS = [
    pytest.param(b"not an instance path", 200, 0x0000, None, id="malformed message"),
    pytest.param(PATH.encode(), 404, 0x0000, None, id="source 404"),
    pytest.param(PATH.encode(), 410, 0x0000, None, id="source 410"),
    pytest.param(PATH.encode(), 200, 0xA900, None, id="C-STORE 0xA900"),
    pytest.param(PATH.encode(), 200, 0x0122, None, id="C-STORE 0x0122"),
    pytest.param(PATH.encode(), 200, 0xC001, frozenset({0xC001}), id="C-STORE listed by flag"),
]
TRANSIENT_ROWS = [
    pytest.param(PATH.encode(), 200, 0x0110, None, id="C-STORE 0x0110"),
    pytest.param(PATH.encode(), 200, 0xC000, None, id="C-STORE 0xC000"),
    pytest.param(PATH.encode(), 200, 0xC0FF, None, id="C-STORE 0xC0FF"),
    pytest.param(PATH.encode(), 200, 0xA700, None, id="C-STORE 0xA700"),
    pytest.param(PATH.encode(), 200, 0xA900, frozenset({0x0122}), id="0xA900 not listed"),
    pytest.param(PATH.encode(), 400, 0x0000, None, id="source 400"),
    pytest.param(PATH.encode(), 403, 0x0000, None, id="source 403"),
    pytest.param(PATH.encode(), 503, 0x0000, None, id="source 503"),
]


def run_row(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    wado_status: int,
    cstore_status: int,
    permanent: frozenset[int] | None,
) -> tuple[Outcome, ExportMetrics, list[logging.LogRecord]]:
    metrics = ExportMetrics(MetricsRegistry())
    payload = part10(CT, SOP_UID, EXPLICIT_VR_LE, b"slice")

    def handler(request: httpx.Request) -> httpx.Response:
        return wado_response(payload) if wado_status == 200 else httpx.Response(wado_status)

    with caplog.at_level(logging.INFO, logger="dicom_adapter.exporter"):
        outcome = handle(
            handler, cstore_sink(cstore_status, permanent), tmp_path, data, metrics=metrics
        )
    records = [r for r in caplog.records if r.name.startswith("dicom_adapter.exporter")]
    return outcome, metrics, records


@pytest.mark.parametrize(("data", "wado_status", "cstore_status", "permanent"), PERMANENT_ROWS)
def test_permanent_rows_are_acked_logged_and_counted(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    wado_status: int,
    cstore_status: int,
    permanent: frozenset[int] | None,
) -> None:
    outcome, metrics, records = run_row(
        tmp_path, caplog, data, wado_status, cstore_status, permanent
    )
    assert outcome is Outcome.ACK
    errors = [r for r in records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert getattr(errors[0], "message_id", None) == "message-1"
    assert "permanently (acking" in errors[0].getMessage()
    assert metrics.permanent_failures.value() == 1
    assert metrics.transient_failures.value() == 0


@pytest.mark.parametrize(("data", "wado_status", "cstore_status", "permanent"), TRANSIENT_ROWS)
def test_transient_rows_back_off_and_are_nacked(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    wado_status: int,
    cstore_status: int,
    permanent: frozenset[int] | None,
) -> None:
    outcome, metrics, records = run_row(
        tmp_path, caplog, data, wado_status, cstore_status, permanent
    )
    assert outcome is Outcome.NACK
    assert not [r for r in records if r.levelno >= logging.ERROR]
    (warning,) = [r for r in records if r.levelno == logging.WARNING and "retrying in" in r.msg]
    assert getattr(warning, "message_id", None) == "message-1"
    assert metrics.transient_failures.value() == 1
    assert metrics.permanent_failures.value() == 0


# --------------------------------------------------------------------------------------------
# Point 7: per-message backoff and the circuit breaker


def test_transient_failure_is_held_for_a_backoff_growing_with_the_attempt(tmp_path: Path) -> None:
    """The nack comes after the backoff (Pub/Sub redelivers at once after a nack)."""
    backoff = Backoff(initial=0.2, maximum=5.0)

    def timed(attempt: int | None) -> float:
        async def main() -> float:
            http = make_http_client(timeout=10.0, transport=httpx.MockTransport(failing))
            async with http:
                worker = ExportWorker(
                    DicomwebClient(http, FAST), ROOT, RecordingSink(), tmp_path, backoff=backoff
                )
                started = time.monotonic()
                assert await worker.handle("m", PATH.encode(), attempt) is Outcome.NACK
                return time.monotonic() - started

        return asyncio.run(main())

    def failing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400)

    assert 0.1 <= timed(None) < 0.4  # attempt 1: [initial/2, initial]
    assert 0.4 <= timed(3) < 1.0  # Pub/Sub's delivery_attempt 3: [2·initial, 4·initial]


def test_backoff_delays() -> None:
    backoff = Backoff(initial=1.0, maximum=600.0)
    assert [backoff.delay(n, lambda: 1.0) for n in (1, 2, 3, 10, 11, 100)] == [
        1.0,
        2.0,
        4.0,
        512.0,
        600.0,
        600.0,
    ]
    assert backoff.delay(4, lambda: 0.0) == 4.0  # jitter: [base/2, base]


def test_local_attempt_count_without_delivery_attempt(tmp_path: Path) -> None:
    """Without a dead-letter policy Pub/Sub sends no delivery_attempt: the worker counts."""
    backoff = Backoff(initial=0.05, maximum=5.0)

    async def main() -> list[float]:
        http = make_http_client(
            timeout=10.0, transport=httpx.MockTransport(lambda r: httpx.Response(400))
        )
        async with http:
            worker = ExportWorker(
                DicomwebClient(http, FAST), ROOT, RecordingSink(), tmp_path, backoff=backoff
            )
            held = []
            for _ in range(4):
                started = time.monotonic()
                assert await worker.handle("m", PATH.encode()) is Outcome.NACK
                held.append(time.monotonic() - started)
            return held

    held = asyncio.run(main())
    assert held[3] >= 0.2  # attempt 4: at least 4·initial
    assert held[3] > held[0]


class OutageSink(RecordingSink):
    """Unreachable (SinkUnavailable) until `up` is set; counts sends and probes."""

    def __init__(self) -> None:
        super().__init__()
        self.up = False
        self.sends = 0
        self.probes = 0

    async def send(self, instance: FetchedInstance, refetch: Refetch | None = None) -> None:
        self.sends += 1
        if not self.up:
            raise SinkUnavailable("connection refused")
        await super().send(instance, refetch)

    async def probe(self) -> None:
        self.probes += 1
        if not self.up:
            raise SinkUnavailable("connection refused")


def test_breaker_holds_exports_during_an_outage_and_probes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = part10(CT, SOP_UID, EXPLICIT_VR_LE, b"slice")
    fetches = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal fetches
        fetches += 1
        return wado_response(data)

    sink = OutageSink()
    messages = 10

    async def main() -> list[Outcome]:
        http = make_http_client(timeout=10.0, transport=httpx.MockTransport(handler))
        async with http:
            worker = ExportWorker(
                DicomwebClient(http, FAST),
                ROOT,
                sink,
                tmp_path,
                backoff=Backoff(initial=0.05, maximum=30.0),
                probe_interval=0.05,
            )
            tasks = [
                asyncio.create_task(worker.handle(f"m{i}", PATH.encode())) for i in range(messages)
            ]
            await asyncio.sleep(0.6)  # the outage: 0.6 s, about 12 probe intervals
            assert worker.breaker.is_open
            during = (fetches, sink.sends)
            sink.up = True
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 2.0)
            await worker.close()
            assert during[0] <= messages and during[1] <= messages, during
            return outcomes

    with caplog.at_level(logging.DEBUG, logger="dicom_adapter.exporter"):
        outcomes = asyncio.run(main())
    assert outcomes == [Outcome.ACK] * messages
    assert len(sink.sent) == messages
    assert fetches <= 2 * messages  # once before the outage was known, once after
    assert sink.sends <= 2 * messages
    assert 5 <= sink.probes <= 14
    records = [r for r in caplog.records if r.name.startswith("dicom_adapter.exporter")]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    infos = [r for r in records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "reachable again" in infos[0].getMessage()


def test_held_messages_are_nacked_at_once_on_shutdown(tmp_path: Path) -> None:
    data = part10(CT, SOP_UID, EXPLICIT_VR_LE, b"slice")
    sink = OutageSink()
    busy = RecordingSink(error=TransientFailure("busy"))

    async def main() -> tuple[list[Outcome], float]:
        http = make_http_client(
            timeout=10.0, transport=httpx.MockTransport(lambda r: wado_response(data))
        )
        async with http:
            client = DicomwebClient(http, FAST)
            slow = Backoff(initial=60.0, maximum=600.0)
            waiting = ExportWorker(client, ROOT, sink, tmp_path, backoff=slow, probe_interval=60)
            backing_off = ExportWorker(client, ROOT, busy, tmp_path, backoff=slow)
            tasks = [
                asyncio.create_task(waiting.handle("breaker", PATH.encode())),
                asyncio.create_task(backing_off.handle("backoff", PATH.encode())),
            ]
            await asyncio.sleep(0.2)
            started = time.monotonic()
            waiting.stop_holding()
            backing_off.stop_holding()
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 2.0)
            await waiting.close()
            return outcomes, time.monotonic() - started

    outcomes, took = asyncio.run(main())
    assert outcomes == [Outcome.NACK, Outcome.NACK]
    assert took < 0.5


def test_breaker_wait_is_bounded_by_the_maximum_backoff(tmp_path: Path) -> None:
    """A delivery is not held past --retry_backoff_max (the client's lease lasts 1 h)."""
    data = part10(CT, SOP_UID, EXPLICIT_VR_LE, b"slice")
    sink = OutageSink()

    async def main() -> Outcome:
        http = make_http_client(
            timeout=10.0, transport=httpx.MockTransport(lambda r: wado_response(data))
        )
        async with http:
            worker = ExportWorker(
                DicomwebClient(http, FAST),
                ROOT,
                sink,
                tmp_path,
                backoff=Backoff(initial=0.05, maximum=0.3),
                probe_interval=0.05,
            )
            try:
                return await asyncio.wait_for(worker.handle("m", PATH.encode()), 2.0)
            finally:
                await worker.close()

    assert asyncio.run(main()) is Outcome.NACK
    assert sink.probes >= 3
