"""`dicom-spool` on a gs://bucket/prefix spool: status, requeue, purge, adopt.

Safe while dicom-import runs: failed/ items are no longer touched by the uploader; a requeued
or adopted item appears in the replica's queue/ under a name the running uploader has never
seen, so its next rescan takes it. Cloud Storage has no rename: a move is a copy, then a
delete of the source (a crash between them leaves a duplicate, uploaded once more at worst).
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from dicom_adapter.errors import ConfigError
from dicom_adapter.spool.base import SUFFIX, name_arrival_ns, name_sop_instance_uid, queue_name
from dicom_adapter.spool.command import PROG, SHOWN_FAILED, _age, print_failed, study_uid_in
from dicom_adapter.spool.gcs import (
    FAILED,
    NOTE_SUFFIX,
    QUEUE,
    GcsLocation,
    Storage,
    check_replica,
    replica_name,
)

HEADER_BYTES = 64 * 1024  # enough for the Study Instance UID of any sane file
_serial = itertools.count()


@dataclass(frozen=True)
class Area:
    """One replica's spool on Cloud Storage."""

    storage: Storage
    replica: str

    @property
    def location(self) -> GcsLocation:
        return self.storage.location

    def prefix(self, area: str) -> str:
        return self.location.area(self.replica, area)

    def items(self, area: str) -> list[str]:
        """Instance objects (not reason files) of an area, in arrival order."""
        names = [n for n in self.storage.names(self.prefix(area)) if n.endswith(SUFFIX)]
        return sorted(names, key=lambda n: (name_arrival_ns(_base(n)) or 0, n))


def _base(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _study_uid(area: Area, name: str, reason: dict[str, Any]) -> str | None:
    """From the reason file when recorded, else from the object's first bytes."""
    recorded = reason.get("study_instance_uid")
    if isinstance(recorded, str) and recorded:
        return recorded
    try:
        head = area.storage.head(name, HEADER_BYTES)
    except OSError:
        return None
    return study_uid_in(io.BytesIO(head))


def status(area: Area) -> int:
    """Counts, oldest ages, the oldest failed items, and other replicas that hold items."""
    now = time.time_ns()
    queued, failed = area.items(QUEUE), area.items(FAILED)
    oldest_q = f", oldest {_age(PurePosixPath(queued[0]), now)}" if queued else ""
    oldest_f = f", oldest {_age(PurePosixPath(failed[0]), now)}" if failed else ""
    print(f"spool: {area.location.url(area.location.replica_root(area.replica))}")
    print(f"queue: {len(queued)} instances{oldest_q}")
    print(f"failed: {len(failed)} instances{oldest_f}")
    for name in failed[:SHOWN_FAILED]:
        print_failed(PurePosixPath(name), area.storage.read_json(name + NOTE_SUFFIX), now)
    prefix = area.location.prefix
    root = f"{prefix}/" if prefix else ""
    for other in area.storage.subfolders(root):
        if other == area.replica:
            continue
        peer = Area(area.storage, other)
        q, f = len(peer.items(QUEUE)), len(peer.items(FAILED))
        if q or f:
            print(f"replica {other}: queue {q}, failed {f} (adopt it if that replica is gone)")
    return 0


def _selected(area: Area, study_uid: str | None) -> list[tuple[str, dict[str, Any]]]:
    chosen = []
    for name in area.items(FAILED):
        reason = area.storage.read_json(name + NOTE_SUFFIX)
        if study_uid is None or _study_uid(area, name, reason) == study_uid:
            chosen.append((name, reason))
    return chosen


def requeue(area: Area, study_uid: str | None) -> int:
    """Move failed items back into queue/ under a new arrival name; drop their reason files."""
    moved = 0
    for name, _reason in _selected(area, study_uid):
        uid = name_sop_instance_uid(_base(name))
        target = area.prefix(QUEUE) + queue_name(time.time_ns(), next(_serial), uid)
        try:
            area.storage.move(name, target)
        except FileNotFoundError:
            continue  # purged or requeued by someone else meanwhile
        area.storage.delete(name + NOTE_SUFFIX)
        moved += 1
    print(f"requeued {moved} instances")
    return 0


def purge_failed(area: Area, study_uid: str | None, *, yes: bool) -> int:
    """Delete failed items and their reason files; without --yes, only list them."""
    items = _selected(area, study_uid)
    if not yes:
        for name, _reason in items:
            print(f"would delete {area.location.url(name)}")
        print(f"{len(items)} failed instances would be deleted; repeat with --yes to delete")
        return 1
    for name, _reason in items:
        area.storage.delete(name)
        area.storage.delete(name + NOTE_SUFFIX)
    print(f"deleted {len(items)} failed instances")
    return 0


def adopt(area: Area, gone: str) -> int:
    """Move every object of a gone replica's queue/ and failed/ to the same area here."""
    if gone == area.replica:
        print(f"{PROG}: --from_replica is this replica ({gone})", file=sys.stderr)
        return 2
    source = Area(area.storage, gone)
    counts = {}
    for kind in (QUEUE, FAILED):
        names = area.storage.names(source.prefix(kind))
        for name in names:
            try:
                area.storage.move(name, area.prefix(kind) + _base(name))
            except FileNotFoundError:
                continue  # moved by someone else meanwhile
        counts[kind] = sum(1 for name in names if name.endswith(SUFFIX))
    print(
        f"adopted {counts[QUEUE]} queued and {counts[FAILED]} failed instances "
        f"of replica {gone} into {area.location.url(area.location.replica_root(area.replica))}"
    )
    return 0


def run_gcs(args: argparse.Namespace) -> int:
    """`dicom-spool` for a gs:// location; returns the exit code."""
    try:
        location = GcsLocation.parse(args.persistent_file_storage_location)
        replica = args.replica or replica_name()
        check_replica(replica)
        if args.command == "adopt":
            check_replica(args.from_replica)
        storage = Storage(location, args.gcs_backup_project_id)
    except (ValueError, ConfigError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    area = Area(storage, replica)
    study = getattr(args, "study_uid", None)
    try:
        if args.command == "status":
            return status(area)
        if args.command == "requeue":
            return requeue(area, study)
        if args.command == "adopt":
            return adopt(area, args.from_replica)
        return purge_failed(area, study, yes=args.yes)
    except OSError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
