"""GcsSpool with the uploader, on an in-memory bucket that refuses calls from the event loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from tests.rig import generate_ct_series, wait_until_async
from tests.spool_testing import ScriptedStore, single_uploader

from dicom_adapter.dicom.attributes import read_identity
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry
from dicom_adapter.spool.base import StoreOutcome
from dicom_adapter.spool.gcs import GcsLocation, GcsSpool, Storage
from dicom_adapter.spool.uploader import SpoolUploader
from dicom_adapter.status import Status


def off_the_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise AssertionError("a blocking Cloud Storage call ran on the event loop")


class MemoryStorage(Storage):
    """The Storage calls GcsSpool makes, on a dict; each call checks where it runs."""

    def __init__(self) -> None:  # no client, no credentials
        self.location = GcsLocation("bucket", "prefix")
        self.objects: dict[str, bytes] = {}
        self.downloads = 0

    def names(self, prefix: str) -> list[str]:
        off_the_loop()
        return sorted(
            n for n in self.objects if n.startswith(prefix) and "/" not in n[len(prefix) :]
        )

    def upload_file(self, path: Path, name: str) -> None:
        off_the_loop()
        self.objects[name] = path.read_bytes()

    def upload_json(self, name: str, value: dict[str, Any]) -> None:
        off_the_loop()
        self.objects[name] = json.dumps(value).encode()

    def download(self, name: str, path: Path) -> None:
        off_the_loop()
        if name not in self.objects:
            raise FileNotFoundError(name)
        self.downloads += 1
        path.write_bytes(self.objects[name])

    def copy(self, source: str, target: str) -> None:
        off_the_loop()
        if source not in self.objects:
            raise FileNotFoundError(source)
        self.objects[target] = self.objects[source]

    def delete(self, name: str) -> None:
        off_the_loop()
        self.objects.pop(name, None)


def spool_with(tmp_path: Path, n: int, *, keep_received: bool = False) -> GcsSpool:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spool = GcsSpool(
        MemoryStorage(), "pod-0", scratch=scratch, headroom_bytes=0, keep_received=keep_received
    )
    for path in generate_ct_series(tmp_path / "received", n, rows=4, cols=4):
        spool.commit(path, str(read_identity(path).sop_instance_uid))
    return spool


def storage(spool: GcsSpool) -> MemoryStorage:
    assert isinstance(spool.storage, MemoryStorage)
    return spool.storage


async def upload_all(spool: GcsSpool, store: ScriptedStore) -> ImportMetrics:
    metrics = ImportMetrics(MetricsRegistry())
    uploader = SpoolUploader(
        spool, store, metrics, concurrency=2, retries=0, min_delay=0, max_delay=0
    )
    await uploader.start()
    try:

        async def drained() -> bool:
            return not await asyncio.to_thread(spool.queued)

        await wait_until_async(drained, 5.0, "an empty queue")
    finally:
        await uploader.stop()
    return metrics


def test_commit_writes_the_object_and_removes_the_received_file(tmp_path: Path) -> None:
    spool = spool_with(tmp_path, 3)
    names = storage(spool).names("prefix/pod-0/queue/")
    assert len(names) == 3 and [str(p) for p in spool.queued()] == names
    assert not list((tmp_path / "received").rglob("*.dcm"))
    assert spool.depth() == 3 and 0 <= spool.oldest_age() < 60


def test_uploader_stows_each_object_then_deletes_it(tmp_path: Path) -> None:
    spool = spool_with(tmp_path, 3)
    sent: list[bytes] = []
    store = ScriptedStore([StoreOutcome(Status.SUCCESS)])
    original = store.store_outcome

    async def recording(path: Path, identity: Any, *, may_exist: bool = False) -> StoreOutcome:
        sent.append(path.read_bytes())
        return await original(path, identity, may_exist=may_exist)

    store.store_outcome = recording  # type: ignore[method-assign]
    queued = dict(storage(spool).objects)
    asyncio.run(upload_all(spool, store))
    assert sorted(sent) == sorted(queued.values())
    assert storage(spool).objects == {}
    assert spool.depth() == 0
    assert not list(spool.scratch.iterdir())  # scratch downloads removed


def test_refused_object_goes_to_failed_with_its_reason(tmp_path: Path) -> None:
    spool = spool_with(tmp_path, 1)
    [item] = spool.queued()
    store = ScriptedStore([StoreOutcome(Status.NOT_AUTHORIZED, 403, "forbidden")])
    metrics = asyncio.run(upload_all(spool, store))
    objects = storage(spool).objects
    assert sorted(objects) == [
        f"prefix/pod-0/failed/{item.name}",
        f"prefix/pod-0/failed/{item.name}.json",
    ]
    reason = json.loads(objects[f"prefix/pod-0/failed/{item.name}.json"])
    assert reason["http_status"] == 403 and reason["attempts"] == 1
    assert reason["body_excerpt"] == "forbidden"
    assert item.name.endswith(reason["sop_instance_uid"] + ".dcm")
    assert metrics.cstore_backup_errors.value() == 1


def test_synchronous_mode_stows_the_received_file_without_a_download(tmp_path: Path) -> None:
    spool = spool_with(tmp_path, 1, keep_received=True)
    [item] = spool.queued()
    [received] = (tmp_path / "received").rglob("*.dcm")
    store = ScriptedStore([StoreOutcome(Status.SUCCESS)])
    stowed: list[Path] = []

    async def stow(path: Path, identity: Any) -> StoreOutcome:
        stowed.append(path)
        return StoreOutcome(Status.SUCCESS)

    store.store_answer = stow  # type: ignore[method-assign]

    async def scenario() -> StoreOutcome:
        uploader = single_uploader(spool, store)
        await uploader.start()
        try:
            return await uploader.upload_now(item, read_identity(received))
        finally:
            await uploader.stop()

    assert asyncio.run(scenario()).status == Status.SUCCESS
    assert stowed == [received]  # the received file itself
    assert storage(spool).downloads == 0
    assert storage(spool).objects == {}
    assert not received.exists()


def test_a_removed_object_is_file_not_found_and_leaves_no_scratch(tmp_path: Path) -> None:
    spool = spool_with(tmp_path, 1)
    [item] = spool.queued()
    with pytest.raises(FileNotFoundError):
        storage(spool).objects.clear()
        spool.materialize(item)
    assert not list(spool.scratch.iterdir())
