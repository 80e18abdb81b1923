"""What the event loop takes off a C-GET's requesting association while the DUL lends it."""

from __future__ import annotations

import struct
from types import SimpleNamespace

from dicom_adapter.dimse import pdu
from dicom_adapter.dimse.get_sender import C_CANCEL_RQ, RequesterStore, _ours

GET_ID = 7


def element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def command(field: int, responded_to: int, status: int | None = None) -> bytes:
    body = element(0x0100, struct.pack("<H", field)) + element(
        0x0120, struct.pack("<H", responded_to)
    )
    if status is not None:
        body += element(0x0900, struct.pack("<H", status))
    return element(0x0000, struct.pack("<I", len(body))) + body


def p_data_body(*pdvs: tuple[bytes, int]) -> bytes:
    """PDV items (data, control byte) on context 1."""
    return b"".join(struct.pack(">IBB", len(d) + 2, 1, c) + d for d, c in pdvs)


def requester_store() -> RequesterStore:
    """The C-GET sender of a requesting association that is never used (no socket)."""
    return RequesterStore(
        SimpleNamespace(),
        get_message_id=GET_ID,
        get_sop_class_uid="1.2.840.10008.5.1.4.1.2.2.3",
        get_context_id=1,
        dimse_timeout=5.0,
        network_timeout=5.0,
    )


def test_store_responses_and_a_cancel_of_our_get_are_taken() -> None:
    body = p_data_body(
        (command(pdu.C_STORE_RSP, 3, 0x0000), 0x03), (command(C_CANCEL_RQ, GET_ID), 0x03)
    )
    taken = _ours(body, GET_ID)
    assert taken is not None
    assert [(c.command_field, c.message_id_responded_to, c.status) for c in taken] == [
        (pdu.C_STORE_RSP, 3, 0x0000),
        (C_CANCEL_RQ, GET_ID, None),
    ]


def test_anything_else_is_left_to_pynetdicom() -> None:
    echo_rq = 0x0030
    assert _ours(p_data_body((command(echo_rq, 0), 0x03)), GET_ID) is None
    assert _ours(p_data_body((command(C_CANCEL_RQ, GET_ID + 1), 0x03)), GET_ID) is None
    store_rsp = command(pdu.C_STORE_RSP, 3, 0x0000)
    assert _ours(p_data_body((store_rsp[:10], 0x01)), GET_ID) is None  # a fragment, not last
    assert _ours(p_data_body((b"\x00" * 8, 0x02)), GET_ID) is None  # a data set PDV
    assert _ours(b"\x00\x00\x00\x09garbage", GET_ID) is None
    assert _ours(b"", GET_ID) is None


def test_a_flood_of_unasked_store_responses_is_not_kept() -> None:
    """A requester answering C-STOREs we never sent cannot grow our memory: past a few
    unclaimed responses the socket goes back to pynetdicom with what follows."""
    from dicom_adapter.dimse.get_sender import MAX_UNCLAIMED

    given_back: list[bytes] = []
    wrapper = SimpleNamespace(socket=None, give_back=given_back.append)
    store = requester_store()
    store._lease = wrapper
    flood = p_data_body(*[(command(pdu.C_STORE_RSP, n, 0), 0x03) for n in range(1, 1001)])
    following = p_data_body((command(pdu.C_STORE_RSP, 2000, 0), 0x03))
    store._inbox += struct.pack(">BBI", pdu.P_DATA_TF, 0, len(flood)) + flood
    store._inbox += struct.pack(">BBI", pdu.P_DATA_TF, 0, len(following)) + following
    store._parse_inbox()
    assert len(store._direct) == MAX_UNCLAIMED
    assert store._lease is None  # the lease ended: pynetdicom reads from here on
    assert given_back and given_back[0].endswith(following)


def test_a_deferred_pending_response_waits_for_the_next_write() -> None:
    """`defer` (another sub-operation is ready): the pending C-GET-RSP is not written alone;
    it goes out with the next write (here `flush`), complete and in order."""
    import asyncio
    import socket

    ours, peer = socket.socketpair()
    peer.setblocking(False)
    store = requester_store()
    store._sock = ours

    async def scenario() -> tuple[bytes, bytes]:
        await store.pending(remaining=2, completed=1, failed=0, warning=0, defer=True)
        await store.pending(remaining=1, completed=2, failed=0, warning=0, defer=True)
        try:
            early = peer.recv(65536)
        except BlockingIOError:
            early = b""
        await store.flush()
        return early, peer.recv(65536)

    try:
        early, written = asyncio.run(scenario())
    finally:
        ours.close()
        peer.close()
    assert early == b""
    responses = []
    while written:
        pdu_type, length = pdu.parse_pdu_header(written[:6])
        assert pdu_type == pdu.P_DATA_TF
        taken = pdu.parse_command(written[12 : 6 + length])
        assert taken.command_field == pdu.C_GET_RSP and taken.status == 0xFF00
        responses.append(taken)
        written = written[6 + length :]
    assert len(responses) == 2
