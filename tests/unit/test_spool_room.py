"""The spool's room: byte counter and cap, readiness after a refusal, and upload retries of
upstream failures that carry no HTTP status."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from pydicom import Dataset, dcmread
from tests.rig import generate_ct_series, wait_until, wait_until_async

from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy
from dicom_adapter.importer.destinations import DestinationQueue, DestinationSpools
from dicom_adapter.importer.handlers import CStoreHandler, SpoolIntake
from dicom_adapter.importer.store import StoreService
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry
from dicom_adapter.spool import local
from dicom_adapter.spool.local import LocalSpool, tree_bytes
from dicom_adapter.spool.uploader import SpoolUploader
from dicom_adapter.status import Status


def received(spool: LocalSpool, n: int, side: int = 32) -> list[Path]:
    """`n` data sets as pynetdicom leaves them in incoming/ (not yet committed)."""
    return generate_ct_series(spool.incoming / "run-x", n, rows=side, cols=side)


def test_the_byte_counter_follows_commits_deliveries_and_failures(tmp_path: Path) -> None:
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    files = received(spool, 3)
    spool.add_incoming(100)  # a data set being written
    queued = [spool.commit(p, p.stem) for p in files]
    assert spool.used_bytes == tree_bytes(spool.queue) + 100
    spool.add_incoming(-100)  # its file closed (renamed or deleted)
    spool.delivered(queued[0])
    spool.fail(queued[1], {"why": "refused"})
    spool.delivered(queued[0])  # again (an operator removed it meanwhile): nothing to subtract
    on_disk = tree_bytes(spool.queue) + tree_bytes(spool.failed)
    assert spool.used_bytes == on_disk
    assert spool.recount() == on_disk
    spool.close()
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0, max_bytes=1 << 30)
    assert spool.used_bytes == on_disk  # a restart with a cap walks what is there
    spool.close()


def test_a_capped_spool_refuses_and_is_not_ready_until_uploads_make_room(
    tmp_path: Path,
) -> None:
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    files = received(spool, 3)
    size = files[0].stat().st_size
    spool.close()
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0, max_bytes=2 * size + size // 2)
    first = spool.commit(files[0], "a")
    assert spool.refusal(size) is None  # the second fits
    spool.commit(files[1], "b")
    assert spool.has_room()
    refusal = spool.refusal(size)  # the third would pass the cap
    assert refusal is not None and "byte cap" in refusal
    assert not spool.has_room()
    spool.delivered(first)  # an upload drains one
    assert spool.has_room()
    assert spool.refusal(size) is None
    spool.close()


def test_room_freed_behind_the_spools_back_is_seen_by_a_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dicom-spool purge` in another process: the next walk (while over the cap) sees it."""
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    files = received(spool, 2)
    size = files[0].stat().st_size
    spool.close()
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0, max_bytes=2 * size)
    for path in files:
        spool.fail(spool.commit(path, path.stem), {})
    assert spool.refusal(size) is not None
    for path in spool.failed.iterdir():
        path.unlink()
    monkeypatch.setattr(local, "RECOUNT_SECONDS", 0.0)
    # /readyz: the walk runs in a thread of its own
    wait_until(spool.has_room, 5.0, "/readyz to see the purge", interval=0.01)
    assert spool.refusal(size) is None
    spool.close()


def test_readiness_after_a_refusal_waits_for_room_for_that_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headroom 1000: ready at 1000 free; after refusing 500 bytes, ready again at 1500."""
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=1000)
    free = [999]
    monkeypatch.setattr(spool, "free_bytes", lambda: free[0])
    assert spool.refusal(500) is not None
    free[0] = 1000
    assert not spool.has_room()
    free[0] = 1500
    assert spool.has_room()
    spool.refused(800)  # ENOSPC while 800 bytes arrived
    assert not spool.has_room()
    assert spool.refusal(10) is None  # an admitted instance: ready at the headroom again
    assert spool.has_room()
    spool.close()


def test_an_upstream_failure_without_an_http_status_is_retried(tmp_path: Path) -> None:
    """A replayed instance: STOW 409, then the existence check meets a gateway's HTML page
    (no JSON, no HTTP failure status). It is retried, not moved to failed/ at once."""
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    [path] = received(spool, 1, side=4)
    header = dcmread(path, stop_before_pixels=True)
    uid, sop_class = str(header.SOPInstanceUID), str(header.SOPClassUID)
    spool.commit(path, uid)
    match = {
        "00080018": {"vr": "UI", "Value": [uid]},
        "00080016": {"vr": "UI", "Value": [sop_class]},
    }
    checks = [
        httpx.Response(200, html="<html>upstream temporarily unreachable</html>"),
        httpx.Response(200, json=[match]),
    ]
    seen: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if request.method == "POST":
            return httpx.Response(409, text="instance exists")
        return checks.pop(0) if checks else httpx.Response(200, json=[])

    async def run() -> None:
        http = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
        store = StoreService(
            DicomwebClient(http, RetryPolicy(deadline=1.0)),
            stow_url="http://up/dicom-web/studies",
            dicomweb_root="http://up/dicom-web",
            overwrite=False,
        )
        metrics = ImportMetrics(MetricsRegistry())
        uploader = SpoolUploader(
            spool, store, metrics, concurrency=1, retries=3, min_delay=0.01, max_delay=0.02
        )
        await uploader.start()
        try:
            await wait_until_async(lambda: not spool.queued(), 5.0, "an empty queue")
        finally:
            await uploader.stop()
            await http.aclose()
        assert metrics.cstore_backup_errors.value() == 0

    asyncio.run(run())
    reasons = [json.loads(p.read_text()) for p in spool.failed.glob("*.json")]
    assert not reasons, reasons
    assert not spool.queued()
    assert seen == ["POST", "GET", "POST", "GET"]  # retried, then found upstream: delivered
    spool.close()


class _Uploader:
    """Records what the handler queues for upload."""

    def __init__(self) -> None:
        self.queued: list[Path] = []

    def enqueue_threadsafe(self, path: Path, identity: object = None) -> None:
        self.queued.append(path)


def _store_event(path: Path, uid: str) -> SimpleNamespace:
    requestor = SimpleNamespace(ae_title="MODALITY")
    return SimpleNamespace(
        dataset_path=path,
        request=SimpleNamespace(AffectedSOPInstanceUID=uid),
        assoc=SimpleNamespace(name="assoc-1", requestor=requestor),
    )


@pytest.mark.parametrize("failing", ["fsync_file", "rename"])
def test_enospc_at_fsync_or_rename_answers_a700_and_queues_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    [path] = received(spool, 1, side=4)
    uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "fsync_file":
        monkeypatch.setattr(local, "fsync_file", full)
    else:
        monkeypatch.setattr(os, "rename", full)
    uploader = _Uploader()
    handler = CStoreHandler(
        cast(Any, None),
        cast(Any, None),
        1.0,
        intake=SpoolIntake(spool, cast(Any, uploader), auto_ack=True),
    )
    answer = handler(_store_event(path, uid))
    assert isinstance(answer, Dataset)  # a failure carries its ErrorComment
    assert answer.Status == Status.OUT_OF_RESOURCES
    assert answer.ErrorComment == "adapter spool write failed"
    monkeypatch.undo()
    assert not spool.queued() and not uploader.queued
    monkeypatch.setattr(spool, "free_bytes", lambda: path.stat().st_size - 1)
    assert not spool.has_room()  # not ready until that instance would fit
    spool.close()


def test_enospc_linking_a_routed_instance_makes_readyz_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    [path] = received(spool, 1, side=4)
    uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    nothing: Any = None
    uploader = _Uploader()
    fanout = DestinationSpools(DestinationQueue(None, spool, cast(Any, uploader), nothing))

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    handler = CStoreHandler(
        cast(Any, None),
        cast(Any, None),
        1.0,
        intake=SpoolIntake(spool, cast(Any, uploader), auto_ack=True, destinations=fanout),
    )
    answer = handler(_store_event(path, uid))
    assert isinstance(answer, Dataset)
    assert answer.Status == Status.OUT_OF_RESOURCES
    monkeypatch.undo()
    assert not spool.queued() and not uploader.queued
    monkeypatch.setattr(spool, "free_bytes", lambda: path.stat().st_size - 1)
    assert not spool.has_room()  # not ready until that instance would fit
    spool.close()
