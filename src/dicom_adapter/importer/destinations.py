"""Routed delivery: which store an instance goes to, and one spool queue per destination.

Without a spool, single mode picks the destination's StoreService (one pooled client per
host). With a spool, an instance is hard-linked into the queue of every destination it goes
to: `queue/` for --dicomweb_address, `dest/<id>/queue/` for a configured destination (each a
LocalSpool with its own failed/, `destination.json` beside it; `dicom-spool` works on either
directory). Each queue has its own uploader, so each destination is retried on its own; the
inode is freed when the last destination's link goes. No copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import Any

from dicom_adapter.dicom.attributes import InstanceIdentity, read_filter_attributes
from dicom_adapter.dicom.part10 import DatasetFile, read_path_meta
from dicom_adapter.dicom.syntaxes import IMPLICIT_VR_LE
from dicom_adapter.dimse.scu import (
    MAX_CONTEXTS,
    AssociationError,
    AssociationTarget,
    RequestedContext,
    ScuTimeouts,
)
from dicom_adapter.dimse.store_scu import AssociationLostError, StoreAssociation
from dicom_adapter.errors import InvalidDatasetError, lo_text
from dicom_adapter.importer.routing import Destination, RoutingTable
from dicom_adapter.spool.base import InstanceStore, Spool, StoreOutcome, queue_name
from dicom_adapter.spool.gcs import GcsSpool
from dicom_adapter.spool.local import (
    DEST_AREA,
    SUFFIX,
    LocalSpool,
    fsync_dir,
    fsync_file,
    write_through,
)
from dicom_adapter.spool.uploader import SpoolUploader
from dicom_adapter.status import Status, is_stored, is_warning_code

logger = logging.getLogger(__name__)

DESTINATION_FILE = "destination.json"
VERIFICATION = "1.2.840.10008.1.1"
_UNSAFE = re.compile(r"[^0-9A-Za-z.]")
_PERMANENT = frozenset({Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, Status.SOP_CLASS_NOT_SUPPORTED})


class DimseStore:
    """C-STORE to a DIMSE destination over one association kept open and reused.

    Every (SOP class, transfer syntax) seen gets its own presentation context; a new pair
    reopens the association proposing all of them (at most MAX_CONTEXTS). Data sets go out
    byte for byte (no transcoding: a peer that refuses the syntax fails the instance with
    0x0122). An unreachable peer or a lost association is 0xA700, retried by the uploader.
    """

    def __init__(self, target: AssociationTarget, timeouts: ScuTimeouts) -> None:
        self._target = target
        self._timeouts = timeouts
        self._wanted: dict[tuple[str, str], None] = {}
        self._assoc: StoreAssociation | None = None
        self._proposed: frozenset[tuple[str, str]] = frozenset()
        self._lock = asyncio.Lock()

    async def store(self, path: Path, identity: InstanceIdentity) -> int:
        """One C-STORE; its status."""
        return (await self.store_outcome(path, identity)).status

    async def store_batch(
        self, items: Sequence[tuple[Path, InstanceIdentity]], *, may_exist: bool = False
    ) -> list[StoreOutcome]:
        """C-STORE has no batches: one after the other on the kept association (so each
        outcome is the instance's own)."""
        return [
            replace(await self.store_outcome(path, identity), named=True)
            for path, identity in items
        ]

    async def store_answer(self, path: Path, identity: InstanceIdentity) -> StoreOutcome:
        """One C-STORE for a waiting sender: the failure's cause is its ErrorComment."""
        outcome = await self.store_outcome(path, identity)
        if is_stored(outcome.status):
            return outcome
        comment = lo_text(f"{self._target.called_aet}: {outcome.body_excerpt}")
        return replace(outcome, comment=comment)

    async def store_outcome(
        self, path: Path, identity: InstanceIdentity, *, may_exist: bool = False
    ) -> StoreOutcome:
        """One C-STORE; a failure status with the peer's answer in the excerpt."""
        try:
            meta = await asyncio.to_thread(read_path_meta, path)
        except ValueError as exc:
            raise InvalidDatasetError(str(exc)) from exc
        key = (meta.sop_class_uid, meta.transfer_syntax)
        async with self._lock:
            for fresh_try in (False, True):
                try:
                    assoc, fresh = await self._association_for(key, force=fresh_try)
                except AssociationError as exc:
                    return StoreOutcome(Status.OUT_OF_RESOURCES, 0, str(exc))
                context = assoc.context_for(*key)
                if context is None:
                    return StoreOutcome(
                        Status.SOP_CLASS_NOT_SUPPORTED,
                        0,
                        f"{self._target.called_aet} accepts no context for SOP class "
                        f"{key[0]} in transfer syntax {key[1]}",
                    )
                try:
                    response = await assoc.c_store(
                        context,
                        meta.sop_class_uid,
                        meta.sop_instance_uid,
                        DatasetFile(path, meta.dataset_offset),
                    )
                except AssociationLostError as exc:
                    self._assoc = None
                    if fresh:
                        return StoreOutcome(Status.OUT_OF_RESOURCES, 0, str(exc))
                    continue  # an idle association the peer closed: once more, afresh
                if is_stored(response.status):
                    if is_warning_code(response.status):
                        logger.warning(
                            "C-STORE to %s answered 0x%04X",
                            self._target.called_aet,
                            response.status,
                            extra={"sop_instance_uid": meta.sop_instance_uid},
                        )
                    return StoreOutcome(response.status)
                await self._drop()
                detail = f"C-STORE-RSP 0x{response.status:04X} {response.error_comment}".strip()
                status = response.status if response.status in _PERMANENT else 0
                return StoreOutcome(status or Status.OUT_OF_RESOURCES, 0, detail)
        return StoreOutcome(Status.OUT_OF_RESOURCES, 0, "association lost")  # pragma: no cover

    async def _association_for(
        self, key: tuple[str, str], *, force: bool
    ) -> tuple[StoreAssociation, bool]:
        self._wanted.pop(key, None)
        self._wanted[key] = None
        while len(self._wanted) > MAX_CONTEXTS - 1:
            del self._wanted[next(iter(self._wanted))]
        assoc = self._assoc
        if not force and assoc is not None and assoc.is_open and key in self._proposed:
            return assoc, False
        await self._drop()
        pairs = list(reversed(self._wanted))
        contexts = [RequestedContext(cls, (ts,)) for cls, ts in pairs]
        contexts.append(RequestedContext(VERIFICATION, (IMPLICIT_VR_LE,)))
        assoc = await StoreAssociation.open(self._target, contexts, timeouts=self._timeouts)
        self._assoc, self._proposed = assoc, frozenset(pairs)
        logger.info(
            "association opened to %s@%s:%d",
            self._target.called_aet,
            self._target.host,
            self._target.port,
        )
        return assoc, True

    async def _drop(self) -> None:
        assoc, self._assoc = self._assoc, None
        self._proposed = frozenset()
        if assoc is not None and assoc.is_open:
            await assoc.release()

    async def close(self) -> None:
        """Release the association."""
        async with self._lock:
            await self._drop()


class Router:
    """Chooses an instance's destinations from its attributes as received."""

    def __init__(self, table: RoutingTable) -> None:
        self.table = table

    def destinations(self, path: Path, calling_aet: str) -> list[Destination]:
        """The matching destinations; empty means --dicomweb_address (blocking: reads the file)."""
        attributes = read_filter_attributes(path, self.table.tags) if self.table.tags else {}
        return self.table.route(attributes, calling_aet)


@dataclass
class DestinationQueue:
    """One destination's spool area, its uploader and its store."""

    destination: Destination | None  # None: --dicomweb_address (the spool's own queue/)
    spool: Spool  # LocalSpool, or GcsSpool under GcsDestinationSpools
    uploader: SpoolUploader
    store: InstanceStore


UploaderFactory = Callable[[Spool, InstanceStore], SpoolUploader]


def recorded_destinations(root: Path) -> list[Destination]:
    """Destinations an earlier run recorded under `root/dest/` (config may have changed)."""
    found: list[Destination] = []
    for note in sorted((root / DEST_AREA).glob(f"*/{DESTINATION_FILE}")):
        try:
            found.append(_recorded(json.loads(note.read_text(encoding="utf-8"))))
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("unreadable %s: its queue is not uploaded", note)
    return found


def recorded_gcs_destinations(root: GcsSpool) -> list[Destination]:
    """The same for a gs:// spool: `<replica>/dest/<id>/destination.json` objects (blocking)."""
    found: list[Destination] = []
    prefix = f"{root.area_root}{DEST_AREA}/"
    for folder in root.storage.subfolders(prefix):
        name = f"{prefix}{folder}/{DESTINATION_FILE}"
        try:
            found.append(_recorded(root.storage.read_json(name)))
        except (ValueError, KeyError, TypeError):
            logger.warning("unreadable %s: its queue is not uploaded", name)
    return found


def _recorded(data: dict[str, Any]) -> Destination:
    """A destination as `Destination.to_json` wrote it (KeyError/TypeError when it is not)."""
    if "dicomweb_destination" in data:
        return Destination(stow_url=str(data["dicomweb_destination"]))
    return Destination(
        aet=data["name"], host=data["host"], port=data["port"], tls=bool(data.get("tls", False))
    )


def _write_note(directory: Path, destination: Destination) -> None:
    note = directory / DESTINATION_FILE
    text = json.dumps(destination.to_json(), indent=2, sort_keys=True)
    if note.exists() and note.read_text(encoding="utf-8") == text:
        return
    partial = directory / f".{DESTINATION_FILE}.tmp"
    partial.write_text(text, encoding="utf-8")
    fsync_file(partial)
    os.rename(partial, note)
    fsync_dir(directory)


class DestinationSpools:
    """The default queue plus one per destination; commits link an instance into each."""

    def __init__(self, default: DestinationQueue) -> None:
        self.default = default
        self._queues: dict[Destination, DestinationQueue] = {}
        self._serial = itertools.count()

    def open_spool(self, destination: Destination) -> Spool:
        """`root/dest/<id>/` with its queue/ and failed/, and destination.json (blocking);
        its bytes count in the root spool's counter and cap."""
        root = self.default.spool
        assert isinstance(root, LocalSpool)
        directory = root.root / DEST_AREA / destination.id
        (root.root / DEST_AREA).mkdir(mode=0o700, exist_ok=True)
        spool = LocalSpool(directory, headroom_bytes=root.headroom_bytes, counter=root)
        _write_note(directory, destination)
        return spool

    def add(self, queue: DestinationQueue) -> None:
        """Serve one more destination."""
        assert queue.destination is not None
        self._queues[queue.destination] = queue

    @property
    def queues(self) -> list[DestinationQueue]:
        """Every queue, the default first."""
        return [self.default, *self._queues.values()]

    def depth(self) -> int:
        """Instances waiting, summed over the destinations (one instance may count twice)."""
        return sum(q.spool.depth() for q in self.queues)

    def oldest_age(self) -> float:
        """The oldest wait of any destination."""
        return max(q.spool.oldest_age() for q in self.queues)

    def commit(
        self, path: Path, sop_instance_uid: str, destinations: Sequence[Destination]
    ) -> list[tuple[DestinationQueue, PurePath]]:
        """fsync the received file, link it into each destination's queue/ (fsynced), then
        remove the received name. Empty `destinations`: the default queue."""
        queues = [self._queues[d] for d in destinations] or [self.default]
        fsync_file(path)
        size = path.stat().st_size
        uid = _UNSAFE.sub("_", sop_instance_uid)
        name = f"{time.time_ns()}-{next(self._serial)}-{uid}{SUFFIX}"  # one name in every queue
        done: list[tuple[DestinationQueue, Path]] = []
        try:
            for queue in queues:
                local = queue.spool
                assert isinstance(local, LocalSpool)
                done.append((queue, self._link(path, local.queue, name, uid)))
        except BaseException:
            for _, linked in done:  # not acknowledged: nothing may stay queued
                linked.unlink(missing_ok=True)
            raise
        for queue, linked in done:
            local = queue.spool
            assert isinstance(local, LocalSpool)
            fsync_dir(local.queue)
            local.note_queued(linked)
        path.unlink()
        root = self.default.spool
        assert isinstance(root, LocalSpool)
        root.add_bytes(size)  # once, however many queues link it
        return [(queue, linked) for queue, linked in done]

    def _link(self, path: Path, queue: Path, name: str, uid: str) -> Path:
        target = queue / name
        while True:
            try:
                os.link(path, target)
                return target
            except FileExistsError:  # taken (by another writer's clock): a new name
                target = queue / f"{time.time_ns()}-{next(self._serial)}-{uid}{SUFFIX}"
                continue
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
            # no hard link possible (another volume): one copy, fsynced
            partial = queue / f".{target.name}.partial"
            write_through(partial, target, lambda to: shutil.copyfile(path, to))
            return target

    async def upload_now(
        self, targets: Sequence[tuple[DestinationQueue, PurePath]], identity: InstanceIdentity
    ) -> StoreOutcome:
        """Without auto-ack: upload to each destination at once; the worst outcome answers."""
        outcomes = await asyncio.gather(
            *(queue.uploader.upload_now(path, identity) for queue, path in targets)
        )
        failures = [o for o in outcomes if not is_stored(o.status)]
        if failures:
            return failures[0]
        warnings = [o for o in outcomes if o.status != Status.SUCCESS]
        return warnings[0] if warnings else StoreOutcome(Status.SUCCESS)


class GcsDestinationSpools(DestinationSpools):
    """The gs:// flavour: each destination's queue under `<replica>/dest/<id>/`; a commit
    writes one object per chosen destination (Cloud Storage has no hard links)."""

    def open_spool(self, destination: Destination) -> Spool:
        """The destination's prefix, with destination.json beside its queue (blocking)."""
        root = self.default.spool
        assert isinstance(root, GcsSpool)
        spool = GcsSpool(
            root.storage,
            root.replica,
            scratch=root.scratch,
            headroom_bytes=root.headroom_bytes,
            area=f"{DEST_AREA}/{destination.id}/",
        )
        root.storage.upload_json(f"{spool.area_root}{DESTINATION_FILE}", destination.to_json())
        return spool

    def commit(
        self, path: Path, sop_instance_uid: str, destinations: Sequence[Destination]
    ) -> list[tuple[DestinationQueue, PurePath]]:
        """Write the received file into each chosen destination's queue (every write done
        before the answer), then remove it. Empty `destinations`: the default queue."""
        queues = [self._queues[d] for d in destinations] or [self.default]
        name = queue_name(time.time_ns(), next(self._serial), sop_instance_uid)
        done: list[tuple[DestinationQueue, PurePath]] = []
        try:
            for queue in queues:
                spool = queue.spool
                assert isinstance(spool, GcsSpool)
                done.append((queue, spool.commit_as(path, name)))
        except BaseException:
            for queue, written in done:  # not acknowledged: nothing may stay queued
                with contextlib.suppress(OSError):
                    queue.spool.delivered(written)
            raise
        path.unlink(missing_ok=True)
        return done
