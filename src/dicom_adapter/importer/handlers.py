"""Thin synchronous pynetdicom handlers: validate, cross into the loop, answer a status.

They never let an exception escape (pynetdicom would answer a generic 0xC211).
"""

from __future__ import annotations

import logging
from typing import Any

from dicom_adapter.bridge import Bridge
from dicom_adapter.errors import AdapterError
from dicom_adapter.importer.store import StoreService, read_identity
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


class CStoreHandler:
    """EVT_C_STORE: spooled file → STOW-RS → C-STORE-RSP status."""

    def __init__(self, bridge: Bridge, store: StoreService, timeout: float) -> None:
        self._bridge = bridge
        self._store = store
        self._timeout = timeout

    def __call__(self, event: Any) -> int:
        fields = association_fields(event)
        try:
            path = event.dataset_path
            identity = read_identity(path)
            fields["sop_instance_uid"] = identity.sop_instance_uid
            status = self._bridge.run_with_timeout(self._timeout, self._store.store, path, identity)
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
