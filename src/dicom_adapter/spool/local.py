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

Backpressure: a C-STORE is admitted only while the volume keeps its free-space headroom and,
with a byte cap, while the spool's bytes stay under it: queue/ + failed/, a counter kept by
commit/delivered/fail (no directory walk per C-STORE), measured by one walk at start and
walked again at most every RECOUNT_SECONDS while over the cap (an operator's `dicom-spool
purge` is seen that way); plus incoming/, counted as the data sets are written
(`add_incoming`, from importer/cstore_spool.py).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import heapq
import itertools
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any, cast

from dicom_adapter.errors import ConfigError
from dicom_adapter.spool.base import SUFFIX, name_arrival_ns, queue_name

INCOMING = "incoming"
QUEUE = "queue"
FAILED = "failed"
DEST_AREA = "dest"  # importer/destinations.py: one spool directory per routed destination
RECOUNT_SECONDS = 2.0  # at most one walk of the spool this often, and only while over the cap
SCAN_FRESH_SECONDS = 60.0  # depth()/oldest_age() answer from the last queued() this long
__all__ = [
    "DEST_AREA",
    "FAILED",
    "INCOMING",
    "QUEUE",
    "SUFFIX",
    "LocalSpool",
    "arrival_ns",
    "fsync_dir",
    "start_writeback",
]


def fsync_dir(directory: Path) -> None:
    """Make the directory entries (a new or renamed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _libc_sync_file_range() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[..., int], function)


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of the file to disk now, without waiting (Linux sync_file_range;
    elsewhere nothing). The fsync that makes the file durable later then waits only for
    what is left: measured on this VM's ext4, a 512 KB file written in two halves, each
    written back at once, fsyncs in 0.12-0.16 ms instead of 0.40-0.55 ms. Python's os
    module has no sync_file_range, hence ctypes (the call releases the GIL)."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # advisory: errors ignored


def fsync_file(path: Path) -> None:
    """Make a file's data durable (it may still be open for writing elsewhere)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_through(partial: Path, target: Path, write: Callable[[Path], object]) -> None:
    """`write` the partial file, fsync it, rename it to `target`; no partial stays behind."""
    try:
        write(partial)
        fsync_file(partial)
        os.rename(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _sweep_partials(area: Path) -> None:
    """Remove what a failed copy or a kill -9 left half-written (`.X.partial`, `.X.tmp`)."""
    for entry in os.scandir(area):
        if entry.name.startswith(".") and entry.name.endswith((".partial", ".tmp")):
            Path(entry.path).unlink(missing_ok=True)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def tree_bytes(directory: Path) -> int:
    """Bytes of the regular files under `directory` (files vanishing meanwhile count 0)."""
    total = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += tree_bytes(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
    return total


def _inode_bytes(directories: list[Path], seen: set[tuple[int, int]]) -> int:
    """Bytes of the regular files directly in `directories`, each inode (hard link) once."""
    total = 0
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total


def arrival_ns(path: PurePath) -> int | None:
    """The arrival time encoded in a queue name, None for a name that is not ours."""
    return name_arrival_ns(path.name)


class LocalSpool:
    """The three areas of a local spool directory and the moves between them."""

    rescan_seconds = 1.0  # queue/ is checked this often for items `dicom-spool requeue` put there
    files_in_place = True  # materialize() returns the queued file, release() does nothing

    def __init__(
        self,
        root: Path,
        *,
        headroom_bytes: int,
        max_bytes: int = 0,
        counter: LocalSpool | None = None,
    ) -> None:
        """`counter`: the spool whose byte counter (and cap) this one's files count in (a
        routed destination's spool counts in the root spool: one instance, one count)."""
        self.root = root
        self._counter = counter if counter is not None else self
        self._links_lock = threading.Lock()  # stat + unlink of a possibly shared inode
        self.incoming = root / INCOMING
        self.queue = root / QUEUE
        self.failed = root / FAILED
        self.headroom_bytes = headroom_bytes
        self.max_bytes = max(0, max_bytes)  # 0: no cap
        self._bytes_lock = threading.Lock()
        self._bytes = 0  # queue/ + failed/
        self._incoming = 0  # data sets being received
        self._counted_at = 0.0
        self._walking = False
        self._wanted = 0  # bytes of the last refused instance: not ready until they would fit
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
        for area in (self.queue, self.failed):
            _sweep_partials(area)
        fsync_dir(root)
        self._serial = itertools.count()
        # what the last queued() listed, kept current by this process's own moves
        self._scan_lock = threading.Lock()
        self._scan_serial = threading.Lock()  # one listing of queue/ at a time
        self._scan_moves: dict[str, bool] | None = None  # during a listing: name -> entered
        self._scanned_at = -SCAN_FRESH_SECONDS
        self._depth = 0
        self._arrivals: list[int] = []  # min-heap of queued arrival ns
        self._gone: dict[int, int] = {}  # arrival ns left queue/ but still in the heap: count
        if self.max_bytes:  # only the cap needs the count
            self.recount()

    def close(self) -> None:
        """Give up ownership (what is queued stays for the next owner)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the spool's volume."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    @property
    def used_bytes(self) -> int:
        """The spool's bytes as counted: queue/ + failed/, and incoming/ being written."""
        return self._bytes + self._incoming

    def add_incoming(self, delta: int) -> None:
        """Bytes written to (or dropped from) incoming/ by a data set being received."""
        with self._bytes_lock:
            self._incoming = max(0, self._incoming + delta)

    def recount(self) -> int:
        """Walk queue/, failed/ and each dest/*/{queue,failed}/ and reset their byte counter
        to what is on disk, a file linked into several queues once; returns it.

        Moves during the walk may be counted twice or missed: the next walk corrects them.
        """
        areas = [self.queue, self.failed]
        try:
            for entry in sorted(os.scandir(self.root / DEST_AREA), key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=False):
                    areas += [Path(entry.path) / QUEUE, Path(entry.path) / FAILED]
        except FileNotFoundError:
            pass
        total = _inode_bytes(areas, set())
        with self._bytes_lock:
            self._bytes = total
            self._counted_at = time.monotonic()
        return total

    def add_bytes(self, delta: int) -> None:
        """Bytes added to (or removed from) queue/ + failed/, counted where they count."""
        if self._counter is not self:
            self._counter.add_bytes(delta)
            return
        with self._bytes_lock:
            self._bytes = max(0, self._bytes + delta)

    def _over_cap(self, extra: int, *, walk_here: bool) -> bool:
        """True when `extra` more bytes would pass the cap; walks again when due.

        `walk_here`: walk before answering (a pynetdicom thread); else in a thread of its
        own (/readyz runs on the event loop: a walk of a long queue must not block it).
        """
        if not self.max_bytes or self._bytes + extra <= self.max_bytes:
            return False
        with self._bytes_lock:
            due = not self._walking and time.monotonic() - self._counted_at >= RECOUNT_SECONDS
            self._walking = self._walking or due
        if due and walk_here:
            self._walk()
        elif due:
            threading.Thread(target=self._walk, name="spool-recount", daemon=True).start()
        return self._bytes + extra > self.max_bytes

    def _walk(self) -> None:
        try:
            self.recount()
        finally:
            self._walking = False

    def refusal(self, size: int) -> str | None:
        """Why a received instance of `size` bytes may not be queued now, None when it may.

        Called per C-STORE: one statvfs and the byte counter. A refusal keeps /readyz
        not-ready (`has_room`) until an instance of that size would be admitted.
        """
        free = self.free_bytes()
        if free < self.headroom_bytes:
            reason = f"spool volume below its headroom ({free} bytes free)"
        # incoming/ holds this data set too when it is counted there (spool_files hook)
        elif self._over_cap(max(self._incoming, size), walk_here=True):
            reason = f"spool at its byte cap ({self.used_bytes} of {self.max_bytes} bytes used)"
        else:
            self._wanted = 0
            return None
        self.refused(size)
        return reason

    def refused(self, size: int) -> None:
        """An instance of `size` bytes was refused for want of space (also: ENOSPC writing it)."""
        self._wanted = max(1, size)

    def has_room(self) -> bool:
        """/readyz: False until the last instance refused for want of space would be admitted.

        That is: the headroom is free beside it, and it fits under the byte cap.
        """
        if self.free_bytes() < self.headroom_bytes + self._wanted:
            return False
        return not self._over_cap(self._wanted, walk_here=False)

    def commit(self, path: Path, sop_instance_uid: str) -> Path:
        """fsync a received file, rename it into queue/ and fsync queue/; returns its new path."""
        fsync_file(path)
        size = _file_size(path)
        target = self.queue / queue_name(time.time_ns(), next(self._serial), sop_instance_uid)
        name = target.stem
        try:
            os.rename(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # received outside the spool's volume (no spool_files hook): one copy, fsynced
            partial = self.queue / f".{name}.partial"
            write_through(partial, target, lambda to: shutil.copyfile(path, to))
        fsync_dir(self.queue)
        self.add_bytes(size)
        self.note_queued(target)
        return target

    def note_queued(self, path: Path) -> None:
        """An instance entered queue/ (kept in what depth() and oldest_age() say)."""
        arrival = arrival_ns(path)
        with self._scan_lock:
            if self._scan_moves is not None:
                self._scan_moves[path.name] = True
            self._depth += 1
            if arrival is not None:
                heapq.heappush(self._arrivals, arrival)

    def _note_left(self, path: Path) -> None:
        arrival = arrival_ns(path)
        with self._scan_lock:
            if self._scan_moves is not None:
                self._scan_moves[path.name] = False
            self._depth = max(0, self._depth - 1)
            if arrival is not None:
                self._gone[arrival] = self._gone.get(arrival, 0) + 1

    def _fresh(self) -> bool:
        return time.monotonic() - self._scanned_at < SCAN_FRESH_SECONDS

    def queued(self) -> list[Path]:
        """The queue in arrival order; also refreshes what depth() and oldest_age() say.

        Instances that enter or leave queue/ while the directory is listed (uploads finish
        on other threads) may or may not be in the listing: their moves, recorded meanwhile,
        decide (a delivered one counted by the listing left the gauge too high for good)."""
        with self._scan_serial:
            with self._scan_lock:
                self._scan_moves = {}
            try:
                listed = list(self.queue.glob("*" + SUFFIX))
            except BaseException:
                with self._scan_lock:
                    self._scan_moves = None
                raise
            with self._scan_lock:
                moves, self._scan_moves = self._scan_moves or {}, None
                names = {p.name for p in listed}
                listed = [p for p in listed if moves.get(p.name, True)]
                listed += [
                    self.queue / name
                    for name, entered in moves.items()
                    if entered and name not in names
                ]
                found = [(arrival_ns(p), p) for p in listed]
                found.sort(key=lambda pair: (pair[0] or 0, pair[1].name))
                self._depth = len(found)
                self._arrivals = [a for a, _ in found if a is not None]  # sorted: a heap
                self._gone = {}
                self._scanned_at = time.monotonic()
        return [p for _, p in found]

    def depth(self) -> int:
        """How many instances wait in queue/: from memory while the uploader's periodic
        queued() keeps it fresh (/metrics calls it on the event loop), else one listing."""
        if self._fresh():
            return self._depth
        return sum(1 for name in os.listdir(self.queue) if name.endswith(SUFFIX))

    def oldest_age(self) -> float:
        """Seconds since the oldest queued instance arrived (0 when the queue is empty);
        from memory like depth()."""
        oldest: int | None = None
        if self._fresh():
            with self._scan_lock:
                while self._arrivals and self._gone.get(self._arrivals[0], 0):
                    left = heapq.heappop(self._arrivals)
                    self._gone[left] -= 1
                    if not self._gone[left]:
                        del self._gone[left]
                oldest = self._arrivals[0] if self._arrivals else None
        else:
            names = [n for n in os.listdir(self.queue) if n.endswith(SUFFIX)]
            oldest = min(filter(None, (arrival_ns(Path(n)) for n in names)), default=None)
        return 0.0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)

    def materialize(self, item: PurePath) -> Path:
        """The queued file itself (no copy)."""
        return Path(item)

    def release(self, item: PurePath, local: Path) -> None:
        """Nothing to clean up: materialize() made no copy."""

    def delivered(self, item: PurePath) -> None:
        """The upstream stored it: remove it (a replay after a crash finds it upstream)."""
        path = Path(item)
        with self._counter._links_lock:  # the last of several links frees the bytes, once
            try:
                stat = path.stat()
                path.unlink()
            except FileNotFoundError:
                return
        self._note_left(path)
        if stat.st_nlink <= 1:
            self.add_bytes(-stat.st_size)

    def fail(self, item: PurePath, reason: dict[str, Any]) -> Path:
        """Move an instance to failed/ with `<name>.json` beside it; returns its new path."""
        path = Path(item)
        target = self.failed / path.name
        os.rename(path, target)
        self._note_left(path)
        note = target.with_name(target.name + ".json")
        partial = note.with_name("." + note.name + ".tmp")
        text = json.dumps(reason, indent=2, sort_keys=True)
        write_through(partial, note, lambda to: to.write_text(text, encoding="utf-8"))
        fsync_dir(self.failed)
        self.add_bytes(_file_size(note))
        return target
