"""Thin synchronous pynetdicom handlers: validate, cross into the loop, answer a status.

They never let an exception escape (pynetdicom would answer a generic 0xC211).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom import Dataset

from dicom_adapter.aets import AetDictionary
from dicom_adapter.bridge import Bridge
from dicom_adapter.dicom.attributes import InstanceIdentity, read_identity
from dicom_adapter.dicom.deflate import check_inflated_size
from dicom_adapter.dicomweb.qido import QueryRoot
from dicom_adapter.dimse.get_sender import GetRequest
from dicom_adapter.dimse.server import (
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_RETRIEVE,
    MoveRequest,
)
from dicom_adapter.errors import AdapterError, error_comment, lo_text
from dicom_adapter.importer.commitment import CommitmentService
from dicom_adapter.importer.cstore_spool import CStoreSpool, ReceivingFile, discard
from dicom_adapter.importer.destinations import DestinationSpools, Router
from dicom_adapter.importer.find import FindService
from dicom_adapter.importer.prepare import Preparation
from dicom_adapter.importer.retrieve import InstanceMover, MoveDestination, MoveProgress
from dicom_adapter.importer.routing import Destination
from dicom_adapter.importer.store import StoreService
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry, RetrieveCounters
from dicom_adapter.spool.base import Spool
from dicom_adapter.spool.uploader import SpoolUploader
from dicom_adapter.status import Status, is_failure_code, is_stored, is_warning_code

logger = logging.getLogger(__name__)


def association_fields(event: Any) -> dict[str, str]:
    """Log fields naming the association and the calling AE."""
    assoc = event.assoc
    try:
        calling = str(assoc.requestor.ae_title).strip()
    except AttributeError:
        calling = ""
    return {"association": str(getattr(assoc, "name", "")), "calling_aet": calling}


def status_answer(code: int, comment: str = "") -> int | Dataset:
    """A handler's status: the code, with ErrorComment (0000,0902) when it is a failure.

    pynetdicom copies a returned Status data set's elements into the response.
    """
    if not comment or not is_failure_code(code):
        return int(code)
    answer = Dataset()
    answer.Status = int(code)
    answer.ErrorComment = lo_text(comment)
    return answer


@contextlib.contextmanager
def _never_raises(what: str) -> Iterator[None]:
    """Metrics are recorded on the DIMSE paths: a failure to record is logged, never raised."""
    try:
        yield
    except Exception:
        logger.warning("%s metrics not recorded", what, exc_info=True)


class AssociationCleanup:
    """EVT_CONN_CLOSE: however the association ended, drop its unanswered data sets' files.

    A transfer aborted mid-data-set, or completed but never dispatched, leaves a spool file
    open; it may not outlive the association.
    """

    def __init__(self, spool: CStoreSpool) -> None:
        self._spool = spool

    def __call__(self, event: Any) -> None:
        try:
            files = self._spool.take_files(getattr(event.assoc, "dul", None))
            if not files:
                return
            removed = discard(files)
            logger.info(
                "association ended with %d unanswered C-STORE data sets: %d spool files removed",
                len(files),
                removed,
                extra=association_fields(event),
            )
        except Exception:  # never raise in pynetdicom's thread
            logger.exception("C-STORE spool cleanup failed")


class SpoolIntake:
    """With --persistent_file_storage_location: where C-STORE data sets go once received."""

    def __init__(
        self,
        spool: Spool,
        uploader: SpoolUploader,
        *,
        auto_ack: bool,
        destinations: DestinationSpools | None = None,
    ) -> None:
        self.spool = spool
        self.uploader = uploader
        self.auto_ack = auto_ack
        self.destinations = destinations  # with routing: one queue per destination


class CStoreHandler:
    """EVT_C_STORE: spooled file → STOW-RS → C-STORE-RSP status.

    `timeout` is the answer deadline, counted from the handler's start, which pynetdicom's
    reactor reaches within about a millisecond of the data set's last byte: past it the
    upload is cancelled and the peer gets 0xA700 (retry later) while it still listens.
    """

    def __init__(
        self,
        bridge: Bridge,
        store: StoreService,
        timeout: float,
        *,
        metrics: ImportMetrics | None = None,
        intake: SpoolIntake | None = None,
        prepare: Preparation | None = None,
        router: Router | None = None,
        stores: dict[Destination, StoreService] | None = None,
        unwritten: Callable[[Path], ReceivingFile | None] | None = None,
    ) -> None:
        self._bridge = bridge
        self._store = store
        self._router = router  # destinations from the attributes as received
        self._stores = stores or {}  # without a spool: single mode's STOW-RS destinations
        self._timeout = timeout
        self._metrics = metrics or ImportMetrics(MetricsRegistry())
        self._intake = intake
        self._prepare = prepare
        # a data set whose file could not be written whole (ENOSPC while receiving)
        self._unwritten = unwritten

    def __call__(self, event: Any) -> int | Dataset:
        started = time.perf_counter()
        with _never_raises("C-STORE"):
            self._metrics.cstore_requests.inc()
        size = 0
        with _never_raises("C-STORE"):
            # the received Part-10 file: one stat, no second read of the file per C-STORE
            # (before handling: with a spool, the handler moves the file)
            size = event.dataset_path.stat().st_size
        status, comment = self._handle(event)
        with _never_raises("C-STORE"):
            metrics = self._metrics
            metrics.cstore_seconds.observe(time.perf_counter() - started)
            if is_stored(status):
                metrics.cstore_bytes.inc(size)
            else:
                metrics.cstore_errors.inc()
        return status_answer(status, comment)

    def _handle(self, event: Any) -> tuple[int, str]:
        """The C-STORE status and, for a failure, its ErrorComment."""
        fields = association_fields(event)
        path: Path | None = None
        try:
            fields["sop_instance_uid"] = str(event.request.AffectedSOPInstanceUID or "")
            path = event.dataset_path
            unwritten = self._unwritten(path) if self._unwritten is not None else None
            if unwritten is not None:
                logger.warning(
                    "C-STORE data set not written (%s) -> 0xA700", unwritten.error, extra=fields
                )
                if self._intake is not None:
                    self._intake.spool.refused(unwritten.received)
                return int(Status.OUT_OF_RESOURCES), "adapter disk full"
            # every reader after this inflates a Deflated data set whole: bound it once here
            check_inflated_size(path, transfer_syntax=_transfer_syntax(event))
            # routing reads the attributes as received: before redaction and transcoding
            chosen = (
                self._router.destinations(path, fields["calling_aet"])
                if self._router is not None
                else []
            )
            if self._prepare is not None:
                self._prepare(path)
            if self._intake is not None:
                received, path = path, None  # moved into the spool: absence says nothing
                return self._spooled(self._intake, received, fields, chosen)
            store = self._stores[chosen[0]] if chosen else self._store
            started = self._bridge.start(store.store_file, path)
            outcome = self._bridge.result(started, self._timeout)
            if outcome.status == Status.SUCCESS:
                logger.debug("stored instance", extra=fields)
            return outcome.status, outcome.comment
        except AdapterError as exc:
            if _cleaned_up(path):
                logger.info("C-STORE not handled: its association already ended", extra=fields)
            else:
                logger.error("C-STORE failed: %s -> 0x%04X", exc, exc.status, extra=fields)
            return int(exc.status), error_comment(exc)
        except TimeoutError:
            logger.error("C-STORE timed out waiting for the upstream", extra=fields)
            return int(Status.OUT_OF_RESOURCES), "timeout waiting for the DICOMweb server"
        except Exception as exc:
            if _cleaned_up(path):
                logger.info("C-STORE not handled: its association already ended", extra=fields)
            else:
                logger.exception("C-STORE failed unexpectedly", extra=fields)
            return int(Status.PROCESSING_FAILURE), error_comment(exc)

    def _spooled(
        self,
        intake: SpoolIntake,
        path: Path,
        fields: dict[str, str],
        chosen: list[Destination] | None = None,
    ) -> tuple[int, str]:
        """fsync + rename into queue/ (or the gs:// object write), then success (auto-ack)
        or the STOW's own status.

        Nothing is acknowledged that is not durable: a volume below the headroom, a spool at
        its byte cap, or a failed fsync, rename (ENOSPC) or object write answers 0xA700 (retry
        later). This runs on pynetdicom's thread, never on the event loop.
        """
        spool = intake.spool
        size = path.stat().st_size
        refusal = spool.refusal(size)
        if refusal is not None:
            logger.warning("%s: C-STORE refused with 0xA700", refusal, extra=fields)
            return int(Status.OUT_OF_RESOURCES), "adapter spool volume full"
        identity = read_identity(path)
        if intake.destinations is not None:
            return self._fanned_out(
                intake, intake.destinations, path, identity, fields, chosen or [], size
            )
        try:
            queued = spool.commit(path, identity.sop_instance_uid)
        except OSError as exc:
            logger.error("C-STORE not spooled (%s) -> 0xA700", exc, extra=fields)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                spool.refused(size)
            return int(Status.OUT_OF_RESOURCES), "adapter spool write failed"
        if intake.auto_ack:
            intake.uploader.enqueue_threadsafe(queued, identity)
            return int(Status.SUCCESS), ""
        started = self._bridge.start(intake.uploader.upload_now, queued, identity)
        outcome = self._bridge.result(started, self._timeout)
        if outcome.status == Status.SUCCESS:
            logger.debug("stored instance", extra=fields)
        return outcome.status, outcome.comment

    def _fanned_out(
        self,
        intake: SpoolIntake,
        destinations: DestinationSpools,
        path: Path,
        identity: InstanceIdentity,
        fields: dict[str, str],
        chosen: list[Destination],
        size: int,
    ) -> tuple[int, str]:
        """Routing with a spool: linked into each chosen destination's queue (default: queue/)."""
        try:
            targets = destinations.commit(path, identity.sop_instance_uid, chosen)
        except OSError as exc:
            logger.error("C-STORE not spooled (%s) -> 0xA700", exc, extra=fields)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                intake.spool.refused(size)  # /readyz: not ready until it would fit
            return int(Status.OUT_OF_RESOURCES), "adapter spool write failed"
        if intake.auto_ack:
            for queue, queued in targets:
                queue.uploader.enqueue_threadsafe(queued, identity)
            return int(Status.SUCCESS), ""
        started = self._bridge.start(destinations.upload_now, targets, identity)
        outcome = self._bridge.result(started, self._timeout)
        if outcome.status == Status.SUCCESS:
            logger.debug("stored instance", extra=fields)
        return outcome.status, outcome.comment


def _transfer_syntax(event: Any) -> str | None:
    """The negotiated transfer syntax of a C-STORE's context (what its file meta says)."""
    syntax = getattr(getattr(event, "context", None), "transfer_syntax", None)
    return str(syntax) if syntax else None


def _cleaned_up(path: Path | None) -> bool:
    """True once AssociationCleanup removed the data set's file: nobody awaits the answer."""
    return path is not None and not path.exists()


class CommitmentHandler:
    """EVT_N_ACTION (Storage Commitment Push Model): answered at once; the report follows later."""

    def __init__(self, service: CommitmentService, *, metrics: ImportMetrics | None = None) -> None:
        self._service = service
        self._metrics = metrics or ImportMetrics(MetricsRegistry())

    def __call__(self, event: Any) -> tuple[int | Dataset, None]:
        fields = association_fields(event)
        try:
            # the Action Information is decoded on access: inside the try
            info = event.action_information
            self._service.request(fields["calling_aet"], event.action_type, info, fields)
            status, comment = int(Status.SUCCESS), ""
        except AdapterError as exc:
            logger.error("storage commitment request refused: %s", exc, extra=fields)
            status, comment = int(exc.status), error_comment(exc)
        except Exception as exc:
            logger.exception("storage commitment request failed unexpectedly", extra=fields)
            status, comment = int(Status.PROCESSING_FAILURE), error_comment(exc)
        with _never_raises("storage commitment"):
            self._metrics.commitment_requests.inc()
            if status != Status.SUCCESS:
                self._metrics.commitment_errors.inc()
        return status_answer(status, comment), None


class CFindHandler:
    """EVT_C_FIND: identifier → QIDO-RS pages → pending answers; C-CANCEL stops the paging."""

    def __init__(
        self, bridge: Bridge, find: FindService, *, metrics: ImportMetrics | None = None
    ) -> None:
        self._bridge = bridge
        self._find = find
        self._metrics = metrics or ImportMetrics(MetricsRegistry())

    def __call__(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        started = time.perf_counter()
        with _never_raises("C-FIND"):
            self._metrics.cfind_requests.inc()
        final: int | None = None
        try:
            for status, answer in self._answers(event):
                code = status if isinstance(status, int) else int(status.Status)
                if code != Status.PENDING:
                    final = code
                yield status, answer
        finally:
            with _never_raises("C-FIND"):
                self._metrics.cfind_seconds.observe(time.perf_counter() - started)
                if final == Status.CANCEL:
                    self._metrics.cfind_cancels.inc()
                elif final is not None and is_failure_code(final):
                    self._metrics.cfind_errors.inc()

    def _answers(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        fields = association_fields(event)
        try:
            sop_class = str(event.request.AffectedSOPClassUID)
            root = QueryRoot.PATIENT if sop_class == PATIENT_ROOT_FIND else QueryRoot.STUDY
            identifier = event.identifier
            matches = 0
            answers = self._bridge.iterate(self._find.find, identifier, root)
            try:
                for answer in answers:
                    if event.is_cancelled:
                        logger.info("C-FIND cancelled after %d matches", matches, extra=fields)
                        yield int(Status.CANCEL), None
                        return
                    matches += 1
                    yield int(Status.PENDING), answer
            finally:
                close = getattr(answers, "close", None)
                if close is not None:
                    close()
            logger.info("C-FIND answered %d matches", matches, extra=fields)
            yield int(Status.SUCCESS), None
        except AdapterError as exc:
            logger.error("C-FIND failed: %s -> 0x%04X", exc, exc.status, extra=fields)
            yield status_answer(exc.status, error_comment(exc)), None
        except Exception as exc:
            logger.exception("C-FIND failed unexpectedly", extra=fields)
            yield status_answer(Status.PROCESSING_FAILURE, error_comment(exc)), None


class RetrieveHandlers:
    """C-MOVE (`run_move`) and C-GET (`run_get`), run in the requesting association's thread:
    the retrieve pipeline (InstanceMover) sends the sub-operations, these answer the requester
    with pending and final responses."""

    def __init__(
        self,
        bridge: Bridge,
        aets: AetDictionary,
        *,
        mover: InstanceMover,
        cmove_aet: str = "",
        metrics: ImportMetrics | None = None,
    ) -> None:
        self._bridge = bridge
        self._aets = aets
        self._mover = mover
        self._cmove_aet = cmove_aet
        self._metrics = metrics or ImportMetrics(MetricsRegistry())

    def run_move(self, request: MoveRequest) -> None:
        """C-MOVE: destination from the AET dictionary, sub-operations over one association."""
        self._run(request, "C-MOVE", self._metrics.cmove)

    def run_get(self, request: GetRequest) -> None:
        """C-GET: the same pipeline, sub-operations back on the requesting association."""
        self._run(request, "C-GET", self._metrics.cget)

    def _run(self, request: MoveRequest, what: str, counters: RetrieveCounters) -> None:
        fields = association_fields(request)
        started = time.perf_counter()
        with _never_raises(what):
            counters.requests.inc()
        final: int = Status.PROCESSING_FAILURE
        try:
            final = self._serve(request, what, fields)
        except Exception as exc:
            logger.exception("%s failed unexpectedly", what, extra=fields)
            with contextlib.suppress(Exception):
                request.respond(Status.PROCESSING_FAILURE, error_comment=error_comment(exc))
        finally:
            with _never_raises(what):
                _count_retrieve(counters, final, time.perf_counter() - started)

    def _updates(
        self, request: MoveRequest, what: str, fields: dict[str, str]
    ) -> tuple[Iterator[list[MoveProgress]] | None, int]:
        """The pipeline's progress updates, or None and the status already answered."""
        peer = None
        if not isinstance(request, GetRequest):
            peer = self._aets.get(request.move_destination)
            if peer is None:
                logger.error(
                    "C-MOVE to unknown destination %r", request.move_destination, extra=fields
                )
                request.respond(
                    Status.MOVE_DESTINATION_UNKNOWN,
                    error_comment=lo_text(
                        f"destination {request.move_destination} not in the AET dictionary"
                    ),
                )
                return None, Status.MOVE_DESTINATION_UNKNOWN
        try:
            identifier = request.identifier()
        except Exception as exc:
            logger.error("%s identifier cannot be decoded: %s", what, exc, extra=fields)
            request.respond(Status.CANNOT_UNDERSTAND, error_comment="identifier cannot be decoded")
            return None, Status.CANNOT_UNDERSTAND
        root = (
            QueryRoot.PATIENT if request.sop_class_uid in PATIENT_ROOT_RETRIEVE else QueryRoot.STUDY
        )
        if isinstance(request, GetRequest):
            updates = self._bridge.iterate(
                self._mover.get, identifier, root, request.requester, request.is_cancelled
            )
            return updates, Status.SUCCESS
        assert peer is not None
        target = MoveDestination(
            self._aets.target(peer, self._cmove_aet),
            originator_aet=fields.get("calling_aet", ""),
            originator_message_id=request.message_id,
        )
        updates = self._bridge.iterate(
            self._mover.move, identifier, root, target, request.is_cancelled
        )
        return updates, Status.SUCCESS

    def _serve(self, request: MoveRequest, what: str, fields: dict[str, str]) -> int:
        """Serve the C-MOVE or C-GET; returns the final status it answered with."""
        updates, answered = self._updates(request, what, fields)
        if updates is None:
            return answered
        to = f" to {request.move_destination}" if request.move_destination else ""
        progress: MoveProgress | None = None
        cancelled = False
        try:
            for batch in updates:
                if progress is None:
                    progress = batch[-1]
                    logger.info("%s of %d instances%s", what, progress.remaining, to, extra=fields)
                    continue
                for update in batch:
                    progress = update
                    if update.cancelled:  # the pipeline polls for C-CANCEL, even mid-C-STORE
                        cancelled = True
                        break
                    request.pending(
                        remaining=update.remaining,
                        completed=update.completed,
                        failed=update.failed,
                        warning=update.warning,
                    )
                if cancelled:
                    break
        except AdapterError as exc:  # listing failed (the pipeline handles later failures)
            logger.error("%s failed: %s -> 0x%04X", what, exc, exc.status, extra=fields)
            request.respond(exc.status, error_comment=error_comment(exc))
            return exc.status
        except TimeoutError:
            logger.error("%s timed out", what, extra=fields)
            request.respond(Status.OUT_OF_RESOURCES, error_comment="timeout")
            return Status.OUT_OF_RESOURCES
        finally:
            close = getattr(updates, "close", None)
            if close is not None:
                close()  # stops fetching and sending, releases the destination association
        if request.gone:  # the requester aborted: nobody to answer
            logger.info("%s ended: the requester's association is gone", what, extra=fields)
            return Status.OUT_OF_RESOURCES_SUBOPERATIONS
        if cancelled and progress is not None:
            logger.info("%s cancelled", what, extra=fields)
            request.respond(
                Status.CANCEL,
                remaining=progress.remaining,
                completed=progress.completed,
                failed=progress.failed,
                warning=progress.warning,
                failed_uids=progress.failed_uids,
            )
            return Status.CANCEL
        if progress is None:  # the pipeline yields at least once; defensive
            request.respond(Status.PROCESSING_FAILURE)
            return Status.PROCESSING_FAILURE
        status = progress.final_status()
        logger.info(
            "%s%s done: 0x%04X, %d completed, %d warning, %d failed",
            what,
            to,
            status,
            progress.completed,
            progress.warning,
            progress.failed,
            extra=fields,
        )
        request.respond(
            status,
            completed=progress.completed,
            failed=progress.failed,
            warning=progress.warning,
            failed_uids=progress.failed_uids if status != Status.SUCCESS else (),
            error_comment=progress.cause if is_failure_code(status) else "",
        )
        return status


def _count_retrieve(counters: RetrieveCounters, final: int, seconds: float) -> None:
    counters.seconds.observe(seconds)
    if final == Status.CANCEL:
        counters.cancels.inc()
    elif is_warning_code(final):
        counters.warnings.inc()
    elif is_failure_code(final):
        counters.errors.inc()
