"""Thin synchronous pynetdicom handlers: validate, cross into the loop, answer a status.

They never let an exception escape (pynetdicom would answer a generic 0xC211).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from pathlib import Path
from typing import Any

from dicom_adapter.bridge import Bridge
from dicom_adapter.errors import AdapterError
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
