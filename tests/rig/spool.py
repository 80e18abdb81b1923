"""Helpers of the spool fault tests (tests/faults/test_spool*.py): dicom-import with a spool
and fast retries, new instances, dcmsend with the statuses the sender saw, delivery checks.

Imports the rig's submodules, not `tests.rig`, since tests/rig/__init__.py re-exports it.
"""

from __future__ import annotations

import io
from itertools import count
from pathlib import Path

from pydicom import dcmread

from tests.rig.data import generate_ct_series
from tests.rig.dcmtk import dcmsend, parse_dcmsend_debug
from tests.rig.orthanc import Orthanc
from tests.rig.poll import wait_until
from tests.rig.services import Importer

DELIVERY_TIMEOUT = 20.0


_series = count()


def spool_args(spool: Path, *extra: str) -> list[str]:
    """Fast retries, so a test waits seconds, not minutes, for the upstream to come back."""
    return [
        f"--persistent_file_storage_location={spool}",
        "--persistent_file_upload_retry_amount=1000",
        "--min_upload_delay=50",
        "--max_waiting_time_between_uploads=300",
        "--http_timeout=1",
        "--upstream_retry_deadline=1.5",
        *extra,
    ]


def new_instances(tmp_path: Path, n: int, side: int = 16) -> dict[str, Path]:
    """`n` CT instances (side x side 16-bit pixels) of a new series: SOP Instance UID -> file."""
    index = next(_series)
    paths = generate_ct_series(tmp_path / f"series-{index}", n, rows=side, cols=side, seed=index)
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}


def send(importer: Importer, instances: dict[str, Path]) -> dict[str, int]:
    """dcmsend the files over one association: SOP Instance UID -> status the sender saw."""
    sent = dcmsend("127.0.0.1", importer.port, importer.aet, instances.values(), extra=["-d"])
    return parse_dcmsend_debug(sent.stdout + sent.stderr)


def assert_all_in_orthanc(orthanc: Orthanc, instances: dict[str, Path]) -> None:
    """Every instance reaches Orthanc, with the data set that was sent (elements and pixels)."""
    wait_until(
        lambda: all(orthanc.find_instance(uid) is not None for uid in instances),
        DELIVERY_TIMEOUT,
        "every acknowledged instance in Orthanc",
    )
    for uid, path in instances.items():
        orthanc_id = orthanc.find_instance(uid)
        assert orthanc_id is not None
        stored = dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
        sent = dcmread(path)
        assert stored == sent, f"{uid}: the stored data set differs from the one sent"
        assert stored.PixelData == sent.PixelData


def queued(spool: Path) -> list[Path]:
    return sorted((spool / "queue").glob("*.dcm"))


def dataset_bytes(part10: bytes) -> bytes:
    """The data set of a Part-10 file, byte for byte: what follows the file meta group.

    The meta group is the receiver's own (pynetdicom writes it), so it is not compared.
    """
    assert part10[128:132] == b"DICM", "not a Part-10 file"
    tag, vr = part10[132:136], part10[136:138]
    assert tag == b"\x02\x00\x00\x00" and vr == b"UL", "no (0002,0000) group length first"
    return part10[144 + int.from_bytes(part10[140:144], "little") :]


def assert_identical_in_orthanc(orthanc: Orthanc, instances: dict[str, Path]) -> None:
    """Every instance reaches Orthanc with the data set bytes that were sent, unchanged."""
    found: dict[str, str] = {}

    def all_found() -> bool:  # each round looks up only the instances still missing
        for uid in instances.keys() - found.keys():
            orthanc_id = orthanc.find_instance(uid)
            if orthanc_id is None:
                return False
            found[uid] = orthanc_id
        return True

    wait_until(all_found, DELIVERY_TIMEOUT, "every acknowledged instance in Orthanc")
    differ = [
        uid
        for uid, path in instances.items()
        if dataset_bytes(orthanc.instance_file(found[uid])) != dataset_bytes(path.read_bytes())
    ]
    assert not differ, f"{len(differ)} stored data sets differ from the files sent: {differ[:3]}"


class RestartableOrthanc(Orthanc):
    """An Orthanc that can be stopped and started again on the same ports with its data.

    Needs a given `workdir` (Orthanc.stop would remove its own temporary one).
    """

    def halt(self, timeout: float = 15.0) -> None:
        """Stop the Orthanc process (SIGTERM): its ports refuse connections until `resume`."""
        assert self.proc is not None, "not running"
        self.proc.terminate()
        self.proc.wait(timeout)
        self.proc = None

    def resume(self) -> None:
        """Start Orthanc again with the same configuration (ports, storage, index)."""
        assert self.proc is None, "already running"
        self._launch("ab")
        self._wait_ready()
