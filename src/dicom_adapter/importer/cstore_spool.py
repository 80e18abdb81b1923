"""Where incoming C-STORE data sets are spooled: a directory of this run, left clean.

pynetdicom (STORE_RECV_CHUNKED_DATASET) writes each data set to a NamedTemporaryFile
(delete=False) in the temp directory from the moment its command set arrives, and deletes it
only after the C-STORE handler returns. A transfer aborted mid-data-set, or completed but never
dispatched, would leave the file (and its open descriptor) behind for good.

The adapter's own storage SCP (dimse/store_scp.py) opens its files here too (`open_file`),
keyed by its association's thread as pynetdicom's are by their DUL thread.

So the files go to `$TMPDIR/dicom-import-spool/run-<id>/cstore-*.dcm`, one directory per
running process, each owned through an flock on `run-<id>.lock`. When an association ends the
files it opened are closed and removed; at startup the directories of runs whose lock is free
(their process is gone) are swept. Nothing else in the temp directory is ever touched, so
other programs and other dicom-import processes sharing it are safe.

A write that fails while a data set arrives (ENOSPC on a full volume) must not escape into
pynetdicom's DUL thread (it would die mid-association): ReceivingFile remembers the error,
drops the rest of the data set and empties the file, and the C-STORE handler answers 0xA700.

Hazard: this needs a private pynetdicom name, hook spool_files in dimse/pynetdicom_hooks.py
(checked at startup; without it, one WARNING and pynetdicom keeps its own files).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from dicom_adapter.dimse import pynetdicom_hooks as hooks
from dicom_adapter.spool.local import start_writeback

logger = logging.getLogger(__name__)

ROOT_NAME = "dicom-import-spool"
FILE_PREFIX = "cstore-"
FILE_SUFFIX = ".dcm"
WRITEBACK_STEP = 64 << 10  # start writing a durable spool file to disk every 64 KB received


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None when another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_run(run_dir: Path) -> int:
    """Remove our spool files in a dead run's directory, then the directory; returns files."""
    removed = 0
    if run_dir.is_dir():
        for path in run_dir.glob(f"{FILE_PREFIX}*{FILE_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed += 1
        try:
            run_dir.rmdir()
        except OSError:  # something that is not ours is in there: leave it
            logger.warning("spool directory %s not removed: it holds other files", run_dir)
    return removed


def sweep(root: Path) -> int:
    """Remove what runs that are no longer alive left in `root`; returns the files removed."""
    removed = 0
    for lock in sorted(root.glob("run-*.lock")):
        fd = _try_lock(lock)
        if fd is None:
            continue  # a live process owns it
        try:
            removed += _remove_run(lock.with_suffix(""))
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    for run_dir in sorted(root.glob("run-*")):  # a sweep that died between the two steps
        if run_dir.is_dir() and not run_dir.with_suffix(".lock").exists():
            removed += _remove_run(run_dir)
    return removed


class ReceivingFile:
    """A data set's file as pynetdicom writes it (NamedTemporaryFile's write/file.flush/close).

    The first failed write or flush is kept in `error` and nothing more is written; the
    partial file is closed and truncated at once, so a full volume gets its space back.
    """

    def __init__(
        self,
        stream: IO[bytes],
        on_bytes: Callable[[int], None] | None = None,
        *,
        writeback: bool = False,
        name: str = "",
    ) -> None:
        self._stream = stream
        self.name = name or str(stream.name)
        self.error: OSError | None = None
        self.received = 0  # bytes of the data set received so far (written or not)
        self.file = self  # pynetdicom flushes `.file` after every fragment
        self._closed = False
        self._on_bytes = on_bytes  # told the bytes this file holds while it is open
        self._counted = 0
        self._writeback = writeback  # a durable spool's file: fsynced before it is answered
        self._written_back = 0  # bytes whose writeback to disk has been started

    def _count(self, delta: int) -> None:
        if self._on_bytes is not None and delta:
            self._counted += delta
            self._on_bytes(delta)

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes | memoryview) -> int:
        self.received += len(data)
        if self.error is None:
            try:
                view = memoryview(data)
                while view:  # an unbuffered file may take part of it (a short write)
                    written = self._stream.write(view)
                    if not written:
                        raise OSError(errno.EIO, "the spool file took no bytes")
                    view = view[written:]
            except OSError as exc:
                self._failed(exc)
            else:
                self._count(len(data))
        return len(data)

    def flush(self) -> None:
        """After every fragment (pynetdicom): to the kernel and, for a durable spool, on its
        way to disk at once, so the fsync before the answer waits for the last part only."""
        if self.error is None:
            try:
                self._stream.flush()
            except OSError as exc:
                self._failed(exc)
                return
            if self._writeback and self.received - self._written_back >= WRITEBACK_STEP:
                with contextlib.suppress(OSError, ValueError):
                    start_writeback(
                        self._stream.fileno(),
                        self._written_back,
                        self.received - self._written_back,
                    )
                self._written_back = self.received

    def close(self) -> None:
        """Closed: renamed into queue/ (counted there) or about to be deleted."""
        self._closed = True
        self._count(-self._counted)
        try:
            self._stream.close()
        except OSError as exc:
            if self.error is None:
                self.error = exc

    def _failed(self, exc: OSError) -> None:
        self.error = exc
        self._count(-self._counted)
        logger.warning("C-STORE data set not written (%s): it will be refused with 0xA700", exc)
        with contextlib.suppress(OSError):  # the buffered rest fails again; the fd still closes
            self._stream.close()
        with contextlib.suppress(OSError):
            os.truncate(self.name, 0)


class CStoreSpool:
    """This run's spool directory for pynetdicom's C-STORE files, and their cleanup."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        on_bytes: Callable[[int], None] | None = None,
        writeback: bool = False,
    ) -> None:
        self._on_bytes = on_bytes  # told the bytes of data sets being written (the spool's cap)
        self._writeback = writeback  # files are fsynced when complete: write back as they come
        self.root = root or Path(tempfile.gettempdir()) / ROOT_NAME
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        swept = sweep(self.root)
        if swept:
            logger.info("removed %d partial C-STORE files left by an earlier run", swept)
        run_id = f"run-{os.getpid()}-{secrets.token_hex(4)}"
        # locked under a temporary name, then renamed: a sweep never sees it unlocked
        pending = self.root / f".{run_id}.lock"
        self._lock_fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._lock_path = self.root / f"{run_id}.lock"
        pending.rename(self._lock_path)
        self.dir = self.root / run_id
        self.dir.mkdir(mode=0o700)
        self._lock = threading.Lock()
        self._open: dict[threading.Thread, list[ReceivingFile]] = {}  # DUL thread -> its files
        self._installed = False

    def install(self) -> bool:
        """Make pynetdicom spool C-STORE data sets here; False if the hook is unavailable."""
        self._installed = hooks.install_spool_factory(self._create)
        return self._installed

    def _create(self, *args: Any, **kwargs: Any) -> ReceivingFile:
        """pynetdicom's DUL thread opens a data set's file: here, and remembered per thread.

        It takes NamedTemporaryFile's arguments (pynetdicom's call: delete=False, mode="wb")
        and makes the file as NamedTemporaryFile does (mkstemp: a new name, mode 0600), but
        writes it unbuffered, without NamedTemporaryFile's wrapper: measured, the wrapper's
        attribute look-ups and its buffered writer's copies were ~12 % of the GIL time of an
        association receiving 512 KB instances (py-spy, P1)."""
        fd, name = tempfile.mkstemp(suffix=FILE_SUFFIX, prefix=FILE_PREFIX, dir=self.dir)
        try:
            raw = open(fd, "wb", buffering=0)  # noqa: SIM115 - ReceivingFile closes it
        except BaseException:
            os.close(fd)
            raise
        stream = ReceivingFile(raw, self._on_bytes, writeback=self._writeback, name=name)
        thread = threading.current_thread()
        with self._lock:
            ended = [t for t in self._open if t is not thread and not t.is_alive()]
            leftovers = [f for t in ended for f in self._open.pop(t)]
            files = [f for f in self._open.get(thread, []) if not f.closed]  # handled: closed
            files.append(stream)
            self._open[thread] = files
        discard(leftovers)  # associations that ended without telling us
        return stream

    def open_file(self, **kwargs: Any) -> ReceivingFile:
        """A data set's file for the adapter's own storage SCP (dimse/store_scp.py), owned
        and cleaned up like pynetdicom's (per receiving thread)."""
        return self._create(**kwargs)

    def unwritten(self, path: Path) -> ReceivingFile | None:
        """This data set's file if writing it failed (its `error`), None if it is whole."""
        name = str(path)
        with self._lock:
            for files in self._open.values():
                for stream in files:
                    if stream.name == name:
                        return stream if stream.error is not None else None
        return None

    def take_files(self, dul_thread: Any) -> list[ReceivingFile]:
        """The files an association's DUL thread opened that are still open (then forgotten)."""
        with self._lock:
            files = self._open.pop(dul_thread, [])
        return [f for f in files if not f.closed]

    def close(self) -> None:
        """Restore pynetdicom, remove every file and this run's directory and lock."""
        if self._installed:
            hooks.restore_spool_factory(self._create)
            self._installed = False
        with self._lock:
            files = [f for group in self._open.values() for f in group]
            self._open.clear()
        discard(files)
        _remove_run(self.dir)
        self._lock_path.unlink(missing_ok=True)
        os.close(self._lock_fd)


def discard(files: Sequence[ReceivingFile | IO[bytes]]) -> int:
    """Close each file and delete it from disk; returns how many were still on disk."""
    removed = 0
    for stream in files:
        path = Path(str(stream.name))
        with contextlib.suppress(OSError):
            stream.close()
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
