"""`dicom-spool status|requeue|purge` on a spool laid out by LocalSpool itself."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from tests.rig import generate_ct_series, wait_until_async
from tests.spool_testing import ScriptedStore, single_uploader

from dicom_adapter.dicom.attributes import InstanceIdentity
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry
from dicom_adapter.spool.base import StoreOutcome
from dicom_adapter.spool.command import main
from dicom_adapter.spool.local import LocalSpool
from dicom_adapter.spool.uploader import SpoolUploader
from dicom_adapter.status import Status


def failed_spool(tmp_path: Path, studies: dict[str, int]) -> LocalSpool:
    """A spool (owned, as while dicom-import runs) with failed instances of the given studies."""
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    for index, (study, n) in enumerate(studies.items()):
        for path in generate_ct_series(spool.incoming / study, n, rows=4, cols=4, study_uid=study):
            uid = str(dcmread(path).SOPInstanceUID)
            queued = spool.commit(path, uid)
            # the first study's reason records its UID, the second's does not (older uploader)
            reason = {"http_status": 403, "dimse_status": "0x0124", "attempts": 1}
            reason |= {"body_excerpt": "forbidden\nby policy", "sop_instance_uid": uid}
            if index == 0:
                reason["study_instance_uid"] = study
            spool.fail(queued, reason)
    return spool


def run(spool: LocalSpool, *args: str) -> int:
    return main([*args, f"--persistent_file_storage_location={spool.root}"])


def test_status_counts_and_shows_the_oldest_failed_with_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = failed_spool(tmp_path, {"1.2.3": 2, "1.2.4": 1})
    for path in generate_ct_series(spool.incoming / "q", 4, rows=4, cols=4):
        spool.commit(path, "9.9")
    (spool.incoming / "run-1").mkdir()
    (spool.incoming / "run-1" / "x").write_bytes(b"y" * 1234)
    assert run(spool, "status") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("queue: 4 instances, oldest ")
    assert lines[2].startswith("failed: 3 instances, oldest ")
    assert lines[3] == "incoming: 1234 bytes"
    shown = [line for line in lines if line.startswith("failed ")]
    assert len(shown) == 3
    assert all("HTTP 403 -> 0x0124 after 1 attempts" in line for line in shown)
    assert all(line.endswith(": forbidden by policy") for line in shown)  # one line each
    first = sorted(spool.failed.glob("*.dcm"))[0].name
    assert shown[0].startswith(f"failed {first} ")


def test_requeue_all_moves_back_in_order_with_new_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = failed_spool(tmp_path, {"1.2.3": 3})
    before = sorted(spool.failed.glob("*.dcm"))
    uids = [str(dcmread(p).SOPInstanceUID) for p in before]
    started = time.time_ns()
    assert run(spool, "requeue") == 0
    assert "requeued 3 instances" in capsys.readouterr().out
    assert not list(spool.failed.iterdir())  # reason files gone too
    after = spool.queued()
    assert [str(dcmread(p).SOPInstanceUID) for p in after] == uids  # arrival order kept
    assert {p.name for p in after}.isdisjoint(p.name for p in before)
    assert all(int(p.name.split("-")[0]) >= started for p in after)  # a new arrival time
    assert spool.oldest_age() < 60


def test_requeue_by_study_from_reason_or_from_the_file(tmp_path: Path) -> None:
    spool = failed_spool(tmp_path, {"1.2.3": 2, "1.2.4": 2, "1.2.5": 1})
    assert run(spool, "requeue", "--study_uid=1.2.4") == 0  # no UID in its reason file
    assert {str(dcmread(p).StudyInstanceUID) for p in spool.queued()} == {"1.2.4"}
    assert run(spool, "requeue", "--study_uid=1.2.3") == 0  # UID recorded in the reason
    assert len(spool.queued()) == 4
    [left] = spool.failed.glob("*.dcm")
    assert dcmread(left).StudyInstanceUID == "1.2.5"
    assert len(list(spool.failed.glob("*.json"))) == 1


def test_purge_needs_yes_and_can_select_a_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = failed_spool(tmp_path, {"1.2.3": 2, "1.2.4": 1})
    assert run(spool, "purge", "--failed") == 1
    out = capsys.readouterr().out
    assert out.count("would delete") == 3 and "--yes" in out
    assert len(list(spool.failed.glob("*.dcm"))) == 3  # nothing deleted
    assert run(spool, "purge", "--failed", "--study_uid=1.2.4", "--yes") == 0
    assert len(list(spool.failed.glob("*.dcm"))) == 2
    assert run(spool, "purge", "--failed", "--yes") == 0
    assert not list(spool.failed.iterdir())


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["status"],
        ["frobnicate", "--persistent_file_storage_location=/tmp"],
        ["purge", "--persistent_file_storage_location=/tmp"],  # --failed is required
        ["status", "--persistent_file_storage_location=/nonexistent/spool"],
        ["adopt", "--persistent_file_storage_location=/tmp", "--from_replica=pod-0"],  # gs:// only
        ["adopt", "--persistent_file_storage_location=gs://b/p"],  # --from_replica is required
        ["status", "--persistent_file_storage_location=gs:///p"],  # no bucket
        ["status", "--persistent_file_storage_location=gs://b/p", "--replica=a/b"],
    ],
)
def test_bad_usage_is_one_line_and_exit_2(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dicom_adapter.spool.command", *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("dicom-spool: ")


def test_running_uploader_adopts_requeued_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items requeued while the uploader runs are uploaded without a restart, each once."""
    monkeypatch.setattr(LocalSpool, "rescan_seconds", 0.02)
    spool = failed_spool(tmp_path, {"1.2.3": 3})
    store = ScriptedStore([StoreOutcome(Status.SUCCESS)])
    uploaded: list[str] = []
    original = store.store_outcome

    async def counting(
        path: Path, identity: InstanceIdentity, *, may_exist: bool = False
    ) -> StoreOutcome:
        uploaded.append(identity.sop_instance_uid)
        return await original(path, identity, may_exist=may_exist)

    monkeypatch.setattr(store, "store_outcome", counting)

    async def scenario() -> None:
        uploader = SpoolUploader(
            spool,
            store,
            ImportMetrics(MetricsRegistry()),
            concurrency=2,
            retries=0,
            min_delay=0.01,
            max_delay=0.01,
        )
        await uploader.start()
        try:
            await asyncio.sleep(0.1)  # several rescans of an empty queue
            assert not uploaded
            await asyncio.to_thread(run, spool, "requeue")
            await wait_until_async(lambda: not spool.queued(), 5.0, "an empty queue")
            await asyncio.sleep(0.1)  # more rescans: nothing is taken twice
        finally:
            await uploader.stop()

    asyncio.run(scenario())
    assert not spool.queued()
    assert len(uploaded) == 3 and len(set(uploaded)) == 3


def test_reason_file_records_the_study(tmp_path: Path) -> None:
    """The uploader writes the study UID into the reason, so requeue needs no DICOM parse."""
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    for path in generate_ct_series(spool.incoming, 1, rows=4, cols=4, study_uid="1.2.7"):
        spool.commit(path, "x")
    store = ScriptedStore([StoreOutcome(Status.NOT_AUTHORIZED, 403, "no")])

    async def scenario() -> None:
        uploader = single_uploader(spool, store)
        await uploader.start()
        try:
            await wait_until_async(lambda: list(spool.failed.glob("*.json")), 5.0, "a reason file")
        finally:
            await uploader.stop()

    asyncio.run(scenario())
    [note] = spool.failed.glob("*.json")
    assert json.loads(note.read_text())["study_instance_uid"] == "1.2.7"
