"""Unit tests for the pure upper-layer PDU / DIMSE command codec in dicom_adapter.dimse.pdu.

pynetdicom's own PDU and DIMSE message classes, and pydicom's data set reader, are the oracle:
what we encode must decode there, and what they encode must parse here.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
)
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    P_DATA,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext

from dicom_adapter.dimse import pdu

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"

CONTEXTS = [
    pdu.ProposedContext(1, CT, (EXPLICIT, IMPLICIT)),
    pdu.ProposedContext(3, MR, (JPEG_LOSSLESS,)),
    pdu.ProposedContext(255, "1.2.840.10008.1.1", (IMPLICIT,)),
]


def _accept_pdu(
    results: list[tuple[int, int, str]], max_pdu: int | None, *, user_info: bool = True
) -> bytes:
    """An A-ASSOCIATE-AC encoded by pynetdicom: (context ID, result, transfer syntax) each."""
    primitive = A_ASSOCIATE()
    primitive.called_ae_title = "CALLED"
    primitive.calling_ae_title = "CALLING"
    primitive.application_context_name = pdu.APPLICATION_CONTEXT
    for context_id, result, syntax in results:
        cx = PresentationContext()
        cx.context_id = context_id
        cx.result = result
        cx.transfer_syntax = [syntax]
        primitive.presentation_context_definition_results_list.append(cx)
    items: list[Any] = []
    if max_pdu is not None:
        length = MaximumLengthNotification()
        length.maximum_length_received = max_pdu
        items.append(length)
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3.4.5"
    items.append(implementation)
    primitive.user_information = items
    primitive.result = 0
    ac = A_ASSOCIATE_AC()
    ac.from_primitive(primitive)
    raw: bytes = ac.encode()
    if not user_info:  # drop the trailing user information item (type 0x50)
        body = raw[6:]
        pos = 68
        kept = body[:68]
        while pos < len(body):
            item_type, _, length = struct.unpack_from(">BBH", body, pos)
            if item_type != 0x50:
                kept += body[pos : pos + 4 + length]
            pos += 4 + length
        raw = pdu.pdu_header(pdu.A_ASSOCIATE_AC, len(kept)) + kept
    return raw


def _body(raw: bytes, pdu_type: int) -> bytes:
    """The body of a whole PDU, after checking its header."""
    got_type, length = pdu.parse_pdu_header(raw[:6])
    assert got_type == pdu_type
    assert length == len(raw) - 6
    return raw[6:]


def _rsp_pdus(status: int, comment: str | None, message_id: int, max_pdu: int) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE-RSP as pynetdicom would send them."""
    primitive: Any = C_STORE()  # pynetdicom types ErrorComment as None
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    primitive.Status = status
    if comment is not None:
        primitive.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    encoded: list[bytes] = []
    for p_data in message.encode_msg(7, max_pdu):
        tf = P_DATA_TF()
        tf.from_primitive(p_data)
        encoded.append(tf.encode())
    return encoded


def _raw_tags(raw: bytes) -> list[int]:
    """The tags of an implicit VR little endian byte string, in the order they appear."""
    tags: list[int] = []
    pos = 0
    while pos < len(raw):
        group, elem, length = struct.unpack_from("<HHI", raw, pos)
        tags.append(group << 16 | elem)
        pos += 8 + length
    return tags


def _implicit(raw: bytes) -> Dataset:
    return read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)


# --------------------------------------------------------------------------------------------
# PDU header


@pytest.mark.parametrize("length", [0, 4, 16382, 0xFFFFFFFF])
def test_pdu_header_round_trip(length: int) -> None:
    head = pdu.pdu_header(pdu.P_DATA_TF, length)
    assert head == bytes([0x04, 0]) + struct.pack(">I", length)
    assert pdu.parse_pdu_header(head) == (pdu.P_DATA_TF, length)


@pytest.mark.parametrize("head", [b"", b"\x04\x00\x00\x00\x00", bytes(7)])
def test_pdu_header_wrong_size(head: bytes) -> None:
    with pytest.raises(pdu.PduError):
        pdu.parse_pdu_header(head)


# --------------------------------------------------------------------------------------------
# A-ASSOCIATE-RQ


def test_associate_rq_decoded_by_pynetdicom() -> None:
    raw = pdu.associate_rq("CALLING_AE_16CHR", "PACS", CONTEXTS, 16382)
    body = _body(raw, pdu.A_ASSOCIATE_RQ)
    assert struct.unpack(">H", body[:2]) == (1,)  # protocol version
    rq = A_ASSOCIATE_RQ()
    rq.decode(raw)
    assert rq.calling_ae_title == "CALLING_AE_16CHR"
    assert rq.called_ae_title == "PACS"
    assert rq.application_context_name == pdu.APPLICATION_CONTEXT
    primitive = rq.to_primitive()
    assert primitive.maximum_length_received == 16382
    assert primitive.implementation_class_uid == pdu.IMPLEMENTATION_CLASS_UID
    user_information = rq.user_information
    assert user_information is not None
    assert user_information.implementation_version_name == pdu.IMPLEMENTATION_VERSION
    proposed = [
        (cx.context_id, cx.abstract_syntax, [str(ts) for ts in cx.transfer_syntax])
        for cx in primitive.presentation_context_definition_list
    ]
    assert proposed == [
        (1, CT, [EXPLICIT, IMPLICIT]),
        (3, MR, [JPEG_LOSSLESS]),
        (255, "1.2.840.10008.1.1", [IMPLICIT]),
    ]
    # pynetdicom re-encodes exactly the same bytes: every length and padding agrees
    assert rq.encode() == raw


@pytest.mark.parametrize("max_pdu", [0, 4096, 1 << 24])
def test_associate_rq_max_pdu(max_pdu: int) -> None:
    rq = A_ASSOCIATE_RQ()
    rq.decode(pdu.associate_rq("A", "B", CONTEXTS[:1], max_pdu))
    assert rq.to_primitive().maximum_length_received == max_pdu


@pytest.mark.parametrize("context_id", [0, 2, 254, 256, -1])
def test_associate_rq_rejects_bad_context_id(context_id: int) -> None:
    with pytest.raises(pdu.PduError, match="presentation context ID"):
        pdu.associate_rq("A", "B", [pdu.ProposedContext(context_id, CT, (EXPLICIT,))], 16382)


@pytest.mark.parametrize(("calling", "called"), [("", "PACS"), ("ME", ""), ("A" * 17, "PACS")])
def test_associate_rq_rejects_bad_ae_titles(calling: str, called: str) -> None:
    with pytest.raises(pdu.PduError, match="AE title"):
        pdu.associate_rq(calling, called, CONTEXTS, 16382)


# --------------------------------------------------------------------------------------------
# A-ASSOCIATE-AC / RJ


def test_parse_associate_ac_from_pynetdicom() -> None:
    raw = _accept_pdu(
        [(1, 0, EXPLICIT), (3, 3, IMPLICIT), (5, 4, IMPLICIT), (7, 0, IMPLICIT)], 4096
    )
    accept = pdu.parse_associate_ac(_body(raw, pdu.A_ASSOCIATE_AC))
    assert accept.max_pdu == 4096
    assert accept.contexts == (
        pdu.ContextResult(1, 0, EXPLICIT),
        pdu.ContextResult(3, 3, IMPLICIT),
        pdu.ContextResult(5, 4, IMPLICIT),
        pdu.ContextResult(7, 0, IMPLICIT),
    )
    assert [cx.accepted for cx in accept.contexts] == [True, False, False, True]
    assert pdu.CONTEXT_RESULTS[accept.contexts[1].result] == "abstract syntax not supported"


@pytest.mark.parametrize("max_pdu", [0, 8, 16382, 0xFFFFFFFF])
def test_parse_associate_ac_max_pdu(max_pdu: int) -> None:
    raw = _accept_pdu([(1, 0, EXPLICIT)], max_pdu)
    assert pdu.parse_associate_ac(raw[6:]).max_pdu == max_pdu


def test_parse_associate_ac_without_max_length_means_unlimited() -> None:
    assert pdu.parse_associate_ac(_accept_pdu([(1, 0, EXPLICIT)], None)[6:]).max_pdu == 0
    no_user = _accept_pdu([(1, 0, EXPLICIT)], 4096, user_info=False)
    accept = pdu.parse_associate_ac(_body(no_user, pdu.A_ASSOCIATE_AC))
    assert accept.max_pdu == 0
    assert accept.contexts == (pdu.ContextResult(1, 0, EXPLICIT),)


def test_parse_associate_ac_ignores_unknown_items() -> None:
    raw = _accept_pdu([(1, 0, EXPLICIT)], 4096)
    body = raw[6:] + bytes([0x7F, 0, 0, 3]) + b"abc"  # an item type nobody defined
    accept = pdu.parse_associate_ac(body)
    assert accept.max_pdu == 4096
    assert accept.contexts == (pdu.ContextResult(1, 0, EXPLICIT),)


def test_parse_associate_ac_malformed() -> None:
    body = _accept_pdu([(1, 0, EXPLICIT)], 4096)[6:]
    with pytest.raises(pdu.PduError, match="shorter"):
        pdu.parse_associate_ac(body[:67])
    with pytest.raises(pdu.PduError, match="truncated item header"):
        pdu.parse_associate_ac(body[:70])
    with pytest.raises(pdu.PduError, match="runs past the end"):
        pdu.parse_associate_ac(body[:-1])
    short_context = body[:68] + bytes([0x21, 0, 0, 2, 1, 0])
    with pytest.raises(pdu.PduError, match="presentation context"):
        pdu.parse_associate_ac(short_context)
    bad_sub_item = body[:68] + bytes([0x21, 0, 0, 10, 1, 0, 0, 0, 0x40, 0, 0, 9, 0x31, 0x2E])
    with pytest.raises(pdu.PduError):
        pdu.parse_associate_ac(bad_sub_item)


@pytest.mark.parametrize(
    ("result", "source", "reason", "words"),
    [
        (1, 1, 7, "rejected permanently: called AE title not recognized"),
        (1, 1, 3, "rejected permanently: calling AE title not recognized"),
        (1, 1, 2, "rejected permanently: application context not supported"),
        (1, 1, 1, "rejected permanently: source 1, reason 1"),
        (1, 2, 2, "rejected permanently: protocol version not supported"),
        (2, 3, 1, "rejected transiently: temporary congestion"),
        (2, 3, 2, "rejected transiently: local limit exceeded"),
    ],
)
def test_describe_reject_of_pynetdicom_rj(
    result: int, source: int, reason: int, words: str
) -> None:
    primitive = A_ASSOCIATE()
    primitive.result = result
    primitive.result_source = source
    primitive.diagnostic = reason
    rj = A_ASSOCIATE_RJ()
    rj.from_primitive(primitive)
    assert pdu.describe_reject(_body(rj.encode(), pdu.A_ASSOCIATE_RJ)) == words


def test_describe_reject_short_body() -> None:
    assert pdu.describe_reject(b"\x00\x01") == "rejected"


# --------------------------------------------------------------------------------------------
# Release and abort


def test_release_and_abort_match_pynetdicom() -> None:
    assert pdu.release_rq() == A_RELEASE_RQ().encode()
    assert pdu.release_rp() == A_RELEASE_RP().encode()
    aborted = A_ABORT_RQ()
    aborted.decode(pdu.abort())
    assert (aborted.source, aborted.reason_diagnostic) == (0, 0)
    assert aborted.encode() == pdu.abort()
    assert [pdu.parse_pdu_header(raw[:6]) for raw in (pdu.release_rq(), pdu.abort())] == [
        (pdu.A_RELEASE_RQ, 4),
        (pdu.A_ABORT, 4),
    ]


# --------------------------------------------------------------------------------------------
# P-DATA-TF


@pytest.mark.parametrize("length", [0, 1, 2, 16376, 1 << 20])
@pytest.mark.parametrize(("command", "last"), [(False, False), (False, True), (True, True)])
def test_pdv_header_decoded_by_pynetdicom(length: int, command: bool, last: bool) -> None:
    payload = bytes(i % 251 for i in range(length))
    raw = pdu.pdv_header(9, length, command=command, last=last) + payload
    assert len(pdu.pdv_header(9, length, command=command, last=last)) == 12
    pdu_type, pdu_length = pdu.parse_pdu_header(raw[:6])
    assert (pdu_type, pdu_length) == (pdu.P_DATA_TF, length + 6)
    assert struct.unpack(">I", raw[6:10]) == (length + 2,)  # PDV item length
    tf = P_DATA_TF()
    tf.decode(raw)
    [item] = tf.presentation_data_value_items
    assert item.presentation_context_id == 9
    control = (1 if command else 0) | (2 if last else 0)
    assert item.presentation_data_value == bytes([control]) + payload
    assert pdu.parse_p_data(raw[6:]) == [pdu.Pdv(9, command, last, payload)]


def test_parse_p_data_of_pynetdicom_pdu_with_several_pdvs() -> None:
    primitive = P_DATA()
    pdvs: list[Any] = [  # pynetdicom wants lists, though it annotates tuples
        [1, b"\x01abc"],
        [1, b"\x03de"],
        [3, b"\x00"],
        [3, b"\x02" + bytes(1000)],
    ]
    primitive.presentation_data_value_list = pdvs
    tf = P_DATA_TF()
    tf.from_primitive(primitive)
    assert pdu.parse_p_data(_body(tf.encode(), pdu.P_DATA_TF)) == [
        pdu.Pdv(1, True, False, b"abc"),
        pdu.Pdv(1, True, True, b"de"),
        pdu.Pdv(3, False, False, b""),
        pdu.Pdv(3, False, True, bytes(1000)),
    ]


def test_parse_p_data_empty_body() -> None:
    assert pdu.parse_p_data(b"") == []


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x00\x00\x02\x01",  # shorter than a PDV header
        b"\x00\x00\x00\x01\x01\x03",  # PDV length 1: no room for context ID and control
        b"\x00\x00\x00\x00\x01\x03",  # PDV length 0
        b"\x00\x00\x00\x05\x01\x03ab",  # PDV length past the end
        b"\x00\x00\x00\x03\x01\x03a\x00",  # a good PDV, then a truncated one
    ],
)
def test_parse_p_data_malformed(body: bytes) -> None:
    with pytest.raises(pdu.PduError):
        pdu.parse_p_data(body)


@pytest.mark.parametrize(
    ("peer", "cap", "expected"),
    [
        (0, 1 << 20, 1 << 20),  # no limit: our own cap
        (0, 4096, 4096),
        (8, 1 << 20, 2),
        (4096, 1 << 20, 4090),
        (16382, 1 << 20, 16376),
        ((1 << 20) + 6, 1 << 20, 1 << 20),
        (0xFFFFFFFF, 1 << 20, 1 << 20),
        (16382, 1000, 1000),
        # PS3.8 E.1: fragments are even, whatever the peer announces
        (9, 1 << 20, 2),
        (4097, 1 << 20, 4090),
        (16383, 1 << 20, 16376),
        (0xFFFF, 1 << 20, 0xFFF8),
        (0, 1001, 1000),
        (16382, 1001, 1000),
    ],
)
def test_max_fragment(peer: int, cap: int, expected: int) -> None:
    assert pdu.max_fragment(peer, cap) == expected
    assert expected % 2 == 0
    if peer:  # a full PDV of that size makes a P-DATA-TF of at most the peer's limit
        _, pdu_length = pdu.parse_pdu_header(
            pdu.pdv_header(1, expected, command=False, last=True)[:6]
        )
        assert pdu_length <= peer


@pytest.mark.parametrize("peer", [4096, 16382, 65536])
def test_max_fragment_agrees_with_pynetdicom(peer: int) -> None:
    """pynetdicom fills each P-DATA-TF up to the same PDV size (for even maximum lengths)."""
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3"
    primitive.Priority = 0
    primitive.DataSet = BytesIO(bytes(3 * peer))
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    sizes = [
        len(pdv[1]) - 1  # minus pynetdicom's message control header byte
        for p_data in message.encode_msg(1, peer)
        for pdv in p_data.presentation_data_value_list
        if not pdv[1][0] & 1
    ]
    assert max(sizes) == pdu.max_fragment(peer)


@pytest.mark.parametrize("peer", [1, 7])
def test_max_fragment_too_small(peer: int) -> None:
    with pytest.raises(pdu.PduError, match="too small"):
        pdu.max_fragment(peer)


# --------------------------------------------------------------------------------------------
# C-STORE-RQ command set


@pytest.mark.parametrize(
    ("sop_instance_uid", "move_aet", "move_id"),
    [
        ("1.2.3.4", "", None),  # even UID, no originator
        ("1.2.3.45", "MOVESCU", 65535),  # odd UID padded with NUL, odd AET padded with space
        ("1.2.826.0.1.3680043.8.498.12345678901234567890", "SIXTEEN_CHARS_AE", 1),
        ("1.2.3", "", 0),  # message ID without AET
    ],
)
def test_c_store_rq_decoded_by_pydicom(
    sop_instance_uid: str, move_aet: str, move_id: int | None
) -> None:
    raw = pdu.c_store_rq(
        513,
        CT,
        sop_instance_uid,
        priority=2,
        move_originator_aet=move_aet,
        move_originator_message_id=move_id,
    )
    assert len(raw) % 2 == 0
    ds = _implicit(raw)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.AffectedSOPClassUID == CT
    assert ds.CommandField == pdu.C_STORE_RQ
    assert ds.MessageID == 513
    assert ds.Priority == 2
    assert ds.CommandDataSetType == 0x0000
    assert ds.AffectedSOPInstanceUID == sop_instance_uid
    if move_aet:
        assert ds.MoveOriginatorApplicationEntityTitle == move_aet
    else:
        assert "MoveOriginatorApplicationEntityTitle" not in ds
    if move_id is None:
        assert "MoveOriginatorMessageID" not in ds
    else:
        assert ds.MoveOriginatorMessageID == move_id
    tags = _raw_tags(raw)
    assert tags == sorted(tags)  # ascending tag order, as PS3.5 requires
    assert tags == sorted(int(element.tag) for element in ds)  # nothing pydicom could not read


def test_c_store_rq_decoded_by_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom's in-memory decoding: the dicom-import setting (spool data sets to a file,
    # left set by tests that configure pynetdicom) needs a live association
    monkeypatch.setattr(pynetdicom_config, "STORE_RECV_CHUNKED_DATASET", False)
    raw = pdu.c_store_rq(
        9, MR, "1.2.3.45", move_originator_aet="MOVER", move_originator_message_id=77
    )
    dataset = b"\x08\x00\x18\x00\x04\x00\x00\x001.2\x00"
    primitive = P_DATA()
    pdvs: list[Any] = [[1, b"\x03" + raw], [1, b"\x02" + dataset]]
    primitive.presentation_data_value_list = pdvs
    message = C_STORE_RQ()
    assert message.decode_msg(primitive)
    request = message.message_to_primitive()
    assert isinstance(request, C_STORE)
    assert request.MessageID == 9
    assert request.Priority == 0
    assert request.AffectedSOPClassUID == MR
    assert request.AffectedSOPInstanceUID == "1.2.3.45"
    assert request.MoveOriginatorApplicationEntityTitle == "MOVER"
    assert request.MoveOriginatorMessageID == 77
    assert isinstance(request.DataSet, BytesIO)
    assert request.DataSet.getvalue() == dataset


def test_parse_command_of_own_c_store_rq() -> None:
    parsed = pdu.parse_command(pdu.c_store_rq(1, CT, "1.2.3"))
    assert parsed == pdu.CommandSet(
        pdu.C_STORE_RQ,
        None,
        None,
        "",
        message_id=1,
        data_set_present=True,
        affected_sop_class_uid=CT,
        affected_sop_instance_uid="1.2.3",
    )


# --------------------------------------------------------------------------------------------
# C-STORE-RSP command set


@pytest.mark.parametrize(
    ("status", "comment"),
    [
        (0x0000, None),
        (0xB000, "Coercion of data elements"),
        (0xA700, "out of resources"),  # even length
        (0xC000, "odd"),  # odd length, padded with a space
        (0xA900, ""),
    ],
)
def test_parse_command_of_pynetdicom_c_store_rsp(status: int, comment: str | None) -> None:
    [raw] = _rsp_pdus(status, comment, 0xFFFF, 16382)
    [pdv] = pdu.parse_p_data(_body(raw, pdu.P_DATA_TF))
    assert (pdv.context_id, pdv.command, pdv.last) == (7, True, True)
    parsed = pdu.parse_command(pdv.data)
    assert parsed == pdu.CommandSet(
        pdu.C_STORE_RSP,
        0xFFFF,
        status,
        comment or "",
        affected_sop_class_uid=CT,
        affected_sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
    )


def test_parse_command_fragmented_across_pdus() -> None:
    """A tiny peer maximum splits the command set; the fragments join to one command."""
    pdus = _rsp_pdus(0x0107, "elements discarded", 42, 16)
    assert len(pdus) > 5
    command = b""
    pdvs = [pdv for raw in pdus for pdv in pdu.parse_p_data(_body(raw, pdu.P_DATA_TF))]
    assert all(pdv.command for pdv in pdvs)
    assert [pdv.last for pdv in pdvs] == [False] * (len(pdvs) - 1) + [True]
    for pdv in pdvs:
        assert len(pdv.data) <= pdu.max_fragment(16)
        command += pdv.data
    assert pdu.parse_command(command) == pdu.CommandSet(
        pdu.C_STORE_RSP,
        42,
        0x0107,
        "elements discarded",
        affected_sop_class_uid=CT,
        affected_sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
    )


def test_parse_command_tolerates_odd_value_lengths() -> None:
    raw = struct.pack("<HHI", 0, 0x0100, 2) + struct.pack("<H", pdu.C_STORE_RSP)
    raw += struct.pack("<HHI", 0, 0x0120, 3) + b"abc"  # not a US: ignored, not an error
    assert pdu.parse_command(raw) == pdu.CommandSet(pdu.C_STORE_RSP, None, None, "")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (struct.pack("<HHI", 0, 0x0100, 2) + b"\x01\x80" + b"\x00\x00", "truncated"),
        (struct.pack("<HHI", 8, 0x0100, 2) + b"\x01\x80", "bad command element"),
        (struct.pack("<HHI", 0, 0x0100, 4) + b"\x01\x80", "bad command element"),
        (struct.pack("<HHI", 0, 0x0900, 2) + b"\x00\x00", "no CommandField"),
        (b"", "no CommandField"),
    ],
)
def test_parse_command_malformed(raw: bytes, match: str) -> None:
    with pytest.raises(pdu.PduError, match=match):
        pdu.parse_command(raw)


def _pynetdicom_store_rsp(primitive: Any) -> bytes:
    """The command set pynetdicom encodes for a C-STORE-RSP primitive (one fragment)."""
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    [p_data] = list(message.encode_msg(1, 0))
    [(_, fragment)] = p_data.presentation_data_value_list
    assert fragment[0] == 0x03  # command, last fragment
    return bytes(fragment[1:])


@pytest.mark.parametrize(
    ("status", "comment", "sop_class", "sop_instance"),
    [
        (0x0000, None, CT, "1.2.826.0.1.3680043.8.498.1"),  # odd UID: padded with a NUL
        (0x0000, None, CT, "1.2.826.0.1.3680043.8.498.12"),  # even UID
        (0xB000, "Coercion of data elements", CT, "1.2.3"),
        (0xA700, "adapter disk full", CT, "1.2.3.4"),  # odd text: padded with a space
        (0xC000, "", CT, "1.2.3"),  # an empty comment is still an element
        (0xA900, None, None, None),  # the request named no UIDs: none in the response
        (0xFFFF, "x" * 64, "1." + "2" * 62, "1." + "9" * 62),  # the longest values
    ],
)
def test_c_store_rsp_is_the_command_pynetdicom_encodes(
    status: int, comment: str | None, sop_class: str | None, sop_instance: str | None
) -> None:
    primitive: Any = C_STORE()
    primitive.MessageIDBeingRespondedTo = 0x1234
    primitive.MessageID = 0x1234  # a C-STORE-RSP carries no MessageID: not encoded
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    primitive.ErrorComment = comment
    ours = pdu.c_store_rsp(0x1234, sop_class, sop_instance, status, error_comment=comment)
    assert ours == _pynetdicom_store_rsp(primitive)
    assert pdu.parse_command(ours) == pdu.CommandSet(
        pdu.C_STORE_RSP,
        0x1234,
        status,
        comment or "",
        affected_sop_class_uid=sop_class,
        affected_sop_instance_uid=sop_instance,
    )


@pytest.mark.parametrize(
    ("uid", "comment"),
    [
        ("1.2.3", "é"),  # pynetdicom would encode it in the default character set
        ("1.2.3", "x" * 65),  # longer than LO allows
        ("1.2.3", "two\nlines"),  # control characters are not LO text
        ("1." + "2" * 63, None),  # a 65-character UID from a peer
        ("1.2.3\u00e9", None),
    ],
)
def test_c_store_rsp_refuses_what_it_does_not_carry(uid: str, comment: str | None) -> None:
    with pytest.raises(pdu.PduError):
        pdu.c_store_rsp(1, CT, uid, 0, error_comment=comment)


# --------------------------------------------------------------------------------------------
# the storage SCP's side: A-ASSOCIATE-RQ parsed, A-ASSOCIATE-AC and C-ECHO-RSP encoded


def _pynetdicom_rq(*, role: bool = False, max_pdu: int = 32768) -> bytes:
    """An A-ASSOCIATE-RQ as pynetdicom encodes it (optionally with SCP/SCU role selection)."""
    primitive = A_ASSOCIATE()
    primitive.calling_ae_title = "MODALITY"
    primitive.called_ae_title = "IMPORTER"
    primitive.application_context_name = pdu.APPLICATION_CONTEXT
    for context in CONTEXTS:
        cx = PresentationContext()
        cx.context_id = context.context_id
        cx.abstract_syntax = context.abstract_syntax
        cx.transfer_syntax = list(context.transfer_syntaxes)
        primitive.presentation_context_definition_list.append(cx)
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3.4.5"
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "PEER_1"
    items: list[Any] = [length, implementation, version]
    if role:
        selection = SCP_SCU_RoleSelectionNegotiation()
        selection.sop_class_uid = CT
        selection.scu_role = False
        selection.scp_role = True
        items.append(selection)
    primitive.user_information = items
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    raw: bytes = rq.encode()
    return raw


def test_parse_associate_rq_of_pynetdicom() -> None:
    request = pdu.parse_associate_rq(_body(_pynetdicom_rq(), pdu.A_ASSOCIATE_RQ))
    assert (request.called_aet, request.calling_aet) == ("IMPORTER", "MODALITY")
    assert request.application_context == pdu.APPLICATION_CONTEXT
    assert request.contexts == tuple(CONTEXTS)
    assert request.max_pdu == 32768
    assert request.user_items == (0x51, 0x52, 0x55)
    assert request.raw_called == b"IMPORTER".ljust(16)


def test_parse_associate_rq_lists_role_selection() -> None:
    request = pdu.parse_associate_rq(_body(_pynetdicom_rq(role=True), pdu.A_ASSOCIATE_RQ))
    assert 0x54 in request.user_items


def test_parse_associate_rq_of_own_encoder_without_limit() -> None:
    raw = pdu.associate_rq("A", "B", CONTEXTS[:1], 0)
    request = pdu.parse_associate_rq(_body(raw, pdu.A_ASSOCIATE_RQ))
    assert (request.called_aet, request.calling_aet, request.max_pdu) == ("B", "A", 0)


def test_parse_associate_rq_malformed() -> None:
    raw = _body(pdu.associate_rq("A", "B", CONTEXTS[:1], 0), pdu.A_ASSOCIATE_RQ)
    with pytest.raises(pdu.PduError):
        pdu.parse_associate_rq(raw[:60])
    with pytest.raises(pdu.PduError):
        pdu.parse_associate_rq(raw[:-3])  # the last item runs past the end


def test_associate_ac_decoded_by_pynetdicom() -> None:
    request = pdu.parse_associate_rq(_body(_pynetdicom_rq(), pdu.A_ASSOCIATE_RQ))
    results = [
        pdu.ContextResult(1, 0, EXPLICIT),
        pdu.ContextResult(3, 0, JPEG_LOSSLESS),
        pdu.ContextResult(255, 0, IMPLICIT),
    ]
    raw = pdu.associate_ac(
        request, results, 262144, implementation_class_uid="1.2.3", implementation_version="V1"
    )
    ac = A_ASSOCIATE_AC()
    ac.decode(raw)
    assert ac.encode() == raw  # every length and padding agrees
    primitive = ac.to_primitive()
    assert primitive.called_ae_title == "IMPORTER"
    assert primitive.calling_ae_title == "MODALITY"
    assert primitive.application_context_name == pdu.APPLICATION_CONTEXT
    assert primitive.maximum_length_received == 262144
    assert primitive.implementation_class_uid == "1.2.3"
    user_information = ac.user_information
    assert user_information is not None
    assert user_information.implementation_version_name == "V1"
    answered = [
        (cx.context_id, cx.result, [str(ts) for ts in cx.transfer_syntax])
        for cx in primitive.presentation_context_definition_results_list
    ]
    assert answered == [(1, 0, [EXPLICIT]), (3, 0, [JPEG_LOSSLESS]), (255, 0, [IMPLICIT])]
    # and our own SCU's parser reads it back
    assert pdu.parse_associate_ac(raw[6:]).contexts == tuple(results)


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.1.1", None])
def test_c_echo_rsp_is_the_command_pynetdicom_encodes(sop_class: str | None) -> None:
    primitive: Any = C_ECHO()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = sop_class
    primitive.Status = 0
    message = C_ECHO_RSP()
    message.primitive_to_message(primitive)
    [p_data] = list(message.encode_msg(1, 0))
    [(_, fragment)] = p_data.presentation_data_value_list
    assert pdu.c_echo_rsp(7, sop_class, 0) == bytes(fragment[1:])
