"""pynetdicom glue for the SCP: build the AE with our association policy, start the server."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    _config,
    evt,
)

logger = logging.getLogger(__name__)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

Handler = tuple[Any, Callable[..., Any]]


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings.

    - C-STORE data is spooled to a file as it arrives, never held in memory.
    - Unrestricted storage: every storage SOP class, private ones included, is accepted with
      the FIRST transfer syntax the peer proposes (its preference), so a peer that offers
      [JPEG 2000, Explicit LE] keeps its JPEG 2000 and one offering [Explicit LE, JPEG lossy]
      is never pushed into lossy compression. pynetdicom's default would pick by our order.
    - Identifiers are never logged (PHI).
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"


def set_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN: disable Nagle on the accepted socket (else ~40 ms per DIMSE round trip)."""
    try:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        logger.debug("could not set TCP_NODELAY", exc_info=True)


def build_ae(
    *,
    aet: str,
    max_associations: int,
    max_pdu_size: int,
    acse_timeout: float,
    dimse_timeout: float,
    network_timeout: float,
) -> Any:
    """An AE for Verification; storage contexts come from the unrestricted storage service."""
    ae = AE(ae_title=aet)
    ae.require_called_aet = True
    ae.maximum_associations = max_associations
    ae.maximum_pdu_size = max_pdu_size
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.add_supported_context(VERIFICATION_SOP_CLASS, ALL_TRANSFER_SYNTAXES)
    return ae


def start_server(ae: Any, host: str, port: int, handlers: Sequence[Handler]) -> Any:
    """Start listening in pynetdicom's own thread; returns the ThreadedAssociationServer."""
    all_handlers = [(evt.EVT_CONN_OPEN, set_nodelay), *handlers]
    return ae.start_server((host, port), block=False, evt_handlers=all_handlers)
