"""C-STORE sub-operations of a C-GET, sent on the requesting association (PS3.4 C.4.3).

The requesting association belongs to pynetdicom: its DUL thread reads the socket, and the
association's own thread runs the C-GET runner, blocked until the retrieve ends. The
sub-operations are sent from the event loop: the C-STORE-RQ command and data set are framed
by `pdu` and written to the socket in groups of PDUs sized to the peer's maximum PDU length
(hook raw_p_data), without blocking (a full socket buffer is waited for on the loop; a data
set spooled to disk is read and written by a writer thread); the C-STORE-RSP is read on the
loop while the DUL lends it the socket, else it comes through pynetdicom's DIMSE queue, whose
`put` wakes the loop. Pending C-GET-RSPs go out the same way, in order with the C-STOREs.
pynetdicom's `send_c_store` costs ~6 ms per 512 KB instance (a DUL hand-off per PDU, and a
thread hop each way when called from the loop). Without the hook (or over TLS), pynetdicom's
DIMSE provider sends, from a worker thread.

Hazard: the DUL thread also writes this socket (the final response, A-ABORT). Every write
of ours holds `lock` for one whole DIMSE message, and the final response is queued holding
it, so PDUs of different messages never interleave.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import queue
import select
import socket
import threading
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any, TypeVar

from pynetdicom.dimse_primitives import C_GET, C_STORE

from dicom_adapter.dicom.part10 import DatasetFile, DatasetSource
from dicom_adapter.dimse import pdu
from dicom_adapter.dimse import pynetdicom_hooks as hooks
from dicom_adapter.dimse.server import MoveRequest, lend_socket
from dicom_adapter.dimse.store_scu import AssociationLostError, StoreResponse
from dicom_adapter.status import Status

logger = logging.getLogger(__name__)

FILE_READ = 1 << 20  # bytes read from a spooled instance at a time
MAX_BUFFERS = 512  # per sendmsg() (below IOV_MAX), for peers with a tiny maximum PDU
LEASE_READ = 1 << 16  # bytes read at a time while the loop reads the socket
LEASE_PDU = 1 << 16  # a longer PDU is no C-STORE-RSP: the DUL reads it
# C-STORE-RSPs read but not yet claimed: we have one C-STORE outstanding at a time, so more
# is a peer answering what we never asked; past this the DUL reads the rest (bounded memory)
MAX_UNCLAIMED = 16
LEASE_WAIT = 1.0  # how long the DUL may take to stop reading (it finishes a PDU first)
C_CANCEL_RQ = 0x0FFF
WRITABLE_CHECK = 1.0  # how often a write waiting for room checks the association is alive
MAX_DEFERRED = 64  # PDU pieces (32 pending C-GET-RSPs) held for the next write at most

Groups = Iterator[list[bytes | memoryview]]
_T = TypeVar("_T")
# Blocking writes to C-GET requesters: threads are made as writes block at once (one per
# requester whose socket buffer is full) and reused; bounded by the associations accepted.
_WRITERS = concurrent.futures.ThreadPoolExecutor(max_workers=1024, thread_name_prefix="cget-write")


class RequesterStore:
    """The C-STORE SCU side of one C-GET's requesting association (pynetdicom `Association`).

    `c_store` and `pending` are called from the event loop, one at a time.
    """

    def __init__(
        self,
        assoc: Any,
        *,
        get_message_id: int,
        get_sop_class_uid: str,
        get_context_id: int,
        dimse_timeout: float,
        network_timeout: float,
    ) -> None:
        self._assoc = assoc
        self._sock: socket.socket | None = hooks.raw_socket(assoc)
        self._get = (get_message_id, get_sop_class_uid, get_context_id)
        self._dimse_timeout = dimse_timeout
        self._network_timeout = network_timeout
        peer_max = int(getattr(getattr(assoc, "requestor", None), "maximum_length", 0) or 0)
        # a peer announcing less than a PDV header gets the smallest fragments there are
        self._fragment = pdu.max_fragment(peer_max if peer_max == 0 else max(peer_max, 8))
        self._message_id = 0
        self._abandoned = False
        self._arrived: asyncio.Event | None = None  # set (thread-safely) by each DIMSE put
        self._messages: Any = None
        self._lease: Any = None  # the socket wrapper, while the loop reads the socket
        self._lease_tried = False
        self._inbox = bytearray()  # bytes read while leased, not yet parsed
        self._direct: collections.deque[pdu.CommandSet] = collections.deque()  # read leased
        self._lease_fd = -1  # the fd registered with the loop (the socket may be gone later)
        self._deferred: list[bytes | memoryview] = []  # pending C-GET-RSP PDUs not yet sent
        self.cancelled = False  # a C-CANCEL for the C-GET was read while leased
        self.lost = False  # the association broke under a sub-operation
        self.lock = threading.Lock()  # held while any DIMSE message is written (see above)

    @property
    def raw(self) -> bool:
        """True when sub-operations are framed by us (False: pynetdicom's DIMSE provider)."""
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
        """Stop waiting for C-STORE-RSPs and give pynetdicom its DIMSE queue back (the C-GET
        ended); from the loop."""
        self._abandoned = True
        self._end_lease()
        if self._arrived is not None:
            self._arrived.set()
        if self._messages is not None:
            hooks.unwatch_dimse_messages(self._assoc)
            self._messages = None

    async def c_store(
        self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: DatasetSource
    ) -> StoreResponse:
        """One C-STORE sub-operation of the encoded `dataset` (in the context's syntax);
        AssociationLostError when the association broke."""
        if self._abandoned or self.lost or not self._assoc.is_established:
            raise AssociationLostError("the requesting association is gone")
        self._message_id = self._message_id % 0xFFFF + 1
        message_id = self._message_id
        try:
            if self._sock is None:
                return await self._in_writer(
                    self._send_msg, context_id, sop_class_uid, sop_instance_uid, dataset, message_id
                )
            await self._watch()
            command = pdu.c_store_rq(message_id, sop_class_uid, sop_instance_uid)
            head = pdu.pdv_header(context_id, len(command), command=True, last=True)
            first, self._deferred = [*self._deferred, head, command], []
            if isinstance(dataset, DatasetFile):  # file reads: all of it in a thread
                groups = self._pieces(context_id, dataset, first)
                await self._in_writer(self._write_locked, groups)
            else:
                await self._write(
                    pdu.framed_groups(context_id, dataset, self._fragment, last=True, prefix=first)
                )
            return await self._response(message_id)
        except (OSError, AssociationLostError) as exc:
            self.lost = True
            if isinstance(exc, AssociationLostError):
                raise
            raise AssociationLostError(f"C-STORE to the requester: {exc}") from exc

    async def pending(
        self, *, remaining: int, completed: int, failed: int, warning: int, defer: bool = False
    ) -> None:
        """A pending C-GET-RSP (counts only), in order with the sub-operations. `defer` (the
        next sub-operation is ready): it goes out in the same write as the next C-STORE-RQ
        (one system call and one loop turn less per sub-operation), or with `flush`."""
        if self.lost or self._abandoned:
            return
        message_id, sop_class_uid, context_id = self._get
        command = pdu.c_move_pending_rsp(
            message_id,
            sop_class_uid,
            Status.PENDING,
            remaining=remaining,
            completed=completed,
            failed=failed,
            warning=warning,
            command_field=pdu.C_GET_RSP,
        )
        head = pdu.pdv_header(context_id, len(command), command=True, last=True)
        try:
            if self._sock is None:
                await self._in_writer(self._queue_p_data, context_id, b"\x03" + command)
                return
            self._deferred += [head, command]
            if not defer or len(self._deferred) >= MAX_DEFERRED:
                await self.flush()
        except OSError as exc:
            logger.info("pending C-GET-RSP not sent: %s", exc)

    async def flush(self) -> None:
        """Send the deferred pending C-GET-RSPs now."""
        deferred, self._deferred = self._deferred, []
        if deferred and not (self.lost or self._abandoned):
            await self._write(iter([deferred]))

    def _queue_p_data(self, context_id: int, fragment: bytes) -> None:
        with self.lock:
            hooks.send_p_data(self._assoc, context_id, fragment)

    async def _watch(self) -> None:
        """Read the C-STORE-RSPs on the loop: from the socket itself while the DUL lends it
        (no thread involved), else from pynetdicom's DIMSE queue, which wakes the loop."""
        if self._messages is None:
            loop = asyncio.get_running_loop()
            arrived = asyncio.Event()

            def wake() -> None:  # in the DUL thread
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(arrived.set)

            self._messages = hooks.watch_dimse_messages(self._assoc, wake)
            self._arrived = arrived
        if self._lease_tried:
            return
        self._lease_tried = True
        lease = lend_socket(self._assoc)
        if lease is None:
            return
        wrapper, stopped = lease
        if not await asyncio.to_thread(stopped.wait, LEASE_WAIT):
            wrapper.give_back(b"")
            return
        self._lease = wrapper
        self._lease_fd = wrapper.socket.fileno()
        asyncio.get_running_loop().add_reader(self._lease_fd, self._on_readable)

    def _end_lease(self) -> None:
        """Give the socket back to the DUL with whatever was read and not used."""
        wrapper, self._lease = self._lease, None
        if wrapper is None:
            return
        fd, self._lease_fd = self._lease_fd, -1
        with contextlib.suppress(Exception):  # by fd: the DUL may have closed the socket
            asyncio.get_running_loop().remove_reader(fd)
        unread, self._inbox = bytes(self._inbox), bytearray()
        wrapper.give_back(unread)

    def _on_readable(self) -> None:
        """Loop reader while leased: C-STORE-RSPs and a C-CANCEL are ours; anything else
        (or the connection closing) ends the lease and goes to the DUL as it came."""
        wrapper = self._lease
        if wrapper is None:
            return
        if wrapper.socket is None:  # closed by the DUL (an abort): stop watching its fd
            self._end_lease()
            return
        try:
            chunk = wrapper.socket.recv(LEASE_READ, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # closed: the DUL sees it too, and tells its DIMSE queue
            self._end_lease()
        else:
            self._inbox += chunk
            self._parse_inbox()
        if self._arrived is not None:
            self._arrived.set()

    def _parse_inbox(self) -> None:
        inbox = self._inbox
        while len(inbox) >= 6:
            pdu_type, length = pdu.parse_pdu_header(bytes(inbox[:6]))
            if pdu_type != pdu.P_DATA_TF or length > LEASE_PDU:
                self._end_lease()
                return
            if len(inbox) < 6 + length:
                return
            commands = _ours(bytes(inbox[6 : 6 + length]), self._get[0])
            if commands is None:  # not for us: the DUL handles it, and what follows
                self._end_lease()
                return
            del inbox[: 6 + length]
            for command in commands:
                if command.command_field == C_CANCEL_RQ:
                    self.cancelled = True
                elif len(self._direct) >= MAX_UNCLAIMED:
                    self._end_lease()  # the DUL handles the flood (unexpected messages)
                    return
                else:
                    self._direct.append(command)

    def _send_msg(
        self,
        context_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        dataset: DatasetSource,
        message_id: int,
    ) -> StoreResponse:
        """Without the hook, in a worker thread: pynetdicom's DIMSE provider sends (the data
        set in memory) and receives. Not `send_c_store`: it waits for the reactor to pause,
        and the reactor is this C-GET's runner."""
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
            raise AssociationLostError("no C-STORE-RSP from the requester")
        return StoreResponse(int(rsp.Status), str(getattr(rsp, "ErrorComment", "") or ""))

    def _pieces(
        self, context_id: int, dataset: DatasetFile, first: list[bytes | memoryview]
    ) -> Groups:
        """Groups of whole PDUs: the command's, then the data set's, read as it goes."""
        with dataset.path.open("rb") as stream:
            stream.seek(dataset.offset)
            chunk = stream.read(FILE_READ)
            pending = first
            while True:
                following = stream.read(FILE_READ) if chunk else b""
                yield from pdu.framed_groups(
                    context_id, chunk, self._fragment, last=not following, prefix=pending
                )
                pending = []
                if not following:
                    return
                chunk = following

    async def _write(self, groups: Groups) -> None:
        """Write from the loop without blocking it: when the socket buffer is full, wait on the
        loop for room (up to the network timeout), holding the lock: one message at a time.
        (A writer thread per full buffer cost a thread hop each way per data set.) Cut short
        once begun (cancelled, timed out), the connection is shut down: half a message cannot
        go on."""
        sock = self._sock
        assert sock is not None
        if not self.lock.acquire(blocking=False):  # only a final response holds it this long
            await self._in_writer(self._write_locked, groups)
            return
        begun = whole = False
        try:
            for group in groups:
                buffers = [memoryview(b) for b in group]
                while buffers:
                    try:
                        sent = sock.sendmsg(buffers[:MAX_BUFFERS], [], socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        await self._writable(sock)
                        continue
                    begun = True
                    _consume(buffers, sent)
            whole = True
        finally:
            self.lock.release()
            if begun and not whole:
                self._cut()

    async def _writable(self, sock: socket.socket) -> None:
        """Until `sock` has room for more (TimeoutError after the network timeout). Checked
        every WRITABLE_CHECK s: if pynetdicom closed the socket meanwhile (the requester
        aborted), epoll forgets the fd and no event would ever come."""
        fd = sock.fileno()
        if fd < 0:
            raise OSError("the requester's connection was closed")
        loop = asyncio.get_running_loop()
        room: asyncio.Future[None] = loop.create_future()
        loop.add_writer(fd, _resolve, room)
        deadline = loop.time() + self._network_timeout
        try:
            while not room.done():
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError("the requester stopped reading")
                await asyncio.wait({room}, timeout=min(left, WRITABLE_CHECK))
                if not room.done() and (sock.fileno() < 0 or not self._assoc.is_established):
                    raise OSError("the requester's association ended")
        finally:
            with contextlib.suppress(Exception):  # by fd, like the lease's reader
                loop.remove_writer(fd)

    def _cut(self) -> None:
        """The association cannot go on (a message cut short): shut the connection down."""
        self.lost = True
        if self._sock is not None:  # (without the hook pynetdicom's DUL writes: bounded)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    async def _in_writer(self, function: Callable[..., _T], *args: Any) -> _T:
        """`function(*args)` in a writer thread (not the loop's default executor, which a few
        requesters that stop reading would fill for up to --network_timeout each, stalling
        every other `to_thread` of the daemon). Cancelled while it blocks (the C-GET ends,
        the daemon stops): the connection is shut down, so the thread returns at once and
        lets go of the lock and the spool file (a message cut short cannot go on anyway)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(_WRITERS, functools.partial(function, *args))
        except asyncio.CancelledError:
            self._cut()
            raise

    def _write_locked(self, groups: Groups) -> None:
        with self.lock:
            for group in groups:
                self._blocking_write([memoryview(b) for b in group])

    def _blocking_write(self, buffers: list[memoryview]) -> None:
        """The socket stays in pynetdicom's (blocking) mode: each send is non-blocking by flag
        and waits for room with select() up to the network timeout."""
        sock = self._sock
        assert sock is not None
        while buffers:
            try:
                sent = sock.sendmsg(buffers[:MAX_BUFFERS], [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                _, writable, _ = select.select([], [sock], [], self._network_timeout)
                if not writable:
                    raise TimeoutError("the requester stopped reading") from None
                continue
            _consume(buffers, sent)

    async def _response(self, message_id: int) -> StoreResponse:
        """The C-STORE-RSP for `message_id`, from pynetdicom's DIMSE queue."""
        messages, arrived = self._messages, self._arrived
        assert messages is not None and arrived is not None
        try:
            async with asyncio.timeout(self._dimse_timeout):
                while True:
                    arrived.clear()
                    if self._abandoned:
                        raise AssociationLostError("C-GET abandoned waiting for a C-STORE-RSP")
                    while self._direct:
                        direct = self._direct.popleft()
                        if (
                            direct.message_id_responded_to == message_id
                            and direct.status is not None
                        ):
                            return StoreResponse(direct.status, direct.error_comment)
                        logger.warning("C-GET: ignoring a C-STORE-RSP for another message")
                    try:
                        context_id, message = messages.get_nowait()
                    except queue.Empty:
                        await arrived.wait()
                        continue
                    if message is None:  # aborted or closed: leave the marker for pynetdicom
                        messages.put((context_id, message))
                        raise AssociationLostError("the requester aborted the association")
                    responded = getattr(message, "MessageIDBeingRespondedTo", None)
                    status = getattr(message, "Status", None)
                    if (
                        isinstance(message, C_STORE)
                        and responded == message_id
                        and status is not None
                    ):
                        comment = getattr(message, "ErrorComment", None)
                        return StoreResponse(int(status), str(comment or ""))
                    logger.warning(
                        "C-GET: ignoring a %s from the requester", type(message).__name__
                    )
        except TimeoutError:
            raise AssociationLostError("no C-STORE-RSP from the requester in time") from None


def _ours(body: bytes, get_message_id: int) -> list[pdu.CommandSet] | None:
    """The commands of a P-DATA-TF body if all are whole C-STORE-RSPs or a C-CANCEL of our
    C-GET; None otherwise (then nothing of it is consumed)."""
    try:
        pdvs = pdu.parse_p_data(body)
        if not pdvs or not all(p.command and p.last for p in pdvs):
            return None
        commands = [pdu.parse_command(p.data) for p in pdvs]
    except pdu.PduError:
        return None
    for command in commands:
        if command.command_field == C_CANCEL_RQ:
            if command.message_id_responded_to != get_message_id:
                return None
        elif command.command_field != pdu.C_STORE_RSP:
            return None
    return commands


def _resolve(room: asyncio.Future[None]) -> None:
    if not room.done():
        room.set_result(None)


def _consume(buffers: list[memoryview], sent: int) -> None:
    """Drop `sent` bytes from the front of `buffers`."""
    while sent and buffers:
        if sent >= len(buffers[0]):
            sent -= len(buffers.pop(0))
        else:
            buffers[0] = buffers[0][sent:]
            sent = 0


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
    """A C-GET request handed to our runner: answered like a C-MOVE (C-GET-RSPs); the
    sub-operations and pending responses go out through `requester`, from the event loop.

    The final response is queued holding `requester.lock` (no PDU of it may fall between two
    PDUs of a C-STORE-RQ still being written).
    """

    def __init__(self, service: Any, request: Any, context: Any) -> None:
        super().__init__(service, request, context)
        self.move_destination = ""
        self.requester = RequesterStore(
            self.assoc,
            get_message_id=self.message_id,
            get_sop_class_uid=self.sop_class_uid,
            get_context_id=int(context.context_id),
            dimse_timeout=float(self.assoc.dimse_timeout or 30),
            network_timeout=float(self.assoc.network_timeout or 60),
        )

    def pending(self, *, remaining: int, completed: int, failed: int, warning: int) -> None:
        """Nothing: `requester` writes the pending C-GET-RSPs, in order with the C-STOREs."""

    @property
    def gone(self) -> bool:
        """True when nobody can be answered (a sub-operation found the association broken)."""
        return self.requester.lost or super().gone

    def is_cancelled(self) -> bool:
        """True once the requester sent a C-CANCEL (read by pynetdicom or by `requester`)."""
        return self.requester.cancelled or super().is_cancelled()

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
