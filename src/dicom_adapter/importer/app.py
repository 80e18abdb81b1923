"""Composition root and lifecycle of dicom-import: builds every client, serves, shuts down."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from pynetdicom import evt

from dicom_adapter.aets import load_aet_dictionary
from dicom_adapter.bridge import Bridge
from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.dicom.redact import redaction_step
from dicom_adapter.dicom.transcode import transcoding_step
from dicom_adapter.dicomweb.auth import choose_auth, credentials_if_needed
from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy, make_http_client
from dicom_adapter.dicomweb.instances import MemoryBudget
from dicom_adapter.dimse.get_sender import refuse_get, route_gets
from dicom_adapter.dimse.scu import AssociationTarget, ScuTimeouts, client_tls_context
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
from dicom_adapter.importer.destinations import (
    DestinationQueue,
    DestinationSpools,
    DimseStore,
    GcsDestinationSpools,
    Router,
    recorded_destinations,
    recorded_gcs_destinations,
)
from dicom_adapter.importer.find import FindService
from dicom_adapter.importer.handlers import (
    AssociationCleanup,
    CFindHandler,
    CommitmentHandler,
    CStoreHandler,
    RetrieveHandlers,
    SpoolIntake,
)
from dicom_adapter.importer.prepare import build_preparation
from dicom_adapter.importer.retrieve import InstanceMover, RetrieveService
from dicom_adapter.importer.routing import Destination, RoutingTable, load_destination_config
from dicom_adapter.importer.store import StoreService
from dicom_adapter.observability.cloud_monitoring import MonitoringExporter, start_monitoring
from dicom_adapter.observability.http import HealthServer, serve_health
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry
from dicom_adapter.spool.base import InstanceStore, Spool
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
        self._registry = MetricsRegistry(process=True)
        self.metrics = ImportMetrics(self._registry)
        self._monitoring: MonitoringExporter | None = None
        self.metrics.associations.set_function(self._established_associations)
        self.metrics.pending_associations.set_function(self._pending_connections)
        self._health: HealthServer | None = None
        self._ready = False
        self.fetch_budget = MemoryBudget(settings.fetch_memory_budget_bytes)
        self._routing = RoutingTable([], send_to_all=False)
        self._dest_clients: dict[str, DicomwebClient] = {}  # one pooled client per host
        self._outgoing_tls_context: ssl.SSLContext | None = None
        self._dimse_stores: list[DimseStore] = []
        self._dest_uploaders: list[SpoolUploader] = []
        self._left_in_spool: list[Destination] = []  # read once at startup
        self._dest_local_spools: list[Spool] = []
        self._google_credentials: Any = None

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
        if aets.any_tls:  # loaded before anything starts: a bad file is a startup error
            aets.tls_context = self._outgoing_tls()
        self._routing = routing = load_destination_config(
            settings.destination_config_inline,
            settings.destination_config_path,
            self._environ,
            send_to_all=settings.send_to_all_matching_destinations,
        )
        if any(d.tls for d in routing.destinations):  # bad files: a startup error
            self._outgoing_tls()
        transcode = transcoding_step(  # before anything starts: no codecs is exit 2
            settings.store_compress_to_transfer_syntax,
            settings.transcode_max_bytes,
            settings.transcode_max_seconds,
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
        location = settings.persistent_file_storage_location
        left_in_spool = (  # queues of destinations earlier rules named are uploaded too
            await asyncio.to_thread(recorded_destinations, Path(location))
            if location and not is_gcs(location)
            else []  # a gs:// spool's are read once its storage is open
        )
        self._left_in_spool = left_in_spool
        google_credentials = await credentials_if_needed(
            [
                settings.stow_url,
                *(d.stow_url for d in [*routing.destinations, *left_in_spool] if d.stow_url),
            ],
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
        self._google_credentials = google_credentials
        self._dest_clients = {_host_key(settings.stow_url): client}
        if len(routing):
            logger.info(
                "routing: %d rules (%s); unmatched instances go to %s",
                len(routing),
                "every match" if routing.send_to_all else "first match wins",
                settings.stow_url,
            )
        # From a data set's last byte to its C-STORE-RSP: the upstream retries end before it.
        store_timeout = settings.cstore_answer_deadline
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
            counter = intake.spool.add_incoming if intake is not None else None
            self._spool = spool = await asyncio.to_thread(
                lambda: CStoreSpool(incoming, on_bytes=counter, writeback=incoming is not None)
            )
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
                    prepare=build_preparation(  # issue 10: redaction, then transcoding
                        [
                            redaction_step(
                                settings.redact_remove_list,
                                settings.redact_keep_list,
                                settings.redact_filter_profile,
                            ),
                            transcode,
                        ]
                    ),
                    router=Router(routing) if len(routing) else None,
                    stores=None if intake is not None else self._web_stores(routing.destinations),
                    unwritten=spool.unwritten,
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
            retrieve = RetrieveHandlers(
                bridge,
                aets,
                mover=InstanceMover(
                    RetrieveService(client, settings.dicomweb_root),
                    timeouts=sub_operation_timeouts,
                    budget=self.fetch_budget,
                    metrics=metrics,
                ),
                cmove_aet=settings.dimse_cmove_aet or settings.dimse_aet,
                metrics=metrics,
            )
            if not route_moves(ae, retrieve.run_move):
                handlers.append((evt.EVT_C_MOVE, refuse_move))
            if not route_gets(ae, retrieve.run_get):
                handlers.append((evt.EVT_C_GET, refuse_get))
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
            handlers.append((evt.EVT_N_ACTION, CommitmentHandler(commitment, metrics=metrics)))
        try:
            self._server = start_server(
                ae,
                "0.0.0.0",
                settings.dimse_port,
                handlers,
                ssl_context=tls,
                max_pending=settings.max_pending_associations,
                on_pending_drop=metrics.pending_dropped.inc,
                spool_file=None if settings.pynetdicom_storage else spool.open_file,
            )
        except OSError as exc:
            await self._stop_uploader()
            await self._close_destinations()
            await http.aclose()
            await self._close_spool()
            await self._stop_health()
            raise ConfigError(
                "dimse_port", f"cannot listen on {settings.dimse_port}: {exc.strerror}"
            ) from None
        port = int(self._server.server_address[1])
        self._ready = True
        self._monitoring = start_monitoring(
            settings.monitoring_project_id,
            settings.monitoring_flush_interval,
            metrics,
            self._environ,
        )
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
        await self._close_destinations()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        await self._close_spool()
        monitoring, self._monitoring = self._monitoring, None
        if monitoring is not None:  # after the drain: its last write has every count
            await asyncio.to_thread(monitoring.stop)
        await self._stop_health()

    def _web_store(self, destination: Destination) -> StoreService:
        """STOW-RS to a routed destination, over the pooled client of its host."""
        settings = self._settings
        key = _host_key(destination.stow_url)
        client = self._dest_clients.get(key)
        if client is None:
            http = make_http_client(
                timeout=settings.http_timeout,
                http2=settings.stow_http2,
                auth=choose_auth(
                    destination.stow_url,
                    bearer_token=settings.dicomweb_bearer_token,
                    basic_auth=settings.dicomweb_basic_auth,
                    google_credentials=self._google_credentials,
                ),
                max_connections=max(8, settings.max_associations * 2),
                transport=self._transport,
            )
            client = self._dest_clients[key] = DicomwebClient(
                http,
                RetryPolicy(
                    deadline=settings.upstream_retry_deadline,
                    extra_codes=settings.http_error_codes_to_retry,
                ),
            )
        return StoreService(
            client,
            stow_url=destination.stow_url,
            dicomweb_root=destination.stow_url.removesuffix("/studies"),
            overwrite=settings.stow_overwrite,
        )

    def _web_stores(self, destinations: list[Destination]) -> dict[Destination, StoreService]:
        return {d: self._web_store(d) for d in destinations if not d.is_dimse}

    def _outgoing_tls(self) -> ssl.SSLContext:
        """The client context for DICOM TLS peers, built once from the --outgoing_tls_* flags."""
        if self._outgoing_tls_context is None:
            self._outgoing_tls_context = client_tls_context(**self._settings.outgoing_tls_options)
        return self._outgoing_tls_context

    def _destination_store(self, destination: Destination) -> InstanceStore:
        if not destination.is_dimse:
            return self._web_store(destination)
        settings = self._settings
        dimse = DimseStore(
            AssociationTarget(
                settings.dimse_cmove_aet or settings.dimse_aet,
                destination.aet,
                destination.host,
                destination.port,
                tls=self._outgoing_tls() if destination.tls else None,
            ),
            ScuTimeouts(
                acse=settings.acse_timeout,
                dimse=settings.dimse_timeout,
                network=settings.network_timeout,
            ),
        )
        self._dimse_stores.append(dimse)
        return dimse

    async def _close_destinations(self) -> None:
        stores, self._dimse_stores = self._dimse_stores, []
        for dimse in stores:
            await dimse.close()
        clients, self._dest_clients = self._dest_clients, {}
        for client in clients.values():
            if client.http is not self._http:
                await client.http.aclose()

    async def _open_local_spool(self, store: StoreService) -> SpoolIntake:
        """The durable spool and its uploader, which starts with what earlier runs left."""
        settings = self._settings
        local = await asyncio.to_thread(
            LocalSpool,
            Path(settings.persistent_file_storage_location),
            headroom_bytes=settings.spool_free_space_headroom,
            max_bytes=settings.spool_max_bytes,
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
        uploader = self._spool_uploader(local, store)
        self._local_spool, self._uploader = local, uploader
        await uploader.start()
        destinations = None
        # also without routing rules: queues an earlier run's rules left are still uploaded
        left = self._left_in_spool
        if isinstance(local, GcsSpool):
            left = self._left_in_spool = await asyncio.to_thread(recorded_gcs_destinations, local)
        if len(self._routing) > 0 or left:
            fanout: DestinationSpools = (
                GcsDestinationSpools(DestinationQueue(None, local, uploader, store))
                if isinstance(local, GcsSpool)
                else DestinationSpools(DestinationQueue(None, local, uploader, store))
            )
            destinations = await self._open_destination_spools(fanout, store, left)
        logger.info(
            "spool %s: C-STORE %s",
            where,
            f"acknowledged once {durable}, uploaded in the background"
            if settings.auto_ack_cstore
            else "answered after its STOW-RS",
        )
        return SpoolIntake(
            local, uploader, auto_ack=settings.auto_ack_cstore, destinations=destinations
        )

    def _spool_uploader(self, local: Spool, store: InstanceStore) -> SpoolUploader:
        """The one uploader factory: the spool's own queue and each destination's."""
        settings = self._settings
        return SpoolUploader(
            local,
            store,
            self.metrics,
            concurrency=settings.spool_upload_concurrency,
            retries=settings.persistent_file_upload_retry_amount,
            min_delay=settings.min_upload_delay / 1000,
            max_delay=settings.max_waiting_time_between_uploads / 1000,
            retry_codes=settings.http_error_codes_to_retry,
            batch=settings.spool_upload_batch,
            batch_bytes=settings.spool_upload_batch_bytes,
        )

    async def _open_destination_spools(
        self,
        spools: DestinationSpools,
        store: StoreService,
        recorded: list[Destination],
    ) -> DestinationSpools:
        """One queue and uploader per destination: configured ones, plus any an earlier run
        recorded in the spool (a changed config must not strand acknowledged instances).

        One per directory: a recorded entry differing only in what the directory name does
        not hash (e.g. "tls") is the configured one, which wins.
        """
        configured = self._routing.destinations
        by_id: dict[str, Destination] = {}
        for destination in [*configured, *recorded]:
            by_id.setdefault(destination.id, destination)
        for destination in by_id.values():
            dest_spool = await asyncio.to_thread(spools.open_spool, destination)
            dest_store = self._destination_store(destination)
            dest_uploader = self._spool_uploader(dest_spool, dest_store)
            spools.add(DestinationQueue(destination, dest_spool, dest_uploader, dest_store))
            self._dest_uploaders.append(dest_uploader)
            self._dest_local_spools.append(dest_spool)
            await dest_uploader.start()
            if destination not in configured:
                logger.warning(
                    "spool holds a queue for %s, which is no longer configured: uploading it",
                    destination.describe(),
                )
        self.metrics.spool_depth.set_function(spools.depth)
        self.metrics.spool_oldest_age.set_function(spools.oldest_age)
        return spools

    async def _stop_uploader(self) -> None:
        uploaders, self._dest_uploaders = self._dest_uploaders, []
        for dest_uploader in uploaders:
            await dest_uploader.stop()
        dest_spools, self._dest_local_spools = self._dest_local_spools, []
        for dest_spool in dest_spools:
            dest_spool.close()
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


def _host_key(url: str) -> str:
    """scheme://host:port of a URL: destinations on one host share a pooled client."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"


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
