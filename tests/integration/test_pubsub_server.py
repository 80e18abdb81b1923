"""The in-process Pub/Sub server against the real `google.cloud.pubsub_v1` clients.

Each test gets a fresh server and points the clients at it with `PUBSUB_EMULATOR_HOST`.
Assertions are about what a subscriber sees: which message ids were acked, redelivered, how
often, and with which `delivery_attempt`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest
from google.api_core import exceptions
from google.cloud import pubsub_v1  # type: ignore[import-untyped]
from google.pubsub_v1 import types

from tests.pubsub_server import PubSubServer
from tests.rig import wait_until

PROJECT = "projects/test-project"
TOPIC = f"{PROJECT}/topics/instances"
SUBSCRIPTION = f"{PROJECT}/subscriptions/export"
TIMEOUT = 5.0


@pytest.fixture
def pubsub(monkeypatch: pytest.MonkeyPatch) -> Iterator[PubSubServer]:
    with PubSubServer() as server:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", server.host)
        yield server


@pytest.fixture
def publisher(pubsub: PubSubServer) -> Iterator[Any]:
    client = pubsub_v1.PublisherClient()
    yield client
    client.stop()


@pytest.fixture
def subscriber(pubsub: PubSubServer) -> Iterator[Any]:
    client = pubsub_v1.SubscriberClient()
    yield client
    client.close()


@pytest.fixture
def topic(pubsub: PubSubServer) -> str:
    pubsub.create_topic(TOPIC)
    return TOPIC


def publish_all(publisher: Any, count: int) -> list[str]:
    """Publish `count` messages through the real publisher client; return their ids."""
    futures = [
        publisher.publish(TOPIC, f"message {i}".encode(), index=str(i)) for i in range(count)
    ]
    return [str(future.result(timeout=TIMEOUT)) for future in futures]


def stop_streaming(future: Any, subscriber: Any) -> None:
    """Graceful stop as SPEC §2 demands: cancel, wait for the future, then close the client."""
    future.cancel()
    future.result(timeout=TIMEOUT)
    subscriber.close()


def pull_one(subscriber: Any, deadline: float = TIMEOUT) -> Any:
    """Unary Pull until a message arrives (each Pull waits about a second on the server)."""

    def delivered() -> Any:
        return subscriber.pull(
            subscription=SUBSCRIPTION, max_messages=10, timeout=TIMEOUT
        ).received_messages

    (message,) = wait_until(delivered, deadline, "a delivered message", interval=0)
    return message


def test_admin_rpcs(pubsub: PubSubServer, publisher: Any, subscriber: Any) -> None:
    publisher.create_topic(name=TOPIC)
    assert publisher.get_topic(topic=TOPIC).name == TOPIC
    assert [t.name for t in publisher.list_topics(project=PROJECT)] == [TOPIC]
    with pytest.raises(exceptions.AlreadyExists):
        publisher.create_topic(name=TOPIC)
    with pytest.raises(exceptions.NotFound):
        publisher.get_topic(topic=f"{PROJECT}/topics/missing")

    created = subscriber.create_subscription(name=SUBSCRIPTION, topic=TOPIC)
    assert created.ack_deadline_seconds == 10
    assert subscriber.get_subscription(subscription=SUBSCRIPTION).topic == TOPIC
    assert list(publisher.list_topic_subscriptions(topic=TOPIC)) == [SUBSCRIPTION]
    with pytest.raises(exceptions.NotFound):
        subscriber.create_subscription(name=f"{PROJECT}/subscriptions/x", topic="nope")

    subscriber.delete_subscription(subscription=SUBSCRIPTION)
    with pytest.raises(exceptions.NotFound):
        subscriber.get_subscription(subscription=SUBSCRIPTION)
    with pytest.raises(exceptions.NotFound):
        subscriber.pull(subscription=SUBSCRIPTION, max_messages=1, timeout=TIMEOUT)


def test_streaming_pull_acks_everything(
    pubsub: PubSubServer, publisher: Any, subscriber: Any, topic: str
) -> None:
    subscriber.create_subscription(name=SUBSCRIPTION, topic=topic)
    ids = publish_all(publisher, 5)
    late = f"{PROJECT}/subscriptions/late"
    pubsub.create_subscription(late, topic)  # created after publishing: gets nothing

    received: dict[str, tuple[bytes, dict[str, str], int | None]] = {}

    def callback(message: Any) -> None:
        received[message.message_id] = (
            message.data,
            dict(message.attributes),
            message.delivery_attempt,
        )
        message.ack()

    future = subscriber.subscribe(SUBSCRIPTION, callback)
    pubsub.wait_until(lambda: pubsub.acked(SUBSCRIPTION) == set(ids), what="all acked")
    stop_streaming(future, subscriber)

    assert pubsub.outstanding(SUBSCRIPTION) == 0
    assert received == {
        message_id: (f"message {i}".encode(), {"index": str(i)}, 1)
        for i, message_id in enumerate(ids)
    }
    assert [pubsub.deliveries(message_id) for message_id in ids] == [1] * 5
    assert pubsub.outstanding(late) == 0


def test_nack_redelivers(pubsub: PubSubServer, publisher: Any, subscriber: Any, topic: str) -> None:
    pubsub.create_subscription(SUBSCRIPTION, topic)
    ids = publish_all(publisher, 3)
    attempts: dict[str, list[int | None]] = {}
    lock = threading.Lock()

    def callback(message: Any) -> None:
        with lock:
            seen = attempts.setdefault(message.message_id, [])
            seen.append(message.delivery_attempt)
            first = len(seen) == 1
        if first:
            message.nack()
        else:
            message.ack()

    future = subscriber.subscribe(SUBSCRIPTION, callback)
    pubsub.wait_until(lambda: pubsub.acked(SUBSCRIPTION) == set(ids), what="all acked")
    stop_streaming(future, subscriber)

    assert attempts == {message_id: [1, 2] for message_id in ids}
    assert pubsub.outstanding(SUBSCRIPTION) == 0


def test_acks_flushed_when_future_is_cancelled_before_close(
    pubsub: PubSubServer, publisher: Any, subscriber: Any, topic: str
) -> None:
    pubsub.create_subscription(SUBSCRIPTION, topic)
    ids = publish_all(publisher, 20)
    handled: list[str] = []
    lock = threading.Lock()
    all_handled = threading.Event()

    def callback(message: Any) -> None:
        message.ack()  # queued in the client's dispatcher, sent later as a unary Acknowledge
        with lock:
            handled.append(message.message_id)
            if len(handled) == len(ids):
                all_handled.set()

    future = subscriber.subscribe(SUBSCRIPTION, callback)
    # Stop the moment the last callback returns, while its ack is still queued in the client
    # (closing the client first instead loses the queued acks: "closed channel").
    assert all_handled.wait(TIMEOUT)
    stop_streaming(future, subscriber)

    # No waiting: once the future has completed, the queued acks have reached the server.
    assert pubsub.acked(SUBSCRIPTION) == set(ids)
    assert pubsub.outstanding(SUBSCRIPTION) == 0


def test_streaming_pull_respects_max_outstanding_messages(
    pubsub: PubSubServer, publisher: Any, subscriber: Any, topic: str
) -> None:
    pubsub.create_subscription(SUBSCRIPTION, topic)
    ids = publish_all(publisher, 6)
    release = threading.Event()
    in_callback: list[str] = []
    lock = threading.Lock()

    def callback(message: Any) -> None:
        with lock:
            in_callback.append(message.message_id)
        release.wait(TIMEOUT)
        message.ack()

    flow_control = pubsub_v1.types.FlowControl(max_messages=2)
    future = subscriber.subscribe(SUBSCRIPTION, callback, flow_control=flow_control)
    pubsub.wait_until(lambda: len(in_callback) == 2, what="two callbacks running")
    # The server leased only what the stream's max_outstanding_messages allows.
    assert pubsub.leased(SUBSCRIPTION) == 2
    assert sum(pubsub.deliveries(message_id) for message_id in ids) == 2
    release.set()
    pubsub.wait_until(lambda: pubsub.acked(SUBSCRIPTION) == set(ids), what="all acked")
    stop_streaming(future, subscriber)
    assert [pubsub.deliveries(message_id) for message_id in ids] == [1] * 6


def test_unacked_message_of_cancelled_stream_is_redelivered(
    pubsub: PubSubServer, publisher: Any, subscriber: Any, topic: str
) -> None:
    pubsub.create_subscription(SUBSCRIPTION, topic)
    ids = publish_all(publisher, 3)
    seen: list[str] = []

    def ignore(message: Any) -> None:  # neither ack nor nack: the client keeps the lease
        seen.append(message.message_id)

    flow_control = pubsub_v1.types.FlowControl(max_messages=1)
    future = subscriber.subscribe(SUBSCRIPTION, ignore, flow_control=flow_control)
    pubsub.wait_until(lambda: len(seen) == 1, what="first delivery")
    stop_streaming(future, subscriber)
    assert seen == [ids[0]]
    assert pubsub.acked(SUBSCRIPTION) == set()
    # The client extended the lease to its minimum of 10 s; let it run out now.
    assert pubsub.expire_leases(SUBSCRIPTION) == 1

    second = pubsub_v1.SubscriberClient()
    attempts: dict[str, int | None] = {}

    def ack(message: Any) -> None:
        attempts[message.message_id] = message.delivery_attempt
        message.ack()

    future = second.subscribe(SUBSCRIPTION, ack)
    pubsub.wait_until(lambda: pubsub.acked(SUBSCRIPTION) == set(ids), what="all acked")
    stop_streaming(future, second)
    assert attempts == {ids[0]: 2, ids[1]: 1, ids[2]: 1}


def test_unary_pull_and_acknowledge(pubsub: PubSubServer, subscriber: Any, topic: str) -> None:
    pubsub.create_subscription(SUBSCRIPTION, topic)
    message_id = pubsub.publish(topic, b"payload", {"key": "value"})

    received = pull_one(subscriber)
    assert received.message.message_id == message_id
    assert received.message.data == b"payload"
    assert dict(received.message.attributes) == {"key": "value"}
    assert received.delivery_attempt == 1
    assert pubsub.outstanding(SUBSCRIPTION) == 1

    subscriber.acknowledge(subscription=SUBSCRIPTION, ack_ids=[received.ack_id])
    assert pubsub.acked(SUBSCRIPTION) == {message_id}
    assert pubsub.outstanding(SUBSCRIPTION) == 0
    empty = subscriber.pull(subscription=SUBSCRIPTION, max_messages=10, timeout=1.0)
    assert list(empty.received_messages) == []


def test_expired_pull_lease_is_redelivered(
    pubsub: PubSubServer, subscriber: Any, topic: str
) -> None:
    pubsub.create_subscription(SUBSCRIPTION, topic, ack_deadline=1)
    message_id = pubsub.publish(topic, b"x")

    first = pull_one(subscriber)
    delivered = time.monotonic()
    second = pull_one(subscriber)  # not acked: comes back once the 1 s deadline has passed
    assert time.monotonic() - delivered >= 0.9
    assert second.message.message_id == message_id
    assert second.ack_id != first.ack_id
    assert second.delivery_attempt == 2

    subscriber.acknowledge(subscription=SUBSCRIPTION, ack_ids=[first.ack_id])  # stale: ignored
    assert pubsub.acked(SUBSCRIPTION) == set()
    subscriber.acknowledge(subscription=SUBSCRIPTION, ack_ids=[second.ack_id])
    assert pubsub.acked(SUBSCRIPTION) == {message_id}
    assert pubsub.deliveries(message_id) == 2


def test_modify_ack_deadline_extends_and_zero_nacks(
    pubsub: PubSubServer, subscriber: Any, topic: str
) -> None:
    pubsub.create_subscription(SUBSCRIPTION, topic, ack_deadline=1)
    message_id = pubsub.publish(topic, b"x")

    first = pull_one(subscriber)
    subscriber.modify_ack_deadline(
        subscription=SUBSCRIPTION, ack_ids=[first.ack_id], ack_deadline_seconds=30
    )
    # Each empty Pull waits about 1 s on the server: together past the original 1 s deadline.
    for _ in range(2):
        response = subscriber.pull(subscription=SUBSCRIPTION, max_messages=10, timeout=TIMEOUT)
        assert list(response.received_messages) == []
    assert pubsub.leased(SUBSCRIPTION) == 1

    subscriber.modify_ack_deadline(
        subscription=SUBSCRIPTION, ack_ids=[first.ack_id], ack_deadline_seconds=0
    )
    again = pull_one(subscriber, deadline=0.5)  # nacked: redelivered at once
    assert again.message.message_id == message_id
    assert again.delivery_attempt == 2


class RawStream:
    """A StreamingPull call driven request by request over a plain gRPC channel."""

    def __init__(self, host: str, first: Any) -> None:
        self.channel: Any = grpc.insecure_channel(host)
        call = self.channel.stream_stream(
            "/google.pubsub.v1.Subscriber/StreamingPull",
            request_serializer=types.StreamingPullRequest.pb().SerializeToString,
            response_deserializer=types.StreamingPullResponse.pb().FromString,
        )
        self.requests: queue.Queue[Any] = queue.Queue()
        self.requests.put(first)
        self.responses: Any = call(iter(self.requests.get, None), timeout=TIMEOUT)

    def send(self, **fields: Any) -> None:
        self.requests.put(types.StreamingPullRequest.pb()(**fields))

    def receive(self) -> list[Any]:
        return list(next(self.responses).received_messages)

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()


def test_acks_and_nacks_sent_on_the_stream(pubsub: PubSubServer, topic: str) -> None:
    pubsub.create_subscription(SUBSCRIPTION, topic)
    ids = [pubsub.publish(topic, f"{i}".encode()) for i in range(3)]
    first = types.StreamingPullRequest.pb()(
        subscription=SUBSCRIPTION, stream_ack_deadline_seconds=60, max_outstanding_messages=3
    )
    stream = RawStream(pubsub.host, first)
    try:
        received = stream.receive()
        assert [r.message.message_id for r in received] == ids
        stream.send(
            ack_ids=[received[0].ack_id, received[1].ack_id],
            modify_deadline_ack_ids=[received[2].ack_id],
            modify_deadline_seconds=[0],
        )
        again = stream.receive()  # the nacked one comes back on the same stream
        assert [(r.message.message_id, r.delivery_attempt) for r in again] == [(ids[2], 2)]
        assert pubsub.acked(SUBSCRIPTION) == set(ids[:2])
        stream.send(ack_ids=[again[0].ack_id])
        pubsub.wait_until(lambda: pubsub.outstanding(SUBSCRIPTION) == 0, what="last ack")
    finally:
        stream.close()


def test_stop_ends_open_streams(pubsub: PubSubServer, topic: str) -> None:
    pubsub.create_subscription(SUBSCRIPTION, topic)
    first = types.StreamingPullRequest.pb()(
        subscription=SUBSCRIPTION, stream_ack_deadline_seconds=10
    )
    stream = RawStream(pubsub.host, first)
    try:
        pubsub.publish(topic, b"x")
        assert len(stream.receive()) == 1
        started = time.monotonic()
        pubsub.stop(grace=0.5)
        assert time.monotonic() - started < 1.0
        with pytest.raises((StopIteration, grpc.RpcError)):
            stream.receive()
    finally:
        stream.close()


def test_streaming_pull_of_missing_subscription_fails(pubsub: PubSubServer) -> None:
    first = types.StreamingPullRequest.pb()(
        subscription=SUBSCRIPTION, stream_ack_deadline_seconds=10
    )
    stream = RawStream(pubsub.host, first)
    try:
        with pytest.raises(grpc.RpcError) as failure:
            stream.receive()
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        stream.close()
