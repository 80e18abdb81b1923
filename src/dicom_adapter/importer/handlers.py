"""Thin synchronous pynetdicom handlers: validate, cross into the loop, answer a status.

They never let an exception escape (pynetdicom would answer a generic 0xC211).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom import Dataset

from dicom_adapter.bridge import Bridge
from dicom_adapter.dicomweb.qido import QueryRoot
from dicom_adapter.dimse.server import PATIENT_ROOT_FIND
from dicom_adapter.errors import AdapterError
from dicom_adapter.importer.find import FindService
from dicom_adapter.importer.store import StoreService
from dicom_adapter.status import Status

logger = logging.getLogger(__name__)


def association_fields(event: Any) -> dict[str, str]:
    """Log fields naming the association and the calling AE."""
    assoc = event.assoc
    try:
        calling = str(assoc.requestor.ae_title).strip()
    except AttributeError:
        calling = ""
    return {"association": str(getattr(assoc, "name", "")), "calling_aet": calling}


class EarlyStores:
    """Uploads started the moment a C-STORE dataset is complete, before pynetdicom dispatches it.

    Called from pynetdicom's DUL thread (DatasetCompletionHook); the C-STORE handler then only
    collects the result. This takes pynetdicom's request dispatch off the critical path of a
    peer that waits for each response. The upload is the ordinary one: it validates the
    dataset first and retries as usual.
    """

    def __init__(self, bridge: Bridge, store: StoreService) -> None:
        self._bridge = bridge
        self._store = store
        self._lock = threading.Lock()
        self._started: dict[Path, concurrent.futures.Future[int]] = {}
        self.count = 0  # early starts so far (observability and tests)

    def completed(self, path: Path) -> None:
        """DUL thread: the dataset in `path` is complete; start storing it."""
        future = self._bridge.start(self._store.store_file, path)
        with self._lock:
            self._started[path] = future
            self.count += 1

    def take(self, path: Path) -> concurrent.futures.Future[int] | None:
        """Handler thread: the store already under way for `path`, if any."""
        with self._lock:
            return self._started.pop(path, None)


class CStoreHandler:
    """EVT_C_STORE: spooled file → STOW-RS → C-STORE-RSP status."""

    def __init__(
        self,
        bridge: Bridge,
        store: StoreService,
        timeout: float,
        early: EarlyStores | None = None,
    ) -> None:
        self._bridge = bridge
        self._store = store
        self._timeout = timeout
        self._early = early

    def __call__(self, event: Any) -> int:
        fields = association_fields(event)
        try:
            fields["sop_instance_uid"] = str(event.request.AffectedSOPInstanceUID or "")
            path = event.dataset_path
            started = self._early.take(path) if self._early is not None else None
            if started is None:
                started = self._bridge.start(self._store.store_file, path)
            status = self._bridge.result(started, self._timeout)
            if status == Status.SUCCESS:
                logger.debug("stored instance", extra=fields)
            return status
        except AdapterError as exc:
            logger.error("C-STORE failed: %s -> 0x%04X", exc, exc.status, extra=fields)
            return int(exc.status)
        except TimeoutError:
            logger.error("C-STORE timed out waiting for the upstream", extra=fields)
            return int(Status.OUT_OF_RESOURCES)
        except Exception:
            logger.exception("C-STORE failed unexpectedly", extra=fields)
            return int(Status.PROCESSING_FAILURE)


class CFindHandler:
    """EVT_C_FIND: identifier → QIDO-RS pages → pending answers; C-CANCEL stops the paging."""

    def __init__(self, bridge: Bridge, find: FindService) -> None:
        self._bridge = bridge
        self._find = find

    def __call__(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
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
            yield int(exc.status), None
        except Exception:
            logger.exception("C-FIND failed unexpectedly", extra=fields)
            yield int(Status.PROCESSING_FAILURE), None
