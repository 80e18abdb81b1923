"""C-STORE sub-operations of a C-GET, sent on the requesting association (PS3.4 C.4.3).

Blocking, for a worker thread while the association's own thread waits in the C-GET runner.
The C-STORE-RQ command and data set are framed by `pdu` and written to the socket in groups
of PDUs sized to the peer's maximum PDU length (hook raw_p_data); pynetdicom's `send_c_store`
hands every PDU to its DUL thread (~6 ms per 512 KB instance at 16 KB PDUs). The C-STORE-RSP
comes through pynetdicom's DIMSE queue: nothing else reads it while the runner holds the
association's thread. Without the hook (or over TLS), `send_c_store` does the sending.

Hazard: two threads write the socket during a C-GET (the worker: C-STORE-RQs; the runner:
pending C-GET-RSPs and, through the DUL, the final one). Every write goes through `lock`, one
whole DIMSE message at a time, so PDUs of different messages never interleave.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any

from pynetdicom.dimse_primitives import C_GET, C_STORE

from dicom_adapter.dimse import pdu
from dicom_adapter.dimse import pynetdicom_hooks as hooks
from dicom_adapter.dimse.part10 import DatasetFile, DatasetSource
from dicom_adapter.dimse.server import MoveRequest
from dicom_adapter.dimse.store_scu import AssociationLostError, StoreResponse
from dicom_adapter.status import Status

logger = logging.getLogger(__name__)

FILE_READ = 1 << 20  # bytes read from a spooled instance at a time
WRITE_GROUP = 256 << 10  # PDUs handed to one sendmsg() call
MAX_BUFFERS = 512  # per sendmsg() (below IOV_MAX), for peers with a tiny maximum PDU
RESPONSE_POLL = 0.05  # how often a waiting sub-operation checks whether it was abandoned


class RequesterStore:
    """The C-STORE SCU side of one C-GET's requesting association (pynetdicom `Association`)."""

    def __init__(self, assoc: Any, *, dimse_timeout: float, network_timeout: float) -> None:
        self._assoc = assoc
        self._sock: socket.socket | None = hooks.raw_socket(assoc)
        self._dimse_timeout = dimse_timeout
        self._network_timeout = network_timeout
        peer_max = int(getattr(getattr(assoc, "requestor", None), "maximum_length", 0) or 0)
        self._fragment = pdu.max_fragment(peer_max)
        self._message_id = 0
        self._abandoned = threading.Event()
        self.lost = False  # the association broke under a sub-operation
        self.lock = threading.Lock()  # held while any DIMSE message is written (see above)

    @property
    def raw(self) -> bool:
        """True when sub-operations are framed by us (False: pynetdicom's send_c_store)."""
        return self._sock is not None

    def accepted(self) -> dict[tuple[str, str], int]:
        """(SOP class, transfer syntax) -> context ID, for contexts where we may send C-STORE
        (the requester took the SCP role for the class)."""
        found: dict[tuple[str, str], int] = {}
        for cx in getattr(self._assoc, "accepted_contexts", []):
            if cx.as_scu and cx.transfer_syntax:
                key = (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                found.setdefault(key, int(cx.context_id))
        return found

    def abandon(self) -> None:
        """Stop waiting for a C-STORE-RSP (the C-GET ended or was abandoned)."""
        self._abandoned.set()

    def store(
        self,
        context_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        dataset: DatasetSource,
    ) -> StoreResponse:
        """One C-STORE sub-operation of the encoded `dataset` (in the context's syntax);
        AssociationLostError when the association broke."""
        if self._abandoned.is_set() or not self._assoc.is_established:
            raise AssociationLostError("the requesting association is gone")
        self._message_id = self._message_id % 0xFFFF + 1
        message_id = self._message_id
        if self._sock is None:
            return self._send_msg(context_id, sop_class_uid, sop_instance_uid, dataset, message_id)
        command = pdu.c_store_rq(message_id, sop_class_uid, sop_instance_uid)
        head = pdu.pdv_header(context_id, len(command), command=True, last=True)
        try:
            with self.lock:
                self._write_all(self._pieces(context_id, dataset, [head, command]))
            return self._response(message_id)
        except OSError as exc:
            self.lost = True
            raise AssociationLostError(f"C-STORE to the requester: {exc}") from exc
        except AssociationLostError:
            self.lost = True
            raise

    def write_command(self, context_id: int, command: bytes) -> bool:
        """One command-only message (a pending C-GET-RSP); False if it could not be sent."""
        head = pdu.pdv_header(context_id, len(command), command=True, last=True)
        with self.lock:
            if self._sock is None:
                return hooks.send_p_data(self._assoc, context_id, b"\x03" + command)
            try:
                self._write_all(iter([[head, command]]))
            except OSError as exc:
                logger.info("pending C-GET-RSP not sent: %s", exc)
                return False
        return True

    def _send_msg(
        self,
        context_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        dataset: DatasetSource,
        message_id: int,
    ) -> StoreResponse:
        """Without the hook: pynetdicom's DIMSE provider sends (the data set in memory) and
        receives. Not `send_c_store`: it waits for the reactor to pause, and the reactor
        is this C-GET's runner."""
        req = C_STORE()
        req.MessageID = message_id
        req.AffectedSOPClassUID = sop_class_uid
        req.AffectedSOPInstanceUID = sop_instance_uid
        req.Priority = 2
        if isinstance(dataset, DatasetFile):
            with dataset.path.open("rb") as stream:
                stream.seek(dataset.offset)
                req.DataSet = BytesIO(stream.read())
        else:
            req.DataSet = BytesIO(bytes(dataset))
        with self.lock:
            self._assoc.dimse.send_msg(req, context_id)
        _, rsp = self._assoc.dimse.get_msg(block=True)
        if rsp is None or getattr(rsp, "Status", None) is None:
            self.lost = True
            raise AssociationLostError("no C-STORE-RSP from the requester")
        return StoreResponse(int(rsp.Status), str(getattr(rsp, "ErrorComment", "") or ""))

    def _pieces(
        self, context_id: int, dataset: DatasetSource, first: list[bytes | memoryview]
    ) -> Iterator[list[bytes | memoryview]]:
        """Groups of whole PDUs (about WRITE_GROUP bytes each): the command's, then the data
        set's, read from its file as it goes."""
        fragment = self._fragment
        if isinstance(dataset, DatasetFile):
            with dataset.path.open("rb") as stream:
                stream.seek(dataset.offset)
                chunk = stream.read(FILE_READ)
                pending = first
                while True:
                    following = stream.read(FILE_READ) if chunk else b""
                    yield from _framed(context_id, chunk, fragment, not following, pending)
                    pending = []
                    if not following:
                        return
                    chunk = following
        yield from _framed(context_id, memoryview(dataset), fragment, True, first)

    def _write_all(self, groups: Iterator[list[bytes | memoryview]]) -> None:
        """Write every group; the socket stays in pynetdicom's (blocking) mode, so each send
        is non-blocking by flag and waits for room with select() up to the network timeout."""
        sock = self._sock
        assert sock is not None
        for group in groups:
            buffers = [memoryview(b) for b in group]
            while buffers:
                try:
                    sent = sock.sendmsg(buffers[:MAX_BUFFERS], [], socket.MSG_DONTWAIT)
                except BlockingIOError:
                    _, writable, _ = select.select([], [sock], [], self._network_timeout)
                    if not writable:
                        raise TimeoutError("the requester stopped reading") from None
                    continue
                while sent and buffers:
                    if sent >= len(buffers[0]):
                        sent -= len(buffers.pop(0))
                    else:
                        buffers[0] = buffers[0][sent:]
                        sent = 0

    def _response(self, message_id: int) -> StoreResponse:
        """The C-STORE-RSP for `message_id`, from pynetdicom's DIMSE queue."""
        messages = hooks.dimse_messages(self._assoc)
        deadline = time.monotonic() + self._dimse_timeout
        while time.monotonic() < deadline:
            if self._abandoned.is_set():
                raise AssociationLostError("C-GET abandoned while waiting for a C-STORE-RSP")
            try:
                context_id, message = messages.get(timeout=RESPONSE_POLL)
            except queue.Empty:
                continue
            if message is None:  # aborted or closed: leave the marker for pynetdicom
                messages.put((context_id, message))
                raise AssociationLostError("the requester aborted the association")
            responded = getattr(message, "MessageIDBeingRespondedTo", None)
            status = getattr(message, "Status", None)
            if (
                type(message).__name__ == "C_STORE"
                and responded == message_id
                and status is not None
            ):
                comment = getattr(message, "ErrorComment", None)
                return StoreResponse(int(status), str(comment or ""))
            logger.warning(
                "C-GET: ignoring a %s message from the requester", type(message).__name__
            )
        raise AssociationLostError("no C-STORE-RSP from the requester within the DIMSE timeout")


def _framed(
    context_id: int,
    data: bytes | memoryview,
    fragment: int,
    last: bool,
    prefix: list[bytes | memoryview],
) -> Iterator[list[bytes | memoryview]]:
    """P-DATA-TF PDUs (one PDV each) carrying `data`, grouped about WRITE_GROUP bytes."""
    view = memoryview(data)
    total = len(view)
    group: list[bytes | memoryview] = list(prefix)
    if total == 0 and last:
        group.append(pdu.pdv_header(context_id, 0, command=False, last=True))
    pos = grouped = 0
    while pos < total:
        end = min(pos + fragment, total)
        group.append(
            pdu.pdv_header(context_id, end - pos, command=False, last=last and end == total)
        )
        group.append(view[pos:end])
        grouped += end - pos
        pos = end
        if grouped >= WRITE_GROUP and pos < total:
            yield group
            group, grouped = [], 0
    if group:
        yield group


@contextlib.contextmanager
def held(lock: threading.Lock, timeout: float) -> Iterator[bool]:
    """`lock` for at most `timeout` s of waiting; yields whether it was acquired."""
    acquired = lock.acquire(timeout=timeout)
    try:
        yield acquired
    finally:
        if acquired:
            lock.release()


class GetRequest(MoveRequest):
    """A C-GET request handed to our runner: same answers as a C-MOVE (C-GET-RSPs), and the
    sub-operations go back on this association through `requester`.

    Every response is written holding `requester.lock` (no PDU of it may fall between two
    PDUs of a C-STORE-RQ being written by the sub-operation thread).
    """

    def __init__(self, service: Any, request: Any, context: Any) -> None:
        super().__init__(service, request, context)
        self.move_destination = ""
        self.requester = RequesterStore(
            self.assoc,
            dimse_timeout=float(self.assoc.dimse_timeout or 30),
            network_timeout=float(self.assoc.network_timeout or 60),
        )

    def pending(self, *, remaining: int, completed: int, failed: int, warning: int) -> None:
        """A pending C-GET-RSP, encoded by us (counts only)."""
        command = pdu.c_move_pending_rsp(
            self.message_id,
            self.sop_class_uid,
            Status.PENDING,
            remaining=remaining,
            completed=completed,
            failed=failed,
            warning=warning,
            command_field=pdu.C_GET_RSP,
        )
        if not self.requester.write_command(self._context.context_id, command):
            logger.debug("pending C-GET-RSP not sent")

    @property
    def gone(self) -> bool:
        """True when nobody can be answered (a sub-operation found the association broken)."""
        return self.requester.lost or super().gone

    def _primitive(self) -> Any:
        return C_GET()

    def _send(self, rsp: Any) -> None:
        with held(self.requester.lock, float(self.assoc.network_timeout or 60)) as acquired:
            if not acquired:  # a sub-operation is stuck writing: the association is lost
                self.assoc.abort()
                return
            super()._send(rsp)


def route_gets(ae: Any, runner: Callable[[GetRequest], None]) -> bool:
    """C-GET requests to `ae` go to `runner` (in the association's thread), not pynetdicom.

    False when pynetdicom's get SCP cannot be routed (hook get_routing): bind `refuse_get` to
    EVT_C_GET then.
    """
    return hooks.route_gets(
        ae, lambda service, request, context: runner(GetRequest(service, request, context))
    )


def refuse_get(event: Any) -> Any:
    """EVT_C_GET without our runner: one sub-operation, failed (0xA702)."""
    logger.warning("C-GET refused: the get runner is not available with this pynetdicom")
    yield 1
    yield Status.OUT_OF_RESOURCES_SUBOPERATIONS, None
