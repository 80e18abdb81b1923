"""The adapter's own storage SCP (dimse/store_scp.py): which associations it serves, what it
answers, and how it ends an association that breaks the protocol.

The rest of the suite exercises it too: every storage-only association (dcmsend, storescu,
pynetdicom SCUs with storage contexts) is served by it unless `--pynetdicom_storage` is set.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicom_adapter.dimse import pdu
from dicom_adapter.dimse.store_scp import StoreAssociation
from dicom_adapter.status import Status
from tests.rig import http_get, p_data, raw_associate, read_pdu, wait_until
from tests.rig.component import (
    JSON,
    RunningImporter,
    _part10,
    c_store,
    dataset_bytes,
    make_ct,
    stow_json,
)


def served_by_adapter(importer: RunningImporter) -> list[bool]:
    """For each association being served: True when the adapter's SCP serves it."""
    return [isinstance(a, StoreAssociation) for a in importer.service.active_associations]


def accepting(importer: RunningImporter) -> Any:
    """A CT the scripted upstream stores when it is sent."""
    ds = make_ct()
    importer.upstream.responder = lambda r: httpx.Response(
        200, headers=JSON, content=stow_json([(ds.SOPInstanceUID, None)])
    )
    return ds


def test_storage_only_association_is_served_by_the_adapter(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    ds = accepting(importer)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    try:
        assert served_by_adapter(importer) == [True]
        # the peer's first proposal is kept, as pynetdicom's unrestricted storage does
        (storage,) = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage]
        assert storage.transfer_syntax == [ExplicitVRLittleEndian]
        assert assoc.send_c_echo().Status == Status.SUCCESS
        assert assoc.send_c_store(ds).Status == Status.SUCCESS
    finally:
        assoc.release()
    assert assoc.is_released
    # the data set went upstream byte for byte
    (body,) = importer.upstream.bodies
    assert dataset_bytes(_part10(ds)) in body
    wait_until(lambda: not importer.service.active_associations, 5.0, "the association gone")


def role_selection(ae: Any) -> Any:
    return {"ext_neg": [build_role(CTImageStorage, scu_role=True, scp_role=True)]}


def async_window(ae: Any) -> Any:
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 1
    window.maximum_number_operations_performed = 1
    return {"ext_neg": [window]}


def find_context(ae: Any) -> Any:
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    return {}


@pytest.mark.parametrize(
    "extra", [find_context, role_selection, async_window], ids=["c-find", "roles", "async"]
)
def test_associations_needing_more_go_to_pynetdicom(
    start_importer: Callable[..., RunningImporter], extra: Callable[[Any], Any]
) -> None:
    importer = start_importer()
    ds = accepting(importer)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    options = extra(ae)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet, **options)
    assert assoc.is_established
    try:
        assert served_by_adapter(importer) == [False]
        assert assoc.send_c_store(ds).Status == Status.SUCCESS
    finally:
        assoc.release()


def test_pynetdicom_storage_flag_keeps_every_association_on_pynetdicom(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer("--pynetdicom_storage")
    ds = accepting(importer)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    try:
        assert served_by_adapter(importer) == [False]
        assert assoc.send_c_store(ds).Status == Status.SUCCESS
    finally:
        assoc.release()


def test_association_limit_counts_both_kinds(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer("--max_associations=2")
    storage = AE(ae_title="MODALITY")
    storage.add_requested_context(Verification)
    query = AE(ae_title="VIEWER")
    query.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    first = storage.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    second = query.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    try:
        assert first.is_established and second.is_established
        assert sorted(served_by_adapter(importer)) == [False, True]
        assert http_get(importer.metrics_url + "/readyz").status_code == 503
        for ae in (storage, query):
            extra = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
            assert extra.is_rejected
    finally:
        first.release()
        second.release()
    wait_until(
        lambda: http_get(importer.metrics_url + "/readyz").status_code == 200, 5.0, "/readyz 200"
    )


def test_wrong_called_aet_is_still_rejected(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title="SOMEONE_ELSE")
    assert assoc.is_rejected


# --- protocol violations: A-ABORT for the offender, everyone else served --------------------


def c_store_rq() -> bytes:
    return pdu.c_store_rq(1, CTImageStorage, "1.2.3.4")


def find_rq() -> bytes:
    """A C-FIND-RQ command set (Implicit VR LE), on a context that is not a query one."""
    elements = [
        (0x0002, StudyRootQueryRetrieveInformationModelFind.encode() + b"\0"),
        (0x0100, struct.pack("<H", 0x0020)),
        (0x0110, struct.pack("<H", 1)),
        (0x0700, struct.pack("<H", 0)),
        (0x0800, struct.pack("<H", 0)),
    ]
    rest = b"".join(struct.pack("<HHI", 0, elem, len(v)) + v for elem, v in elements)
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(rest)) + rest


VIOLATIONS = {
    "unknown context": p_data(3, c_store_rq(), command=True, last=True),
    "command not storage": p_data(1, find_rq(), command=True, last=True),
    "data before command": p_data(1, b"\x08\x00\x16\x00", command=False, last=True),
    "undecodable command": p_data(1, b"\x00\x00\x00\x00\xff", command=True, last=True),
    "PDV past its PDU": pdu.pdu_header(pdu.P_DATA_TF, 8) + struct.pack(">IBB", 100, 1, 3) + b"xx",
    "second A-ASSOCIATE-RQ": pdu.associate_rq("MODALITY", "IMPORTER", [], 16384),
    "A-RELEASE-RQ too long": pdu.pdu_header(pdu.A_RELEASE_RQ, 6) + bytes(6),
    "command after command": p_data(1, c_store_rq(), command=True, last=True)
    + p_data(1, c_store_rq(), command=True, last=True),
}


@pytest.mark.parametrize("payload", VIOLATIONS.values(), ids=VIOLATIONS.keys())
def test_protocol_violation_is_aborted_and_others_are_served(
    start_importer: Callable[..., RunningImporter], payload: bytes
) -> None:
    importer = start_importer()
    ds = accepting(importer)
    with socket.create_connection(("127.0.0.1", importer.port), timeout=5) as sock:
        raw_associate(sock, importer.aet, "MODALITY", [(CTImageStorage, ExplicitVRLittleEndian)])
        assert served_by_adapter(importer) == [True]
        sock.sendall(payload)
        pdu_type, body = read_pdu(sock)
        assert pdu_type == pdu.A_ABORT
        assert body[2] == 2  # source: the service provider
        assert sock.recv(16) == b""  # and the connection closed
    wait_until(lambda: not importer.service.active_associations, 5.0, "the association gone")
    assert c_store(importer, ds) == Status.SUCCESS


def test_idle_association_is_aborted_after_the_network_timeout(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer("--network_timeout=0.5")
    with socket.create_connection(("127.0.0.1", importer.port), timeout=5) as sock:
        raw_associate(sock, importer.aet, "MODALITY", [(CTImageStorage, ExplicitVRLittleEndian)])
        pdu_type, _ = read_pdu(sock)  # nothing sent: the SCP gives up on us
        assert pdu_type == pdu.A_ABORT
    wait_until(lambda: not importer.service.active_associations, 5.0, "the association gone")


def test_spool_file_that_cannot_be_created_is_answered_0xa700(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    ds = accepting(importer)
    scp = importer.service._server.store_scp

    def full(**kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    scp.file_factory = full
    assert c_store(importer, ds) == Status.OUT_OF_RESOURCES
    assert importer.upstream.requests == []


def test_unexpected_failure_aborts_one_association_cleanly(
    start_importer: Callable[..., RunningImporter],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    importer = start_importer()
    ds = accepting(importer)
    scp = importer.service._server.store_scp
    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))

    def broken(**kwargs: Any) -> Any:
        raise RuntimeError("a bug of ours")

    original, scp.file_factory = scp.file_factory, broken
    with socket.create_connection(("127.0.0.1", importer.port), timeout=5) as sock:
        raw_associate(sock, importer.aet, "MODALITY", [(CTImageStorage, ExplicitVRLittleEndian)])
        sock.sendall(p_data(1, c_store_rq(), command=True, last=True))
        pdu_type, _ = read_pdu(sock)
        assert pdu_type == pdu.A_ABORT
    wait_until(lambda: not importer.service.active_associations, 5.0, "the association gone")
    assert escaped == []  # nothing escaped the association's thread
    assert "storage association with" in caplog.text  # the bug is logged, with its traceback
    scp.file_factory = original
    assert c_store(importer, ds) == Status.SUCCESS  # everyone else is still served
