"""`dicom-spool status|requeue|purge`: the operator's view of a local spool directory.

Safe while dicom-import runs: it never takes `.owner.lock`; it only renames within the spool
(atomic on one filesystem) and unlinks failed items, which the uploader no longer touches.
A requeued item gets a new queue name; the running uploader adopts it on its next rescan.
A gs://bucket/prefix location is handled by spool/gcs_command.py (plus `adopt`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, BinaryIO, NoReturn

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from dicom_adapter.spool.local import (
    DEST_AREA,
    FAILED,
    INCOMING,
    QUEUE,
    SUFFIX,
    arrival_ns,
    fsync_dir,
    tree_bytes,
)

PROG = "dicom-spool"
SHOWN_FAILED = 5
_STUDY_UID_TAG = 0x0020000D


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line on stderr and exit 2 (not argparse's usage block)."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: {message} (see {PROG} --help)", file=sys.stderr)
        raise SystemExit(2)


@dataclass(frozen=True)
class FailedItem:
    """An instance in failed/ and its reason file (empty when missing or unreadable)."""

    path: Path
    reason: dict[str, Any]

    @property
    def note(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    @property
    def sop_instance_uid(self) -> str:
        return self.path.stem.split("-", 2)[-1]

    def study_uid(self) -> str | None:
        """From the reason file when the uploader recorded it, else from the file's header."""
        recorded = self.reason.get("study_instance_uid")
        if isinstance(recorded, str) and recorded:
            return recorded
        return read_study_uid(self.path)


def read_study_uid(path: Path) -> str | None:
    """Study Instance UID of a file, reading no further than (0020,000D)."""
    try:
        with path.open("rb") as stream:
            return study_uid_in(stream)
    except OSError:
        return None


def study_uid_in(stream: BinaryIO) -> str | None:
    """Study Instance UID of a Part-10 stream (a file or an object's first bytes)."""

    def past_study(tag: BaseTag, vr: str | None, length: int) -> bool:
        return int(tag) > _STUDY_UID_TAG

    try:
        ds = read_partial(stream, stop_when=past_study, specific_tags=[_STUDY_UID_TAG])
    except (OSError, InvalidDicomError, ValueError, EOFError):
        return None
    value = ds.get("StudyInstanceUID")
    return str(value) if value else None


def _load_reason(note: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(note.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _by_arrival(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: (arrival_ns(p) or 0, p.name))


def failed_items(root: Path) -> list[FailedItem]:
    """failed/ in arrival order."""
    found = _by_arrival(list((root / FAILED).glob("*" + SUFFIX)))
    return [FailedItem(p, _load_reason(p.with_name(p.name + ".json"))) for p in found]


def _age(path: PurePath, now_ns: int) -> str:
    ns = arrival_ns(path)
    if ns is None:
        return "?"
    seconds = max(0, (now_ns - ns) // 1_000_000_000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _one_line(text: object, limit: int = 120) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def status(root: Path) -> int:
    """Counts, oldest ages and the oldest failed items with their reason."""
    now = time.time_ns()
    queued = _by_arrival(list((root / QUEUE).glob("*" + SUFFIX)))
    failed = failed_items(root)
    oldest_q = f", oldest {_age(queued[0], now)}" if queued else ""
    oldest_f = f", oldest {_age(failed[0].path, now)}" if failed else ""
    print(f"spool: {root}")
    print(f"queue: {len(queued)} instances{oldest_q}")
    print(f"failed: {len(failed)} instances{oldest_f}")
    print(f"incoming: {tree_bytes(root / INCOMING)} bytes")
    dest_area = root / DEST_AREA
    routed = sorted(d for d in dest_area.iterdir() if d.is_dir()) if dest_area.is_dir() else []
    for directory in routed:  # routed destinations' queues
        depth = sum(1 for _ in (directory / QUEUE).glob("*" + SUFFIX))
        stuck = sum(1 for _ in (directory / FAILED).glob("*" + SUFFIX))
        print(
            f"destination {directory.name} ({_destination_text(directory)}): "
            f"queue {depth}, failed {stuck} (dicom-spool ... "
            f"--persistent_file_storage_location={directory})"
        )
    for item in failed[:SHOWN_FAILED]:
        print_failed(item.path, item.reason, now)
    return 0


def _destination_text(directory: Path) -> str:
    """What destination.json names: the STOW-RS URL or AET@host:port."""
    try:
        data = json.loads((directory / "destination.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unknown"
    if isinstance(data, dict) and "dicomweb_destination" in data:
        return str(data["dicomweb_destination"])
    if isinstance(data, dict):
        return f"{data.get('name')}@{data.get('host')}:{data.get('port')}"
    return "unknown"


def print_failed(path: PurePath, why: dict[str, Any], now_ns: int) -> None:
    """One line per failed item: its age and the reason the uploader recorded."""
    print(
        f"failed {path.name} ({_age(path, now_ns)} old): "
        f"HTTP {why.get('http_status', '?')} -> {why.get('dimse_status', '?')} "
        f"after {why.get('attempts', '?')} attempts, at {why.get('failed_at', '?')}: "
        f"{_one_line(why.get('body_excerpt', 'no reason file'))}"
    )


def _selected(root: Path, study_uid: str | None) -> list[FailedItem]:
    items = failed_items(root)
    if study_uid is None:
        return items
    return [item for item in items if item.study_uid() == study_uid]


_serial = itertools.count()


def requeue(root: Path, study_uid: str | None) -> int:
    """Move failed items back into queue/ under a new arrival name; drop their reason files."""
    queue, failed = root / QUEUE, root / FAILED
    moved = 0
    for item in _selected(root, study_uid):
        target = queue / f"{time.time_ns()}-{next(_serial)}-{item.sop_instance_uid}{SUFFIX}"
        try:
            os.rename(item.path, target)
        except FileNotFoundError:
            continue  # purged or requeued by someone else meanwhile
        fsync_dir(queue)
        item.note.unlink(missing_ok=True)
        moved += 1
    if moved:
        fsync_dir(failed)
    print(f"requeued {moved} instances")
    return 0


def purge_failed(root: Path, study_uid: str | None, *, yes: bool) -> int:
    """Delete failed items (and their reason files); without --yes, only list them."""
    items = _selected(root, study_uid)
    if not yes:
        for item in items:
            print(f"would delete {item.path}")
        print(f"{len(items)} failed instances would be deleted; repeat with --yes to delete")
        return 1
    for item in items:
        item.path.unlink(missing_ok=True)
        item.note.unlink(missing_ok=True)
    if study_uid is None:  # reason files whose instance is gone (a crash between two steps)
        for note in (root / FAILED).glob("*" + SUFFIX + ".json"):
            if not note.with_name(note.name.removesuffix(".json")).exists():
                note.unlink(missing_ok=True)
    fsync_dir(root / FAILED)
    print(f"deleted {len(items)} failed instances")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="Inspect and repair a dicom-import spool (directory or gs://)."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, text in (
        ("status", "counts, oldest ages and the oldest failed items with their reason"),
        ("requeue", "move failed instances back into the upload queue"),
        ("purge", "delete failed instances"),
        ("adopt", "gs:// only: move a gone replica's queued and failed items to this replica"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--persistent_file_storage_location", required=True, metavar="DIR|gs://BUCKET/PREFIX"
        )
        sub.add_argument(
            "--replica",
            metavar="NAME",
            help="gs:// only: this replica's prefix (default: env HOSTNAME, the pod name)",
        )
        sub.add_argument(
            "--gcs_backup_project_id", default="", metavar="PROJECT", help="gs:// only"
        )
        if name == "adopt":
            sub.add_argument("--from_replica", required=True, metavar="NAME")
        if name in ("requeue", "purge"):
            sub.add_argument("--study_uid", metavar="UID", help="only this study's instances")
        if name == "purge":
            sub.add_argument("--failed", action="store_true", required=True)
            sub.add_argument("--yes", action="store_true", help="really delete")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dicom-spool`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.persistent_file_storage_location.startswith("gs://"):
        from dicom_adapter.spool.gcs_command import run_gcs

        return run_gcs(args)
    if args.command == "adopt" or args.replica:
        print(
            f"{PROG}: {args.command} --replica/--from_replica need a gs:// location",
            file=sys.stderr,
        )
        return 2
    root = Path(args.persistent_file_storage_location)
    if not (root / QUEUE).is_dir() or not (root / FAILED).is_dir():
        print(f"{PROG}: {root} is not a spool directory (no queue/ and failed/)", file=sys.stderr)
        return 2
    study = getattr(args, "study_uid", None)
    if args.command == "status":
        return status(root)
    if args.command == "requeue":
        return requeue(root, study)
    return purge_failed(root, study, yes=args.yes)


def entry() -> None:
    """Console script: exit with main()'s code."""
    raise SystemExit(main())


if __name__ == "__main__":
    entry()
