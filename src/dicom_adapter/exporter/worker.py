"""One Pub/Sub message: parse → WADO-RS fetch (memory, or spool if large) → sink → ack/nack."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections import OrderedDict
from pathlib import Path

from dicom_adapter.dicomweb.client import DicomwebClient
from dicom_adapter.dicomweb.instances import DEFAULT_MEMORY_LIMIT, FetchedInstance, MemoryBudget
from dicom_adapter.errors import AdapterError, UpstreamError
from dicom_adapter.exporter.messages import MalformedMessage, instance_path
from dicom_adapter.exporter.retry import Backoff, CircuitBreaker
from dicom_adapter.exporter.sinks import (
    PermanentFailure,
    Sink,
    SinkUnavailable,
    TransientFailure,
    usable_meta,
)
from dicom_adapter.observability.metrics import ExportMetrics, MetricsRegistry

logger = logging.getLogger(__name__)

SOURCE_GONE = frozenset({404, 410})  # WADO-RS statuses that mean the instance will never come
MAX_TRACKED_MESSAGES = 10_000  # failed-delivery counts kept for messages without delivery_attempt


class Outcome(enum.Enum):
    """What becomes of the message: acked or nacked."""

    ACK = "ack"
    NACK = "nack"


class ExportWorker:
    """Exports one instance per message; `handle` never raises.

    Retries, and why they look like this: google-cloud-pubsub has no public "nack after a
    delay". `Message.modify_ack_deadline(s)` is overridden by the client's leaser, which keeps
    extending every message not yet acked or nacked (up to FlowControl's
    max_lease_duration, 1 h), and `nack()` is a deadline of 0 (immediate redelivery: the retry
    storm of issue 8). So a failed message is held: its export waits out the backoff while
    the client keeps leasing it, then nacks, and Pub/Sub redelivers it at once with
    delivery_attempt + 1. Each delivery is one attempt, so the subscription's dead-letter
    policy counts real attempts, spaced 1, 2, 4 ... up to `backoff.maximum` seconds apart.
    A held message keeps its flow-control slot (--max_messages), which is what bounds work.

    When the sink is unreachable (SinkUnavailable) the circuit breaker opens: messages wait
    for it without fetching anything and without spending a delivery attempt, and retry
    in-process once a probe finds the sink again; a delivery waits at most `backoff.maximum`
    seconds before it is nacked (well inside the 1 h lease limit). `stop_holding` (shutdown)
    nacks every held message at once.
    """

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
        backoff: Backoff | None = None,
        probe_interval: float = 5.0,
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
        self._backoff = backoff or Backoff()
        self.breaker = CircuitBreaker(
            sink.probe, probe_interval, on_change=self._metrics.breaker_open.set
        )
        self._stopping = asyncio.Event()
        self._failures: OrderedDict[str, int] = OrderedDict()  # message id -> failed deliveries
        self.exported = 0
        self.permanent_failures = 0
        self.transient_failures = 0
        self.attempts = 0

    async def handle(
        self, message_id: str, data: bytes, delivery_attempt: int | None = None
    ) -> Outcome:
        """ACK when exported (or permanently failed, unless configured to nack), else NACK.

        `delivery_attempt` is Pub/Sub's count (set only with a dead-letter policy); without
        it the worker counts this replica's failed deliveries of the message itself.
        """
        metrics = self._metrics
        metrics.total_requests.inc()
        metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            return await self._handle(message_id, data, delivery_attempt)
        finally:
            metrics.in_flight.dec()
            metrics.seconds.observe(time.perf_counter() - started)

    def stop_holding(self) -> None:
        """Shutdown: every held message (backoff, breaker) is nacked now instead of waiting."""
        self._stopping.set()

    async def close(self) -> None:
        """Stop probing the sink."""
        self.stop_holding()
        await self.breaker.close()

    async def _handle(self, message_id: str, data: bytes, delivery_attempt: int | None) -> Outcome:
        extra = {"message_id": message_id}
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._backoff.maximum  # the longest one delivery is held
        while True:
            if not await self._wait_for_sink(give_up - loop.time()):
                self._count_transient()
                logger.info("the sink is still unreachable; nacking the message", extra=extra)
                return Outcome.NACK
            self.attempts += 1
            self._metrics.attempts.inc()
            try:
                delivered = await self._export(data)
            except SinkUnavailable as exc:
                # Not this message's fault: wait for the breaker, then try again in-process.
                self.breaker.trip(exc)
                logger.debug("sink unreachable: %s", exc, extra=extra)
                continue
            except (MalformedMessage, PermanentFailure) as exc:
                return await self._permanent(message_id, delivery_attempt, exc)
            except UpstreamError as exc:
                if exc.http_status in SOURCE_GONE:
                    return await self._permanent(message_id, delivery_attempt, exc)
                return await self._transient(message_id, delivery_attempt, exc)
            except AdapterError as exc:  # TransientFailure, every other upstream error
                return await self._transient(message_id, delivery_attempt, exc)
            except Exception as exc:
                logger.exception("export failed unexpectedly", extra=extra)
                return await self._transient(message_id, delivery_attempt, exc)
            self._failures.pop(message_id, None)
            self.exported += 1
            self._metrics.total_bytes.inc(delivered)
            logger.debug("exported", extra=extra)
            return Outcome.ACK

    async def _wait_for_sink(self, timeout: float) -> bool:
        """Wait until the breaker lets exports through; False on timeout or shutdown."""
        if not self.breaker.is_open:
            return True
        if self._stopping.is_set() or timeout <= 0:
            return False
        closed = asyncio.ensure_future(self.breaker.wait_closed())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait(
                {closed, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closed.cancel()
            stopping.cancel()
        return not self.breaker.is_open and not self._stopping.is_set()

    def _attempt(self, message_id: str, delivery_attempt: int | None) -> int:
        """This delivery's attempt number (1 = first), from Pub/Sub or counted here."""
        counted = self._failures.pop(message_id, 0) + 1
        self._failures[message_id] = counted
        while len(self._failures) > MAX_TRACKED_MESSAGES:
            self._failures.popitem(last=False)
        return max(counted, delivery_attempt or 0)

    async def _hold(self, delay: float) -> None:
        """Wait `delay` seconds (the client keeps the lease), or less when shutting down."""
        if self._stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    def _count_transient(self) -> None:
        self.transient_failures += 1
        self._metrics.transient_failures.inc()
        self._metrics.total_errors.inc()

    async def _transient(
        self, message_id: str, delivery_attempt: int | None, exc: Exception
    ) -> Outcome:
        self._count_transient()
        attempt = self._attempt(message_id, delivery_attempt)
        delay = self._backoff.delay(attempt)
        logger.warning(
            "export failed (attempt %d), retrying in %.1f s: %s",
            attempt,
            delay,
            exc,
            extra={"message_id": message_id},
        )
        await self._hold(delay)
        return Outcome.NACK

    async def _permanent(
        self, message_id: str, delivery_attempt: int | None, exc: Exception
    ) -> Outcome:
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
        if not self._nack_permanent:
            self._failures.pop(message_id, None)
            return Outcome.ACK
        # Nacked after the same backoff: without a dead-letter policy it would spin otherwise.
        await self._hold(self._backoff.delay(self._attempt(message_id, delivery_attempt)))
        return Outcome.NACK

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
            raise TransientFailure("WADO-RS: response had no parts")
        return first
