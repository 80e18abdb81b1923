"""Uploads the spool's queue with STOW-RS in the background: retries, then failed/."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePath

from dicom_adapter.dicom.attributes import InstanceIdentity, read_identity
from dicom_adapter.errors import (
    AdapterError,
    InvalidDatasetError,
    UpstreamAuthError,
    UpstreamError,
)
from dicom_adapter.observability.metrics import ImportMetrics
from dicom_adapter.spool.base import InstanceStore, Spool, StoreOutcome, name_sop_instance_uid
from dicom_adapter.status import Status, is_stored

logger = logging.getLogger(__name__)

BODY_EXCERPT_CHARS = 500
SCAN_COST_FACTOR = 10  # the rescan sleeps at least this many times its last listing's duration
MAX_RESCAN_SECONDS = 30.0  # below local.SCAN_FRESH_SECONDS: depth() stays answered from memory
_MAX_EXPONENT = 60  # 2**60 times any positive delay exceeds every sane maximum
# While a request is in flight, a partial batch waits up to this long for more instances (or for
# the request to end) before it goes. Measured in P1 (bench_spool.py, 200 CT from dcmsend, 6
# alternating reps, 2026-12-07): all stored after 1.481 -> 1.317 s, dicom-import CPU 5.28 ->
# 4.25 ms per instance (uploads there kept pace with receiving, so each request had carried
# one or two instances; STOW-RS per request costs both sides CPU that the 2 cores lacked).
COALESCE_SECONDS = 0.05


@dataclass
class _Item:
    path: PurePath
    attempts: int = 0
    waiting: bool = False  # a retry timer holds it
    settled: bool = False  # this attempt's outcome was acted on (delivered, retry or failed/)
    study_uid: str = ""
    first_try: float = field(default_factory=time.time)
    queued_at: float = 0.0  # loop time it was last queued
    size: int = 0  # bytes of its local file when queued (0 for gs://)
    # the UIDs read when it was received: its upload reads the file only to send it
    identity: InstanceIdentity | None = None


def _no_answer(exc: AdapterError) -> bool:
    """An upstream failure with no HTTP status to judge (not auth): retried like a network error."""
    return (
        isinstance(exc, UpstreamError)
        and not isinstance(exc, UpstreamAuthError)
        and not exc.http_status
    )


def _failure(exc: AdapterError) -> StoreOutcome:
    """The outcome of a request that raised instead of answering."""
    if _no_answer(exc):  # e.g. a gateway's HTML page for the existence check
        return StoreOutcome(Status.OUT_OF_RESOURCES, 0, str(exc))
    return StoreOutcome(int(exc.status), getattr(exc, "http_status", 0), str(exc))


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _size(item: PurePath) -> int:
    """A local queued file's size; 0 for a gs:// object (only the count bounds its batch)."""
    if not isinstance(item, Path):
        return 0
    try:
        return item.stat().st_size
    except OSError:  # an operator removed it: its attempt finds out
        return 0


def _identities(paths: list[Path]) -> list[InstanceIdentity | InvalidDatasetError]:
    """Each file's UIDs, or why it cannot be parsed (run in a thread: it reads the files)."""
    found: list[InstanceIdentity | InvalidDatasetError] = []
    for path in paths:
        try:
            found.append(read_identity(path))
        except InvalidDatasetError as exc:
            found.append(exc)
    return found


class SpoolUploader:
    """`concurrency` workers STOW queued instances; each instance retries on its own timer.

    A worker takes up to `batch` instances already waiting, at most `batch_bytes` of them
    unless one alone is larger, in queue order, into one request. A partial batch goes at
    once when no request is in flight, else after COALESCE_SECONDS at most (sooner if the
    batch fills or the request ends): under a steady stream, requests carry several instances.
    An instance waiting for its next attempt holds no worker, so it never blocks the others.
    Memory: a request streams its instances from local files (a gs:// item is downloaded to
    a scratch file first), so uploads hold none in RAM; on scratch disk, a gs:// batch of
    up to `batch` instances per worker (their size is not known before the download, so
    only the count bounds a gs:// batch).
    """

    def __init__(
        self,
        spool: Spool,
        store: InstanceStore,
        metrics: ImportMetrics,
        *,
        concurrency: int,
        retries: int,
        min_delay: float,
        max_delay: float,
        retry_codes: frozenset[int] = frozenset(),
        batch: int = 1,
        batch_bytes: int = 16 << 20,
    ) -> None:
        self._spool = spool
        self._batch = max(1, batch)
        self._batch_bytes = max(0, batch_bytes)
        self._store = store
        self._metrics = metrics
        self._concurrency = max(1, concurrency)
        self._retries = max(0, retries)
        self._min_delay = max(0.0, min_delay)
        self._max_delay = max(self._min_delay, max_delay)
        self._retry_codes = retry_codes
        self._waiting: collections.deque[_Item] = collections.deque()
        self._waiting_bytes = 0
        self._changed = asyncio.Event()  # set when an item is queued or a request ends
        self._dispatch = asyncio.Lock()
        self._in_flight = 0
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
            self._put(_Item(path))
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

    def enqueue_threadsafe(self, path: PurePath, identity: InstanceIdentity | None = None) -> None:
        """Queue a committed instance for upload (from a pynetdicom thread)."""
        if self._loop is None:
            raise RuntimeError("uploader not started")
        self._loop.call_soon_threadsafe(self._adopt, path, identity)

    def _adopt(self, path: PurePath, identity: InstanceIdentity | None = None) -> None:
        self._known.add(path.name)
        self._put(_Item(path, identity=identity))

    def _put(self, item: _Item) -> None:
        assert self._loop is not None
        item.queued_at = self._loop.time()
        item.size = _size(item.path)
        self._waiting.append(item)
        self._waiting_bytes += item.size
        self._changed.set()

    def _pop(self) -> _Item:
        item = self._waiting.popleft()
        self._waiting_bytes -= item.size
        return item

    async def _next_batch(self) -> tuple[list[_Item], _Item | None]:
        """The next request's batch, once it should start (see the class docstring).

        One worker at a time waits here (the others wait for the lock), so an arrival wakes
        one task, not every idle worker.
        """
        loop = asyncio.get_running_loop()
        async with self._dispatch:
            while True:
                timer: asyncio.TimerHandle | None = None
                if self._waiting:
                    due = self._waiting[0].queued_at + COALESCE_SECONDS
                    if (
                        self._in_flight == 0
                        or len(self._waiting) >= self._batch
                        or self._waiting_bytes >= self._batch_bytes
                        or due <= loop.time()
                    ):
                        return self._take_batch(self._pop())
                    timer = loop.call_at(due, self._changed.set)
                self._changed.clear()
                try:
                    await self._changed.wait()
                finally:
                    if timer is not None:
                        timer.cancel()

    async def upload_now(self, path: PurePath, identity: InstanceIdentity) -> StoreOutcome:
        """Synchronous mode: one STOW for the waiting C-STORE; the file leaves queue/ after it.

        Whatever the answer, the sender is told it and owns any retry; only a crash before
        the answer leaves the file in queue/ for the next run to upload.
        """
        self._known.add(path.name)  # the rescan must not upload it a second time
        try:
            local = await asyncio.to_thread(self._spool.materialize, path)
            try:
                return await self._store.store_answer(local, identity)
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
        is announced within microseconds, so it is never taken twice. A long queue's listing
        costs (0.9 s of CPU, holding the GIL, at 200k files): the pause grows with it.
        """
        unannounced: set[str] = set()
        cost = 0.0
        while True:
            every = self._spool.rescan_seconds
            await asyncio.sleep(max(every, min(SCAN_COST_FACTOR * cost, MAX_RESCAN_SECONDS)))
            started = time.monotonic()
            try:
                listed = await asyncio.to_thread(self._spool.queued)
            except Exception:  # e.g. a listing error: the next scan tries again
                logger.exception("rescan of the spool queue failed")
                continue
            cost = time.monotonic() - started
            seen: set[str] = set()
            for path in listed:
                if path.name in self._known:
                    continue
                if path.name in unannounced:
                    self._adopt(path)
                else:
                    seen.add(path.name)
            unannounced = seen

    def _take_batch(self, first: _Item) -> tuple[list[_Item], _Item | None]:
        """`first` and what waits behind it, within the bounds; also an item taken but over
        the byte bound, which the same worker sends next (so the queue order holds)."""
        batch, size = [first], first.size
        while len(batch) < self._batch and self._waiting:
            item = self._pop()
            if size + item.size > self._batch_bytes:
                return batch, item
            batch.append(item)
            size += item.size
        return batch, None

    async def _work(self) -> None:
        held: _Item | None = None
        while True:
            if held is None:
                batch, held = await self._next_batch()
            else:
                batch, held = self._take_batch(held)
            self._in_flight += 1
            try:
                await self._attempt(batch)
            except Exception:
                names = ", ".join(item.path.name for item in batch)
                logger.exception("spooled upload of %s failed unexpectedly", names)
                for item in batch:
                    if item.settled:
                        continue
                    try:
                        await self._retry_or_fail(
                            item, StoreOutcome(Status.PROCESSING_FAILURE), retry=True
                        )
                    except Exception:  # e.g. failed/ not writable: stays in queue/ for the next run
                        logger.exception("spooled instance %s left in queue/", item.path.name)
                        item.waiting = False
            finally:
                self._in_flight -= 1
                self._changed.set()
            for item in batch:
                if not item.waiting:
                    self._known.discard(item.path.name)

    async def _attempt(self, batch: list[_Item]) -> None:
        """One STOW-RS for the batch; each instance then goes its own way on its own outcome.

        Each item is read from a local file: the queued file itself, or a gs:// object's
        scratch download, released (removed) once the attempt is over.
        """
        for item in batch:
            item.attempts += 1
            item.waiting = item.settled = False
        files: list[tuple[_Item, Path]] = []
        in_place = self._spool.files_in_place  # nothing to fetch or clean up: no thread hops
        try:
            # one thread hop for the batch (each hop costs the loop and the GIL; with uploads
            # beside a C-STORE stream, the receiving threads wait for it)
            if in_place:
                self._materialize(batch, files)
            else:
                await asyncio.to_thread(self._materialize, batch, files)
            await self._upload(files)
        finally:
            if files and not in_place:
                await asyncio.to_thread(self._release, files)

    def _materialize(self, batch: list[_Item], files: list[tuple[_Item, Path]]) -> None:
        """Each item's local file into `files` (filled as it goes: released however it ends)."""
        for item in batch:
            try:
                files.append((item, self._spool.materialize(item.path)))
            except FileNotFoundError:  # an operator removed or moved it
                item.settled = True

    def _release(self, files: list[tuple[_Item, Path]]) -> None:
        for item, local in files:
            try:
                self._spool.release(item.path, local)
            except Exception:  # the others are still released; the sweep removes leftovers
                logger.exception("releasing the local copy of %s failed", item.path.name)

    async def _upload(self, files: list[tuple[_Item, Path]]) -> None:
        unread = [local for item, local in files if item.identity is None]
        read = iter(await asyncio.to_thread(_identities, unread) if unread else [])
        identities = [item.identity or next(read) for item, _ in files]
        ready: list[tuple[_Item, Path, InstanceIdentity]] = []
        for (item, local), identity in zip(files, identities, strict=True):
            if isinstance(identity, InstanceIdentity):
                item.study_uid = identity.study_uid
                ready.append((item, local, identity))
            elif not local.exists():  # an operator removed it
                item.settled = True
            else:
                outcome = StoreOutcome(int(identity.status), 0, str(identity))
                await self._retry_or_fail(item, outcome, retry=False)
                item.settled = True
        if not ready:
            return
        try:
            if len(ready) == 1:
                [(item, local, identity)] = ready
                outcomes = [await self._store.store_outcome(local, identity, may_exist=True)]
            else:
                pairs = [(local, identity) for _, local, identity in ready]
                outcomes = await self._store.store_batch(pairs, may_exist=True)
        except AdapterError as exc:
            outcomes = [_failure(exc)] * len(ready)
        if len(ready) > 1:
            outcomes = [
                await self._alone_if_refused_whole(local, identity, outcome)
                for (_, local, identity), outcome in zip(ready, outcomes, strict=True)
            ]
        results = list(zip((item for item, _, _ in ready), outcomes, strict=True))
        stored = [item for item, outcome in results if is_stored(outcome.status)]
        if stored:
            await asyncio.to_thread(self._delivered, [item.path for item in stored])
            for item in stored:
                item.settled = True
        for item, outcome in results:
            if item.settled:
                continue
            await self._retry_or_fail(item, outcome, retry=self._transient(outcome))
            item.settled = True

    def _transient(self, outcome: StoreOutcome) -> bool:
        return outcome.status == Status.OUT_OF_RESOURCES or outcome.http_status in self._retry_codes

    async def _alone_if_refused_whole(
        self, local: Path, identity: InstanceIdentity, outcome: StoreOutcome
    ) -> StoreOutcome:
        """A batch's permanent failure the answer did not give this instance itself (a bare
        400/409/413 for the whole request, maybe for another part): ask for it alone, once,
        within the same attempt, so one bad part does not send its batch to failed/."""
        if is_stored(outcome.status) or outcome.named or self._transient(outcome):
            return outcome
        try:
            return await self._store.store_outcome(local, identity, may_exist=True)
        except AdapterError as exc:
            return _failure(exc)

    def _delivered(self, paths: list[PurePath]) -> None:
        for path in paths:
            self._spool.delivered(path)

    async def _retry_or_fail(self, item: _Item, outcome: StoreOutcome, *, retry: bool) -> None:
        item.identity = None  # a retry reads the file again (an operator may have fixed it)
        item.waiting = retry and item.attempts <= self._retries
        if item.waiting:
            # the exponent is capped: 2.0**1024 overflows a float on a long outage's retries
            exponent = min(item.attempts - 1, _MAX_EXPONENT)
            delay = min(self._max_delay, self._min_delay * 2.0**exponent)
            loop = asyncio.get_running_loop()
            timer: asyncio.TimerHandle | None = None

            def requeue() -> None:
                if timer is not None:
                    self._timers.discard(timer)
                self._put(item)

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
