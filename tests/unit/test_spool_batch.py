"""Several spooled instances per STOW-RS request: each instance's outcome is its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from tests.rig import generate_ct_series, wait_until_async
from tests.spool_testing import part_uids

from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy
from dicom_adapter.importer.store import StoreService
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry
from dicom_adapter.spool import uploader as uploader_module
from dicom_adapter.spool.local import LocalSpool
from dicom_adapter.spool.uploader import SpoolUploader
from dicom_adapter.status import Status

# decides a STOW answer from the SOP Instance UIDs of its parts (in request order)
Answer = Callable[[list[str]], tuple[int, dict[str, object]]]


def stow_body(stored: list[str], failed: Mapping[str, int]) -> dict[str, object]:
    """A DICOM JSON STOW-RS response (PS3.18 10.5.3)."""

    def item(uid: str, reason: int | None = None) -> dict[str, object]:
        found: dict[str, object] = {"00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            found["00081197"] = {"vr": "US", "Value": [reason]}
        return found

    body: dict[str, object] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [item(uid) for uid in stored]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [item(u, r) for u, r in failed.items()]}
    return body


class Upstream:
    """A DICOMweb server stand-in: records each STOW's parts, answers as `answer` says."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[list[str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":  # QIDO-RS existence check: nothing there
            return httpx.Response(200, json=[])
        uids = part_uids(request)
        self.requests.append(uids)
        status, body = self.answer(uids)
        return httpx.Response(status, json=body, headers={"Content-Type": "application/dicom+json"})


def spool_of(tmp_path: Path, n: int) -> tuple[LocalSpool, list[str]]:
    """A spool with `n` small CT instances queued; their UIDs in queue order."""
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    uids = []
    for path in generate_ct_series(tmp_path / "in", n, rows=4, cols=4):
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        spool.commit(path, uid)
        uids.append(uid)
    return spool, uids


def uploader_for(
    spool: LocalSpool,
    http: httpx.AsyncClient,
    metrics: ImportMetrics,
    *,
    deadline: float,
    concurrency: int,
    retries: int,
    batch: int,
    batch_bytes: int = 16 << 20,
) -> SpoolUploader:
    """The spool's uploader, as dicom-import builds it, over `http` (retries 10-20 ms apart)."""
    store = StoreService(
        DicomwebClient(http, RetryPolicy(deadline=deadline)),
        stow_url="http://x/dicom-web/studies",
        dicomweb_root="",
        overwrite=False,
    )
    return SpoolUploader(
        spool,
        store,
        metrics,
        concurrency=concurrency,
        retries=retries,
        min_delay=0.01,
        max_delay=0.02,
        batch=batch,
        batch_bytes=batch_bytes,
    )


def upload(
    spool: LocalSpool, upstream: Upstream, *, batch: int, batch_bytes: int = 16 << 20
) -> ImportMetrics:
    """Run the uploader until queue/ is empty and failed/ counted (5 s at most)."""

    async def run() -> ImportMetrics:
        http = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
        metrics = ImportMetrics(MetricsRegistry())
        uploader = uploader_for(
            spool,
            http,
            metrics,
            deadline=1.0,
            concurrency=1,
            retries=3,
            batch=batch,
            batch_bytes=batch_bytes,
        )
        await uploader.start()

        def settled() -> bool:  # a move to failed/ is counted once it is complete
            if spool.queued():  # listed first: failed/ is counted after the last move
                return False
            failed = len(list(spool.failed.glob("*.dcm")))
            return metrics.cstore_backup_errors.value() == failed

        try:
            await wait_until_async(settled, 5.0, "every instance uploaded or counted in failed/")
        finally:
            await uploader.stop()
            await http.aclose()
        return metrics

    return asyncio.run(run())


def test_one_refused_in_a_batch_fails_alone_the_others_are_stored(tmp_path: Path) -> None:
    """A permanent refusal of one part: the rest leave the queue, it alone goes to failed/."""
    spool, uids = spool_of(tmp_path, 4)
    refused = uids[1]

    def answer(sent: list[str]) -> tuple[int, dict[str, object]]:
        stored = [uid for uid in sent if uid != refused]
        failed = {refused: Status.SOP_CLASS_NOT_SUPPORTED} if refused in sent else {}
        return 202, stow_body(stored, failed)

    upstream = Upstream(answer)
    metrics = upload(spool, upstream, batch=10)
    assert upstream.requests == [uids]  # one request for all four; the refusal is not retried
    assert not spool.queued()
    [failed] = spool.failed.glob("*.dcm")
    assert dcmread(failed).SOPInstanceUID == refused
    reason = json.loads(failed.with_name(failed.name + ".json").read_text())
    assert (reason["dimse_status"], reason["http_status"], reason["attempts"]) == ("0x0122", 202, 1)
    assert metrics.cstore_backup_errors.value() == 1


def test_a_transient_failure_in_a_batch_is_retried_alone(tmp_path: Path) -> None:
    """0xA700 for one part: only that instance is sent again, and then it is stored."""
    spool, uids = spool_of(tmp_path, 3)
    busy = uids[2]

    def answer(sent: list[str]) -> tuple[int, dict[str, object]]:
        if len(sent) > 1:
            stored = [uid for uid in sent if uid != busy]
            return 202, stow_body(stored, {busy: Status.OUT_OF_RESOURCES})
        return 200, stow_body(sent, {})

    upstream = Upstream(answer)
    metrics = upload(spool, upstream, batch=10)
    assert upstream.requests == [uids, [busy]]
    assert not spool.queued() and not list(spool.failed.iterdir())
    assert metrics.cstore_backup_errors.value() == 0


def test_a_refused_request_fails_each_instance_with_its_own_reason(tmp_path: Path) -> None:
    """HTTP 400 without sequences: each instance asked for alone once (within its first
    attempt), then 0xC000 for each, each in failed/, counted each."""
    spool, uids = spool_of(tmp_path, 3)

    def answer(sent: list[str]) -> tuple[int, dict[str, object]]:
        return 400, {}

    upstream = Upstream(answer)
    metrics = upload(spool, upstream, batch=10)
    assert upstream.requests == [uids, *([uid] for uid in uids)]
    notes = [json.loads(p.read_text()) for p in spool.failed.glob("*.json")]
    assert sorted(n["sop_instance_uid"] for n in notes) == sorted(uids)
    assert {(n["dimse_status"], n["http_status"]) for n in notes} == {("0xC000", 400)}
    assert {n["attempts"] for n in notes} == {1}
    assert metrics.cstore_backup_errors.value() == 3


def test_one_bad_part_refusing_the_whole_request_fails_alone(tmp_path: Path) -> None:
    """A bare 400 for the batch because of one part: the others, asked for alone, are
    stored; only the bad one goes to failed/."""
    spool, uids = spool_of(tmp_path, 3)
    bad = uids[1]

    def answer(sent: list[str]) -> tuple[int, dict[str, object]]:
        if bad in sent:
            return 400, {}
        return 200, stow_body(sent, {})

    upstream = Upstream(answer)
    metrics = upload(spool, upstream, batch=10)
    assert upstream.requests == [uids, [uids[0]], [bad], [uids[2]]]
    assert not spool.queued()
    [failed] = spool.failed.glob("*.dcm")
    assert dcmread(failed).SOPInstanceUID == bad
    assert metrics.cstore_backup_errors.value() == 1


def test_batches_respect_the_count_and_byte_bounds_in_queue_order(tmp_path: Path) -> None:
    """5 queued, at most 2 per request (by count, then by bytes): [2, 2, 1], in arrival order."""
    spool, uids = spool_of(tmp_path, 5)
    size = max(path.stat().st_size for path in spool.queued())

    def answer(sent: list[str]) -> tuple[int, dict[str, object]]:
        return 200, stow_body(sent, {})

    by_count = Upstream(answer)
    upload(spool, by_count, batch=2)
    assert by_count.requests == [uids[0:2], uids[2:4], uids[4:]]

    spool.close()
    spool, uids = spool_of(tmp_path / "again", 5)
    by_bytes = Upstream(answer)
    upload(spool, by_bytes, batch=10, batch_bytes=2 * size + size // 2)
    assert by_bytes.requests == [uids[0:2], uids[2:4], uids[4:]]


def test_one_instance_larger_than_the_byte_bound_still_goes(tmp_path: Path) -> None:
    spool, uids = spool_of(tmp_path, 2)

    def answer(sent: list[str]) -> tuple[int, dict[str, object]]:
        return 200, stow_body(sent, {})

    upstream = Upstream(answer)
    upload(spool, upstream, batch=10, batch_bytes=1)
    assert upstream.requests == [[uids[0]], [uids[1]]]
    assert not spool.queued()


def test_a_replayed_batch_counts_an_instance_already_upstream_as_delivered(
    tmp_path: Path,
) -> None:
    """409 with 0x0111 for one part that QIDO finds upstream: delivered, nothing in failed/."""
    spool, uids = spool_of(tmp_path, 3)
    there = uids[0]
    queried: list[str] = []

    def answer(sent: list[str]) -> tuple[int, dict[str, object]]:
        stored = [uid for uid in sent if uid != there]
        return 409, stow_body(stored, {there: Status.DUPLICATE_SOP_INSTANCE})

    class Archive(Upstream):
        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.method != "GET":
                return super().__call__(request)
            uid = request.url.params["SOPInstanceUID"]
            queried.append(uid)
            match = {
                "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                "00080018": {"vr": "UI", "Value": [uid]},
            }
            return httpx.Response(200, json=[match] if uid == there else [])

    upstream = Archive(answer)
    metrics = upload(spool, upstream, batch=10)
    assert upstream.requests == [uids]
    assert queried == [there]  # only the instance the answer did not reference is checked
    assert not spool.queued() and not list(spool.failed.iterdir())
    assert metrics.cstore_backup_errors.value() == 0


class GatedUpstream:
    """Stores everything; the first STOW-RS is held until `gate` is set (a slow request)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.requests: list[list[str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=[])
        uids = part_uids(request)
        self.requests.append(uids)
        if len(self.requests) == 1:
            await self.gate.wait()
        return httpx.Response(
            200, json=stow_body(uids, {}), headers={"Content-Type": "application/dicom+json"}
        )


async def streamed(
    tmp_path: Path, upstream: GatedUpstream, *, batch: int, scenario: Callable[..., object]
) -> None:
    """Run `scenario(uploader, arrive)` against 4 workers; `arrive()` receives one instance
    (committed to queue/ and announced, as a C-STORE does) and returns its UID."""
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    files = iter(generate_ct_series(tmp_path / "in", 12, rows=4, cols=4))
    http = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    metrics = ImportMetrics(MetricsRegistry())
    uploader = uploader_for(
        spool, http, metrics, deadline=30.0, concurrency=4, retries=0, batch=batch
    )
    await uploader.start()

    async def arrive() -> str:
        path = next(files)
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        uploader.enqueue_threadsafe(spool.commit(path, uid))
        for _ in range(20):  # let idle workers run: before coalescing, one took it at once
            await asyncio.sleep(0)
        return uid

    try:
        result = scenario(uploader, arrive)
        if asyncio.iscoroutine(result):
            await result
        upstream.gate.set()
        await wait_until_async(lambda: not spool.queued(), 5.0, "every instance uploaded")
    finally:
        upstream.gate.set()
        await uploader.stop()
        await http.aclose()
        spool.close()


def test_instances_arriving_during_a_request_go_together_when_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uploader_module, "COALESCE_SECONDS", 60.0)  # only the request's end
    upstream = GatedUpstream()

    async def scenario(uploader: SpoolUploader, arrive: Callable[[], Awaitable[str]]) -> None:
        first = await arrive()  # nothing in flight: it goes at once
        await wait_until_async(lambda: upstream.requests == [[first]], 5.0, "the first request")
        later = [await arrive() for _ in range(3)]
        assert upstream.requests == [[first]]  # they wait for the request in flight
        upstream.gate.set()
        await wait_until_async(lambda: len(upstream.requests) == 2, 5.0, "the second request")
        assert upstream.requests == [[first], later]  # one request for the three, in order

    asyncio.run(streamed(tmp_path, upstream, batch=10, scenario=scenario))


def test_a_full_batch_goes_while_another_request_is_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uploader_module, "COALESCE_SECONDS", 60.0)
    upstream = GatedUpstream()

    async def scenario(uploader: SpoolUploader, arrive: Callable[[], Awaitable[str]]) -> None:
        first = await arrive()
        await wait_until_async(lambda: upstream.requests == [[first]], 5.0, "the first request")
        full = [await arrive() for _ in range(3)]
        await wait_until_async(lambda: len(upstream.requests) == 2, 5.0, "the full batch")
        assert upstream.requests == [[first], full]
        assert not upstream.gate.is_set()  # the first is still in flight

    asyncio.run(streamed(tmp_path, upstream, batch=3, scenario=scenario))


def test_a_partial_batch_waits_no_longer_than_the_coalescing_bound(tmp_path: Path) -> None:
    """A request that never ends (until the test lets it) delays the next instance by
    COALESCE_SECONDS, not until it ends."""
    upstream = GatedUpstream()

    async def scenario(uploader: SpoolUploader, arrive: Callable[[], Awaitable[str]]) -> None:
        first = await arrive()
        await wait_until_async(lambda: upstream.requests == [[first]], 5.0, "the first request")
        second = await arrive()
        await wait_until_async(lambda: len(upstream.requests) == 2, 5.0, "the second request")
        assert upstream.requests == [[first], [second]]
        assert not upstream.gate.is_set()

    asyncio.run(streamed(tmp_path, upstream, batch=10, scenario=scenario))
