"""C-STOREs aborted mid-data-set leave nothing behind: no spool file, no open descriptor."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from tests.rig import (
    Importer,
    echo,
    generate_ct_series,
    interrupt_c_store,
    proc_status,
    wait_until,
)

HOST = "127.0.0.1"
ROOT = "dicom-import-spool"


def spooled_files(tmpdir: Path) -> list[Path]:
    """Every file under TMPDIR except the run locks (our directories are allowed to exist)."""
    return sorted(p for p in tmpdir.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


@pytest.mark.parametrize(
    "flags", [(), ("--pynetdicom_storage",)], ids=["adapter-scp", "pynetdicom"]
)
def test_aborted_transfers_leave_no_file_and_no_descriptor(
    tmp_path: Path, flags: tuple[str, ...]
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    (instance,) = generate_ct_series(tmp_path / "in", 1, rows=256, cols=256)  # 128 KiB pixels
    # nothing listens upstream: an interrupted transfer never gets as far as an upload
    with Importer(
        f"http://{HOST}:1/dicom-web",
        *flags,
        log_dir=tmp_path / "log",
        env={"TMPDIR": str(tmpdir)},
    ) as importer:
        assert importer.proc is not None
        pid = importer.proc.pid
        baseline = proc_status(pid).fds
        for i in range(50):  # half end with an A-ABORT, half with the connection just closed
            interrupt_c_store(HOST, importer.port, importer.aet, instance, 40_000, abort=i % 2 == 0)
        wait_until(
            lambda: not spooled_files(tmpdir) and proc_status(pid).fds <= baseline,
            10.0,
            "no spooled file left and the descriptors back at the start",
            interval=0.1,
            detail=lambda: (
                f"left behind: {spooled_files(tmpdir)[:3]} (of {len(spooled_files(tmpdir))}), "
                f"{proc_status(pid).fds} descriptors open, {baseline} at the start"
            ),
        )
        assert echo(HOST, importer.port, importer.aet, timeout=2)


def test_startup_sweeps_only_files_of_dead_runs(tmp_path: Path) -> None:
    """A dead run's spool files go; a live run's, and anything not ours in TMPDIR, stay."""
    tmpdir = tmp_path / "tmp"
    root = tmpdir / ROOT
    (root / "run-dead").mkdir(parents=True)
    (root / "run-dead.lock").touch()
    dead = root / "run-dead" / "cstore-abc.dcm"
    dead.write_bytes(b"partial")
    (root / "run-live").mkdir()
    live_lock = root / "run-live.lock"
    live_lock.touch()
    live = root / "run-live" / "cstore-def.dcm"
    live.write_bytes(b"in flight")
    foreign = tmpdir / "tmpforeign.dcm"  # another program's temporary file
    foreign.write_bytes(b"not ours")
    with live_lock.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another dicom-import, alive
        with Importer(
            f"http://{HOST}:1/dicom-web", log_dir=tmp_path / "log", env={"TMPDIR": str(tmpdir)}
        ):
            assert not dead.exists()
            assert not (root / "run-dead").exists()
            assert not (root / "run-dead.lock").exists()
            assert live.exists()
            assert foreign.exists()
