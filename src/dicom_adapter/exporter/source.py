"""Pub/Sub streaming pull: each message goes through `bridge.run(worker.handle)`, then ack/nack.

The callback runs in the client's thread pool and never raises (an exception there would be
lost and the message left to its lease). Stop order matters: cancel the streaming future and
wait for it (running callbacks finish, queued acks are sent) BEFORE closing the client.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any

from dicom_adapter.bridge import Bridge
from dicom_adapter.exporter.worker import ExportWorker, Outcome

logger = logging.getLogger(__name__)

CLOSE_WAIT = 2.0  # seconds closing the client may take at shutdown


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

    def start(self) -> None:
        """Open the subscriber client and start the streaming pull (returns at once)."""
        from google.cloud import pubsub_v1  # type: ignore[import-untyped]
        from google.cloud.pubsub_v1.subscriber.scheduler import (  # type: ignore[import-untyped]
            ThreadScheduler,
        )

        self._subscriber = pubsub_v1.SubscriberClient()
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._max_messages, thread_name_prefix="pubsub-callback"
        )
        self._future = self._subscriber.subscribe(
            self._subscription,
            self._callback,
            flow_control=pubsub_v1.types.FlowControl(
                max_messages=self._max_messages, max_bytes=self._max_bytes
            ),
            scheduler=ThreadScheduler(executor=executor),
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
        message_id = str(getattr(message, "message_id", ""))
        try:
            outcome = self._bridge.run(
                self._worker.handle,
                message_id,
                bytes(message.data),
                getattr(message, "delivery_attempt", None),
            )
        except BaseException:
            logger.warning(
                "message not handled (shutting down?); nacking",
                exc_info=True,
                extra={"message_id": message_id},
            )
            outcome = Outcome.NACK
        try:
            if outcome is Outcome.ACK:
                message.ack()
            else:
                message.nack()
        except BaseException:
            logger.warning("ack/nack failed", exc_info=True, extra={"message_id": message_id})

    @property
    def failed(self) -> bool:
        """True when the streaming pull ended on its own (not by `stop`)."""
        return self._future is not None and self._future.done() and not self._future.cancelled()

    def stop(self, grace: float) -> None:
        """Stop pulling, let running callbacks finish (up to `grace`), flush acks, close."""
        future, self._future = self._future, None
        if future is not None:
            future.cancel()
            try:
                future.result(timeout=grace)
            except concurrent.futures.CancelledError:
                pass
            except concurrent.futures.TimeoutError:
                logger.warning("messages still running after %.0f s; leaving them", grace)
            except Exception as exc:
                logger.warning("streaming pull ended with %s", exc)
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
