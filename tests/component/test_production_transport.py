"""C-STORE through the production HTTP transport to a real HTTP server on a socket.

The other component tests inject httpx.MockTransport; here the importer builds its client
as in production (`make_http_client`, so `dicomweb/transport.py` AsyncioTransport): request
writing, response framing and connection reuse are on the path the modality's answer takes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from pydicom import Dataset

from dicom_adapter.dicomweb.client import TRANSPORT_ENV
from dicom_adapter.dicomweb.transport import AsyncioTransport
from dicom_adapter.status import Status
from tests.rig.component import RunningImporter, c_store, make_ct, stow_json
from tests.rig.stow_server import Framing, StowRequest, StowServer

PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


@pytest.fixture(autouse=True)
def production_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """No environment that would make make_http_client pick httpx's own transport."""
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def sent_uid(request: StowRequest, datasets: Sequence[Dataset]) -> str:
    """The SOP Instance UID of whichever data set this STOW request carries."""
    (uid,) = [
        str(ds.SOPInstanceUID) for ds in datasets if str(ds.SOPInstanceUID).encode() in request.body
    ]
    return uid


def start_against(
    start_importer: Callable[..., RunningImporter], server: StowServer
) -> RunningImporter:
    importer = start_importer(dicomweb_url=server.url)
    transport = importer.service._http._transport  # type: ignore[union-attr]
    assert isinstance(transport, AsyncioTransport), type(transport)
    return importer


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_c_store_is_answered_success_once_the_server_stored_it(
    start_importer: Callable[..., RunningImporter], framing: Framing
) -> None:
    datasets = [make_ct(), make_ct()]

    def stored(request: StowRequest) -> tuple[int, bytes]:
        return 200, stow_json([(sent_uid(request, datasets), None)])

    with StowServer(stored, framing) as server:
        importer = start_against(start_importer, server)
        statuses = [c_store(importer, ds) for ds in datasets]

    assert statuses == [Status.SUCCESS, Status.SUCCESS]
    assert [(r.method, r.path) for r in server.requests] == [("POST", "/dicom-web/studies")] * 2
    for request, ds in zip(server.requests, datasets, strict=True):
        assert request.headers["content-type"].startswith("multipart/related")
        assert 'type="application/dicom"' in request.headers["content-type"]
        assert sent_uid(request, datasets) == ds.SOPInstanceUID
    connections = len({request.peer for request in server.requests})
    assert connections == (2 if framing == "close" else 1)  # kept alive unless closed


def test_c_store_failure_reason_from_the_server_reaches_the_modality(
    start_importer: Callable[..., RunningImporter],
) -> None:
    ds = make_ct()
    refused = stow_json(failed=[(str(ds.SOPInstanceUID), 0xA900)])
    with StowServer(lambda request: (409, refused)) as server:
        importer = start_against(start_importer, server)
        status = c_store(importer, ds)
    assert status == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert len(server.requests) == 1  # a refusal is not retried
