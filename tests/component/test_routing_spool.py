"""Routing with the spool, upstream scripted: every matching destination without auto-ack, and
queues left by an earlier configuration still uploaded after a restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from dicom_adapter.importer.destinations import DestinationQueue, DestinationSpools
from dicom_adapter.importer.routing import Destination
from dicom_adapter.spool.local import LocalSpool
from dicom_adapter.status import Status
from tests.rig import wait_until
from tests.rig.component import JSON, RunningImporter, c_store, make_ct, stow_json
from tests.spool_testing import part_uids

FAST = ["--http_timeout=0.5", "--upstream_retry_deadline=1", "--cstore_answer_deadline=5"]


def stored(uid: str) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(200, headers=JSON, content=stow_json([(uid, None)]))


def test_every_match_without_auto_ack_answers_after_all_destinations(
    start_importer: Callable[..., RunningImporter], tmp_path: Path
) -> None:
    routes = [
        {"filter": "Modality=MG", "dicomweb_destination": "http://a.test/dicom-web"},
        {"filter": "AETitle=MODALITY", "dicomweb_destination": "http://b.test/dw/studies"},
        {"filter": "Modality=CT", "dicomweb_destination": "http://c.test/dicom-web"},
    ]
    importer = start_importer(
        f"--destination_config_inline={json.dumps(routes)}",
        "--send_to_all_matching_destinations",
        f"--persistent_file_storage_location={tmp_path / 'spool'}",
        *FAST,
    )
    ds = make_ct()
    ds.Modality = "MG"
    importer.upstream.responder = stored(str(ds.SOPInstanceUID))
    assert c_store(importer, ds) == Status.SUCCESS
    urls = sorted(str(r.url) for r in importer.upstream.requests)
    assert urls == ["http://a.test/dicom-web/studies", "http://b.test/dw/studies"]

    # one destination refuses: the sender is told (it owns the retry without auto-ack)
    again = make_ct()
    again.Modality = "MG"
    uid = str(again.SOPInstanceUID)
    importer.upstream.responder = lambda request: (
        httpx.Response(403, text="no") if request.url.host == "b.test" else stored(uid)(request)
    )
    assert c_store(importer, again) == Status.NOT_AUTHORIZED
    assert not list((tmp_path / "spool").glob("**/queue/*.dcm"))


def test_queue_of_a_destination_no_longer_configured_is_still_uploaded(
    start_importer: Callable[..., RunningImporter], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    routes = [{"filter": "Modality=MG", "dicomweb_destination": "http://mg.test/dicom-web"}]
    first = start_importer(
        f"--destination_config_inline={json.dumps(routes)}",
        f"--persistent_file_storage_location={spool}",
        "--auto_ack_cstore",
        "--persistent_file_upload_retry_amount=100",
        *FAST,
    )
    first.upstream.responder = lambda request: httpx.Response(503, text="down")
    ds = make_ct()
    ds.Modality = "MG"
    assert c_store(first, ds) == Status.SUCCESS  # acknowledged: durable in the spool
    wait_until(lambda: first.upstream.requests, 10.0, "a request at the first upstream")
    asyncio.run_coroutine_threadsafe(first.service.stop(), first.loop).result(30)
    [left] = spool.glob("dest/*/queue/*.dcm")

    second = start_importer(f"--persistent_file_storage_location={spool}", *FAST)  # no routes
    second.upstream.responder = stored(str(ds.SOPInstanceUID))
    wait_until(lambda: not left.exists(), 10.0, f"{left} removed")
    assert [str(r.url) for r in second.upstream.requests] == ["http://mg.test/dicom-web/studies"]


def test_toggling_tls_of_a_dimse_destination_keeps_its_spool_usable(
    start_importer: Callable[..., RunningImporter], tmp_path: Path
) -> None:
    """The recorded entry (tls on) and the configured one (tls off) share one directory:
    the importer starts and serves it once, as configured."""
    spool = tmp_path / "spool"
    recorded = Destination(aet="PACS", host="127.0.0.1", port=1, tls=True)
    root = LocalSpool(spool, headroom_bytes=0)
    nothing: Any = None  # opening a destination's directory touches only the spool
    DestinationSpools(DestinationQueue(None, root, nothing, nothing)).open_spool(recorded).close()
    root.close()
    routes = [{"filter": "Modality=MG", "name": "PACS", "host": "127.0.0.1", "port": 1}]
    importer = start_importer(
        f"--destination_config_inline={json.dumps(routes)}",
        "--send_to_all_matching_destinations",
        f"--persistent_file_storage_location={spool}",
        *FAST,
    )
    importer.upstream.responder = stored("1")
    note = json.loads(next(spool.glob("dest/*/destination.json")).read_text())
    assert note["tls"] is False  # the configured entry won


def test_a_destination_queue_uploads_in_batches_like_the_default_queue(
    start_importer: Callable[..., RunningImporter], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    routes = [{"filter": "Modality=MG", "dicomweb_destination": "http://mg.test/dicom-web"}]
    flags = [
        f"--destination_config_inline={json.dumps(routes)}",
        f"--persistent_file_storage_location={spool}",
        "--auto_ack_cstore",
        "--persistent_file_upload_retry_amount=100",
        "--min_upload_delay=1000",
        "--max_waiting_time_between_uploads=1000",
        *FAST,
    ]
    first = start_importer(*flags)
    first.upstream.responder = lambda request: httpx.Response(503, text="down")
    uids = []
    for _ in range(3):
        ds = make_ct()
        ds.Modality = "MG"
        uids.append(str(ds.SOPInstanceUID))
        assert c_store(first, ds) == Status.SUCCESS
    asyncio.run_coroutine_threadsafe(first.service.stop(), first.loop).result(30)
    left = list(spool.glob("dest/*/queue/*.dcm"))
    assert len(left) == 3

    second = start_importer(*flags, "--spool_upload_batch=10")
    body = stow_json([(uid, None) for uid in uids])
    second.upstream.responder = lambda request: httpx.Response(200, headers=JSON, content=body)
    wait_until(lambda: not any(path.exists() for path in left), 10.0, "the spooled files removed")
    # the replayed three in one STOW-RS request (sent again if it beat the responder)
    parts = [len(part_uids(request)) for request in second.upstream.requests]
    assert parts and set(parts) == {3}
