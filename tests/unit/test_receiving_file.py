"""C-STORE data sets received into a durable spool are on their way to disk as they arrive."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import IO, Any, cast

import pytest

from dicom_adapter.importer import cstore_spool
from dicom_adapter.importer.cstore_spool import WRITEBACK_STEP, CStoreSpool, ReceivingFile
from dicom_adapter.spool import local
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_is_really_asked_of_the_kernel_and_never_fails_a_receive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # found in libc: without it the writeback would silently do nothing
    assert local._SYNC_FILE_RANGE is not None
    path = tmp_path / "f"
    data = os.urandom(3 * WRITEBACK_STEP)
    with path.open("wb") as stream:
        stream.write(data)
        stream.flush()
        start_writeback(stream.fileno(), 0, len(data))  # the real call
        os.fsync(stream.fileno())
    assert path.read_bytes() == data
    start_writeback(-1, 0, 10)  # advisory: a failing call raises nothing (EBADF ignored)
    calls: list[tuple[int, ...]] = []

    def recorded(*args: int) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(local, "_SYNC_FILE_RANGE", recorded)
    start_writeback(7, 4096, 65536)
    start_writeback(7, 0, 0)  # nothing to write back: no call
    assert calls == [(7, 4096, 65536, 2)]  # SYNC_FILE_RANGE_WRITE: start, do not wait


class _Trickle(io.RawIOBase):
    """An unbuffered file that takes at most `step` bytes per write (0: takes nothing)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.data = bytearray()
        self.name = "trickle"

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        taken = bytes(data[: self.step])
        self.data += taken
        return len(taken)


def test_short_writes_are_completed() -> None:
    raw = _Trickle(7)
    stream = ReceivingFile(cast(IO[bytes], raw))
    payload = os.urandom(100)
    assert stream.write(memoryview(payload)) == 100
    assert bytes(raw.data) == payload
    assert stream.error is None


def test_a_file_taking_no_bytes_is_an_error_not_a_hang(tmp_path: Path) -> None:
    raw = _Trickle(0)
    stream = ReceivingFile(cast(IO[bytes], raw), name=str(tmp_path / "f"))
    stream.write(b"abc")
    assert isinstance(stream.error, OSError)  # the C-STORE is answered 0xA700
