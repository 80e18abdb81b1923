"""Association policy (SPEC §1.2): TCP_NODELAY, the association bound, stalled peers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import httpx
import pytest
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_adapter.dimse import pynetdicom_hooks
from dicom_adapter.dimse import server as dimse_server
from dicom_adapter.dimse.store_scp import StoreAssociation
from dicom_adapter.status import Status
from tests.rig import wait_until
from tests.rig.component import JSON, RunningImporter, c_store, make_ct, stow_json


def associate(importer: RunningImporter) -> object:
    ae = AE(ae_title="PEER")
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)


@pytest.mark.parametrize(
    "flags", [(), ("--pynetdicom_storage",)], ids=["adapter-scp", "pynetdicom"]
)
def test_accepted_sockets_have_tcp_nodelay(
    start_importer: Callable[..., RunningImporter], flags: tuple[str, ...]
) -> None:
    importer = start_importer(*flags)
    assoc = associate(importer)
    assert assoc.is_established  # type: ignore[attr-defined]
    try:
        (served,) = importer.service.active_associations
        assert isinstance(served, StoreAssociation) == (not flags)
        raw = served.socket if isinstance(served, StoreAssociation) else served.dul.socket.socket
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


def accepted_syntax(importer: RunningImporter, sop_class: str, proposed: list[str]) -> str | None:
    ae = AE(ae_title="PEER")
    ae.add_requested_context(sop_class, proposed)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    try:
        accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts]
        return str(accepted[0]) if accepted else None
    finally:
        assoc.release()


def test_peer_first_proposed_syntax_is_kept(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    # compressed original first: keep it, do not make the peer decompress
    assert accepted_syntax(importer, CTImageStorage, [JPEG2000, ExplicitVRLittleEndian]) == (
        JPEG2000
    )
    # uncompressed first: never push the peer into lossy compression
    assert accepted_syntax(
        importer, CTImageStorage, [ExplicitVRLittleEndian, JPEGBaseline8Bit]
    ) == (ExplicitVRLittleEndian)
    # dcmsend's proposal for uncompressed files: explicit VR, not pynetdicom's implicit default
    assert accepted_syntax(
        importer,
        CTImageStorage,
        [ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian],
    ) == (ExplicitVRLittleEndian)


def test_private_sop_class_is_accepted_and_forwarded(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer()
    ds = make_ct()
    ds.SOPClassUID = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image Storage (private)
    importer.upstream.responder = lambda r: httpx.Response(
        200, headers=JSON, content=stow_json([(ds.SOPInstanceUID, None)])
    )
    assert c_store(importer, ds) == Status.SUCCESS
    assert len(importer.upstream.requests) == 1


def test_healthz_fails_while_the_accept_loop_is_stuck(
    start_importer: Callable[..., RunningImporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    importer = start_importer()
    server = importer.service._server
    monkeypatch.setattr(dimse_server, "LIVENESS_WINDOW", 0.5)
    healthz = importer.metrics_url + "/healthz"
    assert httpx.get(healthz).status_code == 200
    stuck = threading.Event()
    release = threading.Event()
    original = server.process_request

    def blocking_process_request(request: object, address: object) -> None:
        stuck.set()
        release.wait(10)
        original(request, address)

    monkeypatch.setattr(server, "process_request", blocking_process_request)
    peer = socket.create_connection(("127.0.0.1", importer.port))
    try:
        assert stuck.wait(5)
        wait_until(lambda: httpx.get(healthz).status_code == 503, 5.0, "/healthz to fail")
        release.set()
        wait_until(lambda: httpx.get(healthz).status_code == 200, 5.0, "/healthz to pass")
    finally:
        release.set()
        peer.close()


def test_without_the_socket_hook_pynetdicoms_own_path_serves(
    start_importer: Callable[..., RunningImporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(pynetdicom_hooks.OFF_ENV, "waiting_socket")
    pynetdicom_hooks.reset()
    importer = start_importer()
    ds = make_ct()
    importer.upstream.responder = lambda r: httpx.Response(
        200, headers=JSON, content=stow_json([(ds.SOPInstanceUID, None)])
    )
    assert c_store(importer, ds) == Status.SUCCESS
    assert importer.service._server.pending is None  # no pre-negotiation stage without replay
