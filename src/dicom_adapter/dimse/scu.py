"""Outgoing pynetdicom associations (commitment reports, the --check C-ECHO), and what every SCU
shares: the target, the requested contexts, the timeouts and the association errors.

`associate` blocks while pynetdicom connects, negotiates and waits for responses: call it from a
worker thread (`Bridge.run_blocking`), never from the event loop. pynetdicom's failures (refused
connection, rejection, abort, no accepted context) become `AssociationError`s here. C-STORE
sub-operations of C-MOVE and the export sink use the asyncio SCU in `store_scu.py`; C-GET's
go out on the requesting association through `get_sender.py`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, build_context, build_role, evt

from dicom_adapter.dimse.server import release_connection, tune_connection
from dicom_adapter.errors import AdapterError, ConfigError
from dicom_adapter.status import Status

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
DEFAULT_MAX_PDU = 16382  # pynetdicom's default maximum PDU length


class AssociationError(AdapterError):
    """An outgoing association could not be opened or used; trying again later may help."""

    status = Status.OUT_OF_RESOURCES
    retryable = True


class PeerUnreachableError(AssociationError):
    """The peer could not be reached (connection refused, timed out, unknown host)."""


class AssociationRejectedError(AssociationError):
    """The peer rejected (A-ASSOCIATE-RJ) or aborted the association request."""


@dataclass(frozen=True)
class ScuTimeouts:
    """Timeouts (seconds) of one outgoing association."""

    connection: float = 10.0
    acse: float = 30.0
    dimse: float = 30.0
    network: float = 60.0


@dataclass(frozen=True)
class RequestedContext:
    """A presentation context to propose; set both roles to propose SCP/SCU role selection."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    scu_role: bool | None = None
    scp_role: bool | None = None


@dataclass(frozen=True)
class AssociationTarget:
    """Where and as whom to associate."""

    calling_aet: str
    called_aet: str
    host: str
    port: int
    tls: ssl.SSLContext | None = field(default=None, compare=False)  # DICOM TLS when set


def client_tls_context(
    ca_certificates: str = "",
    certificate: str = "",
    private_key: str = "",
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """The context for outgoing DICOM TLS (TLS 1.2+, the peer's chain always verified).

    Raises ConfigError naming the flag whose file cannot be used.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        if ca_certificates:
            context.load_verify_locations(ca_certificates)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("outgoing_tls_ca_certificates", f"cannot load: {exc}") from exc
    if bool(certificate) != bool(private_key):
        missing = "outgoing_tls_private_key" if certificate else "outgoing_tls_certificate"
        raise ConfigError(
            missing, "a client certificate needs both --outgoing_tls_certificate and its key"
        )
    if certificate:
        try:
            context.load_cert_chain(certificate, private_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "outgoing_tls_certificate", f"cannot load the certificate and private key: {exc}"
            ) from exc
    return context


def open_association(
    target: AssociationTarget,
    contexts: Sequence[RequestedContext],
    *,
    timeouts: ScuTimeouts = ScuTimeouts(),
    max_pdu_size: int = DEFAULT_MAX_PDU,
) -> Any:
    """Open an established association (TCP_NODELAY set) or raise an AssociationError.

    Blocking. The caller must release or abort the returned pynetdicom Association; prefer
    `associate`, which does that.
    """
    if not contexts or len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"between 1 and {MAX_CONTEXTS} presentation contexts are required")
    ae = AE(ae_title=target.calling_aet)
    ae.connection_timeout = timeouts.connection
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    requested = [build_context(c.abstract_syntax, list(c.transfer_syntaxes)) for c in contexts]
    roles: list[Any] = [
        build_role(c.abstract_syntax, scu_role=bool(c.scu_role), scp_role=bool(c.scp_role))
        for c in contexts
        if c.scu_role is not None or c.scp_role is not None
    ]
    connected: list[bool] = []

    def on_open(event: Any) -> None:
        connected.append(True)
        tune_connection(event)

    handlers: list[Any] = [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_CONN_CLOSE, release_connection)]
    where = f"{target.called_aet}@{target.host}:{target.port}"
    try:
        assoc = ae.associate(
            target.host,
            target.port,
            contexts=requested,
            ae_title=target.called_aet,
            max_pdu=max_pdu_size,
            ext_neg=roles or None,
            evt_handlers=handlers,
            tls_args=(target.tls, target.host) if target.tls is not None else None,
        )
    except OSError as exc:
        raise PeerUnreachableError(
            f"cannot connect to {where}: {exc}", comment=f"{target.called_aet}: cannot connect"
        ) from exc
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise AssociationRejectedError(
            f"{where} rejected the association",
            comment=f"{target.called_aet} rejected the association",
        )
    if not connected:
        raise PeerUnreachableError(
            f"cannot connect to {where}", comment=f"{target.called_aet}: cannot connect"
        )
    raise AssociationRejectedError(
        f"{where} aborted the association or accepted none of the proposed contexts",
        comment=f"{target.called_aet} aborted or accepted no context",
    )


@contextmanager
def associate(
    target: AssociationTarget,
    contexts: Sequence[RequestedContext],
    *,
    timeouts: ScuTimeouts = ScuTimeouts(),
    max_pdu_size: int = DEFAULT_MAX_PDU,
) -> Iterator[Any]:
    """An established association, released on exit (aborted when the body raised)."""
    assoc = open_association(target, contexts, timeouts=timeouts, max_pdu_size=max_pdu_size)
    try:
        yield assoc
    except BaseException:
        assoc.abort()
        raise
    if assoc.is_established:
        try:
            assoc.release()
        except Exception:  # the work is done; a failed release only costs the peer a timeout
            logger.warning("association release failed", exc_info=True)
