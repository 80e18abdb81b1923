"""C-MOVE / C-GET → QIDO-RS + WADO-RS (SPEC §1.6): list the instances, fetch them to the spool.

pynetdicom's Q/R SCP does the C-STORE sub-operations (one association per C-MOVE, or the
requesting association for C-GET), the pending counts and FailedSOPInstanceUIDList; this
module supplies the instances. The first instance of each SOP class is fetched before the
destination association opens, so it can offer the transfer syntaxes the instances have;
the rest are fetched with several WADO-RS requests in flight while earlier ones are sent.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pydicom.multival import MultiValue

from dicom_adapter.dicom.part10 import FileMeta
from dicom_adapter.dicom.syntaxes import UNCOMPRESSED, uncompressed_for
from dicom_adapter.dicomweb.client import DicomwebClient
from dicom_adapter.dicomweb.instances import DEFAULT_MEMORY_LIMIT, FetchedInstance, MemoryBudget
from dicom_adapter.dicomweb.qido import IdentifierError, QueryRoot
from dicom_adapter.dimse import pdu
from dicom_adapter.dimse.scu import (
    MAX_CONTEXTS,
    AssociationError,
    AssociationTarget,
    RequestedContext,
    ScuTimeouts,
)
from dicom_adapter.dimse.store_scu import StoreAssociation
from dicom_adapter.errors import AdapterError, InvalidDatasetError, lo_text
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry
from dicom_adapter.status import Status, is_stored, is_warning_code

logger = logging.getLogger(__name__)

_INCLUDE = ("0020000D", "0020000E", "00080018", "00080016")
_REQUIRED = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


@dataclass(frozen=True)
class InstanceRef:
    """One instance to retrieve."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Fetched:
    """An instance in the spool (path) or the reason it could not be fetched."""

    ref: InstanceRef
    path: Path | None
    transfer_syntax: str = ""
    error: str = ""


def _values(identifier: Dataset, keyword: str) -> list[str]:
    raw = identifier.get(keyword)
    if raw is None or raw == "":
        return []
    items = list(raw) if isinstance(raw, list | tuple | MultiValue) else [raw]
    return [str(v).strip() for v in items if str(v).strip()]


def instance_query(identifier: Dataset, root: QueryRoot) -> tuple[str, list[tuple[str, str]]]:
    """QIDO path and params listing every instance the retrieve identifier selects."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in _REQUIRED or (level == "PATIENT" and root is not QueryRoot.PATIENT):
        raise IdentifierError(f"cannot retrieve at QueryRetrieveLevel {level!r}")
    required = _REQUIRED[level]
    if not _values(identifier, required):
        raise IdentifierError(f"a {level} level retrieve needs {required}")
    params: list[tuple[str, str]] = []
    studies = _values(identifier, "StudyInstanceUID")
    path = "instances"
    if len(studies) == 1 and level != "PATIENT":
        path = f"studies/{studies[0]}/instances"
    elif studies and level != "PATIENT":
        params.append(("StudyInstanceUID", ",".join(studies)))
    if level == "PATIENT":
        params.append(("PatientID", _values(identifier, "PatientID")[0]))
    for keyword, from_level in (("SeriesInstanceUID", "SERIES"), ("SOPInstanceUID", "IMAGE")):
        wanted = _values(identifier, keyword)
        if wanted and level in (from_level, "IMAGE"):
            params.append((keyword, ",".join(wanted)))
    params.extend(("includefield", tag) for tag in _INCLUDE)
    return path, params


def _first(item: dict[str, object], tag: str) -> str:
    element = item.get(tag)
    if isinstance(element, dict):
        values = element.get("Value")
        if isinstance(values, list) and values and isinstance(values[0], str):
            return values[0]
    return ""


class RetrieveService:
    """Finds and fetches the instances of a C-MOVE or C-GET request."""

    def __init__(self, client: DicomwebClient, dicomweb_root: str, *, concurrency: int = 6) -> None:
        self._client = client
        self._root = dicomweb_root.rstrip("/")
        self._concurrency = concurrency

    @property
    def client(self) -> DicomwebClient:
        """The DICOMweb client."""
        return self._client

    @property
    def root(self) -> str:
        """The DICOMweb root URL, without a trailing slash."""
        return self._root

    async def list_instances(self, identifier: Dataset, root: QueryRoot) -> list[InstanceRef]:
        """Every instance the identifier selects (QIDO, paged), in server order, no repeats."""
        path, params = instance_query(identifier, root)
        refs: dict[str, InstanceRef] = {}
        async for item in self._client.qido(f"{self._root}/{path}", params):
            ref = InstanceRef(
                study_uid=_first(item, "0020000D"),
                series_uid=_first(item, "0020000E"),
                sop_instance_uid=_first(item, "00080018"),
                sop_class_uid=_first(item, "00080016"),
            )
            if ref.study_uid and ref.series_uid and ref.sop_instance_uid:
                refs.setdefault(ref.sop_instance_uid, ref)
        return list(refs.values())

    async def fetch_one(
        self, index: int, ref: InstanceRef, spool: Path, transfer_syntax: str = "*"
    ) -> Fetched:
        """WADO-RS one instance into `spool` (original syntax by default); failures reported.

        The file is written in threads (a spooling collector with no memory allowance).
        """
        url = (
            f"{self._root}/studies/{ref.study_uid}/series/{ref.series_uid}"
            f"/instances/{ref.sop_instance_uid}"
        )
        first: FetchedInstance | None = None
        try:
            async for part in self._client.wado_instances(
                url, spool_dir=spool, transfer_syntax=transfer_syntax, memory_limit=-1
            ):
                if first is None:
                    first = part
                else:
                    await part.adiscard()
        except (AdapterError, OSError) as exc:
            if first is not None:
                await first.adiscard()
            logger.warning("WADO-RS of instance failed: %s", exc)
            return Fetched(ref, None, error=str(exc))
        if first is None or first.meta is None or first.path is None:
            error = "response had no parts" if first is None else first.error or "empty part"
            if first is not None:
                await first.adiscard()
            logger.warning("WADO-RS of instance failed: %s", error)
            return Fetched(ref, None, error=error)
        return Fetched(ref, first.path, transfer_syntax=first.meta.transfer_syntax)

    async def fetch_samples(self, refs: list[InstanceRef], spool: Path) -> dict[int, Fetched]:
        """The first instance of each SOP class, by position in `refs`."""
        firsts: dict[str, int] = {}
        for index, ref in enumerate(refs):
            firsts.setdefault(ref.sop_class_uid, index)
        fetched = await asyncio.gather(
            *(self.fetch_one(index, refs[index], spool) for index in firsts.values())
        )
        return dict(zip(firsts.values(), fetched, strict=True))

    async def fetch_bulk(
        self, refs: list[InstanceRef], spool: Path, ready: dict[int, Fetched], level: str
    ) -> AsyncIterator[Fetched]:
        """Every listed instance, as WADO-RS delivers it: one request per series (per
        instance at IMAGE level), up to `concurrency` at once, each part spooled to a file.

        `ready` (already fetched) comes first; parts the listing did not name are dropped;
        instances the server did not return come last, as failures. At most QUEUE_DEPTH
        fetched files wait for the sender.
        """
        wanted = {ref.sop_instance_uid: ref for i, ref in enumerate(refs) if i not in ready}
        for item in ready.values():
            yield item
        queue: asyncio.Queue[FetchedInstance | None] = asyncio.Queue(QUEUE_DEPTH)
        paths = fetch_paths(list(wanted.values()), "IMAGE" if level == "IMAGE" else "SERIES")
        producer = asyncio.ensure_future(self._produce_files(paths, spool, queue))
        try:
            while (part := await queue.get()) is not None:
                meta = part.meta
                ref = wanted.pop(meta.sop_instance_uid, None) if meta is not None else None
                if ref is None or part.path is None or meta is None:
                    await part.adiscard()  # not listed (or a duplicate, or unusable)
                    continue
                yield Fetched(ref, part.path, transfer_syntax=meta.transfer_syntax)
            for ref in wanted.values():
                yield Fetched(ref, None, error="not returned by WADO-RS")
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            while not queue.empty():
                leftover = queue.get_nowait()
                if leftover is not None:
                    leftover.discard()

    async def _produce_files(
        self, paths: list[str], spool: Path, queue: asyncio.Queue[FetchedInstance | None]
    ) -> None:
        pending = iter(paths)

        async def worker() -> None:
            for path in pending:
                try:
                    async for part in self._client.wado_instances(
                        f"{self._root}/{path}", spool_dir=spool, memory_limit=-1
                    ):
                        try:
                            await queue.put(part)
                        except BaseException:  # cancelled while the queue was full
                            part.discard()
                            raise
                except (AdapterError, OSError) as exc:
                    logger.warning("WADO-RS of %s failed: %s", path, exc)

        workers = max(1, min(self._concurrency, len(paths)))
        try:
            await asyncio.gather(*(worker() for _ in range(workers)))
        except asyncio.CancelledError:
            raise  # the consumer stopped: it wants no end marker
        except Exception:  # a bug: still end the stream, so what was not sent counts as failed
            logger.exception("fetching the instances failed")
        await queue.put(None)

    @staticmethod
    def new_spool() -> Path:
        """A private directory for one retrieve's instances (removed by the caller)."""
        return Path(tempfile.mkdtemp(prefix="dicom-adapter-retrieve-"))


# Offered besides each SOP class's first-seen syntax, so instances in these syntaxes go out as
# stored: JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, deflate, big endian.
COMMON_SYNTAXES = (
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.1.99",
)
MAX_REOPENS = 3
QUEUE_DEPTH = 8
CANCEL_POLL = 0.05  # how often a running C-MOVE looks for the requester's C-CANCEL
CANCEL_GRACE = 0.5  # a sub-operation still running this long after C-CANCEL is aborted
FETCH_CONCURRENCY = 6  # WADO-RS requests in flight at IMAGE level (one per instance)


def move_contexts(sop_classes: list[str], first_syntax: dict[str, str]) -> list[RequestedContext]:
    """One context per (SOP class, syntax): each class's first-seen syntax and the uncompressed
    ones first, then common compressed syntaxes while the 128 context IDs last."""
    essential: dict[tuple[str, str], None] = {}
    for sop_class in sop_classes:
        if sop_class in first_syntax:
            essential[(sop_class, first_syntax[sop_class])] = None
        for syntax in UNCOMPRESSED:
            essential[(sop_class, syntax)] = None
    pairs = list(essential)[:MAX_CONTEXTS]
    for syntax in COMMON_SYNTAXES:
        for sop_class in sop_classes:
            if len(pairs) >= MAX_CONTEXTS:
                break
            if (sop_class, syntax) not in essential:
                pairs.append((sop_class, syntax))
    return [RequestedContext(sop_class, (syntax,)) for sop_class, syntax in pairs]


@dataclass
class MoveProgress:
    """Sub-operation counts so far (one per pending response) and the failed instances."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    cancelled: bool = False  # the requester sent C-CANCEL: this is the last update
    cause: str = ""  # why the first sub-operation failed (the final ErrorComment)

    def snapshot(self) -> MoveProgress:
        """A copy of the counts (the failed UID list is shared: it only grows)."""
        return MoveProgress(
            self.remaining,
            self.completed,
            self.failed,
            self.warning,
            self.failed_uids,
            self.cancelled,
            self.cause,
        )

    def fail(self, sop_instance_uid: str) -> None:
        """Count one failed sub-operation."""
        self.remaining -= 1
        self.failed += 1
        self.failed_uids.append(sop_instance_uid)

    def final_status(self) -> Status:
        """PS3.4 C.4.2.1.5: all ok, some failed or warned (0xB000), all failed (0xA702)."""
        if self.failed == 0 and self.warning == 0:
            return Status.SUCCESS
        if self.completed == 0 and self.warning == 0:
            return Status.OUT_OF_RESOURCES_SUBOPERATIONS
        return Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES


@dataclass(frozen=True)
class MoveDestination:
    """Where the sub-operations go and the C-MOVE they belong to."""

    target: AssociationTarget
    originator_aet: str
    originator_message_id: int


_Item = FetchedInstance | None  # None: every fetch is done


def early_fetch_paths(identifier: Dataset, root: QueryRoot) -> list[str] | None:
    """WADO-RS paths that fetch exactly what a STUDY or SERIES level retrieve selects, known
    without the QIDO listing (so fetching can start while QIDO-RS runs); None otherwise."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    studies = _values(identifier, "StudyInstanceUID")
    if level == "STUDY" and studies:
        return [f"studies/{study}" for study in studies]
    series = _values(identifier, "SeriesInstanceUID")
    if level == "SERIES" and len(studies) == 1 and series:
        return [f"studies/{studies[0]}/series/{uid}" for uid in series]
    return None


async def _watch_cancel(is_cancelled: Callable[[], bool], stop: asyncio.Event) -> None:
    """Set `stop` once the requester cancels (a dictionary look-up: cheap on the loop)."""
    while not is_cancelled():
        await asyncio.sleep(CANCEL_POLL)
    stop.set()


async def _interrupt(stop: asyncio.Event, sending: asyncio.Future[None]) -> None:
    """After a cancel, give the running sub-operation CANCEL_GRACE, then cancel it (abort)."""
    await stop.wait()
    _, running = await asyncio.wait({sending}, timeout=CANCEL_GRACE)
    if running:
        logger.info("aborting the sub-operation still running after C-CANCEL")
        sending.cancel()


def fetch_paths(refs: list[InstanceRef], level: str) -> list[str]:
    """WADO-RS paths for listed instances: per study, or per instance at IMAGE level."""
    if level == "IMAGE":
        return [
            f"studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_instance_uid}"
            for r in refs
        ]
    if level == "SERIES":
        return list(dict.fromkeys(f"studies/{r.study_uid}/series/{r.series_uid}" for r in refs))
    return list(dict.fromkeys(f"studies/{r.study_uid}" for r in refs))


class InstanceMover:
    """C-MOVE sub-operations: bulk WADO-RS (a study or series per request) into a bounded
    queue, C-STORE over ONE association (our asyncio SCU), refetching uncompressed what the
    receiver refuses."""

    def __init__(
        self,
        retrieve: RetrieveService,
        *,
        timeouts: ScuTimeouts | None = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        budget: MemoryBudget | None = None,
        metrics: ImportMetrics | None = None,
    ) -> None:
        self._retrieve = retrieve
        self._timeouts = timeouts or ScuTimeouts()
        self._memory_limit = memory_limit
        self._budget = budget
        self._metrics = metrics or ImportMetrics(MetricsRegistry())

    async def move(
        self,
        identifier: Dataset,
        root: QueryRoot,
        destination: MoveDestination,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> AsyncIterator[list[MoveProgress]]:
        """Yield the progress after listing (remaining = total), then after each sub-operation
        (batched: every update that is ready, so a slow consumer costs one hop per batch).

        A study or series is fetched in one WADO-RS request, started together with the QIDO
        listing (Orthanc takes ~130 ms to list 200 instances). Stopping early (closing the
        generator) cancels the fetches and releases the association. `is_cancelled` (polled
        on the loop) ends the move with a `cancelled` update; a sub-operation that does not
        finish within CANCEL_GRACE is aborted with its association, never released half sent.
        """
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        spool = await asyncio.to_thread(RetrieveService.new_spool)
        queue: asyncio.Queue[_Item] = asyncio.Queue(QUEUE_DEPTH)
        tasks: list[asyncio.Future[None]] = []
        sender: _Sender | None = None
        stop = asyncio.Event()
        try:
            tasks.append(asyncio.ensure_future(_watch_cancel(is_cancelled, stop)))
            early = early_fetch_paths(identifier, root)
            if early is not None:
                tasks.append(asyncio.ensure_future(self._produce(early, 1, spool, queue)))
            refs = await self._list(identifier, root)
            progress = MoveProgress(remaining=len(refs))
            yield [progress.snapshot()]
            if not refs:
                return
            if early is None:
                paths = fetch_paths(refs, level)
                concurrency = FETCH_CONCURRENCY if level == "IMAGE" else 1
                tasks.append(asyncio.ensure_future(self._produce(paths, concurrency, spool, queue)))
            updates: asyncio.Queue[MoveProgress | None] = asyncio.Queue()
            sender = _Sender(
                self, refs, destination, spool, timeouts=self._timeouts, metrics=self._metrics
            )
            # Sending runs ahead of the consumer of this generator (a pynetdicom thread
            # answering pending responses): a slow consumer never holds up the next C-STORE.
            sending = asyncio.ensure_future(
                self._send_all(refs, queue, sender, progress, updates, stop)
            )
            tasks.append(sending)
            tasks.append(asyncio.ensure_future(_interrupt(stop, sending)))
            finished = False
            while not finished:
                batch: list[MoveProgress] = []
                update = await updates.get()
                while update is not None:
                    batch.append(update)
                    if updates.empty():
                        break
                    update = updates.get_nowait()
                finished = update is None
                if batch:
                    yield batch
            if not stop.is_set():
                await sending  # re-raise a bug instead of reporting a short move
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            while not queue.empty():
                leftover = queue.get_nowait()
                if leftover is not None:
                    await leftover.adiscard()
            if sender is not None:
                await sender.close()
            await asyncio.to_thread(shutil.rmtree, spool, ignore_errors=True)

    async def _list(self, identifier: Dataset, root: QueryRoot) -> list[InstanceRef]:
        """The QIDO-RS listing, counted (an identifier we cannot translate is no QIDO error)."""
        self._metrics.cmove_qidors_requests.inc()
        try:
            return await self._retrieve.list_instances(identifier, root)
        except IdentifierError:
            raise
        except AdapterError:
            self._metrics.cmove_qidors_errors.inc()
            raise

    @staticmethod
    async def _send_all(
        refs: list[InstanceRef],
        queue: asyncio.Queue[_Item],
        sender: _Sender,
        progress: MoveProgress,
        updates: asyncio.Queue[MoveProgress | None],
        stop: asyncio.Event,
    ) -> None:
        """Send what arrives (in arrival order); at the end, count what never came as failed.

        Once `stop` is set (C-CANCEL) nothing more is sent and the last update says cancelled.
        """
        listed = {ref.sop_instance_uid: ref for ref in refs}
        handled: set[str] = set()
        try:
            while (instance := await queue.get()) is not None:
                if stop.is_set():
                    await instance.adiscard()
                    break
                uid = instance.meta.sop_instance_uid if instance.meta else ""
                ref = listed.get(uid)
                if ref is None or uid in handled:  # stored after the listing, or a repeat
                    await instance.adiscard()
                    continue
                handled.add(uid)
                await sender.handle(ref, instance, progress)
                updates.put_nowait(progress.snapshot())
                if sender.unreachable or stop.is_set():  # stop fetching
                    break
            missing = [ref for ref in refs if ref.sop_instance_uid not in handled]
            if missing and not stop.is_set():
                if not sender.unreachable:
                    logger.warning("%d listed instance(s) did not come with WADO-RS", len(missing))
                for ref in missing:
                    progress.fail(ref.sop_instance_uid)
                progress.cause = progress.cause or "instances not returned by WADO-RS"
                updates.put_nowait(progress.snapshot())
        finally:
            if stop.is_set():
                progress.cancelled = True
                updates.put_nowait(progress.snapshot())
            updates.put_nowait(None)

    async def _produce(
        self, paths: list[str], concurrency: int, spool: Path, queue: asyncio.Queue[_Item]
    ) -> None:
        """WADO-RS every path (up to `concurrency` at once) into the queue, then None."""
        pending = iter(paths)

        async def worker() -> None:
            for path in pending:
                await self._fetch_path(path, spool, queue)

        try:
            await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(paths))))))
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: still end the stream, so what was not sent counts as failed
            logger.exception("fetching the instances failed")
        await queue.put(None)

    async def _fetch_path(self, path: str, spool: Path, queue: asyncio.Queue[_Item]) -> None:
        try:
            async for instance in self._retrieve.client.wado_instances(
                f"{self._retrieve.root}/{path}",
                spool_dir=spool,
                memory_limit=self._memory_limit,
                budget=self._budget,
            ):
                if instance.meta is None:
                    logger.warning("WADO-RS part skipped: %s", instance.error)
                    await instance.adiscard()
                    continue
                try:
                    await queue.put(instance)
                except BaseException:  # cancelled while the queue was full: still ours
                    instance.discard()
                    raise
        except (AdapterError, OSError) as exc:  # OSError: the spool (disk full, ...)
            logger.warning("WADO-RS of %s failed: %s", path, exc)

    def _url(self, ref: InstanceRef, whole_series: bool) -> str:
        url = f"{self._retrieve.root}/studies/{ref.study_uid}/series/{ref.series_uid}"
        return url if whole_series else f"{url}/instances/{ref.sop_instance_uid}"

    async def refetch(self, ref: InstanceRef, syntax: str, spool: Path) -> FetchedInstance | None:
        """The instance again, transcoded by the server to `syntax`; None on failure."""
        try:
            async for instance in self._retrieve.client.wado_instances(
                self._url(ref, whole_series=False),
                spool_dir=spool,
                transfer_syntax=syntax,
                memory_limit=self._memory_limit,
                budget=self._budget,
            ):
                if instance.meta is not None and instance.meta.transfer_syntax == syntax:
                    return instance
                await instance.adiscard()
        except AdapterError as exc:
            logger.warning("WADO-RS refetch as %s failed: %s", syntax, exc)
        return None


class _Sender:
    """The destination side of one C-MOVE: opens the association on the first instance."""

    def __init__(
        self,
        mover: InstanceMover,
        refs: list[InstanceRef],
        destination: MoveDestination,
        spool: Path,
        *,
        timeouts: ScuTimeouts,
        metrics: ImportMetrics,
    ) -> None:
        self._mover = mover
        self._timeouts = timeouts
        self._metrics = metrics
        self._classes = list(dict.fromkeys(ref.sop_class_uid for ref in refs if ref.sop_class_uid))
        self._destination = destination
        self._spool = spool
        self._assoc: StoreAssociation | None = None
        self._opens = 0
        self._unreachable = ""
        self._unreachable_comment = ""  # the short cause, for the final ErrorComment

    async def handle(
        self, ref: InstanceRef, instance: FetchedInstance, progress: MoveProgress
    ) -> None:
        """One sub-operation: send the instance and count the outcome."""
        metrics = self._metrics
        metrics.cmove_cstore_requests.inc()
        try:
            code, size = await self._send(ref, instance)
        except BaseException:  # cancelled: give the memory back now, without awaiting
            instance.discard()
            raise
        await instance.adiscard()
        progress.remaining -= 1
        if code is None or not is_stored(code):
            metrics.cmove_cstore_errors.inc()
            progress.failed += 1
            progress.failed_uids.append(ref.sop_instance_uid)
            if not progress.cause:
                progress.cause = self._cause(code)
        else:
            metrics.cmove_cstore_bytes.inc(size)
            if is_warning_code(code):
                progress.warning += 1
            else:
                progress.completed += 1

    async def _association(self, meta: FileMeta) -> StoreAssociation | None:
        if self._assoc is not None and self._assoc.is_open:
            return self._assoc
        if self._unreachable or self._opens > MAX_REOPENS:
            return None
        self._opens += 1
        classes = (
            self._classes
            if meta.sop_class_uid in self._classes
            else [
                *self._classes,
                meta.sop_class_uid,
            ]
        )
        contexts = move_contexts(classes, {meta.sop_class_uid: meta.transfer_syntax})
        target = self._destination.target
        try:
            self._assoc = await StoreAssociation.open(target, contexts, timeouts=self._timeouts)
        except AssociationError as exc:
            logger.error("C-MOVE destination: %s", exc)
            self._unreachable = str(exc)
            self._unreachable_comment = exc.comment
            return None
        logger.info(
            "association opened to %s@%s:%d (%d contexts accepted)",
            target.called_aet,
            target.host,
            target.port,
            len(self._assoc.accepted),
        )
        return self._assoc

    def _cause(self, code: int | None) -> str:
        """Why a sub-operation failed, for the final response's ErrorComment."""
        if self._unreachable:
            return lo_text(f"destination {self._unreachable_comment}")
        if code is not None:
            return f"destination answered C-STORE 0x{code:04X}"
        return "instance could not be sent to the destination"

    @property
    def unreachable(self) -> str:
        """Why the destination cannot be reached ("" while it can)."""
        return self._unreachable

    async def _send(self, ref: InstanceRef, instance: FetchedInstance) -> tuple[int | None, int]:
        """The C-STORE status (None when it could not be sent) and the data set's size."""
        meta = instance.meta
        if meta is None:
            return None, 0
        if not (pdu.encodable_uid(meta.sop_class_uid) and pdu.encodable_uid(meta.transfer_syntax)):
            # this instance only: proposing it would make the association fail for all the rest
            logger.warning("instance with a UID no DIMSE message can carry: %s", meta)
            return None, 0
        assoc = await self._association(meta)
        if assoc is None:
            return None, 0
        context_id = assoc.context_for(meta.sop_class_uid, meta.transfer_syntax)
        replacement: FetchedInstance | None = None
        if context_id is None:
            replacement = await self._in_accepted_syntax(assoc, ref, meta)
            if replacement is None or replacement.meta is None:
                return None, 0
            instance, meta = replacement, replacement.meta
            context_id = assoc.context_for(meta.sop_class_uid, meta.transfer_syntax)
            if context_id is None:
                await replacement.adiscard()
                return None, 0
        size = max(0, instance.size - meta.dataset_offset)
        try:
            response = await assoc.c_store(
                context_id,
                meta.sop_class_uid,
                meta.sop_instance_uid,
                instance.dataset(),
                move_originator_aet=self._destination.originator_aet,
                move_originator_message_id=self._destination.originator_message_id,
            )
        except (AssociationError, InvalidDatasetError) as exc:
            logger.warning("C-STORE sub-operation failed: %s", exc)
            return None, 0
        finally:
            if replacement is not None:
                replacement.discard()  # sync: this also runs when the send is cancelled
        if not is_stored(response.status):
            logger.warning(
                "C-STORE sub-operation answered 0x%04X %s",
                response.status,
                response.error_comment,
            )
        return response.status, size

    async def _in_accepted_syntax(
        self, assoc: StoreAssociation, ref: InstanceRef, meta: FileMeta
    ) -> FetchedInstance | None:
        """The receiver refused the stored syntax: ask the server for an uncompressed one."""
        syntax = uncompressed_for(assoc.accepted_syntaxes(meta.sop_class_uid), meta.transfer_syntax)
        if syntax is None:
            logger.warning(
                "the destination accepts SOP class %s in none of the syntaxes offered",
                meta.sop_class_uid,
            )
            return None
        logger.info("destination refused %s; fetching %s", meta.transfer_syntax, syntax)
        return await self._mover.refetch(ref, syntax, self._spool)

    async def close(self) -> None:
        """Release the association (if one was opened)."""
        if self._assoc is not None:
            await self._assoc.release()
            self._assoc = None
