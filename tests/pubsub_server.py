"""An in-process Pub/Sub server speaking the real gRPC protocol, for tests.

No Pub/Sub emulator is installable here, so this module serves `google.pubsub.v1.Publisher`
and `google.pubsub.v1.Subscriber` with generic gRPC method handlers and the protobuf classes
behind `google.pubsub_v1.types.X.pb()`. The real `google.cloud.pubsub_v1` clients talk to it
when `PUBSUB_EMULATOR_HOST` is set to `PubSubServer.host` (insecure channel, anonymous
credentials).

Semantics follow the real service closely enough for a subscriber's tests:
- topics and subscriptions are addressed by full name (`projects/P/topics/T`,
  `projects/P/subscriptions/S`); a subscription receives only messages published after it was
  created;
- every delivery (unary `Pull` or `StreamingPull`) leases the message under a fresh ack id;
  the lease lasts the subscription's ack deadline (`Pull`) or the stream's
  `stream_ack_deadline_seconds` (`StreamingPull`), can be changed with `ModifyAckDeadline` or
  the stream's `modify_deadline_*` fields (0 seconds = nack: immediate redelivery) and is
  redelivered when it expires; `delivery_attempt` counts deliveries (1 for the first one;
  the real service sets it only with a dead-letter policy);
- acks arrive as unary `Acknowledge` and on the stream (`ack_ids`); an ack id whose lease has
  already expired, been nacked or acked is ignored;
- a dead-letter policy (`dead_letter_policy` of the subscription: topic and
  max_delivery_attempts) forwards a message whose lease ends unacked (nack or expiry) after
  that many deliveries to the dead-letter topic instead of redelivering it;
- a stream never holds more than its `max_outstanding_messages` / `max_outstanding_bytes`
  leases (0 = unlimited, at least one message is always allowed);
- `stop()` ends open streams with UNAVAILABLE (as the real service does when it closes a
  stream). Stop subscribers before the server: a client whose server has gone keeps trying to
  reconnect and its shutdown then takes 10 s or more.

Not modelled: ordering keys, exactly-once delivery, filters, retry policies,
retention/seek/snapshots, schemas, push subscriptions, IAM, page tokens.

Plain module without pytest, so `bench/` scripts can use it too.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self

import grpc  # type: ignore[import-untyped]
from google.pubsub_v1 import types

from tests.rig.lifecycle import Service
from tests.rig.poll import wait_until

# Protobuf message classes (proto-plus wrappers expose them via `.pb()`; untyped, hence Any).
_Topic: Any = types.Topic.pb()
_Subscription: Any = types.Subscription.pb()
_PubsubMessage: Any = types.PubsubMessage.pb()
_ReceivedMessage: Any = types.ReceivedMessage.pb()
_GetTopicRequest: Any = types.GetTopicRequest.pb()
_DeleteTopicRequest: Any = types.DeleteTopicRequest.pb()
_ListTopicsRequest: Any = types.ListTopicsRequest.pb()
_ListTopicsResponse: Any = types.ListTopicsResponse.pb()
_ListTopicSubscriptionsRequest: Any = types.ListTopicSubscriptionsRequest.pb()
_ListTopicSubscriptionsResponse: Any = types.ListTopicSubscriptionsResponse.pb()
_PublishRequest: Any = types.PublishRequest.pb()
_PublishResponse: Any = types.PublishResponse.pb()
_GetSubscriptionRequest: Any = types.GetSubscriptionRequest.pb()
_DeleteSubscriptionRequest: Any = types.DeleteSubscriptionRequest.pb()
_ListSubscriptionsRequest: Any = types.ListSubscriptionsRequest.pb()
_ListSubscriptionsResponse: Any = types.ListSubscriptionsResponse.pb()
_PullRequest: Any = types.PullRequest.pb()
_PullResponse: Any = types.PullResponse.pb()
_StreamingPullRequest: Any = types.StreamingPullRequest.pb()
_StreamingPullResponse: Any = types.StreamingPullResponse.pb()
_AcknowledgeRequest: Any = types.AcknowledgeRequest.pb()
_ModifyAckDeadlineRequest: Any = types.ModifyAckDeadlineRequest.pb()

PUBLISHER_SERVICE = "google.pubsub.v1.Publisher"
SUBSCRIBER_SERVICE = "google.pubsub.v1.Subscriber"

DEFAULT_ACK_DEADLINE = 10
DELETED_TOPIC = "_deleted-topic_"
POLL_INTERVAL = 0.02  # how often waiting handlers re-check lease expiry and shutdown
PULL_WAIT = 1.0  # how long a unary Pull waits for messages before returning an empty response


@dataclass(eq=False)
class _Stream:
    """One StreamingPull call: its subscription, lease deadline and flow-control state."""

    subscription: str
    ack_deadline: float
    max_messages: int
    max_bytes: int
    leased: dict[str, int] = field(default_factory=dict)  # ack id -> message size
    done: bool = False

    def capacity(self) -> tuple[int, int]:
        """Messages and bytes this stream may still receive (-1 = unlimited)."""
        messages = -1 if self.max_messages <= 0 else self.max_messages - len(self.leased)
        size = -1 if self.max_bytes <= 0 else self.max_bytes - sum(self.leased.values())
        return messages, size


@dataclass(eq=False)
class _Lease:
    message_id: str
    deadline: float
    stream: _Stream | None


@dataclass(eq=False)
class _Sub:
    proto: Any  # the Subscription message returned by Create/GetSubscription
    pending: deque[str] = field(default_factory=deque)  # message ids ready for delivery
    leases: dict[str, _Lease] = field(default_factory=dict)  # ack id -> lease
    unacked: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    attempts: dict[str, int] = field(default_factory=dict)  # message id -> deliveries
    delivered_at: dict[str, list[float]] = field(default_factory=dict)  # monotonic times
    dead_lettered: set[str] = field(default_factory=set)

    @property
    def ack_deadline(self) -> int:
        deadline: int = self.proto.ack_deadline_seconds
        return deadline


class PubSubServer(Service):
    """In-process Pub/Sub server on a free port of 127.0.0.1; use as a context manager.

    `host` is the value for `PUBSUB_EMULATOR_HOST`. The helpers (`create_topic`, `publish`,
    `acked`, ...) act on the same state as the gRPC API and are thread-safe.
    """

    def __init__(self, *, max_workers: int = 64, pull_wait: float = PULL_WAIT) -> None:
        self._pull_wait = pull_wait
        self._cond = threading.Condition()
        self._topics: dict[str, Any] = {}
        self._subs: dict[str, _Sub] = {}
        self._messages: dict[str, Any] = {}  # message id -> PubsubMessage
        self._message_ids = itertools.count(1)
        self._ack_ids = itertools.count(1)
        self._stopping = False
        self._stopped = False
        self._streams: set[_Stream] = set()
        self._server: Any = grpc.server(ThreadPoolExecutor(max_workers=max_workers))
        self._server.add_generic_rpc_handlers(
            (self._publisher_handler(), self._subscriber_handler())
        )
        self.port: int = self._server.add_insecure_port("127.0.0.1:0")
        if not self.port:
            raise RuntimeError("could not bind a port on 127.0.0.1")
        self.host = f"127.0.0.1:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        self._server.start()
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """End all streams (UNAVAILABLE) and pending Pulls, then stop the gRPC server; RPCs
        still running after `grace` seconds are cancelled. Idempotent."""
        with self._cond:
            if self._stopped:
                return
            self._stopping = True
            self._cond.notify_all()
        self._server.stop(grace).wait()
        with self._cond:
            self._stopped = True

    # -- test helpers ------------------------------------------------------------------------

    def create_topic(self, name: str) -> None:
        with self._cond:
            if name in self._topics:
                raise ValueError(f"topic {name} already exists")
            self._topics[name] = _Topic(name=name)

    def create_subscription(
        self,
        name: str,
        topic: str,
        ack_deadline: int = DEFAULT_ACK_DEADLINE,
        *,
        dead_letter_topic: str = "",
        max_delivery_attempts: int = 0,
    ) -> None:
        with self._cond:
            if name in self._subs:
                raise ValueError(f"subscription {name} already exists")
            if topic not in self._topics:
                raise KeyError(f"topic {topic} not found")
            proto = _Subscription(name=name, topic=topic, ack_deadline_seconds=ack_deadline)
            if dead_letter_topic:
                proto.dead_letter_policy.dead_letter_topic = dead_letter_topic
                proto.dead_letter_policy.max_delivery_attempts = max_delivery_attempts
            self._subs[name] = _Sub(proto=proto)

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str] | None = None) -> str:
        """Publish one message as the Publish RPC would; return its message id."""
        with self._cond:
            if topic not in self._topics:
                raise KeyError(f"topic {topic} not found")
            message = _PubsubMessage(data=data, attributes=dict(attributes or {}))
            return self._publish_locked(topic, message)

    def acked(self, subscription: str) -> set[str]:
        """Message ids acknowledged on `subscription`."""
        with self._cond:
            return set(self._sub(subscription).acked)

    def outstanding(self, subscription: str) -> int:
        """Messages of `subscription` not acknowledged yet (queued or leased)."""
        with self._cond:
            return len(self._sub(subscription).unacked)

    def leased(self, subscription: str) -> int:
        """Messages of `subscription` currently leased to a subscriber (delivered, unacked)."""
        with self._cond:
            sub = self._sub(subscription)
            self._expire_locked(sub, time.monotonic())
            return len(sub.leases)

    def open_streams(self, subscription: str) -> int:
        """StreamingPull calls on `subscription` that have not ended."""
        with self._cond:
            return sum(1 for s in self._streams if s.subscription == subscription)

    def deliveries(self, message_id: str) -> int:
        """How often `message_id` was delivered, summed over all subscriptions."""
        with self._cond:
            return sum(sub.attempts.get(message_id, 0) for sub in self._subs.values())

    def delivery_times(self, message_id: str) -> list[float]:
        """When `message_id` was delivered (time.monotonic()), over all subscriptions."""
        with self._cond:
            return sorted(
                t for sub in self._subs.values() for t in sub.delivered_at.get(message_id, [])
            )

    def dead_lettered(self, subscription: str) -> set[str]:
        """Message ids `subscription` forwarded to its dead-letter topic."""
        with self._cond:
            return set(self._sub(subscription).dead_lettered)

    def expire_leases(self, subscription: str) -> int:
        """Let every current lease of `subscription` expire now, as if its ack deadline had
        passed (the real client extends leases to at least 10 s). Returns how many expired."""
        with self._cond:
            sub = self._sub(subscription)
            for lease in sub.leases.values():
                lease.deadline = 0.0
            before = len(sub.leases)
            self._expire_locked(sub, time.monotonic())
            return before

    def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
    ) -> None:
        """Poll `predicate` until it is true; PollTimeout naming `what` after `timeout` s."""
        wait_until(predicate, timeout, what, interval=POLL_INTERVAL)

    # -- state (call with self._cond held) ---------------------------------------------------

    def _sub(self, name: str) -> _Sub:
        try:
            return self._subs[name]
        except KeyError:
            raise KeyError(f"subscription {name} not found") from None

    def _publish_locked(self, topic: str, message: Any) -> str:
        message_id = str(next(self._message_ids))
        message.message_id = message_id
        message.publish_time.GetCurrentTime()
        self._messages[message_id] = message
        for sub in self._subs.values():
            if sub.proto.topic == topic:
                sub.pending.append(message_id)
                sub.unacked.add(message_id)
        self._cond.notify_all()
        return message_id

    def _drop_lease_locked(self, sub: _Sub, ack_id: str) -> _Lease | None:
        lease = sub.leases.pop(ack_id, None)
        if lease is not None and lease.stream is not None:
            lease.stream.leased.pop(ack_id, None)
        return lease

    def _requeue_locked(self, sub: _Sub, message_id: str, *, front: bool) -> None:
        """A lease ended unacked: redeliver, or dead-letter after max_delivery_attempts."""
        policy = sub.proto.dead_letter_policy
        if policy.dead_letter_topic and sub.attempts.get(message_id, 0) >= (
            policy.max_delivery_attempts or 5
        ):
            sub.unacked.discard(message_id)
            sub.dead_lettered.add(message_id)
            if policy.dead_letter_topic in self._topics:
                forwarded = _PubsubMessage()
                forwarded.data = self._messages[message_id].data
                forwarded.attributes.update(self._messages[message_id].attributes)
                self._publish_locked(policy.dead_letter_topic, forwarded)
        elif front:
            sub.pending.appendleft(message_id)
        else:
            sub.pending.append(message_id)

    def _expire_locked(self, sub: _Sub, now: float) -> None:
        expired = [ack_id for ack_id, lease in sub.leases.items() if lease.deadline <= now]
        for ack_id in expired:
            lease = self._drop_lease_locked(sub, ack_id)
            assert lease is not None
            self._requeue_locked(sub, lease.message_id, front=False)
        if expired:
            self._cond.notify_all()

    def _deliver_locked(
        self, sub: _Sub, max_messages: int, max_bytes: int, deadline: float, stream: _Stream | None
    ) -> list[Any]:
        """Lease up to `max_messages` / `max_bytes` pending messages (-1 = unlimited; the
        first message is always allowed when the limit is not already exhausted)."""
        now = time.monotonic()
        received: list[Any] = []
        size_total = 0
        while sub.pending and (max_messages < 0 or len(received) < max_messages):
            message = self._messages[sub.pending[0]]
            size = message.ByteSize()
            if max_bytes >= 0 and received and size_total + size > max_bytes:
                break
            if max_bytes == 0:
                break
            sub.pending.popleft()
            size_total += size
            ack_id = f"ack-{next(self._ack_ids)}"
            sub.leases[ack_id] = _Lease(message.message_id, now + deadline, stream)
            if stream is not None:
                stream.leased[ack_id] = size
            attempt = sub.attempts.get(message.message_id, 0) + 1
            sub.attempts[message.message_id] = attempt
            sub.delivered_at.setdefault(message.message_id, []).append(now)
            received.append(
                _ReceivedMessage(ack_id=ack_id, message=message, delivery_attempt=attempt)
            )
        return received

    def _ack_locked(self, sub: _Sub, ack_ids: Iterable[str]) -> None:
        for ack_id in ack_ids:
            lease = self._drop_lease_locked(sub, ack_id)
            if lease is not None:
                sub.unacked.discard(lease.message_id)
                sub.acked.add(lease.message_id)
        self._cond.notify_all()

    def _modify_locked(self, sub: _Sub, ack_ids: list[str], seconds: list[int]) -> None:
        now = time.monotonic()
        for ack_id, deadline in zip(ack_ids, seconds, strict=False):
            if deadline > 0:
                lease = sub.leases.get(ack_id)
                if lease is not None:
                    lease.deadline = now + deadline
            else:
                lease = self._drop_lease_locked(sub, ack_id)
                if lease is not None:
                    self._requeue_locked(sub, lease.message_id, front=True)
        self._cond.notify_all()

    def _sub_or_abort(self, name: str, context: Any) -> _Sub:
        sub = self._subs.get(name)
        if sub is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Subscription does not exist ({name})")
        assert sub is not None
        return sub

    # -- Publisher ---------------------------------------------------------------------------

    def _publisher_handler(self) -> Any:
        return grpc.method_handlers_generic_handler(
            PUBLISHER_SERVICE,
            {
                "CreateTopic": _unary(self._create_topic, _Topic, _Topic),
                "GetTopic": _unary(self._get_topic, _GetTopicRequest, _Topic),
                "DeleteTopic": _unary(self._delete_topic, _DeleteTopicRequest, None),
                "ListTopics": _unary(self._list_topics, _ListTopicsRequest, _ListTopicsResponse),
                "ListTopicSubscriptions": _unary(
                    self._list_topic_subscriptions,
                    _ListTopicSubscriptionsRequest,
                    _ListTopicSubscriptionsResponse,
                ),
                "Publish": _unary(self._publish, _PublishRequest, _PublishResponse),
            },
        )

    def _create_topic(self, request: Any, context: Any) -> Any:
        with self._cond:
            if request.name in self._topics:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, "Topic already exists")
            topic = _Topic()
            topic.CopyFrom(request)
            self._topics[request.name] = topic
            return _copy(topic)

    def _get_topic(self, request: Any, context: Any) -> Any:
        with self._cond:
            if request.topic not in self._topics:
                context.abort(grpc.StatusCode.NOT_FOUND, "Topic not found")
            return _copy(self._topics[request.topic])

    def _delete_topic(self, request: Any, context: Any) -> None:
        with self._cond:
            if self._topics.pop(request.topic, None) is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "Topic not found")
            for sub in self._subs.values():
                if sub.proto.topic == request.topic:
                    sub.proto.topic = DELETED_TOPIC

    def _list_topics(self, request: Any, context: Any) -> Any:
        prefix = f"{request.project}/topics/"
        with self._cond:
            topics = [_copy(t) for n, t in sorted(self._topics.items()) if n.startswith(prefix)]
            return _ListTopicsResponse(topics=topics)

    def _list_topic_subscriptions(self, request: Any, context: Any) -> Any:
        with self._cond:
            if request.topic not in self._topics:
                context.abort(grpc.StatusCode.NOT_FOUND, "Topic not found")
            names = sorted(n for n, s in self._subs.items() if s.proto.topic == request.topic)
            return _ListTopicSubscriptionsResponse(subscriptions=names)

    def _publish(self, request: Any, context: Any) -> Any:
        with self._cond:
            if request.topic not in self._topics:
                context.abort(grpc.StatusCode.NOT_FOUND, "Topic not found")
            if not request.messages:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "No messages")
            ids = []
            for received in request.messages:
                message = _PubsubMessage()
                message.CopyFrom(received)
                ids.append(self._publish_locked(request.topic, message))
            return _PublishResponse(message_ids=ids)

    # -- Subscriber --------------------------------------------------------------------------

    def _subscriber_handler(self) -> Any:
        return grpc.method_handlers_generic_handler(
            SUBSCRIBER_SERVICE,
            {
                "CreateSubscription": _unary(
                    self._create_subscription, _Subscription, _Subscription
                ),
                "GetSubscription": _unary(
                    self._get_subscription, _GetSubscriptionRequest, _Subscription
                ),
                "DeleteSubscription": _unary(
                    self._delete_subscription, _DeleteSubscriptionRequest, None
                ),
                "ListSubscriptions": _unary(
                    self._list_subscriptions, _ListSubscriptionsRequest, _ListSubscriptionsResponse
                ),
                "Pull": _unary(self._pull, _PullRequest, _PullResponse),
                "StreamingPull": grpc.stream_stream_rpc_method_handler(
                    self._streaming_pull,
                    request_deserializer=_StreamingPullRequest.FromString,
                    response_serializer=_StreamingPullResponse.SerializeToString,
                ),
                "Acknowledge": _unary(self._acknowledge, _AcknowledgeRequest, None),
                "ModifyAckDeadline": _unary(
                    self._modify_ack_deadline, _ModifyAckDeadlineRequest, None
                ),
            },
        )

    def _create_subscription(self, request: Any, context: Any) -> Any:
        with self._cond:
            if request.name in self._subs:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, "Subscription already exists")
            if request.topic not in self._topics:
                context.abort(grpc.StatusCode.NOT_FOUND, "Topic not found")
            if request.ack_deadline_seconds < 0 or request.ack_deadline_seconds > 600:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Invalid ack deadline")
            proto = _Subscription()
            proto.CopyFrom(request)
            if not proto.ack_deadline_seconds:
                proto.ack_deadline_seconds = DEFAULT_ACK_DEADLINE
            self._subs[request.name] = _Sub(proto=proto)
            return _copy(proto)

    def _get_subscription(self, request: Any, context: Any) -> Any:
        with self._cond:
            return _copy(self._sub_or_abort(request.subscription, context).proto)

    def _delete_subscription(self, request: Any, context: Any) -> None:
        with self._cond:
            self._sub_or_abort(request.subscription, context)
            del self._subs[request.subscription]
            self._cond.notify_all()

    def _list_subscriptions(self, request: Any, context: Any) -> Any:
        prefix = f"{request.project}/subscriptions/"
        with self._cond:
            subs = [_copy(s.proto) for n, s in sorted(self._subs.items()) if n.startswith(prefix)]
            return _ListSubscriptionsResponse(subscriptions=subs)

    def _pull(self, request: Any, context: Any) -> Any:
        if request.max_messages <= 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_messages must be positive")
        end = time.monotonic() + (0.0 if request.return_immediately else self._pull_wait)
        remaining = context.time_remaining()
        if remaining is not None:  # answer (possibly empty) before the client's deadline
            end = min(end, time.monotonic() + remaining - 0.1)
        with self._cond:
            while True:
                sub = self._sub_or_abort(request.subscription, context)
                now = time.monotonic()
                self._expire_locked(sub, now)
                received = self._deliver_locked(
                    sub, request.max_messages, -1, sub.ack_deadline, None
                )
                if received or now >= end or self._stopping or not context.is_active():
                    return _PullResponse(received_messages=received)
                self._cond.wait(min(POLL_INTERVAL, end - now))

    def _acknowledge(self, request: Any, context: Any) -> None:
        with self._cond:
            self._ack_locked(self._sub_or_abort(request.subscription, context), request.ack_ids)

    def _modify_ack_deadline(self, request: Any, context: Any) -> None:
        if request.ack_deadline_seconds < 0 or request.ack_deadline_seconds > 600:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Invalid ack deadline")
        with self._cond:
            sub = self._sub_or_abort(request.subscription, context)
            ack_ids = list(request.ack_ids)
            self._modify_locked(sub, ack_ids, [request.ack_deadline_seconds] * len(ack_ids))

    def _streaming_pull(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        try:
            first = next(requests)
        except StopIteration:
            return
        if first.stream_ack_deadline_seconds <= 0 or first.stream_ack_deadline_seconds > 600:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Invalid stream_ack_deadline_seconds")
        stream = _Stream(
            subscription=first.subscription,
            ack_deadline=first.stream_ack_deadline_seconds,
            max_messages=first.max_outstanding_messages,
            max_bytes=first.max_outstanding_bytes,
        )
        with self._cond:
            self._sub_or_abort(stream.subscription, context)
            self._apply_stream_request_locked(stream, first)
            self._streams.add(stream)
        context.add_callback(lambda: self._end_stream(stream))
        reader = threading.Thread(
            target=self._read_stream, args=(requests, stream), name="pubsub-stream", daemon=True
        )
        reader.start()
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        context.abort(grpc.StatusCode.UNAVAILABLE, "server is stopping")
                    if stream.done or not context.is_active():
                        return
                    sub = self._sub_or_abort(stream.subscription, context)
                    self._expire_locked(sub, time.monotonic())
                    max_messages, max_bytes = stream.capacity()
                    received: list[Any] = []
                    if max_messages != 0 and max_bytes != 0:
                        received = self._deliver_locked(
                            sub, max_messages, max_bytes, stream.ack_deadline, stream
                        )
                    if received:
                        break
                    self._cond.wait(POLL_INTERVAL)
            yield _StreamingPullResponse(received_messages=received)

    def _apply_stream_request_locked(self, stream: _Stream, request: Any) -> None:
        if request.stream_ack_deadline_seconds > 0:
            stream.ack_deadline = request.stream_ack_deadline_seconds
        sub = self._subs.get(stream.subscription)
        if sub is None:
            return  # deleted meanwhile; the response loop ends the stream
        if request.ack_ids:
            self._ack_locked(sub, list(request.ack_ids))
        if request.modify_deadline_ack_ids:
            self._modify_locked(
                sub, list(request.modify_deadline_ack_ids), list(request.modify_deadline_seconds)
            )

    def _read_stream(self, requests: Iterator[Any], stream: _Stream) -> None:
        """Apply acks and deadline changes the client sends on the stream until it ends."""
        try:
            for request in requests:
                with self._cond:
                    self._apply_stream_request_locked(stream, request)
        except Exception:  # the call was cancelled or failed: the stream is over
            pass
        finally:
            self._end_stream(stream)

    def _end_stream(self, stream: _Stream) -> None:
        with self._cond:
            stream.done = True
            self._streams.discard(stream)
            self._cond.notify_all()


def _copy(message: Any) -> Any:
    """A copy of a stored message, so responses are serialized outside the lock safely."""
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate


def _serialize_empty(_: None) -> bytes:
    """google.protobuf.Empty has no fields: its wire form is empty."""
    return b""


def _unary(handler: Callable[[Any, Any], Any], request_class: Any, response_class: Any) -> Any:
    """A unary-unary handler; `response_class` None means google.protobuf.Empty."""
    return grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=request_class.FromString,
        response_serializer=(
            _serialize_empty if response_class is None else response_class.SerializeToString
        ),
    )
