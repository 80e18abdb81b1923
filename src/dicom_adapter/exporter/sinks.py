"""Where exported instances go: a DIMSE peer (C-STORE) or a DICOMweb server (STOW-RS).

A sink either returns (the instance is stored) or raises `TransientFailure` (nack: Pub/Sub
redelivers) or `PermanentFailure` (retrying cannot help). Instances arrive as fetched by
WADO-RS (`FetchedInstance`: in memory, or spooled when large); the caller discards them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from dicom_adapter.dicomweb.client import DicomwebClient
from dicom_adapter.dicomweb.instances import FetchedInstance
from dicom_adapter.dimse.part10 import DatasetSource, FileMeta
from dicom_adapter.dimse.scu import (
    DEFAULT_MAX_PDU,
    MAX_CONTEXTS,
    AssociationError,
    AssociationTarget,
    RequestedContext,
    ScuTimeouts,
)
from dicom_adapter.dimse.store_scu import AssociationLostError, StoreAssociation, StoreResponse
from dicom_adapter.dimse.syntaxes import IMPLICIT_VR_LE, UNCOMPRESSED, uncompressed_for
from dicom_adapter.errors import AdapterError, UpstreamError
from dicom_adapter.importer.store import status_for
from dicom_adapter.status import Status, is_stored

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"


class TransientFailure(AdapterError):
    """The instance was not exported, but a later attempt may succeed (nack)."""

    retryable = True


class PermanentFailure(AdapterError):
    """The instance can never be exported as it is (ack, or nack with a dead-letter topic)."""


Refetch = Callable[[str], Awaitable[FetchedInstance]]
"""Fetch the same instance again in the given transfer syntax (the server transcodes).

The caller of a Refetch owns (and discards) the instance it returns.
"""


def usable_meta(instance: FetchedInstance) -> FileMeta:
    """The instance's file meta; PermanentFailure when it had none we could read."""
    meta = instance.meta
    if meta is None:
        raise PermanentFailure(f"fetched instance has no usable file meta: {instance.error}")
    uids = (meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax)
    if not all(uid.isascii() for uid in uids):  # could never go into a DIMSE command
        raise PermanentFailure(f"fetched instance has a non-ASCII UID in its file meta: {uids}")
    return meta


class Sink(Protocol):
    """Stores one instance or raises TransientFailure / PermanentFailure."""

    async def send(self, instance: FetchedInstance, refetch: Refetch | None = None) -> None:
        """Store `instance`; `refetch` gets it in another transfer syntax if the sink needs it."""

    async def close(self) -> None:
        """Release connections."""


def classify_cstore_status(code: int) -> type[AdapterError] | None:
    """None when stored (success/warning); else the failure class (0xA7xx = transient)."""
    if is_stored(code):
        return None
    if (code & 0xFF00) == Status.OUT_OF_RESOURCES:
        return TransientFailure
    return PermanentFailure


class StoreConnection(Protocol):
    """What the C-STORE sink needs of an association (`StoreAssociation`)."""

    @property
    def is_open(self) -> bool:
        """False once released, aborted or broken."""

    @property
    def accepted(self) -> dict[tuple[str, str], int]:
        """(SOP class UID, transfer syntax UID) -> presentation context ID."""

    def context_for(self, sop_class_uid: str, transfer_syntax: str) -> int | None:
        """The accepted context for this SOP class in exactly this transfer syntax."""

    def accepted_syntaxes(self, sop_class_uid: str) -> list[str]:
        """The transfer syntaxes accepted for a SOP class."""

    async def c_store(
        self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: DatasetSource
    ) -> StoreResponse:
        """One C-STORE; raises AssociationLostError when the association breaks."""

    async def release(self) -> None:
        """A-RELEASE (aborts when the peer does not answer)."""


Opener = Callable[[AssociationTarget, Sequence[RequestedContext]], Awaitable[StoreConnection]]


class CStoreSink:
    """C-STORE over one association kept open, reopened for new contexts or after a failure.

    Every (SOP class, transfer syntax) seen gets its own presentation context, plus Explicit
    and Implicit VR Little Endian for each SOP class (and Verification, so a peer that takes
    none of our storage classes still associates and the failure is per instance, permanent).
    When the peer refuses the instance's transfer syntax but accepts an uncompressed one, the
    instance is fetched again in that syntax through `refetch` (the DICOMweb server transcodes).
    Data sets go out byte for byte on the event loop (`StoreAssociation`); sends are serialized.
    """

    def __init__(
        self,
        target: AssociationTarget,
        *,
        timeouts: ScuTimeouts | None = None,
        max_pdu: int = DEFAULT_MAX_PDU,
        opener: Opener | None = None,
    ) -> None:
        self._target = target
        self._timeouts = timeouts or ScuTimeouts()
        self._max_pdu = max_pdu
        self._opener = opener or self._open_store_association
        self._wanted: dict[tuple[str, str], None] = {}  # (SOP class, syntax), least recent first
        self._proposed: frozenset[tuple[str, str]] = frozenset()
        self._assoc: StoreConnection | None = None
        self._lock = asyncio.Lock()
        self._refetch_logged: set[tuple[str, str]] = set()
        self.associations_opened = 0

    async def _open_store_association(
        self, target: AssociationTarget, contexts: Sequence[RequestedContext]
    ) -> StoreConnection:
        return await StoreAssociation.open(
            target, contexts, timeouts=self._timeouts, max_pdu=self._max_pdu
        )

    async def send(self, instance: FetchedInstance, refetch: Refetch | None = None) -> None:
        """Send the data set byte for byte, refetching it uncompressed if the peer needs that."""
        meta = usable_meta(instance)
        async with self._lock:
            syntax = await self._store(meta, instance)
        if syntax is None:
            return
        if refetch is None:
            raise PermanentFailure(
                f"the peer does not accept SOP class {meta.sop_class_uid} in transfer syntax "
                f"{meta.transfer_syntax} and the instance cannot be fetched again"
            )
        refused = (meta.sop_class_uid, meta.transfer_syntax)
        logger.log(
            logging.DEBUG if refused in self._refetch_logged else logging.INFO,
            "the peer does not accept transfer syntax %s for SOP class %s; fetching the "
            "instance as %s",
            meta.transfer_syntax,
            meta.sop_class_uid,
            syntax,
        )
        self._refetch_logged.add(refused)  # INFO once per pair, not once per instance
        again = await refetch(syntax)  # outside the lock: other sends go on meanwhile
        try:
            again_meta = usable_meta(again)
            async with self._lock:
                if await self._store(again_meta, again) is not None:
                    raise PermanentFailure(
                        f"asked for transfer syntax {syntax}, the DICOMweb server sent "
                        f"{again_meta.transfer_syntax}, which the peer does not accept"
                    )
        finally:
            again.discard()

    async def _store(self, meta: FileMeta, instance: FetchedInstance) -> str | None:
        """C-STORE when a context fits (None); else the uncompressed syntax to fetch it in.

        A reused association that turns out to be lost (e.g. the peer closed it while idle)
        is reopened once for the same instance.
        """
        while True:
            assoc, fresh = await self._association_for(meta.sop_class_uid, meta.transfer_syntax)
            context = assoc.context_for(meta.sop_class_uid, meta.transfer_syntax)
            if context is None:
                return self._fallback_syntax(assoc, meta)
            try:
                response = await assoc.c_store(
                    context, meta.sop_class_uid, meta.sop_instance_uid, instance.dataset()
                )
            except AssociationLostError as exc:
                self._assoc = None
                if fresh:
                    raise TransientFailure(f"C-STORE could not be completed: {exc}") from exc
                logger.info("the association was lost (%s); reopening it", exc)
                continue
            failure = classify_cstore_status(response.status)
            if failure is None:
                return None
            await self._drop()  # start afresh after a failure
            comment = f": {response.error_comment}" if response.error_comment else ""
            raise failure(f"C-STORE failed with status 0x{response.status:04X}{comment}")

    @staticmethod
    def _fallback_syntax(assoc: StoreConnection, meta: FileMeta) -> str:
        accepted = assoc.accepted_syntaxes(meta.sop_class_uid)
        if not accepted:
            raise PermanentFailure(
                f"the peer accepts no presentation context for SOP class {meta.sop_class_uid}"
            )
        syntax = uncompressed_for(accepted, meta.transfer_syntax)
        if syntax is not None:
            return syntax
        raise PermanentFailure(
            f"the peer accepts SOP class {meta.sop_class_uid} only in transfer syntax "
            f"{', '.join(accepted)}: neither the instance's {meta.transfer_syntax} nor an "
            "uncompressed one it could be transcoded to"
        )

    async def _association_for(
        self, sop_class_uid: str, transfer_syntax: str
    ) -> tuple[StoreConnection, bool]:
        """An open association that proposed this pair; True when it was opened just now."""
        key = (sop_class_uid, transfer_syntax)
        self._wanted.pop(key, None)
        self._wanted[key] = None
        while len(self._wanted) > MAX_CONTEXTS:
            del self._wanted[next(iter(self._wanted))]
        assoc = self._assoc
        if assoc is not None and assoc.is_open and key in self._proposed:
            return assoc, False
        await self._drop()
        contexts, proposed = self._contexts()
        try:
            assoc = await self._opener(self._target, contexts)
        except AssociationError as exc:
            raise TransientFailure(str(exc)) from exc
        self._assoc, self._proposed = assoc, proposed
        self.associations_opened += 1
        logger.info(
            "association opened to %s@%s:%d (%d presentation contexts)",
            self._target.called_aet,
            self._target.host,
            self._target.port,
            len(assoc.accepted),
        )
        return assoc, True

    def _contexts(self) -> tuple[list[RequestedContext], frozenset[tuple[str, str]]]:
        """One context per pair (the peer accepts exactly the file's syntax), most recent first."""
        pairs: dict[tuple[str, str], None] = {}
        for sop_class, syntax in reversed(self._wanted):
            pairs.setdefault((sop_class, syntax), None)
            for fallback in UNCOMPRESSED:
                pairs.setdefault((sop_class, fallback), None)
        chosen = list(pairs)[: MAX_CONTEXTS - 1]
        contexts = [RequestedContext(sop_class, (syntax,)) for sop_class, syntax in chosen]
        contexts.append(RequestedContext(VERIFICATION, (IMPLICIT_VR_LE,)))
        return contexts, frozenset(chosen)

    async def _drop(self) -> None:
        assoc, self._assoc = self._assoc, None
        self._proposed = frozenset()
        if assoc is not None and assoc.is_open:
            await assoc.release()

    async def close(self) -> None:
        """Release the association."""
        async with self._lock:
            await self._drop()


class StowSink:
    """STOW-RS one instance at a time over the pooled HTTP client."""

    def __init__(self, client: DicomwebClient, stow_url: str) -> None:
        self._client = client
        self._url = stow_url

    async def send(self, instance: FetchedInstance, refetch: Refetch | None = None) -> None:
        """Store the instance as fetched; it must come back in ReferencedSOPSequence."""
        meta = usable_meta(instance)
        body = instance.path if instance.path is not None else instance.data
        if body is None:
            raise PermanentFailure("the fetched instance was already discarded")
        try:
            response = await self._client.stow(self._url, [body])
        except UpstreamError as exc:
            if exc.retryable:
                raise TransientFailure(str(exc)) from exc
            raise PermanentFailure(str(exc)) from exc
        code = status_for(response, meta.sop_instance_uid)
        if is_stored(code):
            return
        http = response.http_status
        message = f"STOW-RS: HTTP {http}, status 0x{int(code):04X}"
        if http >= 500 or http in (401, 403, 408, 429) or code == Status.OUT_OF_RESOURCES:
            raise TransientFailure(message)
        raise PermanentFailure(message)

    async def close(self) -> None:
        """Nothing to release: the app closes the HTTP client."""
