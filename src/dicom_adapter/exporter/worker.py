"""One Pub/Sub message: parse → WADO-RS fetch (memory, or spool if large) → sink → ack/nack."""

from __future__ import annotations

import enum
import functools
import logging
import time
from pathlib import Path

from dicom_adapter.dicomweb.client import DicomwebClient
from dicom_adapter.dicomweb.instances import DEFAULT_MEMORY_LIMIT, FetchedInstance, MemoryBudget
from dicom_adapter.errors import (
    AdapterError,
    UpstreamAuthError,
    UpstreamError,
)
from dicom_adapter.exporter.messages import MalformedMessage, instance_path
from dicom_adapter.exporter.sinks import (
    PermanentFailure,
    Sink,
    TransientFailure,
    usable_meta,
)
from dicom_adapter.observability.metrics import ExportMetrics, MetricsRegistry

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """What the Pub/Sub callback does with the message."""

    ACK = "ack"
    NACK = "nack"


class ExportWorker:
    """Exports one instance per message; `handle` never raises."""

    def __init__(
        self,
        client: DicomwebClient,
        source_root: str,
        sink: Sink,
        spool_dir: Path,
        *,
        nack_permanent_failures: bool = False,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        metrics: ExportMetrics | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self._client = client
        self._root = source_root.rstrip("/")
        self._sink = sink
        self._spool = spool_dir
        self._memory_limit = memory_limit
        self._budget = budget
        self._nack_permanent = nack_permanent_failures
        self._metrics = metrics or ExportMetrics(MetricsRegistry())
        self.exported = 0
        self.permanent_failures = 0
        self.transient_failures = 0

    async def handle(self, message_id: str, data: bytes) -> Outcome:
        """ACK when exported (or permanently failed, unless configured to nack), else NACK."""
        metrics = self._metrics
        metrics.total_requests.inc()
        metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            return await self._handle(message_id, data)
        finally:
            metrics.in_flight.dec()
            metrics.seconds.observe(time.perf_counter() - started)

    async def _handle(self, message_id: str, data: bytes) -> Outcome:
        extra = {"message_id": message_id}
        try:
            delivered = await self._export(data)
        except (MalformedMessage, PermanentFailure) as exc:
            return self._permanent(message_id, exc)
        except UpstreamAuthError as exc:
            return self._transient(message_id, exc)
        except UpstreamError as exc:
            if exc.retryable:
                return self._transient(message_id, exc)
            return self._permanent(message_id, exc)
        except (TransientFailure, AdapterError) as exc:
            return self._transient(message_id, exc)
        except Exception:
            self._count_transient()
            logger.exception("export failed unexpectedly, will retry", extra=extra)
            return Outcome.NACK
        self.exported += 1
        self._metrics.total_bytes.inc(delivered)
        logger.debug("exported", extra=extra)
        return Outcome.ACK

    def _count_transient(self) -> None:
        self.transient_failures += 1
        self._metrics.transient_failures.inc()
        self._metrics.total_errors.inc()

    def _transient(self, message_id: str, exc: Exception) -> Outcome:
        self._count_transient()
        logger.warning("export failed, will retry: %s", exc, extra={"message_id": message_id})
        return Outcome.NACK

    def _permanent(self, message_id: str, exc: Exception) -> Outcome:
        self.permanent_failures += 1
        self._metrics.permanent_failures.inc()
        self._metrics.total_errors.inc()
        action = "nacking" if self._nack_permanent else "acking"
        logger.error(
            "export failed permanently (%s the message): %s",
            action,
            exc,
            extra={"message_id": message_id},
        )
        return Outcome.NACK if self._nack_permanent else Outcome.ACK

    async def _export(self, data: bytes) -> int:
        """Fetch and deliver the message's instance; returns its size as fetched (bytes)."""
        url = f"{self._root}/{instance_path(data)}"
        instance = await self.fetch(url)
        try:
            usable_meta(instance)
            await self._sink.send(instance, functools.partial(self.fetch, url))
            return instance.size
        finally:
            await instance.adiscard()  # a spool file is deleted off the event loop

    async def fetch(self, url: str, transfer_syntax: str = "*") -> FetchedInstance:
        """The first part of a WADO-RS instance response ("*": as stored; else transcoded).

        The whole response is read (further parts discarded) so the connection is reused.
        """
        first: FetchedInstance | None = None
        try:
            async for part in self._client.wado_instances(
                url,
                spool_dir=self._spool,
                transfer_syntax=transfer_syntax,
                memory_limit=self._memory_limit,
                budget=self._budget,
            ):
                if first is None:
                    first = part
                else:
                    part.discard()
        except BaseException:
            if first is not None:
                first.discard()
            raise
        if first is None:
            raise PermanentFailure("WADO-RS: response had no parts")
        return first
