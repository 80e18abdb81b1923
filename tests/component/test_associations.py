"""Association policy (SPEC §1.2): TCP_NODELAY, the association bound, stalled peers."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_adapter.status import Status
from tests.component.conftest import RunningImporter
from tests.component.test_store_status import JSON, c_store, make_ct, stow_json


def associate(importer: RunningImporter) -> object:
    ae = AE(ae_title="PEER")
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)


def test_accepted_sockets_have_tcp_nodelay(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    assoc = associate(importer)
    assert assoc.is_established  # type: ignore[attr-defined]
    try:
        (served,) = importer.service.active_associations
        raw = served.dul.socket.socket
        assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()  # type: ignore[attr-defined]


def test_association_limit_rejects_the_extra_peer_only(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer("--max_associations=2")
    first, second = associate(importer), associate(importer)
    try:
        assert first.is_established and second.is_established  # type: ignore[attr-defined]
        third = associate(importer)
        assert third.is_rejected  # type: ignore[attr-defined]
    finally:
        first.release()  # type: ignore[attr-defined]
        second.release()  # type: ignore[attr-defined]
    again = associate(importer)
    assert again.is_established  # type: ignore[attr-defined]
    again.release()  # type: ignore[attr-defined]


def test_stalled_peer_does_not_block_others(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    ds = make_ct()
    importer.upstream.responder = lambda r: httpx.Response(
        200, headers=JSON, content=stow_json([(ds.SOPInstanceUID, None)])
    )
    # a peer that connects and never says anything, and one that sends half a PDU header
    silent = socket.create_connection(("127.0.0.1", importer.port))
    partial = socket.create_connection(("127.0.0.1", importer.port))
    partial.sendall(b"\x01\x00\x00\x00")
    try:
        assert c_store(importer, ds) == Status.SUCCESS
    finally:
        silent.close()
        partial.close()
