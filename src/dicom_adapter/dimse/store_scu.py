"""An asyncio C-STORE SCU: one outgoing association that sends encoded data sets byte for byte.

Used for the C-MOVE sub-operations and the dicom-export C-STORE sink, where every instance
is already a Part-10 file (or its bytes) in the right transfer syntax: the data set is framed
into P-DATA-TF PDUs of the peer's maximum length and written straight to the socket, on the
event loop, with no thread hop. One operation at a time (no asynchronous-operations window).

Failures become the errors of `dimse.scu`: PeerUnreachableError, AssociationRejectedError,
and AssociationLostError once established (abort, timeout, closed socket, protocol error).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dicom_adapter.dicom.part10 import DatasetFile, DatasetSource
from dicom_adapter.dimse import pdu
from dicom_adapter.dimse.scu import (
    DEFAULT_MAX_PDU,
    MAX_CONTEXTS,
    AssociationError,
    AssociationRejectedError,
    AssociationTarget,
    PeerUnreachableError,
    RequestedContext,
    ScuTimeouts,
)
from dicom_adapter.errors import InvalidDatasetError

logger = logging.getLogger(__name__)

FILE_READ = 1 << 20
MAX_INCOMING_PDU = 16 << 20  # we announce DEFAULT_MAX_PDU; anything far above it is hostile


class AssociationLostError(AssociationError):
    """An established association broke: aborted, timed out, closed or garbled."""


@dataclass(frozen=True)
class StoreResponse:
    """The C-STORE-RSP: its status and optional ErrorComment."""

    status: int
    error_comment: str = ""


class StoreAssociation:
    """An established association for C-STORE requests; open with `StoreAssociation.open`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        target: AssociationTarget,
        accept: pdu.AssociateAccept,
        proposed: Sequence[pdu.ProposedContext],
        timeouts: ScuTimeouts,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._target = target
        self._timeouts = timeouts
        self._fragment = pdu.max_fragment(accept.max_pdu)
        abstract = {cx.context_id: cx.abstract_syntax for cx in proposed}
        self._accepted: dict[tuple[str, str], int] = {}
        for result in accept.contexts:
            if result.accepted and result.context_id in abstract and result.transfer_syntax:
                key = (abstract[result.context_id], result.transfer_syntax)
                self._accepted.setdefault(key, result.context_id)
        self._message_id = 0
        self._lock = asyncio.Lock()
        self._open = True

    @classmethod
    async def open(
        cls,
        target: AssociationTarget,
        contexts: Sequence[RequestedContext],
        *,
        timeouts: ScuTimeouts | None = None,
        max_pdu: int = DEFAULT_MAX_PDU,
    ) -> StoreAssociation:
        """Connect, negotiate, and return the association; raises an AssociationError."""
        if not contexts or len(contexts) > MAX_CONTEXTS:
            raise ValueError(f"between 1 and {MAX_CONTEXTS} presentation contexts are required")
        timeouts = timeouts or ScuTimeouts()
        where = f"{target.called_aet}@{target.host}:{target.port}"
        proposed = [
            pdu.ProposedContext(2 * i + 1, c.abstract_syntax, c.transfer_syntaxes)
            for i, c in enumerate(contexts)
        ]
        try:
            async with asyncio.timeout(timeouts.connection):
                reader, writer = await asyncio.open_connection(
                    target.host,
                    target.port,
                    ssl=target.tls,
                    server_hostname=target.host if target.tls is not None else None,
                )
        except ssl.SSLError as exc:  # reached, but the TLS handshake failed: say why
            raise AssociationRejectedError(
                f"TLS handshake with {where} failed: {exc.reason or exc}",
                comment=f"{target.called_aet}: TLS {exc.reason or 'handshake failed'}",
            ) from exc
        except (OSError, TimeoutError) as exc:
            raise PeerUnreachableError(
                f"cannot connect to {where}: {exc!r}",
                comment=f"{target.called_aet}: {connect_cause(exc)}",
            ) from exc
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            writer.write(pdu.associate_rq(target.calling_aet, target.called_aet, proposed, max_pdu))
            async with asyncio.timeout(timeouts.acse):
                pdu_type, body = await _read_pdu(reader)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, pdu.PduError) as exc:
            writer.close()
            raise AssociationRejectedError(
                f"{where} did not answer the association: {exc!r}",
                comment=f"{target.called_aet}: no answer to the association",
            ) from exc
        except BaseException:  # cancelled while negotiating: do not leave the socket open
            writer.close()
            raise
        if pdu_type == pdu.A_ASSOCIATE_RJ:
            writer.close()
            raise AssociationRejectedError(
                f"{where} {pdu.describe_reject(body)}",
                comment=f"{target.called_aet} rejected the association",
            )
        if pdu_type != pdu.A_ASSOCIATE_AC:
            writer.close()
            raise AssociationRejectedError(f"{where} answered the association with PDU {pdu_type}")
        try:
            accept = pdu.parse_associate_ac(body)
            assoc = cls(reader, writer, target, accept, proposed, timeouts)
        except pdu.PduError as exc:
            writer.write(pdu.abort())
            writer.close()
            raise AssociationRejectedError(f"{where}: malformed A-ASSOCIATE-AC: {exc}") from exc
        if not assoc._accepted:
            await assoc.release()
            raise AssociationRejectedError(f"{where} accepted none of the proposed contexts")
        return assoc

    @property
    def is_open(self) -> bool:
        """False once released, aborted or broken."""
        return self._open

    @property
    def accepted(self) -> dict[tuple[str, str], int]:
        """(SOP class UID, transfer syntax UID) -> presentation context ID."""
        return dict(self._accepted)

    def context_for(self, sop_class_uid: str, transfer_syntax: str) -> int | None:
        """The accepted context for this SOP class in exactly this transfer syntax, if any."""
        return self._accepted.get((sop_class_uid, transfer_syntax))

    def accepted_syntaxes(self, sop_class_uid: str) -> list[str]:
        """The transfer syntaxes accepted for a SOP class, in proposal order."""
        return [ts for (cls, ts) in self._accepted if cls == sop_class_uid]

    async def c_store(
        self,
        context_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        dataset: DatasetSource,
        *,
        move_originator_aet: str = "",
        move_originator_message_id: int | None = None,
    ) -> StoreResponse:
        """Send one C-STORE-RQ with its data set and wait for the C-STORE-RSP."""
        async with self._lock:
            if not self._open:
                raise AssociationLostError("the association is closed")
            self._message_id = self._message_id % 0xFFFF + 1
            message_id = self._message_id
            try:  # nothing sent yet: a UID we cannot encode fails this instance only
                command = pdu.c_store_rq(
                    message_id,
                    sop_class_uid,
                    sop_instance_uid,
                    move_originator_aet=move_originator_aet,
                    move_originator_message_id=move_originator_message_id,
                )
            except pdu.PduError as exc:
                raise InvalidDatasetError(f"C-STORE-RQ cannot be encoded: {exc}") from exc
            try:
                head = pdu.pdv_header(context_id, len(command), command=True, last=True)
                await self._send_dataset(context_id, dataset, [head + command])
                async with asyncio.timeout(self._timeouts.dimse):
                    response = await self._read_response(message_id)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, pdu.PduError) as exc:
                self.abort()
                raise AssociationLostError(
                    f"C-STORE to {self._target.called_aet}: {_describe(exc)}"
                ) from exc
            except BaseException:  # cancelled mid-operation: the stream is out of step
                self.abort()
                raise
            return response

    async def _send_dataset(
        self, context_id: int, dataset: DatasetSource, command: list[bytes]
    ) -> None:
        """The data set's P-DATA-TF PDUs, after the command's (sent with the first chunk)."""
        fragment = self._fragment
        if isinstance(dataset, DatasetFile):
            stream = await asyncio.to_thread(_open_at, dataset.path, dataset.offset)
            try:
                chunk = await asyncio.to_thread(stream.read, FILE_READ)
                while True:
                    following = await asyncio.to_thread(stream.read, FILE_READ) if chunk else b""
                    await self._write_fragments(
                        context_id, chunk, fragment, last=not following, prefix=command
                    )
                    command = []
                    if not following:
                        return
                    chunk = following
            finally:
                stream.close()  # a read-only file: closing does no I/O worth a thread
        await self._write_fragments(context_id, dataset, fragment, last=True, prefix=command)

    async def _write_fragments(
        self,
        context_id: int,
        data: bytes | bytearray | memoryview,
        fragment: int,
        *,
        last: bool,
        prefix: list[bytes],
    ) -> None:
        for group in pdu.framed_groups(context_id, data, fragment, last=last, prefix=prefix):
            await self._write(group)

    async def _write(self, pieces: list[bytes | memoryview]) -> None:
        """One write of several PDUs (asyncio joins them: a copy, so groups stay small)."""
        self._writer.writelines(pieces)
        async with asyncio.timeout(self._timeouts.network):  # per group: big files take long
            await self._writer.drain()

    async def _read_response(self, message_id: int) -> StoreResponse:
        command = bytearray()
        while True:
            pdu_type, body = await _read_pdu(self._reader)
            if pdu_type == pdu.P_DATA_TF:
                for pdv in pdu.parse_p_data(body):
                    if not pdv.command:
                        continue
                    command += pdv.data
                    if not pdv.last:
                        continue
                    parsed = pdu.parse_command(bytes(command))
                    command.clear()
                    if (
                        parsed.command_field == pdu.C_STORE_RSP
                        and parsed.message_id_responded_to == message_id
                        and parsed.status is not None
                    ):
                        return StoreResponse(parsed.status, parsed.error_comment)
                    logger.debug("ignoring DIMSE command 0x%04X", parsed.command_field)
            elif pdu_type == pdu.A_ABORT:
                self._close()
                raise AssociationLostError(f"{self._target.called_aet} aborted the association")
            elif pdu_type == pdu.A_RELEASE_RQ:
                self._writer.write(pdu.release_rp())
                self._close()
                raise AssociationLostError(f"{self._target.called_aet} released the association")
            else:
                raise pdu.PduError(f"unexpected PDU type {pdu_type} while waiting for C-STORE-RSP")

    async def release(self) -> None:
        """A-RELEASE; aborts when the peer does not answer within the ACSE timeout."""
        async with self._lock:
            if not self._open:
                return
            try:
                self._writer.write(pdu.release_rq())
                async with asyncio.timeout(self._timeouts.acse):
                    while True:
                        pdu_type, _ = await _read_pdu(self._reader)
                        if pdu_type in (pdu.A_RELEASE_RP, pdu.A_ABORT):
                            break
                        if pdu_type == pdu.A_RELEASE_RQ:  # release collision
                            self._writer.write(pdu.release_rp())
                            break
            except (OSError, TimeoutError, asyncio.IncompleteReadError, pdu.PduError) as exc:
                logger.debug("release of %s failed: %r", self._target.called_aet, exc)
                self.abort()
                return
            self._close()

    def abort(self) -> None:
        """A-ABORT and close the socket (safe to call twice).

        With part of a PDU still unsent (a cancelled or stalled send) no A-ABORT can follow
        it, and a plain close would wait for a peer that may never read: the connection is
        reset at once instead.
        """
        if not self._open:
            return
        self._open = False
        transport = self._writer.transport
        if transport.get_write_buffer_size():
            transport.abort()
            return
        with contextlib.suppress(Exception):
            self._writer.write(pdu.abort())
        self._close()

    def _close(self) -> None:
        self._open = False
        with contextlib.suppress(Exception):
            self._writer.close()


async def _read_pdu(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    pdu_type, length = pdu.parse_pdu_header(await reader.readexactly(6))
    if length > MAX_INCOMING_PDU:
        raise pdu.PduError(f"incoming PDU of {length} bytes is too large")
    return pdu_type, await reader.readexactly(length)


def _open_at(path: Path, offset: int) -> BinaryIO:
    """The file opened for reading at `offset` (run in a thread: open and seek may block)."""
    stream = path.open("rb")
    try:
        stream.seek(offset)
    except BaseException:
        stream.close()
        raise
    return stream


def connect_cause(exc: BaseException) -> str:
    """A connect failure in an operator's words, short enough for an ErrorComment."""
    if isinstance(exc, TimeoutError):
        return "connect timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "host not found"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the peer closed the connection"
    return str(exc) or type(exc).__name__
