"""Composition root and lifecycle of dicom-import: builds every client, serves, shuts down."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
from pynetdicom import evt

from dicom_adapter.aets import load_aet_dictionary
from dicom_adapter.bridge import Bridge
from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.dicomweb.auth import choose_auth, credentials_if_needed
from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy, make_http_client
from dicom_adapter.dicomweb.instances import MemoryBudget
from dicom_adapter.dimse.scu import ScuTimeouts
from dicom_adapter.dimse.server import (
    build_ae,
    configure_pynetdicom,
    refuse_move,
    route_moves,
    server_tls_context,
    start_server,
)
from dicom_adapter.errors import ConfigError
from dicom_adapter.importer.commitment import CommitmentService
from dicom_adapter.importer.cstore_spool import CStoreSpool
from dicom_adapter.importer.find import FindService
from dicom_adapter.importer.handlers import (
    AssociationCleanup,
    CFindHandler,
    CStoreHandler,
    RetrieveHandlers,
    SpoolIntake,
)
from dicom_adapter.importer.move import InstanceMover, RetrieveService
from dicom_adapter.importer.prepare import build_preparation
from dicom_adapter.importer.store import StoreService
from dicom_adapter.observability.http import HealthServer, serve_health
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry
from dicom_adapter.spool.base import Spool
from dicom_adapter.spool.gcs import GcsLocation, GcsSpool, Storage, is_gcs, replica_name
from dicom_adapter.spool.local import LocalSpool
from dicom_adapter.spool.uploader import SpoolUploader

logger = logging.getLogger(__name__)


class ImportService:
    """Everything dicom-import runs, wired together; start() and stop() on the event loop."""

    def __init__(
        self,
        settings: ImporterSettings,
        environ: Mapping[str, str],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._environ = environ
        self._transport = transport
        self._server: Any = None
        self._http: httpx.AsyncClient | None = None
        self._bridge: Bridge | None = None
        self._spool: CStoreSpool | None = None
        self._local_spool: Spool | None = None
        self._uploader: SpoolUploader | None = None
        self._registry = MetricsRegistry()
        self.metrics = ImportMetrics(self._registry)
        self.metrics.associations.set_function(self._established_associations)
        self.metrics.pending_associations.set_function(self._pending_connections)
        self._health: HealthServer | None = None
        self._ready = False
        self.fetch_budget = MemoryBudget(settings.fetch_memory_budget_bytes)

    @property
    def ready(self) -> bool:
        """True while the DIMSE port listens, has a free association slot and is not draining.

        /readyz: Kubernetes stops sending new peers to a pod whose slots are all taken.
        """
        server = self._server
        if not (self._ready and server is not None and server.free_slots() > 0):
            return False
        local = self._local_spool
        return local is None or local.has_room()

    @property
    def live(self) -> bool:
        """False once the DIMSE accept loop stopped looping (/healthz: Kubernetes restarts us).

        Always True before start and while draining: the accept loop is stopped on purpose.
        """
        server = self._server
        return server is None or not self._ready or bool(server.is_alive())

    @property
    def metrics_port(self) -> int:
        """The bound port of /metrics, /healthz, /readyz (0 when disabled or not started)."""
        return self._health.port if self._health is not None else 0

    def _established_associations(self) -> int:
        return sum(1 for assoc in self.active_associations if assoc.is_established)

    def _pending_connections(self) -> int:
        pending = getattr(self._server, "pending", None)
        return len(pending) if pending is not None else 0

    async def start(self) -> int:
        """Build the clients, start listening; returns the bound DIMSE port."""
        settings = self._settings
        loop = asyncio.get_running_loop()
        aets = load_aet_dictionary(
            settings.aet_dictionary_inline, settings.aet_dictionary, self._environ
        )
        tls = (  # loaded before anything starts: a bad file is a startup error (exit 2)
            server_tls_context(
                settings.tls_certificate, settings.tls_private_key, settings.tls_ca_certificates
            )
            if settings.tls_certificate
            else None
        )
        # Health first: liveness answers while credentials load; readiness waits for DIMSE.
        self._health = await serve_health(
            settings.metrics_port, self._registry.render, lambda: self.ready, lambda: self.live
        )
        if len(aets):
            logger.info("AET dictionary: %d peers (%s)", len(aets), ", ".join(aets.names))
        google_credentials = await credentials_if_needed(
            [settings.stow_url],
            static_auth=bool(settings.dicomweb_bearer_token or settings.dicomweb_basic_auth),
            force_google=False,
            scopes=settings.oauth_scopes,
        )
        auth = choose_auth(
            settings.stow_url,
            bearer_token=settings.dicomweb_bearer_token,
            basic_auth=settings.dicomweb_basic_auth,
            google_credentials=google_credentials,
        )
        self._http = http = make_http_client(
            timeout=settings.http_timeout,
            http2=settings.stow_http2,
            auth=auth,
            max_connections=max(8, settings.max_associations * 2),
            transport=self._transport,
        )
        client = DicomwebClient(
            http,
            RetryPolicy(
                deadline=settings.upstream_retry_deadline,
                extra_codes=settings.http_error_codes_to_retry,
            ),
        )
        self._bridge = bridge = Bridge(loop)
        store = StoreService(
            client,
            stow_url=settings.stow_url,
            dicomweb_root=settings.dicomweb_root,
            overwrite=settings.stow_overwrite,
        )
        # From a data set's last byte to its C-STORE-RSP: the upstream retries end before it.
        store_timeout = settings.cstore_answer_deadline
        retrieve_timeout = settings.upstream_retry_deadline + 2 * settings.http_timeout + 5
        configure_pynetdicom()
        query_services = bool(settings.dicomweb_root)  # not with the deprecated STOW-only pair
        find_on = query_services and not settings.disable_cfind
        retrieve_on = query_services and not settings.disable_retrieve
        commitment_on = query_services and not settings.disable_commitment
        ae = build_ae(
            aet=settings.dimse_aet,
            max_associations=settings.max_associations,
            max_pdu_size=settings.max_pdu_size,
            acse_timeout=settings.acse_timeout,
            dimse_timeout=settings.dimse_timeout,
            network_timeout=settings.network_timeout,
            find=find_on,
            retrieve=retrieve_on,
            commitment=commitment_on,
            allowed_calling_aets=settings.allowed_calling_aet_list,
        )
        metrics = self.metrics
        location = settings.persistent_file_storage_location
        if is_gcs(location):
            # received in this run's temp directory, written to Cloud Storage from there
            self._spool = spool = await asyncio.to_thread(CStoreSpool)
            try:
                intake: SpoolIntake | None = await self._open_gcs_spool(store, spool.dir)
            except BaseException:
                await self._stop_uploader()
                await http.aclose()
                await self._close_spool()
                await self._stop_health()
                raise
        else:
            intake = await self._open_local_spool(store) if location else None
            # C-STORE data sets spool in a directory of this run; stale runs' files are swept
            # (inside the durable spool when there is one: a rename moves a file into its queue)
            incoming = intake.spool.incoming if intake is not None else None
            self._spool = spool = await asyncio.to_thread(CStoreSpool, incoming)
        spool.install()
        handlers: list[tuple[Any, Callable[..., Any]]] = [
            (
                evt.EVT_C_STORE,
                CStoreHandler(
                    bridge,
                    store,
                    store_timeout,
                    metrics=metrics,
                    intake=intake,
                    prepare=build_preparation([]),  # issue 10: redaction, then transcoding
                ),
            ),
            (evt.EVT_CONN_CLOSE, AssociationCleanup(spool)),
        ]
        sub_operation_timeouts = ScuTimeouts(
            acse=settings.acse_timeout,
            dimse=settings.dimse_timeout,
            network=settings.network_timeout,
        )
        if find_on:
            find = FindService(
                client,
                settings.dicomweb_root,
                retrieve_aet=settings.dimse_aet,
                fuzzy=settings.fuzzy_matching,
                metrics=metrics,
            )
            handlers.append((evt.EVT_C_FIND, CFindHandler(bridge, find, metrics=metrics)))
        if retrieve_on:
            retrieve_service = RetrieveService(client, settings.dicomweb_root)
            retrieve = RetrieveHandlers(
                bridge,
                retrieve_service,
                aets,
                timeout=retrieve_timeout + settings.dimse_timeout,
                mover=InstanceMover(
                    retrieve_service,
                    timeouts=sub_operation_timeouts,
                    budget=self.fetch_budget,
                    metrics=metrics,
                ),
                cmove_aet=settings.dimse_cmove_aet or settings.dimse_aet,
                metrics=metrics,
            )
            if not route_moves(ae, retrieve.run_move):
                handlers.append((evt.EVT_C_MOVE, refuse_move))
            handlers.append((evt.EVT_C_GET, retrieve.on_get))
        if commitment_on:
            commitment = CommitmentService(
                client,
                settings.dicomweb_root,
                aets,
                aet=settings.dimse_aet,
                bridge=bridge,
                scu_timeouts=sub_operation_timeouts,
                metrics=metrics,
            )
            handlers.append((evt.EVT_N_ACTION, commitment.on_n_action))
        try:
            self._server = start_server(
                ae,
                "0.0.0.0",
                settings.dimse_port,
                handlers,
                ssl_context=tls,
                max_pending=settings.max_pending_associations,
                on_pending_drop=metrics.pending_dropped.inc,
            )
        except OSError as exc:
            await self._stop_uploader()
            await http.aclose()
            await self._close_spool()
            await self._stop_health()
            raise ConfigError(
                "dimse_port", f"cannot listen on {settings.dimse_port}: {exc.strerror}"
            ) from None
        port = int(self._server.server_address[1])
        self._ready = True
        metrics.started.inc()
        logger.info(
            "dicom-import listening on port %d as %s; STOW-RS to %s",
            port,
            settings.dimse_aet,
            settings.stow_url,
        )
        return port

    @property
    def active_associations(self) -> list[Any]:
        """The associations being served right now (pynetdicom Association threads)."""
        return list(self._server.active_associations) if self._server is not None else []

    async def stop(self) -> None:
        """Stop accepting, drain running associations within the grace period, close clients."""
        self._ready = False  # /readyz answers 503 while draining; /metrics still serves
        if self._server is not None and self._bridge is not None:
            await _drain(self._server, self._bridge, self._settings.shutdown_grace_period)
            self._server = None
        await self._stop_uploader()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        await self._close_spool()
        await self._stop_health()

    async def _open_local_spool(self, store: StoreService) -> SpoolIntake:
        """The durable spool and its uploader, which starts with what earlier runs left."""
        settings = self._settings
        local = await asyncio.to_thread(
            LocalSpool,
            Path(settings.persistent_file_storage_location),
            headroom_bytes=settings.spool_free_space_headroom,
        )
        return await self._start_uploader(local, store, str(local.root), "fsynced")

    async def _open_gcs_spool(self, store: StoreService, scratch: Path) -> SpoolIntake:
        """The gs:// spool (this replica's prefix) and its uploader; bad access stops startup."""
        settings = self._settings
        location = settings.persistent_file_storage_location
        try:
            replica = replica_name(self._environ)
        except ValueError as exc:
            raise ConfigError("persistent_file_storage_location", str(exc)) from None
        # object writes are bounded like a STOW: the C-STORE waits for the write
        storage = await asyncio.to_thread(
            functools.partial(
                Storage,
                GcsLocation.parse(location),
                settings.gcs_backup_project_id,
                timeout=settings.http_timeout,
                retry_seconds=settings.upstream_retry_deadline,
            )
        )
        gcs = GcsSpool(
            storage,
            replica,
            scratch=scratch,
            headroom_bytes=settings.spool_free_space_headroom,
            keep_received=not settings.auto_ack_cstore,
        )
        try:
            await asyncio.to_thread(gcs.queued)
        except OSError as exc:
            raise ConfigError(
                "persistent_file_storage_location", f"cannot list {gcs.root}: {exc}"
            ) from None
        return await self._start_uploader(gcs, store, gcs.root, "written to Cloud Storage")

    async def _start_uploader(
        self, local: Spool, store: StoreService, where: str, durable: str
    ) -> SpoolIntake:
        settings = self._settings
        self.metrics.spool_depth.set_function(local.depth)
        self.metrics.spool_oldest_age.set_function(local.oldest_age)
        uploader = SpoolUploader(
            local,
            store,
            self.metrics,
            concurrency=settings.spool_upload_concurrency,
            retries=settings.persistent_file_upload_retry_amount,
            min_delay=settings.min_upload_delay / 1000,
            max_delay=settings.max_waiting_time_between_uploads / 1000,
            retry_codes=settings.http_error_codes_to_retry,
        )
        self._local_spool, self._uploader = local, uploader
        await uploader.start()
        logger.info(
            "spool %s: C-STORE %s",
            where,
            f"acknowledged once {durable}, uploaded in the background"
            if settings.auto_ack_cstore
            else "answered after its STOW-RS",
        )
        return SpoolIntake(local, uploader, auto_ack=settings.auto_ack_cstore)

    async def _stop_uploader(self) -> None:
        uploader, self._uploader = self._uploader, None
        if uploader is not None:
            await uploader.stop()
        local, self._local_spool = self._local_spool, None
        if local is not None:
            local.close()

    @property
    def cstore_spool_dir(self) -> Path | None:
        """This run's directory for incoming C-STORE data sets (None before start)."""
        return self._spool.dir if self._spool is not None else None

    async def _close_spool(self) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            await asyncio.to_thread(spool.close)

    async def _stop_health(self) -> None:
        health, self._health = self._health, None
        if health is not None:
            await health.stop()


async def run(settings: ImporterSettings, environ: Mapping[str, str]) -> int:
    """Serve until SIGTERM/SIGINT, then drain within the grace period; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = ImportService(settings, environ)
    try:
        await service.start()
        await stop.wait()
    finally:
        await service.stop()
    logger.info("dicom-import stopped")
    return 0


async def _drain(server: Any, bridge: Bridge, grace: float) -> None:
    """Stop accepting, let established associations finish within `grace`, abort the rest.

    Connections that never completed association negotiation hold no data; pynetdicom keeps
    their threads until the ACSE timeout, so they are aborted and not waited for.
    """
    logger.info("stopping: no new associations; waiting up to %.0f s for running ones", grace)
    await asyncio.to_thread(server.shutdown)

    def established() -> list[Any]:
        return [a for a in server.active_associations if a.is_established]

    await _abort_all([a for a in server.active_associations if not a.is_established])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while established() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    late = established()
    if late:
        logger.warning("aborting %d association(s) still running after the grace period", len(late))
    await _abort_all(late)
    await bridge.close(grace=max(0.0, deadline - loop.time()))


async def _abort_all(associations: list[Any]) -> None:
    """pynetdicom's abort() blocks until the association's thread stops: in threads, at once."""
    await asyncio.gather(*(asyncio.to_thread(assoc.abort) for assoc in associations))
