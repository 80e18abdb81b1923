"""Composition root and lifecycle of dicom-export: builds every client, pulls, shuts down."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from dicom_adapter.bridge import Bridge
from dicom_adapter.config.exporter import ExporterSettings
from dicom_adapter.dicomweb.auth import choose_auth, credentials_if_needed
from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy, make_http_client
from dicom_adapter.dicomweb.instances import MemoryBudget
from dicom_adapter.dimse.scu import AssociationTarget, client_tls_context
from dicom_adapter.exporter.retry import Backoff
from dicom_adapter.exporter.sinks import CStoreSink, CStoreSinkPool, Sink, StowSink
from dicom_adapter.exporter.source import PubSubSource
from dicom_adapter.exporter.worker import ExportWorker
from dicom_adapter.observability.cloud_monitoring import MonitoringExporter, start_monitoring
from dicom_adapter.observability.http import HealthServer, serve_health
from dicom_adapter.observability.metrics import ExportMetrics, MetricsRegistry

logger = logging.getLogger(__name__)


class ExportService:
    """Everything dicom-export runs, wired together; start() and stop() on the event loop."""

    def __init__(
        self,
        settings: ExporterSettings,
        environ: Mapping[str, str],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._environ = environ
        self._transport = transport
        self._clients: list[httpx.AsyncClient] = []
        self._bridge: Bridge | None = None
        self._sink: Sink | None = None
        self._source: PubSubSource | None = None
        self._spool: Path | None = None
        self.worker: ExportWorker | None = None
        self._registry = MetricsRegistry(process=True)
        self.metrics = ExportMetrics(self._registry)
        self._monitoring: MonitoringExporter | None = None
        self._health: HealthServer | None = None
        self._ready = False

    @property
    def ready(self) -> bool:
        """True while the streaming pull runs and the service is not draining (/readyz)."""
        return self._ready and not self.failed

    @property
    def metrics_port(self) -> int:
        """The bound port of /metrics, /healthz, /readyz (0 when disabled or not started)."""
        return self._health.port if self._health is not None else 0

    def _client(self, url: str, google_credentials: Any) -> DicomwebClient:
        settings = self._settings
        http = make_http_client(
            timeout=settings.http_timeout,
            auth=choose_auth(
                url,
                bearer_token=settings.dicomweb_bearer_token,
                basic_auth=settings.dicomweb_basic_auth,
                google_credentials=google_credentials,
                force_google=settings.use_gcp_application_default_credentials,
            ),
            max_connections=max(8, settings.max_messages * 2),
            transport=self._transport,
        )
        self._clients.append(http)
        return DicomwebClient(http, RetryPolicy(deadline=settings.upstream_retry_deadline))

    async def start(self) -> None:
        """Build the clients and start pulling."""
        settings = self._settings
        loop = asyncio.get_running_loop()
        # Health first: liveness answers while credentials load; readiness waits for the pull.
        self._health = await serve_health(
            settings.metrics_port, self._registry.render, lambda: self.ready
        )
        urls = [settings.source_root] + ([settings.stow_url] if settings.stow_sink else [])
        google_credentials = await credentials_if_needed(
            urls,
            static_auth=bool(settings.dicomweb_bearer_token or settings.dicomweb_basic_auth),
            force_google=settings.use_gcp_application_default_credentials,
            scopes=settings.oauth_scopes,
        )
        # Only Pub/Sub messages cross into the loop (started there, never waited on by a thread).
        self._bridge = bridge = Bridge(loop, blocking_workers=1)
        source_client = self._client(settings.source_root, google_credentials)
        if settings.stow_sink:
            self._sink = StowSink(
                self._client(settings.stow_url, google_credentials),
                settings.stow_url,
                permanent_statuses=settings.permanent_statuses,
            )
            where = f"STOW-RS to {settings.stow_url}"
        else:
            target = AssociationTarget(
                calling_aet=settings.client_aet,
                called_aet=settings.peer_dimse_aet,
                host=settings.peer_dimse_ip,
                port=settings.peer_dimse_port,
                tls=(
                    client_tls_context(**settings.outgoing_tls_options)
                    if settings.peer_dimse_tls
                    else None
                ),
            )
            self._sink = CStoreSinkPool(
                [
                    CStoreSink(target, permanent_statuses=settings.permanent_statuses)
                    for _ in range(settings.peer_max_associations)
                ]
            )
            where = (
                f"C-STORE to {settings.peer_dimse_aet}@{settings.peer_dimse_ip}:"
                f"{settings.peer_dimse_port}{' over DICOM TLS' if settings.peer_dimse_tls else ''}"
                f", up to {settings.peer_max_associations} association(s)"
            )
        self._spool = Path(tempfile.mkdtemp(prefix="dicom-export-"))
        self.worker = ExportWorker(
            source_client,
            settings.source_root,
            self._sink,
            self._spool,
            nack_permanent_failures=settings.nack_permanent_failures,
            metrics=self.metrics,
            backoff=Backoff(settings.retry_backoff_initial, settings.retry_backoff_max),
            probe_interval=settings.sink_probe_interval,
            budget=MemoryBudget(settings.fetch_memory_budget_bytes),
        )
        self._source = PubSubSource(
            bridge,
            self.worker,
            settings.subscription_path,
            max_messages=settings.max_messages,
            max_bytes=settings.max_bytes,
        )
        await asyncio.to_thread(self._source.start)
        self._ready = True
        self._monitoring = start_monitoring(
            settings.monitoring_project_id,
            settings.monitoring_flush_interval,
            self.metrics,
            self._environ,
        )
        self.metrics.started.inc()
        logger.info(
            "dicom-export pulling %s; WADO-RS from %s; %s",
            settings.subscription_path,
            settings.source_root,
            where,
        )

    @property
    def failed(self) -> bool:
        """True when the streaming pull ended by itself (e.g. the subscription is gone)."""
        return self._source is not None and self._source.failed

    async def stop(self) -> None:
        """Stop pulling, let in-flight messages finish (grace period), flush acks, close."""
        grace = self._settings.shutdown_grace_period
        self._ready = False  # /readyz answers 503 while draining; /metrics still serves
        if self.worker is not None:
            self.worker.stop_holding()  # messages waiting out a backoff are nacked now
        if self._source is not None:
            logger.info("stopping: no new messages; waiting up to %.0f s for running ones", grace)
            # Blocking, and the running exports need this loop: wait in a thread.
            await asyncio.to_thread(self._source.stop, grace)
            self._source = None
        if self.worker is not None:
            await self.worker.close()
        if self._sink is not None:
            await self._sink.close()
            self._sink = None
        if self._bridge is not None:
            await self._bridge.close(grace=1.0)
            self._bridge = None
        for http in self._clients:
            await http.aclose()
        self._clients = []
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None
        monitoring, self._monitoring = self._monitoring, None
        if monitoring is not None:  # after the drain: its last write has every count
            await asyncio.to_thread(monitoring.stop)
        health, self._health = self._health, None
        if health is not None:
            await health.stop()


async def run(settings: ExporterSettings, environ: Mapping[str, str]) -> int:
    """Pull until SIGTERM/SIGINT, then drain within the grace period; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = ExportService(settings, environ)
    code = 0
    try:
        await service.start()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except TimeoutError:
                if service.failed:
                    logger.error("the streaming pull stopped; exiting")
                    code = 1
                    break
    finally:
        await service.stop()
    logger.info("dicom-export stopped")
    return code
