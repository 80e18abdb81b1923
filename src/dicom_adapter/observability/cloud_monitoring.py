"""Cloud Monitoring export (`--monitoring_project_id`), as the Java adapter writes it.

Each event counter (the Prometheus counters of observability.metrics: one event source) is
written as `custom.googleapis.com/dicomadapter/<service>/<event>`, a GAUGE INT64 whose point
is the count since the last successful write, from one background thread: one
CreateTimeSeries call per period (events with nothing to report are left out, an idle period
makes no call), never on the event loop or a DIMSE thread. A failed write is logged once per
failure streak and its counts are carried: the next write sends them (added to the new ones).
The monitored resource is `k8s_container` when ENV_POD_NAME, ENV_POD_NAMESPACE and
ENV_CONTAINER_NAME are set and the GCE metadata server answers cluster-name and zone, else
`global`.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import httpx

logger = logging.getLogger(__name__)

METRIC_PREFIX = "custom.googleapis.com/dicomadapter/"
METADATA_HOST = "metadata.google.internal"
METADATA_TIMEOUT = 2.0  # seconds per metadata request; off GCE the name does not resolve
CALL_TIMEOUT = 12.0  # seconds per CreateTimeSeries (the client's own default)
FINAL_TIMEOUT = 5.0  # seconds for the last write at shutdown, inside the SIGTERM grace
# Not a Java adapter variable: points the client at a fake or an emulator (insecure channel),
# as PUBSUB_EMULATOR_HOST does for Pub/Sub. Used by the tests.
EMULATOR_ENV = "MONITORING_EMULATOR_HOST"
POD_ENV = ("ENV_POD_NAME", "ENV_POD_NAMESPACE", "ENV_CONTAINER_NAME")


def _module(name: str) -> Any:
    """A google-cloud-monitoring module, imported on first use and untyped on purpose.

    A static import would make mypy treat the `google.cloud` namespace as typed, which turns
    the untyped google.cloud.pubsub_v1 imports elsewhere into errors.
    """
    return importlib.import_module(name)


class CountSource(Protocol):
    """A counter read by value (observability.metrics.Counter)."""

    def value(self) -> float: ...


Resource = tuple[str, dict[str, str]]


def _metadata(host: str, path: str) -> str | None:
    """One GCE metadata value, or None when the server does not answer it."""
    url = f"http://{host}/computeMetadata/v1/{path}"
    try:
        with httpx.Client(trust_env=False, timeout=METADATA_TIMEOUT) as client:
            response = client.get(url, headers={"Metadata-Flavor": "Google"})
    except httpx.HTTPError:
        return None
    if response.status_code != 200 or not response.text.strip():
        return None
    return response.text.strip()


def detect_resource(project_id: str, environ: Mapping[str, str]) -> Resource:
    """The monitored resource: `k8s_container` in a GKE pod, else `global` (blocking I/O)."""
    pod, namespace, container = (environ.get(name, "") for name in POD_ENV)
    if pod and namespace and container:
        host = environ.get("GCE_METADATA_HOST") or METADATA_HOST
        cluster = _metadata(host, "instance/attributes/cluster-name")
        zone = _metadata(host, "instance/zone")  # projects/<number>/zones/<zone>
        if cluster and zone:
            return "k8s_container", {
                "project_id": project_id,
                "location": zone.rsplit("/", 1)[-1],
                "cluster_name": cluster,
                "namespace_name": namespace,
                "pod_name": pod,
                "container_name": container,
            }
        logger.warning(
            "Cloud Monitoring: ENV_POD_* are set but the GCE metadata server did not answer "
            "cluster-name and zone; writing to the global resource"
        )
    return "global", {"project_id": project_id}


def make_client(environ: Mapping[str, str]) -> Any:
    """A MetricServiceClient: Application Default Credentials, or the emulator host if set."""
    monitoring_v3 = _module("google.cloud.monitoring_v3")
    transports = _module("google.cloud.monitoring_v3.services.metric_service.transports")
    emulator = environ.get(EMULATOR_ENV, "")
    if emulator:
        import grpc  # type: ignore[import-untyped]

        channel = grpc.insecure_channel(emulator)
        return monitoring_v3.MetricServiceClient(
            transport=transports.MetricServiceGrpcTransport(channel=channel)
        )
    return monitoring_v3.MetricServiceClient()


def build_series(
    service: str, counts: Mapping[str, int], resource: Resource, now: float
) -> list[Any]:
    """One TimeSeries per event: GAUGE INT64, one point ending `now` (seconds since epoch)."""
    monitoring_v3 = _module("google.cloud.monitoring_v3")
    descriptor = _module("google.api.metric_pb2").MetricDescriptor
    resource_type, labels = resource
    seconds = int(now)
    end = {"seconds": seconds, "nanos": int((now - seconds) * 1e9)}
    return [
        monitoring_v3.TimeSeries(
            metric={"type": f"{METRIC_PREFIX}{service}/{event}"},
            resource={"type": resource_type, "labels": labels},
            metric_kind=descriptor.MetricKind.GAUGE,
            value_type=descriptor.ValueType.INT64,
            points=[{"interval": {"end_time": end}, "value": {"int64_value": count}}],
        )
        for event, count in counts.items()
    ]


class MonitoringExporter:
    """Writes the deltas of `events` to Cloud Monitoring every `interval` s, from a thread."""

    def __init__(
        self,
        project_id: str,
        service: str,
        events: Mapping[str, CountSource],
        environ: Mapping[str, str],
        *,
        interval: float = 60.0,
        client_factory: Callable[[Mapping[str, str]], Any] = make_client,
    ) -> None:
        self._project_id = project_id
        self._service = service
        self._events = dict(events)
        self._environ = dict(environ)
        self._interval = interval
        self._client_factory = client_factory
        self._client: Any = None
        self._resource: Resource | None = None
        self._sent = dict.fromkeys(self._events, 0)  # counts written so far, per event
        self._failing = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one flush at a time (the thread, or the final one)
        self._thread: threading.Thread | None = None

    @property
    def resource(self) -> Resource | None:
        """The monitored resource written to (None before the first write attempt)."""
        return self._resource

    def start(self) -> None:
        """Start the flush thread (a daemon: it never holds the process up)."""
        self._thread = threading.Thread(
            target=self._run, name=f"cloud-monitoring-{self._service}", daemon=True
        )
        self._thread.start()
        logger.info(
            "Cloud Monitoring: writing %s%s/* to project %s every %g s",
            METRIC_PREFIX,
            self._service,
            self._project_id,
            self._interval,
        )

    def stop(self) -> None:
        """Stop the thread after one last write of what is pending (blocking; off the loop).

        Waits at most FINAL_TIMEOUT + 1 s (it runs inside the SIGTERM grace period); past that
        the daemon thread, stuck in a slow write, is left behind and the last counts are lost.
        """
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(FINAL_TIMEOUT + 1)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._flush_logged(CALL_TIMEOUT)
        self._flush_logged(FINAL_TIMEOUT)  # what the last period counted is not lost

    def _flush_logged(self, timeout: float) -> None:
        try:
            self.flush(timeout)
        except Exception:  # a bug here must not end the thread: later writes catch up
            logger.exception("Cloud Monitoring flush failed")

    def flush(self, timeout: float = CALL_TIMEOUT) -> bool:
        """One CreateTimeSeries with every event's count since the last successful write.

        True when written or nothing to write; False when the write failed (counts carried).
        """
        with self._lock:
            return self._flush_locked(timeout)

    def _flush_locked(self, timeout: float) -> bool:
        current = {event: int(source.value()) for event, source in self._events.items()}
        deltas = {
            event: value - self._sent[event]
            for event, value in current.items()
            if value > self._sent[event]
        }
        if not deltas:
            return True
        try:
            if self._resource is None:
                self._resource = detect_resource(self._project_id, self._environ)
                logger.info("Cloud Monitoring resource: %s %s", *self._resource)
            if self._client is None:
                self._client = self._client_factory(self._environ)
            series = build_series(self._service, deltas, self._resource, time.time())
            self._client.create_time_series(
                name=f"projects/{self._project_id}",
                time_series=series,
                timeout=timeout,
            )
        except Exception as exc:
            if not self._failing:
                logger.warning(
                    "Cloud Monitoring write failed; counts are kept for the next write "
                    "(logged once until a write succeeds): %s",
                    exc,
                )
            self._failing = True
            return False
        for event, delta in deltas.items():
            self._sent[event] += delta
        if self._failing:
            logger.info("Cloud Monitoring writes succeed again")
            self._failing = False
        return True


class ServiceMetrics(Protocol):
    """ImportMetrics or ExportMetrics: the service name and its Java event counters."""

    service: str

    def events(self) -> Mapping[str, CountSource]: ...


def start_monitoring(
    project_id: str, interval: float, metrics: ServiceMetrics, environ: Mapping[str, str]
) -> MonitoringExporter | None:
    """A running exporter when --monitoring_project_id is set, else None."""
    if not project_id:
        return None
    exporter = MonitoringExporter(
        project_id, metrics.service, metrics.events(), environ, interval=interval
    )
    exporter.start()
    return exporter
