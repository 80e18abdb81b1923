"""pynetdicom glue for the SCP: build the AE with our association policy, start the server."""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any, cast

from pydicom import Dataset
from pydicom import config as pydicom_config
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    _config,
    evt,
)
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from dicom_adapter.dimse import admission, pdu
from dicom_adapter.dimse import pynetdicom_hooks as hooks
from dicom_adapter.dimse.store_scp import FileFactory, StorageScp
from dicom_adapter.errors import ConfigError
from dicom_adapter.status import Status

logger = logging.getLogger(__name__)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
PATIENT_ROOT_RETRIEVE = (PATIENT_ROOT_MOVE, PATIENT_ROOT_GET)
STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
QUERY_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
]

Handler = tuple[Any, Callable[..., Any]]


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings.

    - C-STORE data is spooled to a file as it arrives, never held in memory.
    - Unrestricted storage: every storage SOP class, private ones included, is accepted with
      the FIRST transfer syntax the peer proposes (its preference), so a peer that offers
      [JPEG 2000, Explicit LE] keeps its JPEG 2000 and one offering [Explicit LE, JPEG lossy]
      is never pushed into lossy compression. pynetdicom's default would pick by our order.
    - Identifiers are never logged (PHI).
    - pydicom's value validation is off: datasets are forwarded, never built or changed.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True  # a pynetdicom C-STORE of a file streams it
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    hooks.check()  # one WARNING per private internal that is not as expected
    hooks.wake_reactors()
    hooks.fast_file_meta()
    # We forward datasets untouched; pydicom's per-value regex checks only cost time.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    dul_logger = logging.getLogger("pynetdicom.dul")
    if not any(isinstance(f, _QuietShortPdu) for f in dul_logger.filters):
        dul_logger.addFilter(_QuietShortPdu())


class MoveRequest:
    """A C-MOVE request handed to our runner instead of pynetdicom's sub-operation loop.

    pynetdicom's move SCP opens the destination association itself (calling AET = ours,
    one pynetdicom C-STORE per instance, ~2.5 ms of GIL time each); the runner does the
    sub-operations its own way and answers through `respond`.
    """

    def __init__(self, service: Any, request: Any, context: Any) -> None:
        self._service = service
        self.request = request
        self._context = context
        self.assoc = service.assoc
        self.message_id = int(request.MessageID)
        self.sop_class_uid = str(request.AffectedSOPClassUID)
        self.move_destination = str(getattr(request, "MoveDestination", "") or "").strip()

    def identifier(self) -> Dataset:
        """The decoded request identifier (ValueError and friends when it cannot be)."""
        syntax = self._context.transfer_syntax[0]
        return decode(
            self.request.Identifier,
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            syntax.is_deflated,
        )

    @property
    def gone(self) -> bool:
        """True when the requesting association is no longer established."""
        return not self.assoc.is_established

    def is_cancelled(self) -> bool:
        """True once the requester sent a C-CANCEL for this request."""
        return bool(self._service.is_cancelled(self.message_id))

    def pending(self, *, remaining: int, completed: int, failed: int, warning: int) -> None:
        """A pending C-MOVE-RSP, encoded by us and queued on the DUL as one P-DATA.

        Same bytes pynetdicom would send, without its pydicom encode in this thread (which
        holds the GIL the sub-operations' event loop needs, once per instance).
        """
        if not hooks.available(hooks.PENDING_P_DATA):
            self.respond(
                Status.PENDING,
                remaining=remaining,
                completed=completed,
                failed=failed,
                warning=warning,
            )
            return
        command = pdu.c_move_pending_rsp(
            self.message_id,
            self.sop_class_uid,
            Status.PENDING,
            remaining=remaining,
            completed=completed,
            failed=failed,
            warning=warning,
        )
        # command, last fragment
        hooks.send_p_data(self.assoc, self._context.context_id, b"\x03" + command)

    def respond(
        self,
        status: int,
        *,
        remaining: int | None = None,
        completed: int | None = None,
        failed: int | None = None,
        warning: int | None = None,
        failed_uids: Sequence[str] = (),
        error_comment: str = "",
    ) -> None:
        """Send a C-MOVE-RSP; a final one carries FailedSOPInstanceUIDList when given."""
        rsp = self._primitive()
        rsp.MessageIDBeingRespondedTo = self.message_id
        rsp.AffectedSOPClassUID = self.sop_class_uid
        rsp.Status = status
        if remaining is not None:
            rsp.NumberOfRemainingSuboperations = pdu.sub_operation_count(remaining)
        if completed is not None:
            rsp.NumberOfCompletedSuboperations = pdu.sub_operation_count(completed)
        if failed is not None:
            rsp.NumberOfFailedSuboperations = pdu.sub_operation_count(failed)
        if warning is not None:
            rsp.NumberOfWarningSuboperations = pdu.sub_operation_count(warning)
        if error_comment:
            rsp.ErrorComment = error_comment[:64]
        if failed_uids:
            syntax = self._context.transfer_syntax[0]
            identifier = Dataset()
            identifier.FailedSOPInstanceUIDList = list(failed_uids)
            encoded = encode(
                identifier, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated
            )
            rsp.Identifier = BytesIO(cast(bytes, encoded))
        hooks.restart_idle_timer(self.assoc)  # a long retrieve is no idle association
        self._send(rsp)

    def _primitive(self) -> Any:
        return C_MOVE()

    def _send(self, rsp: Any) -> None:
        self._service.dimse.send_msg(rsp, self._context.context_id)


def route_moves(ae: Any, runner: Callable[[MoveRequest], None]) -> bool:
    """C-MOVE requests to `ae` go to `runner` (in the association's thread), not pynetdicom.

    False when pynetdicom's move SCP cannot be routed (hook move_routing): bind
    `refuse_move` to EVT_C_MOVE then.
    """
    return hooks.route_moves(
        ae, lambda service, request, context: runner(MoveRequest(service, request, context))
    )


def refuse_move(event: Any) -> Any:
    """EVT_C_MOVE without our runner: pynetdicom answers 0xA801 (destination unknown)."""
    logger.warning("C-MOVE refused: the move runner is not available with this pynetdicom")
    yield None, None


POLL_WAIT = 0.005  # longest the DUL thread blocks when idle (its timers are checked that often)
UNLIMITED_PDU = 64 << 20  # the PDU bound when --max_pdu_size is 0 (buffers grow as bytes arrive)
READ_CHUNK = 1 << 20  # the most one recv() asks for: a buffer grows by what arrived, not more


def lend_socket(assoc: Any) -> tuple[Any, threading.Event] | None:
    """The association's socket wrapper, lent to another reader (see
    `_WaitingAssociationSocket.lend`), and the event set once the DUL stopped reading; None
    without our socket class (hook waiting_socket) or over TLS."""
    assoc_socket = getattr(getattr(assoc, "dul", None), "socket", None)
    if not isinstance(assoc_socket, _WaitingAssociationSocket):
        return None
    if isinstance(assoc_socket.socket, ssl.SSLSocket):
        return None
    ack = assoc_socket.lend()
    return None if ack is None else (assoc_socket, ack)


def pdu_bound(max_pdu_size: int) -> int:
    """The longest PDU body we read: what we negotiated, never less than an A-ASSOCIATE-RQ."""
    return max(max_pdu_size or UNLIMITED_PDU, pdu.MAX_ASSOCIATE_RQ)


class _WaitingAssociationSocket(AssociationSocket):
    """pynetdicom's socket, with a DUL poll that sleeps on the socket instead of sleeping blind.

    pynetdicom's DUL thread sleeps 1 ms whenever the socket had nothing to read, so every PDU
    that arrives a moment late, and every response we queue, waits up to 1 ms; measured, that
    was a tenth of each C-STORE. Here `ready` blocks in select() on the socket and on a wake-up
    socket that `send_pdu` pokes, so incoming data and outgoing responses are handled at once
    while an idle association wakes only every POLL_WAIT.

    `recv` first replays the A-ASSOCIATE-RQ the pre-negotiation stage already read; it refuses
    (A-ABORT, connection closed) a PDU longer than `max_pdu` before reading it, and grows its
    buffer only as bytes arrive. A reset or close is one INFO line and a short read, which the
    DUL turns into "transport connection closed" (pynetdicom would log a traceback at ERROR).
    """

    _wake: socket.socket | None = None
    _wake_writer: socket.socket | None = None
    _replay: bytes = b""
    _max_pdu: int = UNLIMITED_PDU
    _peer: str = ""
    _lent = False  # another reader has the socket (see `lend`)
    _lent_ack: threading.Event | None = None

    def lend(self) -> threading.Event | None:
        """Stop the DUL reading this socket so another reader can (a C-GET's responses, read
        on the event loop). Returns an event set once the DUL has stopped (it finishes a PDU
        it is reading first); None if it cannot be lent. End with `give_back`."""
        if self._wake_writer is None or self._lent:
            return None
        self._lent_ack = threading.Event()
        self._lent = True
        self._poke()
        return self._lent_ack

    def give_back(self, unread: bytes) -> None:
        """The DUL reads again, first the bytes the other reader took but did not use."""
        self._replay = unread + self._replay
        self._lent = False
        self._poke()

    def _poke(self) -> None:
        if self._wake_writer is not None:
            with contextlib.suppress(OSError):
                self._wake_writer.send(b"\0")

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or not hooks.socket_connected(self):
            time.sleep(POLL_WAIT)  # the DUL loop runs without a delay: never spin on a corpse
            return False
        if self._replay:
            return True
        ack = self._lent_ack
        if self._lent and self._wake is not None:  # someone else reads: wait for a poke
            if ack is not None:
                ack.set()
            with contextlib.suppress(OSError, ValueError):
                if select.select([self._wake], [], [], POLL_WAIT)[0]:
                    self._wake.recv(4096)
            return bool(self._replay)
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        watched = [sock] if self._wake is None else [sock, self._wake]
        try:
            readable, _, _ = select.select(watched, [], [], POLL_WAIT)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if self._wake is not None and self._wake in readable:
            with contextlib.suppress(OSError):
                self._wake.recv(4096)
        return sock in readable and not self._lent

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        if sock is None:
            return bytearray()
        if nr_bytes > self._max_pdu + 6:
            self._refuse(nr_bytes)
            return bytearray()
        buffer = bytearray(self._replay[:nr_bytes])
        self._replay = self._replay[nr_bytes:]
        while len(buffer) < nr_bytes:
            try:
                chunk = sock.recv(min(nr_bytes - len(buffer), READ_CHUNK))
            except OSError as exc:
                logger.info("connection from %s lost: %s", self._peer or "peer", exc)
                return buffer
            if not chunk:  # connection closed: return what we have, like pynetdicom does
                return buffer
            buffer += chunk
        return buffer

    def _refuse(self, nr_bytes: int) -> None:
        logger.warning(
            "A-ABORT to %s: PDU of %d bytes, more than the %d negotiated (--max_pdu_size)",
            self._peer or "peer",
            nr_bytes,
            self._max_pdu,
        )
        sock = self.socket
        with contextlib.suppress(OSError, ValueError):
            if sock is not None:
                sock.sendall(pdu.ABORT_UNEXPECTED_PARAMETER)
                sock.shutdown(socket.SHUT_RDWR)


class _QuietShortPdu(logging.Filter):
    """Drop pynetdicom's ERROR for a PDU cut short: our socket already logged why (one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("The received PDU is shorter than expected")


class ConnectionTuner:
    """EVT_CONN_OPEN / EVT_CONN_CLOSE handlers of the SCP's accepted connections.

    On open: TCP_NODELAY (else ~40 ms per DIMSE round trip), C-STORE-RSPs encoded by us, the
    waking DUL poll, the PDU bound, and the A-ASSOCIATE-RQ bytes the pre-negotiation stage
    read (`replays`).
    """

    def __init__(self, max_pdu_size: int) -> None:
        self.max_pdu = pdu_bound(max_pdu_size)
        self.replays: dict[socket.socket, bytes] = {}

    def open(self, event: Any) -> None:
        """EVT_CONN_OPEN."""
        dul = event.assoc.dul
        assoc_socket = dul.socket
        sock = assoc_socket.socket
        replay = self.replays.pop(sock, b"")
        try:
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hooks.answer_stores_directly(event.assoc)
            if not hooks.swap_socket_class(assoc_socket, _WaitingAssociationSocket):
                return
            wake_reader, wake_writer = socket.socketpair()
            wake_reader.setblocking(False)
            wake_writer.setblocking(False)
            tuned = cast(_WaitingAssociationSocket, assoc_socket)
            tuned._wake = wake_reader
            tuned._wake_writer = wake_writer
            tuned._replay = replay
            tuned._max_pdu = self.max_pdu
            address = getattr(event, "address", None)
            tuned._peer = admission.peer_text(address) if address is not None else ""

            def wake() -> None:
                with contextlib.suppress(OSError):  # full or closed: the poll wakes up anyway
                    wake_writer.send(b"\0")

            hooks.wake_on_send(dul, wake)
        except (AttributeError, OSError):
            logger.debug("could not tune the accepted connection", exc_info=True)

    @staticmethod
    def close(event: Any) -> None:
        """EVT_CONN_CLOSE: close the wake-up socket pair of a tuned connection."""
        assoc_socket = getattr(getattr(event.assoc, "dul", None), "socket", None)
        for name in ("_wake", "_wake_writer"):
            wake = getattr(assoc_socket, name, None)
            if isinstance(wake, socket.socket):
                wake.close()


_SCU_TUNER = ConnectionTuner(0)
tune_connection = _SCU_TUNER.open  # for our SCU associations (scu.py): nothing to replay
release_connection = ConnectionTuner.close


class AdapterAE(AE):
    """pynetdicom's AE, counting the associations our storage SCP serves (store_scp.py) as
    its own: pynetdicom's --max_associations check and shutdown see them too."""

    store_scp: StorageScp | None = None

    @property
    def active_associations(self) -> list[Any]:
        running: list[Any] = list(super().active_associations)
        scp = self.store_scp
        return running if scp is None else [*running, *scp.associations()]


def build_ae(
    *,
    aet: str,
    max_associations: int,
    max_pdu_size: int,
    acse_timeout: float,
    dimse_timeout: float,
    network_timeout: float,
    find: bool = False,
    retrieve: bool = False,
    commitment: bool = False,
    allowed_calling_aets: Sequence[str] = (),
) -> Any:
    """An AE for Verification; storage contexts come from the unrestricted storage service."""
    ae = AdapterAE(ae_title=aet)
    ae.require_called_aet = True
    # pynetdicom rejects other calling AE titles: A-ASSOCIATE-RJ permanent, reason 3
    ae.require_calling_aet = list(allowed_calling_aets)
    ae.maximum_associations = max_associations
    ae.maximum_pdu_size = max_pdu_size
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.add_supported_context(VERIFICATION_SOP_CLASS, ALL_TRANSFER_SYNTAXES)
    if find:
        for sop_class in (STUDY_ROOT_FIND, PATIENT_ROOT_FIND):
            ae.add_supported_context(sop_class, QUERY_TRANSFER_SYNTAXES)
    if commitment:
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, QUERY_TRANSFER_SYNTAXES)
    if retrieve:
        for sop_class in (STUDY_ROOT_MOVE, STUDY_ROOT_GET, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET):
            ae.add_supported_context(sop_class, QUERY_TRANSFER_SYNTAXES)
    return ae


def server_tls_context(
    certificate: str, private_key: str, ca_certificates: str = ""
) -> ssl.SSLContext:
    """The DICOM TLS server context (TLS 1.2+); client certificates required when a CA is given.

    Raises ConfigError naming the flag whose file cannot be used.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate, private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "tls_certificate", f"cannot load the certificate and private key: {exc}"
        ) from exc
    if ca_certificates:
        try:
            context.load_verify_locations(ca_certificates)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls_ca_certificates", f"cannot load: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


LISTEN_BACKLOG = 128
LIVENESS_WINDOW = 10.0  # seconds: an accept loop that has not looped for longer is stuck


class _AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with a pre-negotiation stage before its Association threads.

    pynetdicom starts an Association thread per connection at accept(), which then counts
    against --max_associations, and completes a TLS handshake inside accept(). Here an
    accepted connection goes to `admission.PendingAssociations` (one thread, bounded, TLS
    handshake and A-ASSOCIATE-RQ read there under --acse_timeout); only a connection with a
    whole, sane A-ASSOCIATE-RQ gets its pynetdicom thread, which replays those bytes.
    """

    request_queue_size = LISTEN_BACKLOG
    handshake_timeout = 30.0
    pending: admission.PendingAssociations | None = None
    tuner: ConnectionTuner | None = None
    store_scp: StorageScp | None = None  # storage-only associations, served without pynetdicom
    accept_heartbeat = 0.0

    @property
    def active_associations(self) -> list[Any]:
        running: list[Any] = list(super().active_associations)
        scp = self.store_scp
        return running if scp is None else [*running, *scp.associations()]

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        context = self.ssl_context
        if context is not None:
            client = context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.pending is None or self.tuner is None:
            super().process_request(request, client_address)
            return
        self.pending.admit(request, client_address)

    def _start_association(self, sock: socket.socket, address: Any, associate_rq: bytes) -> None:
        """Handoff from the pending stage: our storage SCP's thread, or pynetdicom's,
        replaying the A-ASSOCIATE-RQ."""
        if self.store_scp is not None and self.store_scp.take(sock, address, associate_rq):
            return
        assert self.tuner is not None
        self.tuner.replays[sock] = associate_rq
        try:
            super().process_request(sock, address)
        except BaseException:
            self.tuner.replays.pop(sock, None)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket) and self.pending is None:
            try:
                request.settimeout(self.handshake_timeout)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                logger.warning("TLS handshake with %s failed: %s", client_address, exc)
                self.shutdown_request(request)
                return
        try:
            super().process_request_thread(request, client_address)
        finally:
            if self.tuner is not None:
                self.tuner.replays.pop(request, None)

    def service_actions(self) -> None:
        self.accept_heartbeat = time.monotonic()
        super().service_actions()

    def shutdown(self) -> None:
        if self.store_scp is not None:
            self.store_scp.close()
        hooks.unregistered_shutdown(super().shutdown)

    def server_close(self) -> None:
        if self.pending is not None:
            self.pending.stop()
        super().server_close()

    def is_alive(self, now: float | None = None) -> bool:
        """True while the accept loop and the pre-negotiation stage both loop (liveness)."""
        now = time.monotonic() if now is None else now
        if now - self.accept_heartbeat > LIVENESS_WINDOW:
            return False
        pending = self.pending
        return pending is None or (
            pending.is_alive() and now - pending.heartbeat <= LIVENESS_WINDOW
        )

    def free_slots(self) -> int:
        """Associations that may still be accepted before pynetdicom rejects (local limit)."""
        running = sum(1 for assoc in self.active_associations if assoc.is_acceptor)
        return int(self.ae.maximum_associations) - running


def start_server(
    ae: Any,
    host: str,
    port: int,
    handlers: Sequence[Handler],
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_pending: int = 64,
    on_pending_drop: Callable[[], None] = lambda: None,
    spool_file: FileFactory | None = None,
) -> Any:
    """Start listening in its own thread (as pynetdicom's non-blocking start_server does).

    Connections wait in the pre-negotiation stage (at most `max_pending` of them, each at most
    ae.acse_timeout) until they have sent a whole A-ASSOCIATE-RQ. With `spool_file` (where a
    C-STORE data set is written as it arrives), storage-only associations are served by our
    own SCP (store_scp.py), the rest by pynetdicom.
    """
    tuner = ConnectionTuner(int(ae.maximum_pdu_size))
    all_handlers = [
        (evt.EVT_CONN_OPEN, tuner.open),
        (evt.EVT_CONN_CLOSE, tuner.close),
        *handlers,
    ]
    server = ae.make_server(
        (host, port),
        ssl_context=ssl_context,
        evt_handlers=all_handlers,
        server_class=_AssociationServer,
    )
    acse_timeout = float(ae.acse_timeout or 30.0)
    server.handshake_timeout = acse_timeout
    if hooks.available(hooks.WAITING_SOCKET):  # the stage needs its socket to replay
        server.tuner = tuner
        server.pending = admission.PendingAssociations(
            server._start_association,
            limit=max_pending,
            timeout=acse_timeout,
            on_drop=on_pending_drop,
        )
        server.pending.start()
        if spool_file is not None and isinstance(ae, AdapterAE):
            scp = StorageScp(ae, handlers, spool_file, pdu_bound=tuner.max_pdu)
            if scp.usable:
                server.store_scp = ae.store_scp = scp
    server.accept_heartbeat = time.monotonic()
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
    thread.start()
    hooks.register_server(ae, server)  # so ae.shutdown() stops it, as for pynetdicom's own
    return server
