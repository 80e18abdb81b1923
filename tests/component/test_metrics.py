"""Metrics and health of an in-process importer, read over its HTTP endpoint."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator

import httpx
import pytest
from pydicom import Dataset
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode

from dicom_adapter.status import Status
from tests.rig import VERIFICATION, http_get, scrape_metrics, wait_until
from tests.rig.component import (
    CT_BOTH,
    JSON,
    Archive,
    Destination,
    RunningImporter,
    c_move,
    c_store,
    dataset_bytes,
    dictionary_flag,
    find,
    make_ct,
    make_study,
    paged_studies,
    stow_json,
    study_level,
)

PREFIX = "dicomadapter_import_"


def wait_for_value(url: str, name: str, expected: float, timeout: float = 5.0) -> None:
    """Poll /metrics until `name` has `expected` (association threads end a moment late)."""
    wait_until(
        lambda: scrape_metrics(url).get(name) == expected,
        timeout,
        f"{name} to be {expected}",
        interval=0.02,
        detail=lambda: f"{name} is {scrape_metrics(url).get(name)}",
    )


def encoded_size(ds: Dataset) -> int:
    """Bytes of the data set a C-STORE carries in Explicit VR Little Endian."""
    encoded = encode(ds, False, True)
    assert encoded is not None
    return len(encoded)


def test_echo_store_and_find_are_counted_and_served(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    url = importer.metrics_url
    assert http_get(url + "/healthz").status_code == 200
    assert http_get(url + "/readyz").status_code == 200
    before = scrape_metrics(url)
    assert before[PREFIX + "started_total"] == 1
    assert before[PREFIX + "cstore_requests_total"] == 0

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    try:
        assert int(assoc.send_c_echo().Status) == Status.SUCCESS
        assert scrape_metrics(url)[PREFIX + "associations"] == 1
    finally:
        assoc.release()
    wait_for_value(url, PREFIX + "associations", 0)

    stored, refused = make_ct(), make_ct()
    responses = {
        stored.SOPInstanceUID: httpx.Response(
            200, headers=JSON, content=stow_json([(stored.SOPInstanceUID, None)])
        ),
        refused.SOPInstanceUID: httpx.Response(409, text="no"),
    }

    def stow(request: httpx.Request) -> httpx.Response:
        body = request.read()
        return next(r for uid, r in responses.items() if uid.encode() in body)

    importer.upstream.responder = stow
    assert c_store(importer, stored) == Status.SUCCESS
    assert c_store(importer, refused) == Status.PROCESSING_FAILURE

    importer.upstream.responder = paged_studies(3)
    final, answers = find(importer)
    assert (final, len(answers)) == (Status.SUCCESS, 3)

    metrics = scrape_metrics(url)
    assert metrics[PREFIX + "cstore_requests_total"] == 2
    assert metrics[PREFIX + "cstore_errors_total"] == 1
    del stored.file_meta  # the data set proper, as the C-STORE carried it ...
    stored_bytes = metrics[PREFIX + "cstore_bytes_total"]
    # ... plus the preamble and file meta group of the spooled Part-10 file
    assert encoded_size(stored) + 132 < stored_bytes < encoded_size(stored) + 600
    assert metrics[PREFIX + "cstore_seconds_count"] == 2
    assert metrics[PREFIX + 'cstore_seconds_bucket{le="+Inf"}'] == 2
    assert metrics[PREFIX + "cfind_requests_total"] == 1
    assert metrics[PREFIX + "cfind_errors_total"] == 0
    assert metrics[PREFIX + "cfind_qidors_requests_total"] == 1
    assert metrics[PREFIX + "cfind_seconds_count"] == 1


def test_find_errors_and_cancels(start_importer: Callable[..., RunningImporter]) -> None:
    importer = start_importer("--upstream_retry_deadline=0.2", "--http_timeout=0.1")
    importer.upstream.responder = lambda r: httpx.Response(503)
    assert find(importer)[0] == Status.OUT_OF_RESOURCES
    importer.upstream.responder = paged_studies(100_000)
    assert find(importer, cancel_after=2)[0] == Status.CANCEL

    metrics = importer.service.metrics
    assert metrics.cfind_requests.value() == 2
    assert metrics.cfind_errors.value() == 1
    assert metrics.cfind_cancels.value() == 1
    assert metrics.cfind_qidors_requests.value() == 2
    assert metrics.cfind_qidors_errors.value() == 1


@pytest.fixture
def destination() -> Iterator[Callable[[dict[str, int]], Destination]]:
    """Factory: a recording storage SCP answering the scripted statuses; stopped at teardown."""
    started: list[Destination] = []

    def start(statuses: dict[str, int]) -> Destination:
        server = Destination(CT_BOTH, statuses)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_move_sub_operations_are_counted(
    start_importer: Callable[..., RunningImporter],
    destination: Callable[[dict[str, int]], Destination],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    instances = make_study(3)
    refused = instances[1].uid
    warned = instances[2].uid
    dest = destination({refused: 0xA700, warned: 0xB000})
    importer = start_importer(dictionary_flag(dest.port))
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)  # as test_move does
    importer.upstream.responder = Archive(instances)

    result = c_move(importer, study_level(instances[0].study))
    assert result.status == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    unknown = c_move(importer, study_level(instances[0].study), destination="NOWHERE")
    assert unknown.status == Status.MOVE_DESTINATION_UNKNOWN

    metrics = scrape_metrics(importer.metrics_url)
    assert metrics[PREFIX + "cmove_requests_total"] == 2
    assert metrics[PREFIX + "cmove_warnings_total"] == 1
    assert metrics[PREFIX + "cmove_errors_total"] == 1
    assert metrics[PREFIX + "cmove_cancels_total"] == 0
    assert metrics[PREFIX + "cmove_qidors_requests_total"] == 1
    assert metrics[PREFIX + "cmove_qidors_errors_total"] == 0
    assert metrics[PREFIX + "cmove_cstore_requests_total"] == 3
    assert metrics[PREFIX + "cmove_cstore_errors_total"] == 1
    delivered = [i for i in instances if i.uid != refused]
    assert metrics[PREFIX + "cmove_cstore_bytes_total"] == sum(
        len(dataset_bytes(i.stored)) for i in delivered
    )
    assert metrics[PREFIX + "cmove_seconds_count"] == 2


def test_readyz_is_503_while_draining(start_importer: Callable[..., RunningImporter]) -> None:
    importer = start_importer("--shutdown_grace_period=20")
    url = importer.metrics_url
    assert http_get(url + "/readyz").status_code == 200
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    stopping = asyncio.run_coroutine_threadsafe(importer.service.stop(), importer.loop)
    try:
        wait_until(
            lambda: http_get(url + "/readyz").status_code == 503,
            5.0,
            "/readyz to answer 503 during the drain",
            interval=0.02,
        )
        assert not stopping.done(), "the running association holds the drain"
        assert http_get(url + "/healthz").status_code == 200
        assert scrape_metrics(url)[PREFIX + "associations"] == 1
    finally:
        assoc.release()
    stopping.result(15)
    with pytest.raises(httpx.ConnectError):
        http_get(url + "/healthz")  # closed once the service stopped


def test_metrics_port_minus_one_disables_the_endpoints(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer("--metrics_port=-1")
    assert importer.service.metrics_port == 0
    assert importer.service.ready
    assert importer.service.metrics.started.value() == 1  # still recorded, just not served


def test_process_collectors_are_served(start_importer: Callable[..., RunningImporter]) -> None:
    importer = start_importer()  # runs in this process: /proc/self is the importer's
    metrics = scrape_metrics(importer.metrics_url)
    fds = len(os.listdir("/proc/self/fd"))
    assert metrics["process_resident_memory_bytes"] > 20 * 2**20
    assert fds / 2 < metrics["process_open_fds"] < fds * 2
    assert metrics["process_max_fds"] >= metrics["process_open_fds"]
    assert metrics["process_cpu_seconds_total"] > 0
    assert any(name.startswith("python_info{") for name in metrics)
