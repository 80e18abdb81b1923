"""Pub/Sub streaming pull: each message is exported on the event loop, then acked or nacked.

The client hands messages to `_LoopScheduler`, which starts `worker.handle` on the loop and
returns at once; the ack or nack is queued from the loop when the export ends. No thread waits
on an export: a thread per message in flight, blocked on the loop and woken to ack, cost
0.3-0.46 ms of CPU per message (`bench/bench_export.py`'s pool4 mode, 400 messages, 6
alternating reps, the previous commit on PYTHONPATH, 2026-12-07: 244.7 -> 314.5 msg/s, CPU
2.37 -> 1.91 ms per message; a second run 261.8 -> 270.8 msg/s, 2.31 -> 2.01 ms). The
client's flow control still bounds the work: a message holds its slot (--max_messages,
--max_bytes) until it is acked or nacked, which happens when its export ends.

Stop order matters: cancel the streaming future and wait for it (the scheduler's shutdown waits
for running exports, queued acks are sent) BEFORE closing the client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from google.cloud.pubsub_v1.subscriber.scheduler import (  # type: ignore[import-untyped]
    Scheduler,
)

from dicom_adapter.bridge import Bridge
from dicom_adapter.exporter.worker import ExportWorker, Outcome

logger = logging.getLogger(__name__)

CLOSE_WAIT = 2.0  # seconds closing the client may take at shutdown


class _LoopScheduler(Scheduler):  # type: ignore[misc]
    """Calls the client's message callback in the client's own thread; it must not block.

    `shutdown(await_msg_callbacks=True)` (the client's stop) waits for `drain`: the exports
    started so far. A message that arrives after shutdown began is nacked, not exported.
    """

    def __init__(self, drain: Callable[[], None]) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()  # the client's ack/nack requests
        self._drain = drain
        self._closed = False

    @property
    def queue(self) -> queue.Queue[Any]:
        return self._queue

    def schedule(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._closed:
            if args:
                args[0].nack()  # the client passes the message first
            return
        callback(*args, **kwargs)

    def shutdown(self, await_msg_callbacks: bool = False) -> list[Any]:
        self._closed = True
        if await_msg_callbacks:
            self._drain()
        return []


class PubSubSource:
    """Pulls one subscription with flow control; blocking methods, call them from a thread."""

    def __init__(
        self,
        bridge: Bridge,
        worker: ExportWorker,
        subscription_path: str,
        *,
        max_messages: int,
        max_bytes: int,
    ) -> None:
        self._bridge = bridge
        self._worker = worker
        self._subscription = subscription_path
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._subscriber: Any = None
        self._future: Any = None
        # export -> its message, until the export ends (acked or nacked)
        self._running: dict[concurrent.futures.Future[None], Any] = {}
        self._idle = threading.Condition()

    def start(self) -> None:
        """Open the subscriber client and start the streaming pull (returns at once)."""
        from google.cloud import pubsub_v1  # type: ignore[import-untyped]

        self._subscriber = pubsub_v1.SubscriberClient()
        self._future = self._subscriber.subscribe(
            self._subscription,
            self._callback,
            flow_control=pubsub_v1.types.FlowControl(
                max_messages=self._max_messages, max_bytes=self._max_bytes
            ),
            scheduler=_LoopScheduler(self._wait_idle),
            await_callbacks_on_shutdown=True,
        )
        self._future.add_done_callback(self._on_done)
        logger.info("pulling %s", self._subscription)

    def _on_done(self, future: Any) -> None:
        if future.cancelled():
            return
        try:
            error = future.exception(timeout=0)
        except BaseException:  # cancelled or still running: nothing to report
            return
        if error is not None:
            logger.error("streaming pull stopped: %s", error)

    def _callback(self, message: Any) -> None:
        """In the client's thread: start the export on the loop and return."""
        try:
            future = self._bridge.start(self._export, message)
        except BaseException:
            logger.warning(
                "message not handled (shutting down?); nacking",
                exc_info=True,
                extra={"message_id": str(getattr(message, "message_id", ""))},
            )
            message.nack()
            return
        with self._idle:
            self._running[future] = message
        future.add_done_callback(self._finished)

    def _finished(self, future: concurrent.futures.Future[None]) -> None:
        with self._idle:
            self._running.pop(future, None)
            if not self._running:
                self._idle.notify_all()

    def _wait_idle(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: not self._running)

    async def _export(self, message: Any) -> None:
        """On the loop: export, then queue the ack or nack (a queue put: it never blocks).

        Cancelled (shutdown past its grace period) or failing unexpectedly, it nacks.
        """
        message_id = str(getattr(message, "message_id", ""))
        outcome = Outcome.NACK
        try:
            outcome = await self._worker.handle(
                message_id, bytes(message.data), getattr(message, "delivery_attempt", None)
            )
        except asyncio.CancelledError:
            logger.warning(
                "export cancelled by shutdown; nacking", extra={"message_id": message_id}
            )
            raise
        except Exception:
            logger.exception(
                "export failed unexpectedly; nacking", extra={"message_id": message_id}
            )
        finally:
            try:
                if outcome is Outcome.ACK:
                    message.ack()
                else:
                    message.nack()
            except Exception:
                logger.warning("ack/nack failed", exc_info=True, extra={"message_id": message_id})

    @property
    def failed(self) -> bool:
        """True when the streaming pull ended on its own (not by `stop`)."""
        return self._future is not None and self._future.done() and not self._future.cancelled()

    def stop(self, grace: float) -> None:
        """Stop pulling, let running exports finish (up to `grace`), flush acks, close.

        Exports still running after `grace` are cancelled (they nack; Pub/Sub redelivers).
        """
        future, self._future = self._future, None
        if future is not None:
            future.cancel()
            if not self._ended(future, grace):
                with self._idle:
                    left = list(self._running.items())
                logger.warning(
                    "%d message(s) still running after %g s; nacking and cancelling them",
                    len(left),
                    grace,
                )
                for running, message in left:
                    message.nack()  # before the cancel: that lets the client's shutdown go on
                    running.cancel()
                self._ended(future, CLOSE_WAIT)  # their nacks are flushed with the rest
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            # With Pub/Sub unreachable, closing the channel waits for api_core's reconnect
            # throttle (~8 s more): acks cannot go out then anyway, so it is not waited for.
            closing = threading.Thread(target=subscriber.close, name="pubsub-close", daemon=True)
            closing.start()
            closing.join(CLOSE_WAIT)
            if closing.is_alive():
                logger.warning(
                    "the Pub/Sub client did not close within %.0f s (Pub/Sub unreachable?);"
                    " not waiting for it",
                    CLOSE_WAIT,
                )

    @staticmethod
    def _ended(future: Any, timeout: float) -> bool:
        """Wait for the streaming pull to end; False when it still runs after `timeout`."""
        try:
            future.result(timeout=timeout)
        except concurrent.futures.CancelledError:
            pass
        except concurrent.futures.TimeoutError:
            return False
        except Exception as exc:
            logger.warning("streaming pull ended with %s", exc)
        return True
