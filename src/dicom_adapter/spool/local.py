"""A spool directory an operator can read: incoming/, queue/, failed/ (+ reason files).

- incoming/: pynetdicom's per-run directories of data sets being received (importer/
  cstore_spool.py sweeps what dead runs left there: those transfers were never answered).
- queue/: complete instances, fsynced (file and directory) before anything else happens to
  them; `<arrival ns>-<n>-<SOP Instance UID>.dcm`, so a name sorts by arrival.
- failed/: instances that exhausted their upload retries, each with `<name>.json` giving the
  last HTTP status, a body excerpt, the attempts and timestamps.
Only renames move an instance between areas (one filesystem): there is never a second copy.
One dicom-import process owns a spool (flock on `DIR/.owner.lock`): two would upload and move
the same files.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import shutil
import time
from pathlib import Path, PurePath
from typing import Any

from dicom_adapter.errors import ConfigError
from dicom_adapter.spool.base import SUFFIX, name_arrival_ns, queue_name

INCOMING = "incoming"
QUEUE = "queue"
FAILED = "failed"
__all__ = ["FAILED", "INCOMING", "QUEUE", "SUFFIX", "LocalSpool", "arrival_ns", "fsync_dir"]


def fsync_dir(directory: Path) -> None:
    """Make the directory entries (a new or renamed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make a file's data durable (it may still be open for writing elsewhere)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def arrival_ns(path: PurePath) -> int | None:
    """The arrival time encoded in a queue name, None for a name that is not ours."""
    return name_arrival_ns(path.name)


class LocalSpool:
    """The three areas of a local spool directory and the moves between them."""

    rescan_seconds = 1.0  # queue/ is checked this often for items `dicom-spool requeue` put there

    def __init__(self, root: Path, *, headroom_bytes: int) -> None:
        self.root = root
        self.incoming = root / INCOMING
        self.queue = root / QUEUE
        self.failed = root / FAILED
        self.headroom_bytes = headroom_bytes
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = os.open(root / ".owner.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise ConfigError(
                "persistent_file_storage_location",
                f"{root} is in use by another dicom-import process",
            ) from None
        for area in (self.incoming, self.queue, self.failed):
            area.mkdir(mode=0o700, exist_ok=True)
        fsync_dir(root)
        self._serial = itertools.count()

    def close(self) -> None:
        """Give up ownership (what is queued stays for the next owner)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the spool's volume."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def has_room(self) -> bool:
        """False when the volume is below the headroom: new instances are refused."""
        return self.free_bytes() >= self.headroom_bytes

    def commit(self, path: Path, sop_instance_uid: str) -> Path:
        """fsync a received file, rename it into queue/ and fsync queue/; returns its new path."""
        fsync_file(path)
        target = self.queue / queue_name(time.time_ns(), next(self._serial), sop_instance_uid)
        name = target.stem
        try:
            os.rename(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # received outside the spool's volume (no spool_files hook): one copy, fsynced
            partial = self.queue / f".{name}.partial"
            shutil.copyfile(path, partial)
            fsync_file(partial)
            os.rename(partial, target)
        fsync_dir(self.queue)
        return target

    def queued(self) -> list[Path]:
        """The queue in arrival order."""
        return sorted(self.queue.glob("*" + SUFFIX), key=lambda p: (arrival_ns(p) or 0, p.name))

    def depth(self) -> int:
        """How many instances wait in queue/."""
        return sum(1 for name in os.listdir(self.queue) if name.endswith(SUFFIX))

    def oldest_age(self) -> float:
        """Seconds since the oldest queued instance arrived (0 when the queue is empty)."""
        times = [arrival_ns(self.queue / n) for n in os.listdir(self.queue) if n.endswith(SUFFIX)]
        known = [t for t in times if t is not None]
        return max(0.0, (time.time_ns() - min(known)) / 1e9) if known else 0.0

    def materialize(self, item: PurePath) -> Path:
        """The queued file itself (no copy)."""
        return Path(item)

    def release(self, item: PurePath, local: Path) -> None:
        """Nothing to clean up: materialize() made no copy."""

    def delivered(self, item: PurePath) -> None:
        """The upstream stored it: remove it (a replay after a crash finds it upstream)."""
        Path(item).unlink(missing_ok=True)

    def fail(self, item: PurePath, reason: dict[str, Any]) -> Path:
        """Move an instance to failed/ with `<name>.json` beside it; returns its new path."""
        path = Path(item)
        target = self.failed / path.name
        os.rename(path, target)
        note = target.with_name(target.name + ".json")
        partial = note.with_name("." + note.name + ".tmp")
        with partial.open("w", encoding="utf-8") as stream:
            json.dump(reason, stream, indent=2, sort_keys=True)
            stream.flush()
            os.fsync(stream.fileno())
        os.rename(partial, note)
        fsync_dir(self.failed)
        return target
