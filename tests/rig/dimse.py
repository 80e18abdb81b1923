"""DIMSE clients for tests: C-ECHO, C-STORE of a file, C-FIND, an interrupted C-STORE."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (C-ECHO)


def echo(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "ECHOSCU",
    timeout: float = 10.0,
) -> bool:
    """True if a C-ECHO with pynetdicom succeeds (association accepted, status 0x0000)."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0x0000
    finally:
        assoc.release()


def send_file(
    host: str,
    port: int,
    called_aet: str,
    path: Path,
    calling_aet: str = "STORESCU",
    timeout: float = 60.0,
) -> int | None:
    """C-STORE one Part-10 file with pynetdicom, its bytes sent as they are in the file.

    The SOP Class, SOP Instance and transfer syntax UIDs come from the file meta, so the
    dataset itself may lack them. One presentation context is proposed, with only the file's
    transfer syntax. Flips pynetdicom's global STORE_SEND_CHUNKED_DATASET for the call, so
    do not run it from several threads at once. Returns the response status, or None when no
    response arrived (the association was aborted or timed out). Raises ConnectionError if
    the association is not accepted.
    """
    meta = read_file_meta_info(path)
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        raise ConnectionError(f"association with {called_aet}@{host}:{port} not accepted")
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, no decode/re-encode
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if status and "Status" in status else None


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        data += chunk
    return data


def _c_store_command(sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ command set, implicit VR little endian, with its group length."""
    elements = b""
    for element, value in (
        (0x0002, _uid_bytes(sop_class_uid)),  # Affected SOP Class UID
        (0x0100, struct.pack("<H", 0x0001)),  # Command Field: C-STORE-RQ
        (0x0110, struct.pack("<H", 1)),  # Message ID
        (0x0700, struct.pack("<H", 0)),  # Priority: medium
        (0x0800, struct.pack("<H", 0x0000)),  # Command Data Set Type: a data set follows
        (0x1000, _uid_bytes(sop_instance_uid)),  # Affected SOP Instance UID
    ):
        elements += struct.pack("<HHI", 0x0000, element, len(value)) + value
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(elements)) + elements


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def interrupt_c_store(
    host: str,
    port: int,
    called_aet: str,
    path: Path,
    send_bytes: int,
    abort: bool = True,
    calling_aet: str = "INTERRUPT",
    timeout: float = 30.0,
) -> None:
    """Start a C-STORE of a Part-10 file over a raw socket, then stop after `send_bytes`.

    Speaks just enough of the DICOM upper layer to get an association (one presentation
    context: the file's SOP class and transfer syntax), sends the command and the first
    `send_bytes` of the data set, then sends an A-ABORT (`abort=True`) or simply closes the
    connection, as a crashed sender would. Deterministic, unlike aborting a pynetdicom
    association from another thread mid-send.
    """
    meta = read_file_meta_info(path)
    context_id = 1
    presentation_context = _item(
        0x20,
        struct.pack(">BBBB", context_id, 0, 0, 0)
        + _item(0x30, str(meta.MediaStorageSOPClassUID).encode("ascii"))
        + _item(0x40, str(meta.TransferSyntaxUID).encode("ascii")),
    )
    user_information = _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    associate_rq = _pdu(
        0x01,
        struct.pack(">HH", 1, 0)
        + called_aet.encode("ascii").ljust(16)
        + calling_aet.encode("ascii").ljust(16)
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + presentation_context
        + user_information,
    )
    max_pdv = 16000  # fits pynetdicom's default maximum PDU (16382) and most others

    def p_data(payload: bytes, control: int) -> bytes:
        pdv = struct.pack(">IBB", len(payload) + 2, context_id, control) + payload
        return _pdu(0x04, pdv)

    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(associate_rq)
        pdu_type, _, length = struct.unpack(">BBI", _recv_exactly(sock, 6))
        body = _recv_exactly(sock, length)
        if pdu_type != 0x02:
            raise ConnectionError(f"association not accepted (PDU type {pdu_type:#04x})")
        # The single presentation context item in the A-ASSOCIATE-AC: result byte at offset 2
        offset = 68
        while offset < len(body):
            item_type, _, item_length = struct.unpack(">BBH", body[offset : offset + 4])
            if item_type == 0x21 and body[offset + 6] != 0:
                raise ConnectionError("presentation context rejected")
            offset += 4 + item_length
        sock.sendall(
            p_data(
                _c_store_command(meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID),
                0x03,
            )
        )
        with path.open("rb") as fh:
            fh.seek(split_dataset(path)[1])  # skip preamble and file meta
            remaining = send_bytes
            while remaining > 0:
                chunk = fh.read(min(max_pdv, remaining))
                if not chunk:
                    break
                sock.sendall(p_data(chunk, 0x00))  # data set fragment, not the last one
                remaining -= len(chunk)
        if abort:
            sock.sendall(_pdu(0x07, bytes(4)))  # A-ABORT, source: service user


def c_find(port: int, aet: str, sop_class: str, identifier: Dataset) -> list[Dataset]:
    """Every pending C-FIND answer of one query; fails unless the final status is success."""
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    assert assoc.is_established
    answers: list[Dataset] = []
    try:
        for status, answer in assoc.send_c_find(identifier, sop_class):
            assert status, "no C-FIND response"
            if status.Status == 0xFF00:  # pending: one more match
                assert answer is not None
                answers.append(answer)
            else:
                assert status.Status == 0x0000, f"final status 0x{status.Status:04X}"
    finally:
        assoc.release()
    return answers
