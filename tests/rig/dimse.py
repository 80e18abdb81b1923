"""DIMSE clients for tests: C-ECHO, C-STORE of a file, C-FIND, an interrupted C-STORE."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

from dicom_adapter.dimse import pdu

VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (C-ECHO)

# What configure_pynetdicom() sets for the whole process. Restored after each test that runs
# it, so an in-process importer does not change how other tests' own pynetdicom peers behave.
_PYNETDICOM_SETTINGS = (
    "STORE_RECV_CHUNKED_DATASET",
    "STORE_SEND_CHUNKED_DATASET",
    "UNRESTRICTED_STORAGE_SERVICE",
    "LOG_REQUEST_IDENTIFIERS",
    "LOG_RESPONSE_IDENTIFIERS",
    "LOG_HANDLER_LEVEL",
)


@dataclass(frozen=True)
class ProcessWideSettings:
    """pynetdicom's and pydicom's settings as they were; restore() puts them back."""

    pynetdicom: dict[str, object]
    reading: int
    writing: int

    def restore(self) -> None:
        for name, value in self.pynetdicom.items():
            setattr(_config, name, value)
        pydicom_config.settings.reading_validation_mode = self.reading
        pydicom_config.settings.writing_validation_mode = self.writing


def save_process_wide_settings() -> ProcessWideSettings:
    """What configure_pynetdicom() would change, as it is now."""
    validation = pydicom_config.settings
    return ProcessWideSettings(
        {name: getattr(_config, name) for name in _PYNETDICOM_SETTINGS},
        validation.reading_validation_mode,
        validation.writing_validation_mode,
    )


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


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from `sock`; ConnectionError if the peer closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        data += chunk
    return data


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(PDU type, body) of the next whole PDU on `sock`."""
    pdu_type, length = pdu.parse_pdu_header(recv_exactly(sock, 6))
    return pdu_type, recv_exactly(sock, length)


def raw_associate(
    sock: socket.socket,
    called_aet: str,
    calling_aet: str,
    contexts: Sequence[tuple[str, str]],
    max_pdu: int = 16384,
) -> pdu.AssociateAccept:
    """Negotiate an association over a raw socket with the production codec (dimse/pdu.py).

    `contexts` are (abstract syntax, transfer syntax) pairs, proposed with IDs 1, 3, 5, ...
    Raises ConnectionError unless the answer is an A-ASSOCIATE-AC accepting every context.
    """
    proposed = [
        pdu.ProposedContext(2 * index + 1, abstract, (syntax,))
        for index, (abstract, syntax) in enumerate(contexts)
    ]
    sock.sendall(pdu.associate_rq(calling_aet, called_aet, proposed, max_pdu))
    pdu_type, body = read_pdu(sock)
    if pdu_type == pdu.A_ASSOCIATE_RJ:
        raise ConnectionError(f"association {pdu.describe_reject(body)}")
    if pdu_type != pdu.A_ASSOCIATE_AC:
        raise ConnectionError(f"association not accepted (PDU type {pdu_type:#04x})")
    accept = pdu.parse_associate_ac(body)
    if not accept.contexts or not all(cx.accepted for cx in accept.contexts):
        raise ConnectionError(f"presentation context rejected: {accept.contexts}")
    return accept


def p_data(context_id: int, payload: bytes, *, command: bool, last: bool) -> bytes:
    """One P-DATA-TF PDU carrying `payload` as its single PDV."""
    return pdu.pdv_header(context_id, len(payload), command=command, last=last) + payload


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

    Associates (one presentation context: the file's SOP class and transfer syntax), sends
    the command and the first `send_bytes` of the data set, then sends an A-ABORT
    (`abort=True`) or simply closes the connection, as a crashed sender would. Deterministic,
    unlike aborting a pynetdicom association from another thread mid-send.
    """
    meta = read_file_meta_info(path)
    sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    max_pdv = 16000  # fits pynetdicom's default maximum PDU (16382) and most others
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw_associate(sock, called_aet, calling_aet, [(sop_class, syntax)])
        command = pdu.c_store_rq(1, sop_class, str(meta.MediaStorageSOPInstanceUID))
        sock.sendall(p_data(1, command, command=True, last=True))
        with path.open("rb") as fh:
            fh.seek(split_dataset(path)[1])  # skip preamble and file meta
            remaining = send_bytes
            while remaining > 0:
                chunk = fh.read(min(max_pdv, remaining))
                if not chunk:
                    break
                # a data set fragment, never the last one
                sock.sendall(p_data(1, chunk, command=False, last=False))
                remaining -= len(chunk)
        if abort:
            sock.sendall(pdu.abort())  # from the service user


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


STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # Study Root Q/R Information Model - MOVE


def study_move(
    port: int, aet: str, study_uid: str, destination: str, expected: int, timeout: float
) -> None:
    """One STUDY-level C-MOVE (pynetdicom SCU, calling AE MEMSCU) to `destination`; raises
    unless it ends in Success with exactly `expected` sub-operations completed."""
    ae = AE(ae_title="MEMSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(STUDY_ROOT_MOVE)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        raise ConnectionError("the adapter did not accept the C-MOVE association")
    final: Dataset | None = None
    try:
        for status, _ in assoc.send_c_move(identifier, destination, STUDY_ROOT_MOVE):
            if not status or "Status" not in status:
                raise RuntimeError("C-MOVE got no response (association aborted or timed out)")
            if int(status.Status) not in (0xFF00, 0xFF01):
                final = status
    finally:
        assoc.release()
    if final is None or int(final.Status) != 0:
        raise RuntimeError(f"C-MOVE ended with {final}")
    completed = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
    if completed != expected:
        raise RuntimeError(f"C-MOVE completed {completed} sub-operations, expected {expected}")
