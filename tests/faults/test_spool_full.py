"""A spool that runs out of room: a real 8 MiB volume, and the --spool_max_bytes cap.

0xA700 (or an abort), never a success for an instance that was not written; /readyz says
not-ready while it lasts; once the upstream drains the queue, new C-STOREs succeed again.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_adapter.status import Status
from tests.rig import (
    Fault,
    FaultProxy,
    Importer,
    Orthanc,
    assert_identical_in_orthanc,
    dcmsend,
    echo,
    http_get,
    new_instances,
    parse_dcmsend_debug,
    queued,
    send,
    spool_args,
)
from tests.rig.poll import wait_until

VOLUME = "8m"
SIDE = 512  # 512 x 512 x 16 bits: 512 KiB a data set, about 15 fit on the volume


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted for the test (we run as root); unmounted however it ends."""
    mount_point = tmp_path / "volume"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={VOLUME}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:  # not root: this test needs a real volume, it must not pass
        pytest.fail(f"cannot mount a tmpfs (run as root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def readyz(importer: Importer) -> int:
    return http_get(importer.metrics_url + "/readyz").status_code


def send_all(importer: Importer, instances: dict[str, Path]) -> dict[str, int]:
    """dcmsend every file on one association, not halting at a failure: UID -> status seen."""
    sent = dcmsend(
        "127.0.0.1",
        importer.port,
        importer.aet,
        instances.values(),
        extra=["-d", "--no-halt", "--single-association"],
    )
    return parse_dcmsend_debug(sent.stdout + sent.stderr)


def fill_until_refused(orthanc: Orthanc, tmp_path: Path, spool: Path, n: int, *extra: str) -> None:
    """Upstream down, auto-ack: send `n` 512 KiB instances; the spool fills up and refuses.

    Then the upstream returns: every acknowledged instance is in Orthanc, unchanged, /readyz
    is ready again and the refused instances are accepted when sent once more.
    """
    instances = new_instances(tmp_path, n, side=SIDE)
    with (
        FaultProxy("127.0.0.1", orthanc.http_port) as proxy,
        Importer(
            proxy.url + "/dicom-web",
            *spool_args(spool, "--auto_ack_cstore", *extra),
            log_dir=tmp_path / "logs",
        ) as importer,
    ):
        proxy.set(Fault.UNAVAILABLE)
        statuses = send_all(importer, instances)
        acknowledged = {u: p for u, p in instances.items() if statuses.get(u) == Status.SUCCESS}
        refused = {u: p for u, p in instances.items() if u not in acknowledged}
        assert 4 <= len(acknowledged) < n, statuses
        # no success after the first refusal: a full spool refuses everything after it
        seen = [statuses.get(u) for u in instances]
        assert seen == [Status.SUCCESS] * len(acknowledged) + [Status.OUT_OF_RESOURCES] * len(
            refused
        ), seen
        assert len(queued(spool)) == len(acknowledged)
        assert readyz(importer) == 503
        assert echo("127.0.0.1", importer.port, importer.aet)  # still serving

        proxy.clear()  # the upstream is back: the queue drains, room returns
        assert_identical_in_orthanc(orthanc, acknowledged)
        wait_until(lambda: not queued(spool), 10.0, "an empty queue/")
        wait_until(lambda: readyz(importer) == 200, 10.0, "/readyz ready again")
        assert send(importer, refused) == dict.fromkeys(refused, Status.SUCCESS)
        assert_identical_in_orthanc(orthanc, refused)
        errors = [r for r in importer.log_records() if r.get("severity") == "CRITICAL"]
        assert not errors, errors


def test_full_volume_refuses_with_a700_and_recovers_when_uploads_drain(
    orthanc: Orthanc, tmp_path: Path, small_volume: Path
) -> None:
    """No headroom: the volume itself runs out (ENOSPC while pynetdicom writes a data set)."""
    fill_until_refused(
        orthanc, tmp_path, small_volume / "spool", 24, "--spool_free_space_headroom=0"
    )
    assert not list((small_volume / "spool" / "incoming").rglob("*.dcm"))


def test_byte_cap_refuses_with_a700_and_recovers_when_uploads_drain(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """--spool_max_bytes on an ordinary volume: past 3 MiB of spool, 0xA700 until it drains."""
    fill_until_refused(
        orthanc,
        tmp_path,
        tmp_path / "spool",
        10,
        "--spool_free_space_headroom=0",
        f"--spool_max_bytes={3 << 20}",
    )
