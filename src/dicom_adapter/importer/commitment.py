"""Storage commitment SCP (SPEC §1.7): N-ACTION → QIDO-RS verification → N-EVENT-REPORT.

The N-ACTION is answered at once; verification and the report run as a tracked background
task on the loop. The report goes out on a NEW association to the requester's AET-dictionary
entry, proposing the SCP role for us (PS3.4 J.3.3), and is retried with capped exponential
backoff while the requester cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_adapter.aets import AetDictionary, Peer
from dicom_adapter.bridge import Bridge
from dicom_adapter.dicomweb.client import DicomwebClient
from dicom_adapter.dimse.scu import (
    AssociationError,
    RequestedContext,
    ScuTimeouts,
    associate,
)
from dicom_adapter.dimse.server import STORAGE_COMMITMENT_PUSH_MODEL
from dicom_adapter.errors import AdapterError
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry
from dicom_adapter.status import Status

logger = logging.getLogger(__name__)

STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance
REQUEST_STORAGE_COMMITMENT = 1  # N-ACTION Action Type ID
EVENT_ALL_COMMITTED = 1  # N-EVENT-REPORT Event Type IDs
EVENT_SOME_FAILED = 2

_SOP_CLASS_UID = "00080016"
_SOP_INSTANCE_UID = "00080018"
_REPORT_SYNTAXES = (str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian))


class CommitmentRequestError(AdapterError):
    """The N-ACTION request cannot be served (malformed, unknown requester)."""

    status = Status.PROCESSING_FAILURE


@dataclass(frozen=True)
class ReferencedInstance:
    """One instance the requester asks us to commit."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class FailedInstance:
    """An instance we could not commit, with its FailureReason."""

    instance: ReferencedInstance
    reason: int


@dataclass(frozen=True)
class CommitmentResult:
    """The outcome of verifying one transaction."""

    transaction_uid: str
    committed: tuple[ReferencedInstance, ...]
    failed: tuple[FailedInstance, ...]

    @property
    def event_type(self) -> int:
        """1 when every instance is committed, 2 when any failed."""
        return EVENT_SOME_FAILED if self.failed else EVENT_ALL_COMMITTED


def _uid(value: Any) -> str:
    return str(value or "").strip(" \x00")


def parse_action_information(info: Dataset) -> tuple[str, tuple[ReferencedInstance, ...]]:
    """TransactionUID and referenced instances of a Request Storage Commitment N-ACTION."""
    try:
        transaction_uid = _uid(info.get("TransactionUID"))
        items = info.get("ReferencedSOPSequence")
        if not transaction_uid:
            raise CommitmentRequestError("missing TransactionUID")
        if not items:
            raise CommitmentRequestError("missing or empty ReferencedSOPSequence")
        instances: list[ReferencedInstance] = []
        for item in items:
            sop_class = _uid(item.get("ReferencedSOPClassUID"))
            sop_instance = _uid(item.get("ReferencedSOPInstanceUID"))
            if not sop_class or not sop_instance:
                raise CommitmentRequestError("ReferencedSOPSequence item without class/instance")
            instances.append(ReferencedInstance(sop_class, sop_instance))
    except CommitmentRequestError:
        raise
    except Exception as exc:  # pydicom decoding errors surface lazily, on access
        raise CommitmentRequestError(
            f"cannot decode Action Information: {exc}",
            comment="cannot decode Action Information",
        ) from exc
    return transaction_uid, tuple(instances)


def _reference(instance: ReferencedInstance) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = instance.sop_class_uid
    item.ReferencedSOPInstanceUID = instance.sop_instance_uid
    return item


def event_information(result: CommitmentResult) -> Dataset:
    """The N-EVENT-REPORT Event Information for `result` (PS3.4 J.3.3.1)."""
    info = Dataset()
    info.TransactionUID = result.transaction_uid
    if result.committed:
        info.ReferencedSOPSequence = [_reference(i) for i in result.committed]
    if result.failed:
        failed = []
        for failure in result.failed:
            item = _reference(failure.instance)
            item.FailureReason = int(failure.reason)
            failed.append(item)
        info.FailedSOPSequence = failed
    return info


def judge(
    transaction_uid: str,
    instances: Sequence[ReferencedInstance],
    found: dict[str, str | None],
    unverified: set[str],
    *,
    match_sop_class: bool,
) -> CommitmentResult:
    """Sort instances into committed and failed from what QIDO found (uid -> class or None)."""
    committed: list[ReferencedInstance] = []
    failed: list[FailedInstance] = []
    for instance in instances:
        uid = instance.sop_instance_uid
        if uid in unverified:
            failed.append(FailedInstance(instance, Status.PROCESSING_FAILURE))
        elif uid not in found:
            failed.append(FailedInstance(instance, Status.NO_SUCH_OBJECT_INSTANCE))
        elif match_sop_class and found[uid] not in (None, instance.sop_class_uid):
            failed.append(FailedInstance(instance, Status.CLASS_INSTANCE_CONFLICT))
        else:
            committed.append(instance)
    return CommitmentResult(transaction_uid, tuple(committed), tuple(failed))


def _json_uid(item: dict[str, Any], tag: str) -> str | None:
    element = item.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values or not isinstance(values[0], str):
        return None
    return values[0].strip() or None


class CommitmentService:
    """Serves Storage Commitment Push Model requests from a DICOMweb server's contents."""

    def __init__(
        self,
        client: DicomwebClient,
        dicomweb_root: str,
        aets: AetDictionary,
        *,
        aet: str,
        bridge: Bridge,
        report_attempts: int = 5,
        report_first_delay: float = 1.0,
        report_max_delay: float = 30.0,
        batch_size: int = 100,
        match_sop_class: bool = True,
        scu_timeouts: ScuTimeouts | None = None,
        metrics: ImportMetrics | None = None,
    ) -> None:
        if report_attempts < 1 or batch_size < 1:
            raise ValueError("report_attempts and batch_size must be at least 1")
        self._client = client
        self._root = dicomweb_root.rstrip("/")
        self._aets = aets
        self._aet = aet
        self._bridge = bridge
        self._attempts = report_attempts
        self._first_delay = report_first_delay
        self._max_delay = report_max_delay
        self._batch_size = batch_size
        self._match_sop_class = match_sop_class
        self._scu_timeouts = scu_timeouts or ScuTimeouts()
        self._metrics = metrics or ImportMetrics(MetricsRegistry())

    # ------------------------------------------------------------------ pynetdicom thread

    def request(
        self,
        calling_aet: str,
        action_type: int,
        action_information: Dataset,
        fields: dict[str, str],
    ) -> None:
        """Accept a Request Storage Commitment: verification and report go on in the background.

        Raises an AdapterError whose status and comment answer the N-ACTION when refused.
        """
        if action_type != REQUEST_STORAGE_COMMITMENT:
            raise CommitmentRequestError(
                f"N-ACTION with action type {action_type} refused",
                status=Status.NO_SUCH_ACTION,
                comment="only action type 1 is supported",
            )
        peer = self._aets.get(calling_aet)
        if peer is None:
            raise CommitmentRequestError(
                f"storage commitment from {calling_aet!r}: not in the AET dictionary",
                comment=f"AET {calling_aet} unknown: add it to the AET dictionary",
            )
        transaction_uid, instances = parse_action_information(action_information)
        fields["transaction_uid"] = transaction_uid
        self._bridge.submit(self.commit, peer, transaction_uid, instances, fields)
        logger.info("storage commitment requested for %d instances", len(instances), extra=fields)

    # ------------------------------------------------------------------ event loop

    async def commit(
        self,
        peer: Peer,
        transaction_uid: str,
        instances: Sequence[ReferencedInstance],
        fields: dict[str, str] | None = None,
    ) -> CommitmentResult:
        """Verify the instances and deliver the report (with retries); returns the result."""
        fields = fields or {}
        result = await self.verify(transaction_uid, instances)
        logger.info(
            "storage commitment verified: %d committed, %d failed",
            len(result.committed),
            len(result.failed),
            extra=fields,
        )
        await self.deliver(peer, result, fields)
        return result

    async def verify(
        self, transaction_uid: str, instances: Sequence[ReferencedInstance]
    ) -> CommitmentResult:
        """QIDO-RS the instances in UID-list batches and judge each one."""
        uids = list(dict.fromkeys(i.sop_instance_uid for i in instances))
        found: dict[str, str | None] = {}
        unverified: set[str] = set()
        for start in range(0, len(uids), self._batch_size):
            batch = uids[start : start + self._batch_size]
            try:
                found.update(await self._lookup(batch))
            except AdapterError as exc:
                logger.error("storage commitment: QIDO-RS failed for %d UIDs: %s", len(batch), exc)
                self._metrics.commitment_qidors_errors.inc()
                unverified.update(batch)
        return judge(
            transaction_uid, instances, found, unverified, match_sop_class=self._match_sop_class
        )

    async def _lookup(self, batch: Sequence[str]) -> dict[str, str | None]:
        """SOP Class UID (or None if not returned) of each UID in `batch` the server has."""
        wanted = set(batch)
        found: dict[str, str | None] = {}
        params = [("SOPInstanceUID", ",".join(batch)), ("includefield", _SOP_CLASS_UID)]
        # A batch has at most len(batch) matches, so one page normally answers it; a server
        # that ignores the UID list is paged only until every wanted UID has been seen.
        pages = self._client.qido(f"{self._root}/instances", params, page_size=len(batch) + 1)
        try:
            async for item in pages:
                uid = _json_uid(item, _SOP_INSTANCE_UID)
                if uid in wanted:
                    found[uid] = _json_uid(item, _SOP_CLASS_UID)
                    if len(found) == len(wanted):
                        break
        finally:
            aclose = getattr(pages, "aclose", None)
            if aclose is not None:
                await aclose()
        return found

    async def deliver(
        self, peer: Peer, result: CommitmentResult, fields: dict[str, str] | None = None
    ) -> bool:
        """Send the N-EVENT-REPORT, retrying with capped backoff; True when it was delivered."""
        fields = fields or {}
        delay = self._first_delay
        for attempt in range(1, self._attempts + 1):
            try:
                code = await self._bridge.run_blocking(self._send_report, peer, result)
            except AssociationError as exc:
                if attempt == self._attempts:
                    logger.error(
                        "storage commitment report not delivered after %d attempts: %s",
                        attempt,
                        exc,
                        extra=fields,
                    )
                    self._metrics.commitment_errors.inc()
                    return False
                logger.warning(
                    "storage commitment report attempt %d failed: %s; retrying in %.1f s",
                    attempt,
                    exc,
                    delay,
                    extra=fields,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_delay)
                continue
            if code != Status.SUCCESS:
                logger.warning(
                    "requester answered the report with status 0x%04X", code, extra=fields
                )
            else:
                logger.info("storage commitment report delivered", extra=fields)
            return True
        return False  # unreachable: the loop returns on its last attempt

    def _send_report(self, peer: Peer, result: CommitmentResult) -> int:
        """Blocking: one association, one N-EVENT-REPORT; returns the requester's status."""
        target = self._aets.target(peer, self._aet)
        context = RequestedContext(
            STORAGE_COMMITMENT_PUSH_MODEL, _REPORT_SYNTAXES, scu_role=False, scp_role=True
        )
        with associate(target, [context], timeouts=self._scu_timeouts) as assoc:
            try:
                status, _ = assoc.send_n_event_report(
                    event_information(result),
                    result.event_type,
                    STORAGE_COMMITMENT_PUSH_MODEL,
                    STORAGE_COMMITMENT_INSTANCE,
                )
            except (RuntimeError, ValueError) as exc:
                raise AssociationError(f"N-EVENT-REPORT could not be sent: {exc}") from exc
            if "Status" not in status:
                raise AssociationError("no N-EVENT-REPORT response (timeout or abort)")
            return int(status.Status)
