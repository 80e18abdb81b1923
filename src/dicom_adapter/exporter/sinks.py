"""Where exported instances go: a DIMSE peer (C-STORE) or a DICOMweb server (STOW-RS).

A sink either returns (the instance is stored) or raises `PermanentFailure` (retrying cannot
help: a C-STORE status listed as permanent, by default 0xA900 and 0x0122; for STOW also HTTP
400), `SinkUnavailable` (the peer cannot be reached at all: the worker's circuit breaker holds
every export and `probe`s the sink until it answers) or `TransientFailure` (anything else: this
message backs off and is retried). Instances arrive as fetched by WADO-RS (`FetchedInstance`:
in memory, or spooled when large); the caller discards them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import httpx

from dicom_adapter.dicom.part10 import DatasetSource, FileMeta
from dicom_adapter.dicom.syntaxes import IMPLICIT_VR_LE, UNCOMPRESSED, uncompressed_for
from dicom_adapter.dicomweb.client import DicomwebClient
from dicom_adapter.dicomweb.instances import FetchedInstance
from dicom_adapter.dicomweb.stow import status_for
from dicom_adapter.dimse import pdu
from dicom_adapter.dimse.scu import (
    DEFAULT_MAX_PDU,
    MAX_CONTEXTS,
    AssociationError,
    AssociationTarget,
    RequestedContext,
    ScuTimeouts,
)
from dicom_adapter.dimse.store_scu import AssociationLostError, StoreAssociation, StoreResponse
from dicom_adapter.errors import AdapterError, UpstreamError
from dicom_adapter.status import Status, is_stored

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"


class TransientFailure(AdapterError):
    """The instance was not exported, but a later attempt may succeed (nack)."""

    retryable = True


class SinkUnavailable(TransientFailure):
    """The sink cannot be reached (connection, association, 5xx/429): nothing will get through."""


class PermanentFailure(AdapterError):
    """The instance can never be exported as it is (ack, or nack with a dead-letter topic)."""


DEFAULT_PERMANENT_STATUSES = frozenset(
    {Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, Status.SOP_CLASS_NOT_SUPPORTED}
)
"""C-STORE statuses that mean "never": 0xA900 data set does not match SOP class, 0x0122 SOP
class not supported. Every other failure status is retried (PACS use 0x0110, 0xA7xx and
0xC0xx for passing trouble)."""


Refetch = Callable[[str], Awaitable[FetchedInstance]]
"""Fetch the same instance again in the given transfer syntax (the server transcodes).

The caller of a Refetch owns (and discards) the instance it returns.
"""


def usable_meta(instance: FetchedInstance) -> FileMeta:
    """The instance's file meta; TransientFailure when it had none we could read.

    Not permanent: a proxy's error page or a cut response looks the same, and a message that
    keeps failing ends in the dead-letter topic instead of being dropped.
    """
    meta = instance.meta
    if meta is None:
        raise TransientFailure(f"fetched instance has no usable file meta: {instance.error}")
    uids = (meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax)
    if not all(pdu.encodable_uid(uid) for uid in uids):  # could never go into a DIMSE message
        raise TransientFailure(f"fetched instance has a UID no DIMSE message can carry: {uids}")
    return meta


class Sink(Protocol):
    """Stores one instance or raises TransientFailure / PermanentFailure."""

    async def send(self, instance: FetchedInstance, refetch: Refetch | None = None) -> None:
        """Store `instance`; `refetch` gets it in another transfer syntax if the sink needs it."""

    async def probe(self) -> None:
        """One cheap reachability check; raises SinkUnavailable while the sink is down."""

    async def close(self) -> None:
        """Release connections."""


def classify_cstore_status(
    code: int, permanent: frozenset[int] = DEFAULT_PERMANENT_STATUSES
) -> type[AdapterError] | None:
    """None when stored (success/warning); PermanentFailure for a listed status; else transient."""
    if is_stored(code):
        return None
    return PermanentFailure if code in permanent else TransientFailure


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
    Once an association cannot be opened the sink fails fast (SinkUnavailable, no connect)
    until `probe` opens one again, so sends queued behind the lock do not each wait out a
    connect timeout.
    """

    def __init__(
        self,
        target: AssociationTarget,
        *,
        timeouts: ScuTimeouts | None = None,
        max_pdu: int = DEFAULT_MAX_PDU,
        opener: Opener | None = None,
        permanent_statuses: frozenset[int] = DEFAULT_PERMANENT_STATUSES,
    ) -> None:
        self._target = target
        self._permanent = permanent_statuses
        self._unreachable: AssociationError | None = None
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
                    raise TransientFailure(
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
                if fresh:  # the peer took the association but not this instance
                    raise TransientFailure(f"C-STORE could not be completed: {exc}") from exc
                logger.info("the association was lost (%s); reopening it", exc)
                continue
            failure = classify_cstore_status(response.status, self._permanent)
            if failure is None:
                return None
            await self._drop()  # start afresh after a failure
            comment = f": {response.error_comment}" if response.error_comment else ""
            raise failure(f"C-STORE failed with status 0x{response.status:04X}{comment}")

    def _fallback_syntax(self, assoc: StoreConnection, meta: FileMeta) -> str:
        """Refusing every context we can offer for a SOP class is 0x0122 said in negotiation."""
        unsupported = (
            PermanentFailure
            if Status.SOP_CLASS_NOT_SUPPORTED in self._permanent
            else TransientFailure
        )
        accepted = assoc.accepted_syntaxes(meta.sop_class_uid)
        if not accepted:
            raise unsupported(
                f"the peer accepts no presentation context for SOP class {meta.sop_class_uid}"
            )
        syntax = uncompressed_for(accepted, meta.transfer_syntax)
        if syntax is not None:
            return syntax
        raise unsupported(
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
        if self._unreachable is not None:
            raise SinkUnavailable(f"the peer is unreachable: {self._unreachable}")
        return await self._open(), True

    async def _open(self) -> StoreConnection:
        """Open an association proposing every wanted pair; SinkUnavailable when it fails."""
        await self._drop()
        contexts, proposed = self._contexts()
        try:
            assoc = await self._opener(self._target, contexts)
        except AssociationError as exc:
            self._unreachable = exc
            raise SinkUnavailable(str(exc)) from exc
        self._unreachable = None
        self._assoc, self._proposed = assoc, proposed
        self.associations_opened += 1
        logger.info(
            "association opened to %s@%s:%d (%d presentation contexts)",
            self._target.called_aet,
            self._target.host,
            self._target.port,
            len(assoc.accepted),
        )
        return assoc

    async def probe(self) -> None:
        """Reachable when an association is open or opens now (it is kept for the next send)."""
        async with self._lock:
            if self._assoc is None or not self._assoc.is_open:
                await self._open()

    def forget_failure(self) -> None:
        """The peer was reached by another association: the next send may try to connect."""
        self._unreachable = None

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


class CStoreSinkPool:
    """Up to `size` associations to one peer (--peer_max_associations), each a CStoreSink.

    A send takes the most recently used idle association (so a light load keeps using one and
    the others open only when sends overlap) and gives it back after. Once any of them finds
    the peer unreachable, every send fails fast (SinkUnavailable) until `probe` reaches it.
    """

    def __init__(self, sinks: Sequence[CStoreSink]) -> None:
        if not sinks:
            raise ValueError("a pool needs at least one sink")
        self._sinks = list(sinks)
        self._idle: asyncio.LifoQueue[CStoreSink] = asyncio.LifoQueue()
        for sink in reversed(self._sinks):
            self._idle.put_nowait(sink)
        self._down: SinkUnavailable | None = None
        self._closed = False

    @property
    def associations_opened(self) -> int:
        """Associations opened so far by all members."""
        return sum(sink.associations_opened for sink in self._sinks)

    async def send(self, instance: FetchedInstance, refetch: Refetch | None = None) -> None:
        """Send on an idle association (waiting for one when all are busy)."""
        if self._closed:
            raise SinkUnavailable("the C-STORE sink is closed (shutting down)")
        if self._down is not None:
            raise SinkUnavailable(str(self._down))
        sink = await self._idle.get()
        try:
            await sink.send(instance, refetch)
        except SinkUnavailable as exc:
            self._down = exc
            raise
        finally:
            self._idle.put_nowait(sink)

    async def probe(self) -> None:
        """Reachable when one member's association is open or opens now."""
        sink = await self._idle.get()
        try:
            await sink.probe()
        finally:
            self._idle.put_nowait(sink)
        self._down = None
        for member in self._sinks:
            member.forget_failure()

    async def close(self) -> None:
        """Release every association, all at once (each may wait for its peer's answer)."""
        self._closed = True
        await asyncio.gather(*(sink.close() for sink in self._sinks))


class StowSink:
    """STOW-RS one instance at a time over the pooled HTTP client.

    Permanent: a FailureReason listed as permanent, or HTTP 400 (the server cannot understand
    the instance) unless its reason says out of resources. Unreachable: connection errors,
    timeouts, 408, 429, 5xx (after the client's own retries). A 409 or FailureReason 0x0111
    (duplicate) is a success when a QIDO finds the instance there with the same SOP class: a
    redelivered message whose first ack was lost. Anything else (401/403, other 409s, a 200
    that stored nothing) is transient for this message.
    """

    def __init__(
        self,
        client: DicomwebClient,
        stow_url: str,
        *,
        permanent_statuses: frozenset[int] = DEFAULT_PERMANENT_STATUSES,
    ) -> None:
        self._client = client
        self._url = stow_url
        self._root = stow_url.rstrip("/").removesuffix("/studies")
        self._permanent = permanent_statuses

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
                raise SinkUnavailable(str(exc)) from exc
            raise TransientFailure(str(exc)) from exc
        code = status_for(response, meta.sop_instance_uid)
        if is_stored(code):
            return
        http = response.http_status
        message = f"STOW-RS: HTTP {http}, status 0x{int(code):04X}"
        if _http_unavailable(http):
            raise SinkUnavailable(message)
        if (http == 409 or code == Status.DUPLICATE_SOP_INSTANCE) and await self._already_there(
            meta
        ):
            logger.info("STOW-RS: %s; the instance is already stored there", message)
            return
        if code in self._permanent:
            raise PermanentFailure(message)
        if http == 400 and (code & 0xFF00) != Status.OUT_OF_RESOURCES:
            raise PermanentFailure(message)
        raise TransientFailure(message)

    async def _already_there(self, meta: FileMeta) -> bool:
        """True when QIDO finds this SOP Instance UID with the same SOP class at the sink."""
        params = [("SOPInstanceUID", meta.sop_instance_uid), ("includefield", "00080016")]
        try:
            async for match in self._client.qido(f"{self._root}/instances", params, page_size=10):
                if match.get("00080016", {}).get("Value", [None])[0] == meta.sop_class_uid:
                    return True
        except UpstreamError as exc:
            logger.info("STOW-RS: could not check for a stored duplicate: %s", exc)
        return False

    async def probe(self) -> None:
        """One OPTIONS request to the STOW URL: any answer but 408/429/5xx means reachable."""
        try:
            response = await self._client.http.request("OPTIONS", self._url)
        except httpx.HTTPError as exc:
            raise SinkUnavailable(f"STOW-RS probe: {type(exc).__name__}: {exc}") from exc
        if _http_unavailable(response.status_code):
            raise SinkUnavailable(f"STOW-RS probe: HTTP {response.status_code}")

    async def close(self) -> None:
        """Nothing to release: the app closes the HTTP client."""


def _http_unavailable(code: int) -> bool:
    return code >= 500 or code in (408, 429)
