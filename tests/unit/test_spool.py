"""The local spool's areas and the uploader's retry rules, with a stand-in for STOW-RS."""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tests.rig import generate_ct_series, wait_until_async
from tests.spool_testing import ScriptedStore, spool_with

from dicom_adapter.dicom.attributes import InstanceIdentity
from dicom_adapter.errors import ConfigError, UpstreamUnavailableError
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry
from dicom_adapter.spool.base import StoreOutcome
from dicom_adapter.spool.local import LocalSpool
from dicom_adapter.spool.uploader import SpoolUploader
from dicom_adapter.status import Status

A700 = StoreOutcome(Status.OUT_OF_RESOURCES, 503, "busy")


async def run_until(spool: LocalSpool, store: ScriptedStore, retries: int) -> ImportMetrics:
    metrics = ImportMetrics(MetricsRegistry())
    uploader = SpoolUploader(
        spool, store, metrics, concurrency=2, retries=retries, min_delay=0.02, max_delay=0.05
    )
    await uploader.start()
    try:
        await wait_until_async(
            lambda: (
                not spool.queued()
                and metrics.cstore_backup_errors.value() >= len(list(spool.failed.glob("*.dcm")))
            ),
            5.0,
            "queue/ empty and each instance in failed/ counted (after its move)",
        )
    finally:
        await uploader.stop()
    return metrics


def test_commit_renames_into_queue_in_arrival_order(tmp_path: Path) -> None:
    spool = spool_with(tmp_path, 3)
    assert [p.parent for p in spool.queued()] == [spool.queue] * 3
    assert not list(spool.incoming.glob("*.dcm"))
    assert spool.depth() == 3
    assert 0 <= spool.oldest_age() < 60


def test_transient_failures_retry_with_growing_delays_then_deliver(tmp_path: Path) -> None:
    spool = spool_with(tmp_path, 1)
    store = ScriptedStore(
        [A700, UpstreamUnavailableError("refused"), A700, StoreOutcome(Status.SUCCESS)]
    )
    metrics = asyncio.run(run_until(spool, store, retries=5))
    assert not spool.queued() and not list(spool.failed.iterdir())
    times = [t for t, _ in store.calls]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(store.calls) == 4
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.05  # doubles, then capped
    assert all(may_exist for _, may_exist in store.calls)  # 409 is checked upstream
    assert metrics.cstore_backup_errors.value() == 0


def test_retries_exhausted_move_to_failed_with_a_reason(tmp_path: Path) -> None:
    spool = spool_with(tmp_path, 1)
    store = ScriptedStore([A700])
    metrics = asyncio.run(run_until(spool, store, retries=2))
    assert len(store.calls) == 3  # the first attempt and 2 retries
    [note] = spool.failed.glob("*.json")
    reason = json.loads(note.read_text())
    assert (reason["http_status"], reason["attempts"], reason["body_excerpt"]) == (503, 3, "busy")
    assert reason["dimse_status"] == "0xA700"
    assert metrics.cstore_backup_errors.value() == 1


@pytest.mark.parametrize("status", [Status.NOT_AUTHORIZED, Status.PROCESSING_FAILURE])
def test_permanent_refusal_is_not_retried(tmp_path: Path, status: Status) -> None:
    spool = spool_with(tmp_path, 1)
    store = ScriptedStore([StoreOutcome(status, 403, "no")])
    asyncio.run(run_until(spool, store, retries=5))
    assert len(store.calls) == 1
    assert len(list(spool.failed.glob("*.dcm"))) == 1


def test_one_process_owns_a_spool(tmp_path: Path) -> None:
    owner = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    with pytest.raises(ConfigError, match="in use by another dicom-import"):
        LocalSpool(tmp_path / "spool", headroom_bytes=0)
    owner.close()
    LocalSpool(tmp_path / "spool", headroom_bytes=0).close()


def test_retry_delay_is_capped_after_a_thousand_attempts(tmp_path: Path) -> None:
    """A long outage with a large retry amount keeps retrying at the maximum delay."""
    spool = spool_with(tmp_path, 1)
    store = ScriptedStore([A700])

    async def scenario() -> list[tuple[float, bool]]:
        metrics = ImportMetrics(MetricsRegistry())
        uploader = SpoolUploader(
            spool, store, metrics, concurrency=1, retries=5000, min_delay=0.01, max_delay=0.02
        )
        await uploader.start()  # the workers have not run yet: the replayed item waits
        for item in list(uploader._waiting):
            item.attempts = 1030  # as after a long outage
        try:
            await wait_until_async(lambda: len(store.calls) >= 4, 5.0, "4 uploads")
        finally:
            await uploader.stop()
        return store.calls

    calls = asyncio.run(scenario())
    assert len(calls) >= 4  # still retrying past attempt 1025
    assert spool.queued()


def test_a_worker_survives_an_unexpected_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error moving one instance to failed/ does not stop the uploads of the next ones."""
    spool = spool_with(tmp_path, 2)
    first, second = spool.queued()

    def broken_fail(path: Path, reason: object) -> Path:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(spool, "fail", broken_fail)
    outcomes: dict[str, StoreOutcome] = {
        first.name: StoreOutcome(Status.PROCESSING_FAILURE, 400, "no"),
        second.name: StoreOutcome(Status.SUCCESS),
    }

    class ByName(ScriptedStore):
        async def store_outcome(
            self, path: Path, identity: InstanceIdentity, *, may_exist: bool = False
        ) -> StoreOutcome:
            self.calls.append((time.monotonic(), may_exist))
            return outcomes[path.name]

    async def scenario() -> None:
        metrics = ImportMetrics(MetricsRegistry())
        uploader = SpoolUploader(
            spool,
            ByName([A700]),
            metrics,
            concurrency=1,
            retries=0,
            min_delay=0.01,
            max_delay=0.02,
        )
        await uploader.start()
        try:
            await wait_until_async(lambda: not second.exists(), 5.0, f"{second} uploaded")
        finally:
            await uploader.stop()

    asyncio.run(scenario())
    assert not second.exists()  # delivered by the same, single worker
    assert first.exists()  # left in queue/ for the next run


def test_metrics_read_the_queue_from_memory_after_a_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics calls depth() and oldest_age() on the event loop: no listing of queue/."""
    spool = spool_with(tmp_path, 3)
    first, second, third = spool.queued()  # the uploader's periodic scan
    listings: list[object] = []
    real_listdir = os.listdir

    def counting_listdir(path: str | os.PathLike[str]) -> list[str]:
        listings.append(path)
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", counting_listdir)
    assert spool.depth() == 3
    spool.delivered(first)
    assert spool.depth() == 2
    oldest = (time.time_ns() - int(second.name.split("-")[0])) / 1e9
    assert spool.oldest_age() == pytest.approx(oldest, abs=0.5)
    spool.fail(second, {})
    spool.delivered(third)
    [fresh] = list(generate_ct_series(spool.incoming, 1, rows=4, cols=4))
    spool.commit(fresh, fresh.stem)
    assert spool.depth() == 1
    assert spool.oldest_age() < 5
    assert listings == []


def test_the_rescan_pauses_longer_when_listing_the_queue_is_costly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = spool_with(tmp_path, 1)
    monkeypatch.setattr(spool, "rescan_seconds", 0.01)
    scans: list[float] = []
    real_queued = spool.queued

    def slow_queued() -> list[Path]:
        scans.append(time.monotonic())
        time.sleep(0.05)  # a long queue's listing
        return real_queued()

    monkeypatch.setattr(spool, "queued", slow_queued)

    async def scenario() -> None:
        uploader = SpoolUploader(
            spool,
            ScriptedStore([A700]),
            ImportMetrics(MetricsRegistry()),
            concurrency=1,
            retries=1000,
            min_delay=10,
            max_delay=10,
        )
        await uploader.start()
        await asyncio.sleep(1.2)
        await uploader.stop()

    asyncio.run(scenario())
    # the start's listing, then one rescan every 10 x 0.05 s at most (not every 0.06 s)
    assert 2 <= len(scans) <= 4


def test_half_written_files_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed copy leaves no `.X.partial`; what a kill -9 left is swept at the next open."""
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    [path] = generate_ct_series(tmp_path / "elsewhere", 1, rows=4, cols=4)
    real_rename = os.rename

    def cross_volume(src: Path, dst: Path) -> None:
        if Path(src).parent != spool.queue:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(src, dst)

    def copy_then_full(src: Path, dst: Path) -> None:
        Path(dst).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", cross_volume)
    monkeypatch.setattr(shutil, "copyfile", copy_then_full)
    with pytest.raises(OSError, match="No space"):
        spool.commit(path, path.stem)
    monkeypatch.undo()
    assert os.listdir(spool.queue) == []
    spool.close()

    (spool.queue / ".1-0-1.2.3.dcm.partial").write_bytes(b"half")
    (spool.failed / ".1-0-1.2.4.dcm.json.tmp").write_text("{")
    LocalSpool(tmp_path / "spool", headroom_bytes=0).close()
    assert os.listdir(spool.queue) == [] and os.listdir(spool.failed) == []


def test_a_failed_rescan_does_not_stop_adopting_requeued_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    monkeypatch.setattr(spool, "rescan_seconds", 0.01)
    real_queued = spool.queued
    calls: list[int] = []

    def flaky_queued() -> list[Path]:
        calls.append(1)
        if len(calls) == 2:  # the first rescan
            raise OSError(errno.EIO, "Input/output error")
        return real_queued()

    monkeypatch.setattr(spool, "queued", flaky_queued)
    store = ScriptedStore([StoreOutcome(Status.SUCCESS)])

    async def scenario() -> None:
        uploader = SpoolUploader(
            spool,
            store,
            ImportMetrics(MetricsRegistry()),
            concurrency=1,
            retries=0,
            min_delay=0.01,
            max_delay=0.01,
        )
        await uploader.start()
        try:
            await wait_until_async(lambda: len(calls) >= 3, 5.0, "3 uploads")
            # an operator's requeue: unannounced to the uploader
            for path in generate_ct_series(spool.incoming, 1, rows=4, cols=4):
                spool.commit(path, path.stem)
            await wait_until_async(lambda: not real_queued(), 5.0, "the requeued instance uploaded")
        finally:
            await uploader.stop()

    asyncio.run(scenario())
    assert not real_queued() and len(store.calls) == 1


@pytest.mark.parametrize("in_place", [True, False])
def test_a_local_spools_files_are_used_in_place_without_thread_hops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_place: bool
) -> None:
    """materialize()/release() of a local spool are no-ops: they run on the event loop's own
    thread; a spool that copies (gs://) runs them in a worker thread."""
    spool = spool_with(tmp_path, 2)
    monkeypatch.setattr(spool, "files_in_place", in_place)
    threads: dict[str, set[str]] = {"materialize": set(), "release": set()}
    for name in threads:
        original = getattr(spool, name)

        def recorded(*args: object, _name: str = name, _original: object = original) -> object:
            threads[_name].add(threading.current_thread().name)
            return _original(*args)  # type: ignore[operator]

        monkeypatch.setattr(spool, name, recorded)
    store = ScriptedStore([StoreOutcome(Status.SUCCESS)] * 2)
    asyncio.run(run_until(spool, store, retries=0))
    assert len(store.calls) == 2 and not spool.queued()
    loop = threading.main_thread().name
    if in_place:
        assert threads == {"materialize": {loop}, "release": set()}
    else:
        assert threads["materialize"] and threads["release"]
        assert loop not in threads["materialize"] | threads["release"]


def test_depth_stays_true_when_uploads_finish_while_queue_is_listed(tmp_path: Path) -> None:
    """The uploader lists queue/ in a worker thread while uploads end on others: an instance
    delivered (or queued) during the listing must not leave the gauge off for good."""
    spool = spool_with(tmp_path, 3)
    (extra,) = generate_ct_series(spool.incoming, 1, rows=4, cols=4)
    real_queue = spool.queue

    class Busy(type(real_queue)):  # type: ignore[misc]
        def glob(self, pattern: str) -> Any:
            listed = list(super().glob(pattern))  # the listing has all three
            spool.delivered(listed[0])  # an upload ends meanwhile...
            spool.commit(extra, extra.stem)  # ...and a C-STORE is queued after the listing
            return iter(listed)

    spool.queue = Busy(real_queue)
    queued = spool.queued()
    spool.queue = real_queue
    on_disk = sorted(p.name for p in real_queue.glob("*.dcm"))
    assert len(on_disk) == 3
    assert sorted(p.name for p in queued) == on_disk
    assert spool.depth() == 3  # from memory (fresh scan), equal to what is on disk
