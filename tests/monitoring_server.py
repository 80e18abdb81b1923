"""A fake Cloud Monitoring gRPC server and a fake GCE metadata server, for tests.

`MonitoringServer` serves `google.monitoring.v3.MetricService/CreateTimeSeries` over real
gRPC (generic method handlers, the protobuf classes behind `monitoring_v3.X.pb()`), so the
real `MetricServiceClient` talks to it over the wire through an insecure channel (set
`MONITORING_EMULATOR_HOST` to `MonitoringServer.host`). It records every request; `fail_next`
makes the next calls fail with UNAVAILABLE, `hold` makes calls hang until `release` (a call
whose client gave up meanwhile is not recorded). Other MetricService methods are not served.

`MetadataServer` answers `computeMetadata/v1/instance/attributes/cluster-name` and
`computeMetadata/v1/instance/zone` (only with `Metadata-Flavor: Google`), like the GCE metadata
server; point `GCE_METADATA_HOST` at `MetadataServer.host`.

Plain module without pytest, so `bench/` scripts can use it too.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc  # type: ignore[import-untyped]

from tests.rig.lifecycle import Service
from tests.rig.poll import wait_until

# Imported untyped: a static import makes mypy treat google.cloud as typed (see
# dicom_adapter.observability.cloud_monitoring._module).
_monitoring_v3: Any = importlib.import_module("google.cloud.monitoring_v3")
_CreateTimeSeriesRequest: Any = _monitoring_v3.CreateTimeSeriesRequest.pb()

METRIC_SERVICE = "google.monitoring.v3.MetricService"


@dataclass(frozen=True)
class Point:
    """One written point, flattened: what a test asserts on."""

    project: str
    metric_type: str
    metric_kind: int
    value_type: int
    resource_type: str
    resource_labels: dict[str, str]
    value: int
    end_time: float


class MonitoringServer(Service):
    """In-process MetricService (CreateTimeSeries only) on a free localhost port."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self.requests: list[Any] = []  # CreateTimeSeriesRequest protobufs, in arrival order
        self._failures = 0
        self.failed_calls = 0
        self.held_calls = 0
        self._open = threading.Event()
        self._open.set()
        self._server: Any = None
        self.port = 0

    @property
    def host(self) -> str:
        """`host:port` for MONITORING_EMULATOR_HOST."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen on a free port."""
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        handler = grpc.unary_unary_rpc_method_handler(
            self._create_time_series,
            request_deserializer=_CreateTimeSeriesRequest.FromString,
            response_serializer=lambda _: b"",  # google.protobuf.Empty
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(METRIC_SERVICE, {"CreateTimeSeries": handler}),)
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server

    def stop(self) -> None:
        """Stop serving (running calls are cut, held ones released)."""
        self._open.set()
        if self._server is not None:
            self._server.stop(grace=0).wait()
            self._server = None

    def fail_next(self, calls: int) -> None:
        """Answer the next `calls` CreateTimeSeries calls with UNAVAILABLE."""
        with self._lock:
            self._failures = calls

    def hold(self) -> None:
        """Make calls hang (as a stalled network would) until release()."""
        self._open.clear()

    def release(self) -> None:
        """Let held and later calls through."""
        self._open.set()

    def _create_time_series(self, request: Any, context: Any) -> None:
        if not self._open.is_set():
            with self._lock:
                self.held_calls += 1
                self._lock.notify_all()
            self._open.wait(60)
            if not context.is_active():
                return  # the client's deadline passed: it counts this write as failed
        with self._lock:
            if self._failures > 0:
                self._failures -= 1
                self.failed_calls += 1
                self._lock.notify_all()
                context.abort(grpc.StatusCode.UNAVAILABLE, "fake outage")
            if not request.time_series:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no time series")
            self.requests.append(request)
            self._lock.notify_all()

    def points(self) -> list[Point]:
        """Every point written so far, in order."""
        with self._lock:
            requests = list(self.requests)
        return [
            Point(
                project=request.name,
                metric_type=series.metric.type,
                metric_kind=series.metric_kind,
                value_type=series.value_type,
                resource_type=series.resource.type,
                resource_labels=dict(series.resource.labels),
                value=point.value.int64_value,
                end_time=point.interval.end_time.seconds + point.interval.end_time.nanos / 1e9,
            )
            for request in requests
            for series in request.time_series
            for point in series.points
        ]

    def totals(self) -> dict[str, int]:
        """The sum of the written values per metric type."""
        sums: dict[str, int] = {}
        for point in self.points():
            sums[point.metric_type] = sums.get(point.metric_type, 0) + point.value
        return sums

    def wait_for(self, condition: Callable[[MonitoringServer], bool], timeout: float = 10) -> None:
        """Poll until `condition(self)` holds (woken by each call), else PollTimeout."""

        def pause(seconds: float) -> None:
            with self._lock:
                self._lock.wait(seconds)

        wait_until(
            lambda: condition(self),
            timeout,
            "the monitoring write",
            interval=0.1,
            detail=lambda: f"written: {self.totals()}",
            pause=pause,
        )


class _MetadataHandler(BaseHTTPRequestHandler):
    server: _MetadataHTTPServer

    def do_GET(self) -> None:
        values = self.server.values
        path = self.path.removeprefix("/computeMetadata/v1/")
        self.server.seen.append(self.path)
        if self.headers.get("Metadata-Flavor") != "Google":
            self._answer(403, "Missing Metadata-Flavor:Google header.")
        elif path in values:
            self._answer(200, values[path])
        else:
            self._answer(404, "not found")

    def _answer(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/text")
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `seen` instead."""


class _MetadataHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), _MetadataHandler)
        self.values = values
        self.seen: list[str] = []


class MetadataServer(Service):
    """A GCE metadata server answering cluster-name and zone (either may be left out)."""

    def __init__(self, cluster_name: str | None = None, zone: str | None = None) -> None:
        values: dict[str, str] = {}
        if cluster_name is not None:
            values["instance/attributes/cluster-name"] = cluster_name
        if zone is not None:
            values["instance/zone"] = f"projects/123456789/zones/{zone}"
        self._server = _MetadataHTTPServer(values)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def host(self) -> str:
        """`host:port` for GCE_METADATA_HOST."""
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def seen(self) -> list[str]:
        """The paths requested so far."""
        return list(self._server.seen)

    def start(self) -> None:
        """Serve on its thread."""
        self._thread.start()

    def stop(self) -> None:
        """Shut the server down and join its thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
