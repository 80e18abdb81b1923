"""Spooled instances go to Orthanc several per STOW-RS request (--spool_upload_batch).

Real processes: dcmsend -> dicom-import (subprocess) -> fault proxy (counts requests) -> Orthanc.
"""

from __future__ import annotations

from pathlib import Path

from dicom_adapter.status import Status
from tests.rig import (
    FaultProxy,
    Importer,
    Orthanc,
    assert_all_in_orthanc,
    free_port,
    new_instances,
    queued,
    send,
    spool_args,
)
from tests.rig.poll import wait_until


def test_a_queued_spool_is_uploaded_in_batches_and_all_is_stored(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """12 queued, batches of at most 5, one request at a time: 3 STOW-RS, all 12 stored."""
    spool = tmp_path / "spool"
    instances = new_instances(tmp_path, 12)
    nowhere = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens: they stay queued
    with Importer(
        nowhere, *spool_args(spool, "--auto_ack_cstore"), log_dir=tmp_path / "l1"
    ) as first:
        assert send(first, instances) == dict.fromkeys(instances, Status.SUCCESS)
        assert first.stop() == 0
    assert len(queued(spool)) == 12
    batching = ["--spool_upload_batch=5", "--spool_upload_concurrency=1"]
    with (
        FaultProxy("127.0.0.1", orthanc.http_port) as proxy,
        Importer(proxy.url + "/dicom-web", *spool_args(spool, *batching), log_dir=tmp_path / "l2"),
    ):
        assert_all_in_orthanc(orthanc, instances)
        wait_until(lambda: not queued(spool), 5.0, "an empty queue/")
        stows = [seen for seen in proxy.log if seen.method == "POST"]
        assert len(stows) == 3, stows
    assert not list((spool / "failed").iterdir())
