"""C-STORE data sets received into a durable spool are on their way to disk as they arrive."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_adapter.importer import cstore_spool
from dicom_adapter.importer.cstore_spool import WRITEBACK_STEP, CStoreSpool
from dicom_adapter.spool.local import start_writeback


def _receive(spool: CStoreSpool, fragments: list[bytes]) -> Path:
    """Write fragments as pynetdicom does: write, then flush `.file`, for each."""
    stream = spool._create(delete=False, mode="wb", suffix=".dcm")
    for fragment in fragments:
        stream.write(fragment)
        stream.file.flush()
    stream.close()
    return Path(stream.name)


@pytest.mark.parametrize("writeback", [True, False])
def test_a_durable_spools_files_are_written_back_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writeback: bool
) -> None:
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(
        cstore_spool, "start_writeback", lambda fd, offset, length: started.append((offset, length))
    )
    spool = CStoreSpool(tmp_path, writeback=writeback)
    try:
        third = WRITEBACK_STEP // 3 + 1
        fragments = [os.urandom(third) for _ in range(4)] + [os.urandom(WRITEBACK_STEP * 2)]
        path = _receive(spool, fragments)
        assert path.read_bytes() == b"".join(fragments)
    finally:
        spool.close()
    if not writeback:  # a file that is never fsynced: no extra disk writes
        assert started == []
        return
    # the 3rd fragment passes the step: bytes 0..3*third; then the last fragment's range
    assert started == [(0, 3 * third), (3 * third, third + 2 * WRITEBACK_STEP)]


def test_start_writeback_leaves_the_file_as_written(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(3 * WRITEBACK_STEP)
    with path.open("wb") as stream:
        stream.write(data)
        stream.flush()
        start_writeback(stream.fileno(), 0, len(data))
        start_writeback(stream.fileno(), 0, 0)  # nothing to do
        os.fsync(stream.fileno())
    assert path.read_bytes() == data
