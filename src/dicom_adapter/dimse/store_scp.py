"""Storage-only associations, served by the adapter itself: one blocking thread each.

Why (issue 9, P1): through pynetdicom a C-STORE of a 512 KB CT costs dicom-import ~4 ms of
CPU (two threads per association handing each PDU over queues, a pydicom decode of every
command set, the primitives); framing it here costs ~2 ms, and a sender waits for its answer
after each instance. Measured with the throw-away spike this module grew from (200 CT,
`dcmsend` -> spool -> Orthanc, same run, 5 alternating repetitions): 1.55 -> 1.08 s until all
were stored, CPU 4.85 -> 2.3 ms per instance. An asyncio variant on its own thread measured
the same; blocking sockets keep TLS, timeouts and the (synchronous) C-STORE handler simple.

Which associations come here: the pre-negotiation stage (admission.py) hands each whole
A-ASSOCIATE-RQ to `StorageScp.take`, which keeps it only when pynetdicom would accept it
and nothing in it needs pynetdicom:
- called AE title ours, calling AE title allowed, application context and protocol version
  the standard ones, a free association slot (counted together with pynetdicom's);
- every presentation context is Verification (with a transfer syntax of ours) or storage by
  pynetdicom's unrestricted rule (a storage SOP class, a private or an unknown UID), context
  IDs odd and distinct;
- no user information beyond maximum length, implementation class UID and version name (no
  role selection, asynchronous operations window, extended negotiation or user identity).
Everything else (refusals included) goes to pynetdicom unchanged, so its answers stay its own.

What is answered here: A-ASSOCIATE-AC (storage contexts with the first transfer syntax
proposed, Verification by our order: both as pynetdicom does), C-ECHO (0x0000), C-STORE (the
data set written to the spool file as it arrives, with the file meta pynetdicom would write;
the status from the same EVT_C_STORE handler pynetdicom calls), A-RELEASE, A-ABORT. A PDU
longer than negotiated, a PDV outside its PDU, an unknown context, a command other than
C-ECHO/C-STORE, or a PDU out of turn: A-ABORT, logged once. A PDU's length is checked
against the negotiated bound before anything is allocated for it, and its buffer is never
more than READ_CHUNK (1 MiB) ahead of the bytes that arrived.
Whatever ends the association, the EVT_CONN_CLOSE handlers run (the spool's cleanup).
`--pynetdicom_storage` turns this off.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, evt, sop_class
from pynetdicom.service_class import StorageServiceClass

from dicom_adapter.dicom.part10 import file_meta_group
from dicom_adapter.dimse import pdu
from dicom_adapter.dimse.admission import peer_text
from dicom_adapter.status import Status

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
C_CANCEL_RQ = 0x0FFF
STANDARD_USER_ITEMS = frozenset({0x51, 0x52, 0x55})  # max length, implementation UID, name
MAX_COMMAND = 65536  # bytes of one command set (a C-STORE-RQ is ~200)
READ_CHUNK = 1 << 20  # the most a buffer grows by per read
STALLED_SEND = 30.0  # s: a peer that takes no bytes of an answer this long loses its connection
MIN_PEER_PDU = 1024  # a smaller maximum PDU announced by the peer: left to pynetdicom
# Events whose handlers this module honours (C-STORE, connection close) or that no
# storage-only association raises; any other bound handler keeps pynetdicom on every one.
HANDLED_EVENTS = frozenset(
    {
        evt.EVT_C_STORE,
        evt.EVT_CONN_CLOSE,
        evt.EVT_C_FIND,
        evt.EVT_C_MOVE,
        evt.EVT_C_GET,
        evt.EVT_N_ACTION,
    }
)

FileFactory = Callable[..., Any]  # NamedTemporaryFile's signature (CStoreSpool.open_file)


class _Ended(Exception):
    """The association is over (closed, aborted, released or timed out)."""


def storage_like(abstract_syntax: str) -> bool:
    """pynetdicom's unrestricted storage rule: a storage SOP class, a private or unknown UID."""
    uid = UID(abstract_syntax)
    if uid.is_private:
        return True
    if sop_class.uid_to_service_class(uid) is StorageServiceClass:
        return True
    keyword = uid.keyword
    return not keyword or not hasattr(sop_class, keyword)


def negotiate(request: pdu.AssociateRequest) -> list[pdu.ContextResult] | None:
    """Every context accepted the way pynetdicom would, or None when one would not be."""
    results: list[pdu.ContextResult] = []
    seen: set[int] = set()
    for context in request.contexts:
        if context.context_id in seen or context.context_id % 2 == 0:
            return None
        seen.add(context.context_id)
        proposed = context.transfer_syntaxes
        if not proposed or not context.abstract_syntax:
            return None
        if context.abstract_syntax == VERIFICATION:
            chosen = next((ts for ts in ALL_TRANSFER_SYNTAXES if ts in proposed), None)
            if chosen is None:
                return None
        elif storage_like(context.abstract_syntax):
            chosen = proposed[0]
        else:
            return None
        results.append(pdu.ContextResult(context.context_id, 0, str(chosen)))
    return results or None


@dataclass(frozen=True)
class _Requestor:
    ae_title: str


@dataclass(frozen=True)
class StoreRequest:
    """The C-STORE-RQ fields a handler reads (pynetdicom's C_STORE primitive's names)."""

    MessageID: int
    AffectedSOPClassUID: str
    AffectedSOPInstanceUID: str


@dataclass(frozen=True)
class StoreContext:
    """The presentation context of a request (pynetdicom's PresentationContextTuple's names)."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True)
class StoreEvent:
    """What EVT_C_STORE and EVT_CONN_CLOSE handlers read of pynetdicom's Event."""

    assoc: StoreAssociation
    request: StoreRequest | None = None
    dataset_path: Path | None = None
    context: StoreContext | None = None


class StorageScp:
    """Decides which associations are served here and keeps the running ones."""

    def __init__(
        self,
        ae: Any,
        handlers: Sequence[tuple[Any, Callable[..., Any]]],
        file_factory: FileFactory,
        *,
        pdu_bound: int,
    ) -> None:
        self._ae = ae
        self.store_handler: Callable[..., Any] | None = None
        self.close_handlers: list[Callable[..., Any]] = []
        self.usable = all(event in HANDLED_EVENTS for event, _ in handlers)
        for event, handler in handlers:
            if event is evt.EVT_C_STORE:
                self.store_handler = handler
            elif event is evt.EVT_CONN_CLOSE:
                self.close_handlers.append(handler)
        self.file_factory = file_factory
        self.pdu_bound = pdu_bound  # the longest P-DATA body read (--max_pdu_size, at least 64K)
        self._lock = threading.Lock()
        self._running: set[StoreAssociation] = set()
        self._serial = itertools.count(1)
        self.closed = False

    def associations(self) -> list[StoreAssociation]:
        """The associations served here right now."""
        with self._lock:
            return list(self._running)

    def take(self, sock: socket.socket, address: Any, associate_rq: bytes) -> bool:
        """Serve this association here (True), or leave it to pynetdicom (False)."""
        if self.closed or not self.usable or self.store_handler is None:
            return False
        try:
            request = pdu.parse_associate_rq(associate_rq[6:])
        except (pdu.PduError, UnicodeError):
            return False
        results = self._acceptable(request, associate_rq)
        if results is None:
            return False
        ae = self._ae
        # ours included (server.AdapterAE); only the admission thread calls take()
        running = [a for a in ae.active_associations if getattr(a, "is_acceptor", False)]
        if len(running) >= int(ae.maximum_associations):
            return False  # pynetdicom rejects it: local limit exceeded
        with self._lock:
            association = StoreAssociation(
                self, sock, address, request, results, name=f"StoreAssociation-{next(self._serial)}"
            )
            self._running.add(association)
        try:
            association.start()
        except BaseException:
            self.ended(association)
            raise
        return True

    def _acceptable(
        self, request: pdu.AssociateRequest, associate_rq: bytes
    ) -> list[pdu.ContextResult] | None:
        ae = self._ae
        if associate_rq[6:8] != b"\x00\x01" or request.application_context != (
            pdu.APPLICATION_CONTEXT
        ):
            return None
        if request.called_aet != str(ae.ae_title).strip():
            return None
        allowed = [str(aet).strip() for aet in (ae.require_calling_aet or [])]
        if allowed and request.calling_aet not in allowed:
            return None
        if any(item not in STANDARD_USER_ITEMS for item in request.user_items):
            return None
        if 0 < request.max_pdu < MIN_PEER_PDU:
            return None
        return negotiate(request)

    def ended(self, association: StoreAssociation) -> None:
        with self._lock:
            self._running.discard(association)

    def close(self) -> None:
        """No new associations; the running ones finish (or are aborted by their owner)."""
        self.closed = True


class StoreAssociation(threading.Thread):
    """One storage-only association, served in its own thread (see the module docstring).

    Quacks like the pynetdicom Association for the code that counts, drains and logs
    associations: is_acceptor, is_established, requestor.ae_title, name, abort().
    """

    is_acceptor = True

    def __init__(
        self,
        scp: StorageScp,
        sock: socket.socket,
        address: Any,
        request: pdu.AssociateRequest,
        results: list[pdu.ContextResult],
        *,
        name: str,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self._scp = scp
        self._sock = sock
        self.address = address
        self._request = request
        self._results = results
        abstract = {cx.context_id: cx.abstract_syntax for cx in request.contexts}
        self._contexts = {
            r.context_id: StoreContext(r.context_id, abstract[r.context_id], r.transfer_syntax)
            for r in results
        }
        self.requestor = _Requestor(request.calling_aet)
        self.is_established = False
        self._send_lock = threading.Lock()
        self._aborted = False
        self._head = bytearray(6)
        self._buffer = bytearray()
        self._command = bytearray()
        self._command_context = 0
        self._file: Any = None  # the data set's spool file while it arrives
        self._store: StoreRequest | None = None  # the C-STORE-RQ awaiting its data set
        self._store_context = 0
        timeout = scp._ae.network_timeout
        self._timeout = float(timeout) if timeout else None

    @property
    def socket(self) -> socket.socket:
        """The connection (TLS-wrapped when it is)."""
        return self._sock

    @property
    def dul(self) -> StoreAssociation:
        """What the spool's cleanup keys a data set's file by (pynetdicom: the DUL thread)."""
        return self

    @property
    def peer(self) -> str:
        return peer_text(self.address)

    def abort(self) -> None:
        """A-ABORT to the peer and close; waits (briefly) for the thread to end."""
        self._aborted = True
        if self._send_lock.acquire(timeout=1.0):
            try:
                with contextlib.suppress(OSError, ValueError):
                    self._sock.settimeout(1.0)
                    self._sock.sendall(pdu.abort())
            finally:
                self._send_lock.release()
        with contextlib.suppress(OSError, ValueError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self is not threading.current_thread() and self.is_alive():
            self.join(5.0)

    # -- the thread ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._serve()
        except _Ended:
            pass
        except Exception:
            logger.exception("storage association with %s failed", self.peer)
            with contextlib.suppress(_Ended):  # it always ends the association: here, quietly
                self._abort_with(pdu.abort(2, 0))
        finally:
            self.is_established = False
            self._finish()

    def _serve(self) -> None:
        scp = self._scp
        self._send(
            pdu.associate_ac(
                self._request,
                self._results,
                int(scp._ae.maximum_pdu_size or 0),
                implementation_class_uid=str(scp._ae.implementation_class_uid),
                implementation_version=str(scp._ae.implementation_version_name or ""),
            )
        )
        self.is_established = True
        while True:
            kind, length = self._read_header()
            if kind == pdu.P_DATA_TF:
                if length > scp.pdu_bound + 6:
                    logger.warning(
                        "A-ABORT to %s: PDU of %d bytes, more than the %d negotiated "
                        "(--max_pdu_size)",
                        self.peer,
                        length,
                        scp.pdu_bound,
                    )
                    self._abort_with(pdu.ABORT_UNEXPECTED_PARAMETER)
                self._p_data(self._read(length))
            elif kind == pdu.A_RELEASE_RQ:
                if length != 4:
                    self._invalid(f"an A-RELEASE-RQ of {length} bytes")
                self._read(4)
                self._send(pdu.release_rp())
                raise _Ended
            elif kind == pdu.A_ABORT:
                raise _Ended
            else:
                self._protocol(f"PDU type 0x{kind:02X}")

    def _finish(self) -> None:
        stream, self._file = self._file, None
        event = StoreEvent(self)
        for handler in self._scp.close_handlers:  # the spool's cleanup deletes open files
            try:
                handler(event)
            except Exception:
                logger.exception("connection-close handler failed")
        if stream is not None:  # a data set cut short: never answered, so ours to delete
            with contextlib.suppress(OSError):
                stream.close()
            with contextlib.suppress(OSError):
                os.unlink(str(stream.name))
        with contextlib.suppress(OSError):
            self._sock.close()
        self._scp.ended(self)

    # -- reading ------------------------------------------------------------------------

    def _read_header(self) -> tuple[int, int]:
        self._fill(memoryview(self._head), 6)
        return pdu.parse_pdu_header(bytes(self._head))

    def _read(self, length: int) -> memoryview:
        """The next `length` bytes (valid until the next read)."""
        if length <= len(self._buffer):
            view = memoryview(self._buffer)[:length]
            self._fill(view, length)
            return view
        if length <= READ_CHUNK:
            self._buffer = bytearray(length)
            view = memoryview(self._buffer)
            self._fill(view, length)
            return view
        grown = bytearray()  # a long PDU: the buffer grows only with what arrived
        while len(grown) < length:
            chunk = bytearray(min(length - len(grown), READ_CHUNK))
            self._fill(memoryview(chunk), len(chunk))
            grown += chunk
        self._buffer = grown
        return memoryview(grown)

    def _fill(self, view: memoryview, length: int) -> None:
        got = 0
        sock = self._sock
        while got < length:
            try:
                count = sock.recv_into(view[got:], length - got)
            except TimeoutError:
                self._idle()
            except OSError as exc:
                if not self._aborted:
                    logger.info("connection from %s lost: %s", self.peer, exc)
                raise _Ended from None
            if not count:
                raise _Ended
            got += count

    def _idle(self) -> None:
        logger.info(
            "A-ABORT to %s: nothing received for %.0f s (--network_timeout)",
            self.peer,
            self._timeout or 0.0,
        )
        self._abort_with(pdu.abort(2, 0))

    # -- P-DATA ---------------------------------------------------------------------------

    def _p_data(self, body: memoryview) -> None:
        end = len(body)
        pos = 0
        while pos < end:
            if pos + 6 > end:
                self._invalid("a truncated PDV item")
            (length,) = struct.unpack_from(">I", body, pos)
            if length < 2 or pos + 4 + length > end:
                self._invalid("a PDV item longer than its PDU")
            context_id, control = body[pos + 4], body[pos + 5]
            data = body[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if context_id not in self._contexts:
                self._invalid(f"presentation context {context_id}, which was not accepted")
            if control & 1:
                self._command_fragment(context_id, data, last=bool(control & 2))
            else:
                self._data_fragment(context_id, data, last=bool(control & 2))

    def _command_fragment(self, context_id: int, data: memoryview, *, last: bool) -> None:
        if self._store is not None:
            self._protocol("a command while a data set was expected")
        if self._command and context_id != self._command_context:
            self._invalid("a command split over two presentation contexts")
        self._command_context = context_id
        self._command += data
        if len(self._command) > MAX_COMMAND:
            self._invalid(f"a command set longer than {MAX_COMMAND} bytes")
        if not last:
            return
        raw = bytes(self._command)
        self._command.clear()
        try:
            command = pdu.parse_command(raw)
        except pdu.PduError as exc:
            self._invalid(f"a command set that cannot be decoded ({exc})")
        if command.command_field == pdu.C_ECHO_RQ and command.message_id is not None:
            sop_class = command.affected_sop_class_uid or VERIFICATION
            self._send_command(
                context_id, pdu.c_echo_rsp(command.message_id, sop_class, Status.SUCCESS)
            )
            return
        if command.command_field == C_CANCEL_RQ:
            return  # nothing here runs long enough to cancel
        if command.command_field != pdu.C_STORE_RQ:
            self._protocol(f"DIMSE command 0x{command.command_field:04X} on a storage association")
        if (
            command.message_id is None
            or not command.data_set_present
            or not command.affected_sop_class_uid
            or not command.affected_sop_instance_uid
        ):
            self._invalid("a C-STORE-RQ without its message ID, UIDs or data set")
        assert command.message_id is not None
        self._store = StoreRequest(
            command.message_id,
            str(command.affected_sop_class_uid),
            str(command.affected_sop_instance_uid),
        )
        self._store_context = context_id
        self._open_file(self._store, self._contexts[context_id].transfer_syntax)

    def _open_file(self, request: StoreRequest, transfer_syntax: str) -> None:
        """The data set's spool file, its file meta written (as pynetdicom writes it); none
        when it cannot be created (the C-STORE is then answered 0xA700)."""
        try:
            stream = self._scp.file_factory(delete=False, mode="wb", suffix=".dcm")
        except OSError as exc:
            logger.warning("C-STORE data set not written (%s): it will be refused", exc)
            return
        self._file = stream
        ae = self._scp._ae
        try:
            meta = file_meta_group(
                request.AffectedSOPClassUID,
                request.AffectedSOPInstanceUID,
                transfer_syntax,
                str(ae.implementation_class_uid),
                str(ae.implementation_version_name or ""),
            )
        except ValueError:
            meta = _pydicom_meta(request, transfer_syntax, ae)
        stream.write(bytes(128) + b"DICM" + meta)

    def _data_fragment(self, context_id: int, data: memoryview, *, last: bool) -> None:
        request = self._store
        if request is None or context_id != self._store_context:
            self._protocol("a data set fragment without its C-STORE-RQ")
        stream = self._file
        if stream is not None:
            stream.write(data)
            stream.flush()
        if last:
            assert request is not None
            self._store = None
            self._file = None
            self._stored(request, context_id, stream)

    def _stored(self, request: StoreRequest, context_id: int, stream: Any) -> None:
        """The whole data set arrived: the handler's status goes back as the C-STORE-RSP."""
        if stream is None:
            status, comment = int(Status.OUT_OF_RESOURCES), "adapter disk full"
        else:
            path = Path(str(stream.name))
            try:
                answer = self._call_store(request, path)
            finally:
                with contextlib.suppress(OSError):
                    stream.close()
                with contextlib.suppress(OSError):
                    os.unlink(path)  # moved into the spool already, or done with
            status, comment = _status_of(answer)
        self._send_command(context_id, _store_rsp(request, status, comment))

    def _call_store(self, request: StoreRequest, path: Path) -> Any:
        handler = self._scp.store_handler
        assert handler is not None
        try:
            context = self._contexts[self._store_context]
            return handler(StoreEvent(self, request, path, context))
        except Exception:  # the handlers never raise; pynetdicom answers 0xC211 if one did
            logger.exception("C-STORE handler failed")
            return 0xC211

    # -- writing --------------------------------------------------------------------------

    def _send_command(self, context_id: int, command: bytes) -> None:
        """A command set as one P-DATA PDU (a response is < 300 bytes, the peer's maximum
        PDU length at least MIN_PEER_PDU)."""
        self._send(pdu.pdv_header(context_id, len(command), command=True, last=True) + command)

    def _send(self, data: bytes) -> None:
        sock = self._sock
        with self._send_lock:
            if self._aborted:
                raise _Ended
            try:
                sock.settimeout(STALLED_SEND)
                sock.sendall(data)
                sock.settimeout(self._timeout)
            except OSError as exc:  # TimeoutError included
                logger.warning("connection to %s closed: cannot send (%s)", self.peer, exc)
                raise _Ended from None

    def _abort_with(self, answer: bytes) -> None:
        """Send `answer` (an A-ABORT), close, end the association."""
        with contextlib.suppress(_Ended):
            self._send(answer)
        self._aborted = True
        with contextlib.suppress(OSError, ValueError):
            self._sock.shutdown(socket.SHUT_RDWR)
        raise _Ended

    def _invalid(self, what: str) -> None:
        logger.warning("A-ABORT to %s: %s", self.peer, what)
        self._abort_with(pdu.ABORT_INVALID_PARAMETER)

    def _protocol(self, what: str) -> None:
        logger.warning("A-ABORT to %s: unexpected %s", self.peer, what)
        self._abort_with(pdu.ABORT_UNEXPECTED_PDU)


def _status_of(answer: Any) -> tuple[int, str]:
    """A handler's answer (a status, or a data set with Status and ErrorComment)."""
    if isinstance(answer, int):
        return answer, ""
    status = int(getattr(answer, "Status", 0xC211))
    return status, str(getattr(answer, "ErrorComment", "") or "")


def _store_rsp(request: StoreRequest, status: int, comment: str) -> bytes:
    """The C-STORE-RSP; what our encoder cannot carry is left out (optional fields)."""
    sop_class: str | None = request.AffectedSOPClassUID
    sop_instance: str | None = request.AffectedSOPInstanceUID
    if not (pdu.encodable_uid(str(sop_class)) and pdu.encodable_uid(str(sop_instance))):
        sop_class = sop_instance = None
    try:
        return pdu.c_store_rsp(
            request.MessageID, sop_class, sop_instance, status, error_comment=comment or None
        )
    except pdu.PduError:
        return pdu.c_store_rsp(request.MessageID, sop_class, sop_instance, status)


def _pydicom_meta(request: StoreRequest, transfer_syntax: str, ae: Any) -> bytes:
    """The file meta group written by pydicom (values our writer does not carry)."""
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    meta = create_file_meta(
        sop_class_uid=UID(request.AffectedSOPClassUID),
        sop_instance_uid=UID(request.AffectedSOPInstanceUID),
        transfer_syntax=UID(transfer_syntax),
        implementation_uid=UID(str(ae.implementation_class_uid)),
        implementation_version=str(ae.implementation_version_name or ""),
    )
    buffer = BytesIO()
    write_file_meta_info(buffer, meta)  # type: ignore[arg-type]
    return buffer.getvalue()
