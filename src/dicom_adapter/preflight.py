"""`--check`: verify a configuration before the first scanner does, one line per check.

Each line reads `OK|FAIL|WARN <what> — <detail or fix>`; the exit code is 0 only when no
line says FAIL. A peer that does not answer C-ECHO is a WARN (it may simply be off now).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from dicom_adapter.aets import load_aet_dictionary
from dicom_adapter.config.exporter import ExporterSettings
from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.dicom.transcode import transcoding_step
from dicom_adapter.dicomweb.auth import choose_auth, credentials_if_needed
from dicom_adapter.dicomweb.client import DICOM_JSON, failure_cause, make_http_client
from dicom_adapter.dicomweb.problem import explain_refusal, read_problem
from dicom_adapter.dimse.scu import (
    AssociationRejectedError,
    AssociationTarget,
    RequestedContext,
    ScuTimeouts,
    associate,
    client_tls_context,
)
from dicom_adapter.dimse.server import server_tls_context
from dicom_adapter.errors import AdapterError, ConfigError
from dicom_adapter.importer.routing import RoutingTable, load_destination_config
from dicom_adapter.spool.gcs import GcsLocation, Storage, is_gcs, replica_name

Verdict = Literal["OK", "FAIL", "WARN"]
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
ECHO_TIMEOUTS = ScuTimeouts(connection=5.0, acse=5.0, dimse=5.0, network=10.0)
SUBSCRIPTION_TIMEOUT = 10.0


@dataclass(frozen=True)
class CheckResult:
    """One line of the check's output."""

    verdict: Verdict
    what: str
    detail: str

    @property
    def line(self) -> str:
        """`OK|FAIL|WARN <what> — <detail>`."""
        return f"{self.verdict} {self.what} — {self.detail}"


def flags_ok(prog: str) -> CheckResult:
    """The flags parsed (a parse failure is reported by the CLI before any check runs)."""
    return CheckResult("OK", "flags", f"{prog} flags parse and are consistent")


def flags_failed(exc: ConfigError) -> CheckResult:
    """The flags did not parse: the problem names the flag to fix."""
    return CheckResult("FAIL", "flags", str(exc))


# ------------------------------------------------------------------------------ DICOMweb


async def check_dicomweb(
    what: str,
    root: str,
    auth: httpx.Auth | None,
    *,
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> CheckResult:
    """One QIDO-RS `studies?limit=1` at `root`: does it answer, do the credentials work?"""
    url = f"{root.rstrip('/')}/studies?limit=1"
    http = make_http_client(timeout=timeout, auth=auth, max_connections=1, transport=transport)
    started = time.monotonic()
    try:
        response = await http.get(url, headers={"Accept": DICOM_JSON})
    except AdapterError as exc:  # from the auth flow: Google credentials could not refresh
        return CheckResult("FAIL", what, f"{exc}: check the service account and its key")
    except httpx.HTTPError as exc:
        cause = failure_cause(exc)
        return CheckResult(
            "FAIL", what, f"{cause} at {root}: check the address and that the server is up"
        )
    finally:
        await http.aclose()
    code = response.status_code
    millis = (time.monotonic() - started) * 1000
    if code < 300:
        return CheckResult("OK", what, f"QIDO-RS answered HTTP {code} in {millis:.0f} ms")
    problem = read_problem(code, response.content)
    said = f"HTTP {code} {problem.status}"
    if code in (401, 403):
        fix = explain_refusal(problem) or (
            "the credentials are refused: check --dicomweb_bearer_token/--dicomweb_basic_auth "
            "or the service account's roles (roles/healthcare.dicomEditor)"
        )
        return CheckResult("FAIL", what, f"{said}: {fix}")
    if code == 404:
        fix = (
            "no DICOMweb service at this address: check the URL "
            "(for Google: project, location, dataset, DICOM store)"
        )
        return CheckResult("FAIL", what, f"{said}: {fix}")
    return CheckResult("FAIL", what, f"{said}: the server cannot answer QIDO-RS at {root}")


async def _dicomweb_checks(
    upstreams: list[tuple[str, str]],
    settings: ImporterSettings | ExporterSettings,
    *,
    force_google: bool,
    transport: httpx.AsyncBaseTransport | None,
) -> list[CheckResult]:
    """Credentials once, then one QIDO per (what, root)."""
    try:
        credentials = await credentials_if_needed(
            [root for _, root in upstreams],
            static_auth=bool(settings.dicomweb_bearer_token or settings.dicomweb_basic_auth),
            force_google=force_google,
            scopes=settings.oauth_scopes,
        )
    except ConfigError as exc:
        return [CheckResult("FAIL", "DICOMweb credentials", str(exc))]
    results = []
    for what, root in upstreams:
        auth = choose_auth(
            root,
            bearer_token=settings.dicomweb_bearer_token,
            basic_auth=settings.dicomweb_basic_auth,
            google_credentials=credentials,
            force_google=force_google,
        )
        results.append(
            await check_dicomweb(
                what, root, auth, timeout=settings.http_timeout, transport=transport
            )
        )
    return results


# ------------------------------------------------------------------------------ DIMSE peers


def check_peer(
    what: str,
    calling_aet: str,
    called_aet: str,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
) -> CheckResult:
    """Blocking: does `host` resolve, and does the peer accept an association and C-ECHO?"""
    where = f"{called_aet}@{host}:{port}"
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return CheckResult("WARN", what, f"{host} does not resolve ({exc}): fix the host name")
    try:  # the TCP connect (and TLS handshake) alone first: its error names the cause
        with socket.create_connection((host, port), timeout=ECHO_TIMEOUTS.connection) as raw:
            if tls is not None:
                tls.wrap_socket(raw, server_hostname=host).close()
    except ssl.SSLError as exc:
        return CheckResult(
            "WARN",
            what,
            f"{where}: TLS handshake failed ({exc.reason or exc}): check its certificate "
            "against --outgoing_tls_ca_certificates and --outgoing_tls_certificate",
        )
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return CheckResult(
            "WARN",
            what,
            f"{where}: {reason.lower()}: is it running, is the port right, "
            "does the firewall allow it?",
        )
    target = AssociationTarget(calling_aet, called_aet, host, port, tls=tls)
    contexts = [RequestedContext(VERIFICATION, (IMPLICIT_VR_LE,))]
    try:
        with associate(target, contexts, timeouts=ECHO_TIMEOUTS) as assoc:
            status = assoc.send_c_echo()
    except AssociationRejectedError:
        return CheckResult(
            "WARN",
            what,
            f"{where} rejected the association: it must know AE title {calling_aet} "
            f"and answer to {called_aet}",
        )
    except AdapterError as exc:
        return CheckResult(
            "WARN", what, f"{exc}: is it running, is the port right, does the firewall allow it?"
        )
    code = int(status.Status) if status is not None and "Status" in status else None
    if code != 0:
        said = "no answer" if code is None else f"status 0x{code:04X}"
        return CheckResult("WARN", what, f"{where} associated but C-ECHO gave {said}")
    over = " over DICOM TLS" if tls is not None else ""
    return CheckResult("OK", what, f"{where} answered C-ECHO{over}")


def check_outgoing_tls(
    settings: ImporterSettings | ExporterSettings,
) -> tuple[CheckResult, ssl.SSLContext | None]:
    """The --outgoing_tls_* files load (a peer needs DICOM TLS); the context for the echoes."""
    try:
        context = client_tls_context(**settings.outgoing_tls_options)
    except ConfigError as exc:
        return CheckResult("FAIL", "outgoing DICOM TLS", f"{exc}: give PEM files it can read"), None
    trust = settings.outgoing_tls_ca_certificates or "the system's trust store"
    return CheckResult("OK", "outgoing DICOM TLS", f"peers verified against {trust}"), context


# ------------------------------------------------------------------------------ local files


def check_gcs_spool(location: str, project: str, environ: Mapping[str, str]) -> CheckResult:
    """Blocking: this replica's gs:// prefix can be listed and takes (and loses) an object."""
    what = f"spool {location}"
    try:
        replica = replica_name(environ)
        storage = Storage(GcsLocation.parse(location), project, timeout=5.0, retry_seconds=1.0)
        probe = f"{storage.location.replica_root(replica)}.check-{os.getpid()}"
        storage.names(storage.location.area(replica, "queue"))
        storage.upload_json(probe, {"check": True})
        storage.delete(probe)
    except (ConfigError, ValueError) as exc:
        return CheckResult("FAIL", what, str(exc))
    except OSError as exc:
        return CheckResult(
            "FAIL",
            what,
            f"cannot write objects ({exc}): the service account needs "
            "roles/storage.objectAdmin on the bucket (and the bucket must exist)",
        )
    return CheckResult("OK", what, f"objects can be listed, written and deleted as {replica}")


def check_spool(location: str, headroom: int) -> CheckResult:
    """The spool directory exists (or can be made), takes an fsynced file, has room."""
    what = f"spool {location}"
    root = Path(location)
    probe = root / f".check-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as stream:
            stream.write(b"check")
            stream.flush()
            os.fsync(stream.fileno())
        probe.unlink()
        free = shutil.disk_usage(root).free
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return CheckResult(
            "FAIL",
            what,
            f"not writable ({reason}): give the adapter's user a writable directory "
            "(--persistent_file_storage_location)",
        )
    free_text = f"{free / (1 << 30):.1f} GiB free"
    if free < headroom:
        return CheckResult(
            "FAIL",
            what,
            f"{free_text}, below --spool_free_space_headroom ({headroom / (1 << 30):.1f} GiB): "
            "C-STOREs would be refused with 0xA700; free space or grow the volume",
        )
    return CheckResult("OK", what, f"writable, {free_text}")


def check_transcoding(settings: ImporterSettings) -> CheckResult:
    """The codecs for --store_compress_to_transfer_syntax are installed (else startup stops)."""
    what = "transcoding"
    try:
        transcoding_step(
            settings.store_compress_to_transfer_syntax,
            settings.transcode_max_bytes,
            settings.transcode_max_seconds,
        )
    except ConfigError as exc:
        return CheckResult("FAIL", what, str(exc))
    return CheckResult("OK", what, f"codecs for {settings.store_compress_to_transfer_syntax}")


def check_tls(certificate: str, private_key: str, ca_certificates: str) -> CheckResult:
    """The DICOM TLS certificate, key (and CA) load as the server would load them."""
    try:
        server_tls_context(certificate, private_key, ca_certificates)
    except ConfigError as exc:
        return CheckResult("FAIL", "DICOM TLS", f"{exc}: give PEM files the adapter can read")
    with_ca = ", client certificates required" if ca_certificates else ""
    return CheckResult("OK", "DICOM TLS", f"certificate and key load{with_ca}")


# ------------------------------------------------------------------------------ Pub/Sub


def check_subscription(path: str) -> CheckResult:
    """Blocking: the Pub/Sub subscription exists (PUBSUB_EMULATOR_HOST is honoured)."""
    what = f"Pub/Sub {path}"
    try:
        from google.api_core import exceptions as google_errors
        from google.auth import exceptions as auth_errors
        from google.cloud import pubsub_v1  # type: ignore[import-untyped]

        client = pubsub_v1.SubscriberClient()
    except Exception as exc:  # no credentials, no library
        return CheckResult("FAIL", what, f"cannot make a Pub/Sub client: {exc}")
    try:
        client.get_subscription(request={"subscription": path}, timeout=SUBSCRIPTION_TIMEOUT)
    except google_errors.NotFound:
        return CheckResult(
            "FAIL",
            what,
            "subscription not found: check --project_id and --subscription_id, or create it "
            "(gcloud pubsub subscriptions create SUBSCRIPTION --topic=TOPIC)",
        )
    except google_errors.PermissionDenied:
        return CheckResult(
            "WARN",
            what,
            "cannot read the subscription (pubsub.subscriptions.get): pulling needs "
            "roles/pubsub.subscriber on it",
        )
    except (google_errors.GoogleAPIError, auth_errors.GoogleAuthError) as exc:
        return CheckResult("FAIL", what, f"Pub/Sub did not answer: {exc}")
    finally:
        client.close()
    return CheckResult("OK", what, "subscription exists")


# ------------------------------------------------------------------------------ the services


async def import_checks(
    settings: ImporterSettings,
    environ: Mapping[str, str],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[CheckResult]:
    """Every check of dicom-import, in the order an operator fixes them."""
    results = [flags_ok("dicom-import")]
    root = settings.dicomweb_root or settings.stow_url.rstrip("/").removesuffix("/studies")
    results += await _dicomweb_checks(
        [(f"DICOMweb {root}", root)], settings, force_google=False, transport=transport
    )
    try:
        aets = load_aet_dictionary(settings.aet_dictionary_inline, settings.aet_dictionary, environ)
    except ConfigError as exc:
        results.append(CheckResult("FAIL", "AET dictionary", str(exc)))
    else:
        try:
            routing = load_destination_config(
                settings.destination_config_inline,
                settings.destination_config_path,
                environ,
                send_to_all=settings.send_to_all_matching_destinations,
            )
        except ConfigError as exc:
            results.append(CheckResult("FAIL", "destination config", str(exc)))
            routing = RoutingTable([], send_to_all=False)
        peers = [p for p in (aets.get(name) for name in aets.names) if p is not None]
        destinations = routing.destinations
        tls: ssl.SSLContext | None = None
        if any(p.tls for p in peers) or any(d.tls for d in destinations):
            tls_result, tls = check_outgoing_tls(settings)
            results.append(tls_result)
        web = [d for d in destinations if not d.is_dimse]
        results += (
            await _dicomweb_checks(
                [(f"destination {d.stow_url}", d.stow_url.removesuffix("/studies")) for d in web],
                settings,
                force_google=False,
                transport=transport,
            )
            if web
            else []
        )
        calling = settings.dimse_cmove_aet or settings.dimse_aet
        targets = [(f"peer {p.name}", p.name, p.host, p.port, p.tls) for p in peers]
        targets += [
            (f"destination {d.aet}", d.aet, d.host, d.port, d.tls)
            for d in destinations
            if d.is_dimse
        ]
        results += await asyncio.gather(
            *(
                asyncio.to_thread(
                    check_peer, what, calling, aet, host, port, tls if secure else None
                )
                for what, aet, host, port, secure in targets
                if tls is not None or not secure
            )
        )
    location = settings.persistent_file_storage_location
    if is_gcs(location):
        results.append(
            await asyncio.to_thread(
                check_gcs_spool, location, settings.gcs_backup_project_id, environ
            )
        )
    elif location:
        results.append(
            await asyncio.to_thread(check_spool, location, settings.spool_free_space_headroom)
        )
    if settings.store_compress_to_transfer_syntax:
        results.append(check_transcoding(settings))
    if settings.tls_certificate:
        results.append(
            check_tls(
                settings.tls_certificate, settings.tls_private_key, settings.tls_ca_certificates
            )
        )
    return results


async def export_checks(
    settings: ExporterSettings,
    environ: Mapping[str, str],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    subscription_check: Callable[[str], CheckResult] = check_subscription,
) -> list[CheckResult]:
    """Every check of dicom-export, in the order an operator fixes them."""
    results = [flags_ok("dicom-export")]
    upstreams = [(f"DICOMweb source {settings.source_root}", settings.source_root)]
    if settings.stow_sink:
        sink_root = settings.stow_url.rstrip("/").removesuffix("/studies")
        upstreams.append((f"DICOMweb sink {sink_root}", sink_root))
    results += await _dicomweb_checks(
        upstreams,
        settings,
        force_google=settings.use_gcp_application_default_credentials,
        transport=transport,
    )
    if not settings.stow_sink:
        tls: ssl.SSLContext | None = None
        if settings.peer_dimse_tls:
            tls_result, tls = check_outgoing_tls(settings)
            results.append(tls_result)
        if tls is not None or not settings.peer_dimse_tls:
            results.append(
                await asyncio.to_thread(
                    check_peer,
                    f"sink {settings.peer_dimse_aet}",
                    settings.client_aet,
                    settings.peer_dimse_aet,
                    settings.peer_dimse_ip,
                    settings.peer_dimse_port,
                    tls,
                )
            )
    results.append(await asyncio.to_thread(subscription_check, settings.subscription_path))
    return results


def _quiet_pynetdicom() -> None:
    """pynetdicom logs each refused C-ECHO as an ERROR; the check's own line says it."""
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def report(results: list[CheckResult], out: Callable[[str], Any] = print) -> int:
    """Print one line per check; 0 when none failed, else 1."""
    for result in results:
        out(result.line)
    return 1 if any(r.verdict == "FAIL" for r in results) else 0


async def run_import_check(settings: ImporterSettings, environ: dict[str, str]) -> int:
    """dicom-import --check."""
    _quiet_pynetdicom()
    return report(await import_checks(settings, environ))


async def run_export_check(settings: ExporterSettings, environ: dict[str, str]) -> int:
    """dicom-export --check."""
    _quiet_pynetdicom()
    return report(await export_checks(settings, environ))
