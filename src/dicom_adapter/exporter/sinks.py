"""Where exported instances go: a DIMSE peer (C-STORE) or a DICOMweb server (STOW-RS).

A sink either returns (the instance is stored) or raises `TransientFailure` (nack: Pub/Sub
redelivers) or `PermanentFailure` (retrying cannot help).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom.filereader import read_file_meta_info

from dicom_adapter.bridge import Bridge
from dicom_adapter.dicomweb.client import DicomwebClient
from dicom_adapter.dimse.scu import (
    MAX_CONTEXTS,
    AssociationError,
    AssociationTarget,
    RequestedContext,
    ScuTimeouts,
    open_association,
)
from dicom_adapter.dimse.server import wait_for_reactor_resume
from dicom_adapter.errors import AdapterError, UpstreamError
from dicom_adapter.importer.store import status_for
from dicom_adapter.status import Status, is_stored

logger = logging.getLogger(__name__)

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"


class TransientFailure(AdapterError):
    """The instance was not exported, but a later attempt may succeed (nack)."""

    retryable = True


class PermanentFailure(AdapterError):
    """The instance can never be exported as it is (ack, or nack with a dead-letter topic)."""


@dataclass(frozen=True)
class Instance:
    """A fetched Part-10 file and the UIDs that decide how it is sent."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def read_instance(path: Path) -> Instance:
    """Read the file meta of a fetched Part-10 file; PermanentFailure when it has none."""
    try:
        meta = read_file_meta_info(path)
        sop_class = str(meta.MediaStorageSOPClassUID)
        sop_instance = str(meta.MediaStorageSOPInstanceUID)
        syntax = str(meta.TransferSyntaxUID)
    except Exception as exc:
        raise PermanentFailure(f"fetched instance has no usable file meta: {exc}") from exc
    return Instance(path, sop_class, sop_instance, syntax)


class Sink(Protocol):
    """Stores one instance or raises TransientFailure / PermanentFailure."""

    async def send(self, instance: Instance) -> None:
        """Store `instance`."""

    async def close(self) -> None:
        """Release connections."""


def classify_cstore_status(code: int) -> type[AdapterError] | None:
    """None when stored (success/warning); else the failure class (0xA7xx = transient)."""
    if is_stored(code):
        return None
    if (code & 0xFF00) == Status.OUT_OF_RESOURCES:
        return TransientFailure
    return PermanentFailure


class CStoreSink:
    """C-STORE over one association kept open, reopened for new contexts or after a failure."""

    def __init__(
        self,
        bridge: Bridge,
        target: AssociationTarget,
        *,
        timeouts: ScuTimeouts | None = None,
    ) -> None:
        self._bridge = bridge
        self._target = target
        self._timeouts = timeouts or ScuTimeouts()
        self._wanted: dict[tuple[str, str], None] = {}  # insertion-ordered set of pairs
        self._assoc: Any = None
        self._lock = asyncio.Lock()
        self.associations_opened = 0

    async def send(self, instance: Instance) -> None:
        """Send the file byte for byte; sends are serialized on the one association."""
        async with self._lock:
            await self._bridge.run_blocking(self._send_blocking, instance)

    def _contexts(self) -> list[RequestedContext]:
        pairs: dict[tuple[str, str], None] = {}
        for sop_class, syntax in self._wanted:
            pairs[(sop_class, syntax)] = None
            pairs[(sop_class, EXPLICIT_VR_LE)] = None
            pairs[(sop_class, IMPLICIT_VR_LE)] = None
        # One context per pair, so the peer can accept exactly the file's transfer syntax.
        contexts = [RequestedContext(sop_class, (syntax,)) for sop_class, syntax in pairs]
        return contexts[-MAX_CONTEXTS:]

    def _abort(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is not None:
            try:
                assoc.abort()
            except Exception:
                logger.debug("abort failed", exc_info=True)

    def _send_blocking(self, instance: Instance) -> None:
        key = (instance.sop_class_uid, instance.transfer_syntax)
        renegotiate = key not in self._wanted
        if renegotiate:
            self._wanted[key] = None
        if self._assoc is None or not self._assoc.is_established or renegotiate:
            self._release()
            try:
                self._assoc = open_association(
                    self._target, self._contexts(), timeouts=self._timeouts
                )
            except AssociationError as exc:
                raise TransientFailure(str(exc)) from exc
            self.associations_opened += 1
            logger.info(
                "association opened to %s@%s:%d (%d presentation contexts)",
                self._target.called_aet,
                self._target.host,
                self._target.port,
                len(self._assoc.accepted_contexts),
            )
        assoc = self._assoc
        accepted = any(
            cx.abstract_syntax == instance.sop_class_uid
            and cx.transfer_syntax
            and cx.transfer_syntax[0] == instance.transfer_syntax
            for cx in assoc.accepted_contexts
        )
        if not accepted:
            raise PermanentFailure(
                f"the peer accepts no context for SOP class {instance.sop_class_uid} "
                f"in transfer syntax {instance.transfer_syntax}"
            )
        try:
            wait_for_reactor_resume(assoc)
            status = assoc.send_c_store(instance.path)
        except (RuntimeError, ValueError, AttributeError, OSError) as exc:
            self._abort()
            raise TransientFailure(f"C-STORE could not be sent: {exc}") from exc
        code = getattr(status, "Status", None)
        if code is None:  # no response: aborted, timed out or invalid
            self._abort()
            raise TransientFailure("no C-STORE response (association aborted or timed out)")
        failure = classify_cstore_status(int(code))
        if failure is not None:
            self._abort()
            raise failure(f"C-STORE failed with status 0x{int(code):04X}")

    def _release(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is not None and assoc.is_established:
            try:
                assoc.release()
            except Exception:
                logger.debug("release failed", exc_info=True)

    async def close(self) -> None:
        """Release the association."""
        async with self._lock:
            if self._assoc is not None:
                await asyncio.to_thread(self._release)


class StowSink:
    """STOW-RS one instance at a time over the pooled HTTP client."""

    def __init__(self, client: DicomwebClient, stow_url: str) -> None:
        self._client = client
        self._url = stow_url

    async def send(self, instance: Instance) -> None:
        """Store the file; the instance must come back in ReferencedSOPSequence."""
        try:
            response = await self._client.stow(self._url, [instance.path])
        except UpstreamError as exc:
            if exc.retryable:
                raise TransientFailure(str(exc)) from exc
            raise PermanentFailure(str(exc)) from exc
        code = status_for(response, instance.sop_instance_uid)
        if is_stored(code):
            return
        http = response.http_status
        message = f"STOW-RS: HTTP {http}, status 0x{int(code):04X}"
        if http >= 500 or http in (401, 403, 408, 429) or code == Status.OUT_OF_RESOURCES:
            raise TransientFailure(message)
        raise PermanentFailure(message)

    async def close(self) -> None:
        """Nothing to release: the app closes the HTTP client."""
