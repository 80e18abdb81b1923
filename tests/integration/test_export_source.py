"""dicom-export's Pub/Sub source (`PubSubSource`) against the in-process Pub/Sub server.

The real google-cloud-pubsub client delivers; a stand-in worker decides how long each export
takes. What is asserted is what Pub/Sub sees: which messages were acked, nacked or still
leased, and how many exports ran at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import cast

import pytest

from dicom_adapter.bridge import Bridge
from dicom_adapter.exporter.source import PubSubSource
from dicom_adapter.exporter.worker import ExportWorker, Outcome
from tests.pubsub_server import PubSubServer
from tests.rig import wait_until

PROJECT = "projects/test-project"
TOPIC = f"{PROJECT}/topics/instances"
SUBSCRIPTION = f"{PROJECT}/subscriptions/export"
WAIT = 10.0  # upper bound for things that happen at once; never slept


class GatedWorker:
    """Each export waits for `gate`; counts running exports and the most at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.gate = asyncio.Event()
        self._loop = loop
        self.running = 0
        self.most = 0
        self.finished: list[str] = []
        self.cancelled: list[str] = []

    def open_gate(self) -> None:
        self._loop.call_soon_threadsafe(self.gate.set)

    async def handle(
        self, message_id: str, data: bytes, delivery_attempt: int | None = None
    ) -> Outcome:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(message_id)
            raise
        finally:
            self.running -= 1
        self.finished.append(message_id)
        return Outcome.ACK


@pytest.fixture
def pubsub(monkeypatch: pytest.MonkeyPatch) -> Iterator[PubSubServer]:
    with PubSubServer() as server:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", server.host)
        server.create_topic(TOPIC)
        server.create_subscription(SUBSCRIPTION, TOPIC, ack_deadline=60)
        yield server


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-event-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT)
    loop.close()


def source_for(
    loop: asyncio.AbstractEventLoop, max_messages: int
) -> tuple[PubSubSource, GatedWorker]:
    worker = GatedWorker(loop)
    source = PubSubSource(
        Bridge(loop, blocking_workers=1),
        cast(ExportWorker, worker),
        SUBSCRIPTION,
        max_messages=max_messages,
        max_bytes=100 << 20,
    )
    return source, worker


def publish(pubsub: PubSubServer, count: int) -> set[str]:
    return {
        pubsub.publish(TOPIC, f"studies/1/series/2/instances/{n}".encode()) for n in range(count)
    }


def test_running_exports_are_bounded_by_max_messages_and_acked_when_done(
    pubsub: PubSubServer, loop: asyncio.AbstractEventLoop
) -> None:
    source, worker = source_for(loop, max_messages=3)
    sent = publish(pubsub, 10)
    source.start()
    try:
        wait_until(lambda: worker.running == 3, WAIT, "three exports running")
        assert pubsub.acked(SUBSCRIPTION) == set()  # nothing acked before its export ends
        worker.open_gate()
        wait_until(lambda: pubsub.acked(SUBSCRIPTION) == sent, WAIT, "every message acked")
    finally:
        source.stop(grace=WAIT)
    assert worker.most == 3
    assert sorted(worker.finished) == sorted(sent)
    assert all(pubsub.deliveries(m) == 1 for m in sent)


def test_stop_waits_for_running_exports_and_sends_their_acks(
    pubsub: PubSubServer, loop: asyncio.AbstractEventLoop
) -> None:
    source, worker = source_for(loop, max_messages=3)
    sent = publish(pubsub, 3)
    source.start()
    wait_until(lambda: worker.running == 3, WAIT, "three exports running")
    stopping = threading.Thread(target=source.stop, args=(WAIT,))
    stopping.start()
    # the client has closed its stream and now waits for the exports, which end only now
    wait_until(lambda: pubsub.open_streams(SUBSCRIPTION) == 0, WAIT, "the stream closed")
    assert stopping.is_alive()
    worker.open_gate()
    stopping.join(WAIT * 2)
    assert not stopping.is_alive()
    assert pubsub.acked(SUBSCRIPTION) == sent
    assert worker.cancelled == []


def test_exports_still_running_after_the_grace_period_are_nacked_and_cancelled(
    pubsub: PubSubServer, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    source, worker = source_for(loop, max_messages=3)
    sent = publish(pubsub, 3)
    source.start()
    wait_until(lambda: worker.running == 3, WAIT, "three exports running")
    started = time.monotonic()
    source.stop(grace=0.5)
    took = time.monotonic() - started
    assert took < 0.5 + WAIT
    wait_until(lambda: len(worker.cancelled) == 3, WAIT, "every export cancelled")
    assert pubsub.acked(SUBSCRIPTION) == set()
    # nacked, not left to their 60 s leases: ready for the next subscriber at once
    assert pubsub.leased(SUBSCRIPTION) == 0
    assert pubsub.outstanding(SUBSCRIPTION) == len(sent)
    assert "3 message(s) still running after 0.5 s; nacking and cancelling them" in caplog.text
