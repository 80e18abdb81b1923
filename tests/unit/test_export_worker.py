"""Unit tests for the dicom-export worker: WADO-RS fetch (memory or spool), refetch, ack/nack.

WADO-RS is served by httpx.MockTransport (streamed bodies, as real transports deliver them);
the sink is a recording fake.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from tests.rig import part10_bytes as part10

from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy, make_http_client
from dicom_adapter.dicomweb.instances import FetchedInstance
from dicom_adapter.dicomweb.multipart import body_tail, related_content_type
from dicom_adapter.dimse.part10 import DatasetFile
from dicom_adapter.dimse.syntaxes import EXPLICIT_VR_LE
from dicom_adapter.exporter.sinks import (
    PermanentFailure,
    Refetch,
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

    async def close(self) -> None:
        pass


def handle(
    handler: Handler,
    sink: RecordingSink,
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
                **options,  # type: ignore[arg-type]
            )
            return await worker.handle("message-1", data)

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


def test_response_without_parts_is_permanent(tmp_path: Path) -> None:
    sink = RecordingSink()
    assert handle(lambda r: wado_response(), sink, tmp_path) is Outcome.ACK
    assert sink.instances == []


def test_unusable_meta_is_permanent_and_not_sent(tmp_path: Path) -> None:
    sink = RecordingSink()
    outcome = handle(lambda r: wado_response(b"not a DICOM file"), sink, tmp_path)
    assert outcome is Outcome.ACK
    assert sink.instances == []


def test_permanent_failures_nacked_when_configured(tmp_path: Path) -> None:
    sink = RecordingSink()
    outcome = handle(
        lambda r: wado_response(b"not a DICOM file"), sink, tmp_path, nack_permanent_failures=True
    )
    assert outcome is Outcome.NACK


def test_malformed_message_is_permanent(tmp_path: Path) -> None:
    sink = RecordingSink()
    outcome = handle(lambda r: wado_response(), sink, tmp_path, data=b"hello")
    assert outcome is Outcome.ACK


@pytest.mark.parametrize(("code", "expected"), [(404, Outcome.ACK), (503, Outcome.NACK)])
def test_wado_errors(tmp_path: Path, code: int, expected: Outcome) -> None:
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
    assert "dicomadapter_export_permanent_failures_total 1\n" in registry.render()
