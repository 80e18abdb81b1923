"""Uploads the spool's queue with STOW-RS in the background: retries, then failed/."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePath

from dicom_adapter.errors import AdapterError, InvalidDatasetError
from dicom_adapter.importer.store import InstanceIdentity, StoreOutcome, StoreService, read_identity
from dicom_adapter.observability.metrics import ImportMetrics
from dicom_adapter.spool.base import Spool, name_sop_instance_uid
from dicom_adapter.status import Status, is_stored

logger = logging.getLogger(__name__)

BODY_EXCERPT_CHARS = 500


@dataclass
class _Item:
    path: PurePath
    attempts: int = 0
    waiting: bool = False  # a retry timer holds it
    study_uid: str = ""
    first_try: float = field(default_factory=time.time)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


class SpoolUploader:
    """`concurrency` workers STOW queued instances; each instance retries on its own timer.

    An instance waiting for its next attempt holds no worker, so it never blocks the others.
    Memory: a worker streams one instance from a local file (a gs:// item is downloaded to a
    scratch file first), so uploads hold at most one instance per worker on disk, none in RAM.
    """

    def __init__(
        self,
        spool: Spool,
        store: StoreService,
        metrics: ImportMetrics,
        *,
        concurrency: int,
        retries: int,
        min_delay: float,
        max_delay: float,
        retry_codes: frozenset[int] = frozenset(),
    ) -> None:
        self._spool = spool
        self._store = store
        self._metrics = metrics
        self._concurrency = max(1, concurrency)
        self._retries = max(0, retries)
        self._min_delay = max(0.0, min_delay)
        self._max_delay = max(self._min_delay, max_delay)
        self._retry_codes = retry_codes
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._known: set[str] = set()  # names in queue/ this uploader already handles
        self._rescan_task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Queue what earlier runs left in queue/ (replay), start the workers; returns it."""
        self._loop = asyncio.get_running_loop()
        left = await asyncio.to_thread(self._spool.queued)
        for path in left:
            self._known.add(path.name)
            self._queue.put_nowait(_Item(path))
        if left:
            logger.info("replaying %d spooled instances left by an earlier run", len(left))
        self._workers = [
            asyncio.create_task(self._work(), name=f"spool-upload-{i}")
            for i in range(self._concurrency)
        ]
        self._rescan_task = asyncio.create_task(self._rescan(), name="spool-rescan")
        return len(left)

    async def stop(self) -> None:
        """Stop uploading; what is still queued stays in queue/ for the next run."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        tasks = [*self._workers, *([self._rescan_task] if self._rescan_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers, self._rescan_task = [], None

    def enqueue_threadsafe(self, path: PurePath) -> None:
        """Queue a committed instance for upload (from a pynetdicom thread)."""
        if self._loop is None:
            raise RuntimeError("uploader not started")
        self._loop.call_soon_threadsafe(self._adopt, path)

    def _adopt(self, path: PurePath) -> None:
        self._known.add(path.name)
        self._queue.put_nowait(_Item(path))

    async def upload_now(self, path: PurePath, identity: InstanceIdentity) -> int:
        """Synchronous mode: one STOW for the waiting C-STORE; the file leaves queue/ after it.

        Whatever the answer, the sender is told it and owns any retry; only a crash before
        the answer leaves the file in queue/ for the next run to upload.
        """
        self._known.add(path.name)  # the rescan must not upload it a second time
        try:
            local = await asyncio.to_thread(self._spool.materialize, path)
            try:
                return await self._store.store(local, identity)
            finally:
                await asyncio.to_thread(self._spool.release, path, local)
        finally:
            try:  # off the loop: a gs:// delete is a network call
                await asyncio.to_thread(self._spool.delivered, path)
            finally:
                self._known.discard(path.name)

    async def _rescan(self) -> None:
        """Adopt files that appeared in queue/ unannounced (requeued by an operator).

        A file must be unknown on two scans in a row: one committed by a receiving thread
        is announced within microseconds, so it is never taken twice.
        """
        unannounced: set[str] = set()
        while True:
            await asyncio.sleep(self._spool.rescan_seconds)
            seen: set[str] = set()
            for path in await asyncio.to_thread(self._spool.queued):
                if path.name in self._known:
                    continue
                if path.name in unannounced:
                    self._adopt(path)
                else:
                    seen.add(path.name)
            unannounced = seen

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._attempt(item)
            except Exception:
                logger.exception("spooled upload of %s failed unexpectedly", item.path.name)
                try:
                    await self._retry_or_fail(
                        item, StoreOutcome(Status.PROCESSING_FAILURE), retry=True
                    )
                except OSError:  # failed/ not writable: it stays in queue/ for the next run
                    logger.exception("spooled instance %s left in queue/", item.path.name)
                    item.waiting = False
            if not item.waiting:
                self._known.discard(item.path.name)

    async def _attempt(self, item: _Item) -> None:
        item.attempts += 1
        item.waiting = False
        try:
            local = await asyncio.to_thread(self._spool.materialize, item.path)
        except FileNotFoundError:  # an operator removed or moved it
            return
        try:
            outcome = await self._upload(item, local)
        finally:
            await asyncio.to_thread(self._spool.release, item.path, local)
        if outcome is None:
            return
        if is_stored(outcome.status):
            await asyncio.to_thread(self._spool.delivered, item.path)
            return
        transient = (
            outcome.status == Status.OUT_OF_RESOURCES or outcome.http_status in self._retry_codes
        )
        await self._retry_or_fail(item, outcome, retry=transient)

    async def _upload(self, item: _Item, local: Path) -> StoreOutcome | None:
        """One STOW of the item's local file; None when the file vanished meanwhile."""
        try:
            identity = await asyncio.to_thread(read_identity, local)
            item.study_uid = identity.study_uid
        except InvalidDatasetError as exc:
            if not local.exists():  # an operator removed it
                return None
            await self._retry_or_fail(item, StoreOutcome(int(exc.status), 0, str(exc)), retry=False)
            return None
        try:
            return await self._store.store_outcome(local, identity, may_exist=True)
        except AdapterError as exc:
            return StoreOutcome(int(exc.status), 0, str(exc))

    async def _retry_or_fail(self, item: _Item, outcome: StoreOutcome, *, retry: bool) -> None:
        item.waiting = retry and item.attempts <= self._retries
        if item.waiting:
            delay = min(self._max_delay, self._min_delay * 2 ** (item.attempts - 1))
            loop = asyncio.get_running_loop()
            timer: asyncio.TimerHandle | None = None

            def requeue() -> None:
                if timer is not None:
                    self._timers.discard(timer)
                self._queue.put_nowait(item)

            timer = loop.call_later(delay, requeue)
            self._timers.add(timer)
            return
        reason = {
            "sop_instance_uid": name_sop_instance_uid(item.path.name),
            "study_instance_uid": item.study_uid or None,
            "dimse_status": f"0x{outcome.status:04X}",
            "http_status": outcome.http_status,
            "body_excerpt": outcome.body_excerpt[:BODY_EXCERPT_CHARS],
            "attempts": item.attempts,
            "first_attempt": _iso(item.first_try),
            "failed_at": _iso(time.time()),
        }
        try:
            # rename, reason file and two fsyncs: off the event loop
            target = await asyncio.to_thread(self._spool.fail, item.path, reason)
        except FileNotFoundError:
            return  # an operator removed it meanwhile
        logger.error(
            "spooled instance not uploaded after %d attempts (HTTP %d -> 0x%04X): moved to %s",
            item.attempts,
            outcome.http_status,
            outcome.status,
            target,
            extra={"sop_instance_uid": reason["sop_instance_uid"]},
        )
        self._metrics.cstore_backup_errors.inc()  # after the log: a scrape sees both
