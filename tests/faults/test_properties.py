"""Property-based tests (hypothesis) of the pure decoders that read what peers and upstreams send.

The multipart parser (WADO-RS bodies), the PDU / command-set codec (our C-STORE SCU), and the
C-FIND <-> QIDO-RS mapping (identifiers from any peer, DICOM JSON from any upstream): no input
makes them hang, hold more than a fixed amount, or raise anything but their own error types.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import struct
from io import BytesIO
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, reject, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pynetdicom.dsutils import decode, encode

from dicom_adapter.dicomweb import multipart
from dicom_adapter.dicomweb.qido import (
    IdentifierError,
    QueryLevel,
    QueryRoot,
    build_queries,
    dataset_from_json,
    shape_response,
)
from dicom_adapter.dicomweb.stow import StowResponse, parse_stow_response
from dicom_adapter.dimse import pdu
from dicom_adapter.dimse.scu import AssociationRejectedError, AssociationTarget, RequestedContext
from dicom_adapter.dimse.store_scu import StoreAssociation

# A few seconds in all; each example is tiny, the deadline only catches a runaway.
FAST = settings(
    max_examples=200,
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ------------------------------------------------------------------------------ multipart

MAX_HEADER_BYTES = 256  # small, so the examples reach the limit


def _multipart_tokens(boundary: bytes) -> st.SearchStrategy[bytes]:
    """Bytes made of the pieces a multipart body is built from, well or badly assembled."""
    delimiter = b"--" + boundary
    pieces = [
        b"\r\n",
        b"\n",
        b"\r",
        b"-",
        b"--",
        delimiter,
        b"\r\n" + delimiter,
        b"\r\n" + delimiter + b"--",
        delimiter[: len(delimiter) // 2],
        b"Content-Type: application/dicom",
        b"X-Folded:\r\n continued",
        b" no colon",
        b"\r\n\r\n",
        b"\n\n",
        b" " * 700,
        b"\t",
        b"x" * 300,
    ]
    token = st.one_of(st.sampled_from(pieces), st.binary(max_size=24))
    return st.lists(token, max_size=50).map(b"".join)


def _cuts(data: st.DataObject, body: bytes) -> list[bytes]:
    """`body` split at random places."""
    points = data.draw(st.lists(st.integers(0, len(body)), max_size=12).map(sorted))
    edges = [0, *points, len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


def _parse(boundary: str, chunks: list[bytes]) -> tuple[list[Any], bool]:
    """Feed the chunks: (normalised events, whether it failed); checks bounds on the way."""
    parser = multipart.MultipartParser(boundary, max_header_bytes=MAX_HEADER_BYTES)
    # Held back between feeds: at most one header section, or a delimiter with its padding.
    bound = max(MAX_HEADER_BYTES, len(boundary) + multipart._MAX_PADDING) + 8
    events: list[Any] = []
    fed = 0
    emitted = 0
    try:
        for chunk in chunks:
            for event in parser.feed(chunk):
                if isinstance(event, multipart.PartData):
                    assert event.data, "empty PartData"
                    emitted += len(event.data)
                    if events and events[-1][0] == "data":
                        events[-1] = ("data", events[-1][1] + event.data)
                        continue
                    events.append(("data", event.data))
                elif isinstance(event, multipart.PartStart):
                    events.append(("start", event.headers))
                else:
                    events.append(("end",))
            fed += len(chunk)
            assert parser.buffered <= bound, f"holds {parser.buffered} bytes"
            assert emitted <= fed
        parser.close()
    except multipart.MultipartError:
        return events, True
    return events, False


@FAST
@given(st.data())
def test_multipart_parser_any_input_only_its_error_and_bounded(data: st.DataObject) -> None:
    boundary = data.draw(st.sampled_from(["b", "dicomadapter-0f3c", "x" * 70, "a-b_c.d"]))
    body = data.draw(_multipart_tokens(boundary.encode()))
    events, failed = _parse(boundary, _cuts(data, body))
    # Chunking never changes the outcome: the same body in one piece parses the same.
    whole_events, whole_failed = _parse(boundary, [body])
    assert failed == whole_failed
    if not failed:
        assert events == whole_events


@FAST
@given(st.data(), st.booleans())
def test_multipart_endless_header_or_padding_is_refused(data: st.DataObject, padding: bool) -> None:
    """A header section (or boundary padding) that never ends is refused, not buffered."""
    boundary = "b0undary"
    filler = (
        st.sampled_from([b" ", b"\t"])
        if padding
        else st.binary(max_size=90).map(lambda line: b"X-H: " + line.replace(b"\n", b"") + b"\r\n")
    )
    head = b"--" + boundary.encode() + (b"" if padding else b"\r\n")
    body = head + b"".join(data.draw(st.lists(filler, min_size=1, max_size=20))) * 20
    events, failed = _parse(boundary, _cuts(data, body))
    assert failed or len(body) <= MAX_HEADER_BYTES + multipart._MAX_PADDING
    assert events == []


@FAST
@given(st.data())
def test_multipart_round_trip(data: st.DataObject) -> None:
    """Parts built with part_head/body_tail come back byte for byte, however the body is cut."""
    boundary = multipart.new_boundary()
    delimiter = b"\r\n--" + boundary.encode()
    part = _multipart_tokens(boundary.encode()).filter(lambda p: delimiter not in p + b"\r\n")
    parts = data.draw(st.lists(part, min_size=1, max_size=4))
    body = b"".join(
        multipart.part_head(boundary, first=(i == 0)) + p for i, p in enumerate(parts)
    ) + multipart.body_tail(boundary)
    events, failed = _parse(boundary, _cuts(data, body))
    assert not failed
    expected: list[Any] = []
    for p in parts:
        expected.append(("start", {"content-type": "application/dicom"}))
        expected += [("data", p)] if p else []
        expected.append(("end",))
    assert events == expected


@FAST
@given(st.text(max_size=200))
def test_content_type_parsing_only_its_error(value: str) -> None:
    try:
        media_type, params = multipart.parse_content_type(value)
        assert media_type
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())
        boundary = multipart.boundary_from_content_type(value)
        multipart.MultipartParser(boundary)
    except multipart.MultipartError:
        pass


# ------------------------------------------------------------------------------------ PDU


def _item_bytes() -> st.SearchStrategy[bytes]:
    """One item (type, reserved, 16-bit length, value) whose length may lie."""
    return st.builds(
        lambda kind, length, value: struct.pack(">BBH", kind, 0, length) + value,
        st.sampled_from([0x10, 0x21, 0x40, 0x50, 0x51, 0x52, 0x55, 0xFF]),
        st.integers(0, 0xFFFF) | st.integers(0, 12),
        st.binary(max_size=40),
    )


_pdu_body = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda fixed, items: fixed + b"".join(items),
        st.binary(min_size=68, max_size=68),
        st.lists(
            _item_bytes()
            | st.builds(
                lambda i: struct.pack(">BBH", 0x21, 0, 4 + len(i)) + i,
                st.binary(max_size=8).map(lambda x: bytes(4) + x),
            ),
            max_size=8,
        ),
    ),
)


@FAST
@given(_pdu_body)
def test_pdu_decoders_only_their_error(body: bytes) -> None:
    """Every decoder of pdu.py, on any bytes: a result or PduError, nothing else."""
    for decoder in (pdu.parse_associate_ac, pdu.parse_p_data, pdu.parse_command):
        with contextlib.suppress(pdu.PduError):
            decoder(body)
    assert isinstance(pdu.describe_reject(body), str)
    try:
        pdu.parse_pdu_header(body[:6])
    except pdu.PduError:
        assert len(body) < 6


@FAST
@given(
    st.lists(
        st.tuples(st.integers(1, 255), st.booleans(), st.booleans(), st.binary(max_size=64)),
        max_size=5,
    )
)
def test_p_data_round_trip(pdvs: list[tuple[int, bool, bool, bytes]]) -> None:
    body = b"".join(
        pdu.pdv_header(cx, len(data), command=command, last=last)[6:] + data
        for cx, command, last, data in pdvs
    )
    parsed = pdu.parse_p_data(body)
    assert [(p.context_id, p.command, p.last, p.data) for p in parsed] == pdvs


_text = st.text(max_size=70) | st.just("1." * 40000)  # past a 16-bit item length


@FAST
@given(_text, _text, _text, st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF))
@example("\x80", "1.2", "1.2.3", 1, 16384)  # found: UnicodeEncodeError, not PduError
@example("ME", "\x80", "1.2.3", 1, 16384)
@example("ME", "1.2", "1." * 40000, 1, 16384)  # found: struct.error
def test_pdu_encoders_only_their_error(
    aet: str, sop_class: str, uid: str, message_id: int, max_pdu: int
) -> None:
    """Encoders fed with what a peer or an upstream controls: a PDU or PduError."""
    try:
        rq = pdu.associate_rq(aet, "PEER", [pdu.ProposedContext(1, sop_class, (uid,))], max_pdu)
    except pdu.PduError:
        pass
    else:
        pdu_type, length = pdu.parse_pdu_header(rq[:6])
        assert (pdu_type, length) == (pdu.A_ASSOCIATE_RQ, len(rq) - 6)
        # The RQ's fixed fields and user information parse like an AC's.
        assert pdu.parse_associate_ac(rq[6:]).max_pdu == max_pdu
    try:
        command = pdu.c_store_rq(message_id, sop_class, uid, move_originator_aet=aet)
    except pdu.PduError:
        pass
    else:
        assert pdu.parse_command(command).command_field == pdu.C_STORE_RQ
    try:
        fragment = pdu.max_fragment(max_pdu)
    except pdu.PduError:
        assert 0 < max_pdu < 8
    else:
        assert fragment % 2 == 0 and 0 < fragment <= (max_pdu - 6 if max_pdu else 1 << 20)


def test_non_ascii_sop_class_from_upstream_is_a_clean_rejection() -> None:
    """A SOP class UID with non-ASCII (from a broken upstream's QIDO) ends the outgoing
    association as AssociationRejectedError with the socket closed, not a UnicodeEncodeError."""

    async def main() -> None:
        closed = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # until the SCU closes its end
            closed.set()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            target = AssociationTarget("ME", "PEER", "127.0.0.1", port)
            contexts = [RequestedContext("1.2.840.\u00e9", ("1.2.840.10008.1.2",))]
            with pytest.raises(AssociationRejectedError):
                await StoreAssociation.open(target, contexts)
            await asyncio.wait_for(closed.wait(), 10)

    asyncio.run(main())


@FAST
@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4),
)
def test_move_response_round_trip(message_id: int, status: int, counts: list[int]) -> None:
    remaining, completed, failed, warning = counts
    raw = pdu.c_move_pending_rsp(
        message_id,
        "1.2.840.10008.5.1.4.1.2.2.2",
        status,
        remaining=remaining,
        completed=completed,
        failed=failed,
        warning=warning,
    )
    command = pdu.parse_command(raw)
    assert (command.command_field, command.message_id_responded_to, command.status) == (
        pdu.C_MOVE_RSP,
        message_id,
        status,
    )


# ------------------------------------------------------------------------ C-FIND <-> QIDO

# (tag, values worth trying) for keys a C-FIND identifier carries, good and bad.
_KEYS: list[tuple[int, list[bytes]]] = [
    (0x00080052, [b"PATIENT ", b"STUDY ", b"SERIES", b"IMAGE ", b"study", b"", b"BOGUS\\STUDY"]),
    (0x00080005, [b"ISO_IR 192", b"ISO_IR 100", b"\\ISO 2022 IR 87", b"NONSENSE"]),
    (0x00080020, [b"20240101", b"20200101-20240101", b"-", b"2024\\2025"]),
    (0x00080050, [b"A*", b"", b"?"]),
    (0x00080054, [b"", b"ME"]),
    (0x00080061, [b"CT\\MR", b"CT", b"*", b"\\", b"CT\\CT\\"]),
    (0x00081110, [b"", b"\xfe\xff\x00\xe0\x00\x00\x00\x00", b"\x00\x01"]),  # SQ
    (0x00100010, [b"Doe^J*", b"=^", b"\xe9t\xe9", b"\x1b$B"]),
    (0x00100020, [b"P1", b"", b"*", b"P1\\P2"]),
    (0x0020000D, [b"1.2.3", b"1.2.3\\4.5", b"../x", b"1." * 40, b""]),
    (0x0020000E, [b"1.2.3.4", b"9", b"a b", b""]),
    (0x00080018, [b"1.2.3.4.5", b""]),
    (0x00201208, [b"", b"12", b"x"]),  # IS
    (0x00280010, [b"", b"\x00\x02", b"\x01"]),  # US
    (0x00209165, [b"", b"\x10\x00\x20\x00", b"\x01\x02\x03"]),  # AT
    (0x00420011, [b"", b"\x00\x01"]),  # OB
    (0x00091010, [b"", b"private"]),  # private, unknown VR
    (0x7FE00010, [b"", b"\x00\x00"]),  # PixelData: OB or OW
]

_element = st.sampled_from(_KEYS).flatmap(
    lambda key: st.tuples(st.just(key[0]), st.sampled_from(key[1]) | st.binary(max_size=16))
)


def _implicit_le(elements: list[tuple[int, bytes]]) -> bytes:
    """Elements in Implicit VR Little Endian, in tag order, as a peer puts them on the wire."""
    out = b""
    for tag, value in sorted(dict(elements).items()):
        value += b" " * (len(value) % 2)
        out += struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
    return out


_PATH = re.compile(r"[a-z]+(/[0-9.]+/[a-z]+){0,2}")


@FAST
@given(st.lists(_element, max_size=10), st.sampled_from(list(QueryRoot)), st.booleans())
@example([(0x00080005, b"\x00\x01")], QueryRoot.STUDY, False)  # decode itself refuses it
def test_identifier_to_qido_only_its_error(
    elements: list[tuple[int, bytes]], root: QueryRoot, fuzzy: bool
) -> None:
    """An identifier as decoded from the wire: queries with safe paths, or IdentifierError."""
    try:
        identifier = decode(BytesIO(_implicit_le(elements)), True, True)
    except Exception:  # pydicom refuses it before our mapping sees it (the handler: 0x0110)
        reject()
    try:
        queries = build_queries(identifier, root, fuzzy=fuzzy)
    except IdentifierError:
        return
    assert queries
    for query in queries:
        assert _PATH.fullmatch(query.path), query.path
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in query.params)
        answer = shape_response(Dataset(), identifier, query.level)
        assert answer.QueryRetrieveLevel == str(query.level)


_json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12)
)
_json = st.recursive(
    _json_scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_VRS = [
    "AE",
    "AS",
    "AT",
    "CS",
    "DA",
    "DS",
    "DT",
    "FD",
    "FL",
    "IS",
    "LO",
    "LT",
    "OB",
    "OW",
    "PN",
    "SH",
    "SL",
    "SQ",
    "SS",
    "ST",
    "TM",
    "UI",
    "UL",
    "UN",
    "US",
    "UT",
    "XX",
    "",
]
# Keys whose dictionary VRs cover every kind of value conversion.
_JSON_TAGS = [
    "00100010",
    "00080020",
    "00201208",
    "00280010",
    "00209165",
    "00420011",
    "00081110",
    "0020000D",
    "00080061",
    "00181063",
    "00280030",
    "00091010",
    "7FE00010",
    "0008ZZZZ",
]


def _attribute() -> st.SearchStrategy[dict[str, Any]]:
    value_list = st.lists(
        _json_scalar
        | st.dictionaries(
            st.sampled_from(["Alphabetic", "Ideographic", "x"]), _json_scalar, max_size=2
        ),
        max_size=3,
    )
    return st.fixed_dictionaries(
        {"vr": st.sampled_from(_VRS)},
        optional={
            "Value": value_list | _json,
            "InlineBinary": st.binary(max_size=8).map(lambda b: base64.b64encode(b).decode())
            | st.text(max_size=8),
            "BulkDataURI": st.text(max_size=8),
        },
    )


_dicom_json = st.recursive(
    st.dictionaries(st.sampled_from(_JSON_TAGS), _attribute(), max_size=6),
    lambda inner: st.dictionaries(
        st.sampled_from(_JSON_TAGS),
        st.fixed_dictionaries({"vr": st.just("SQ"), "Value": st.lists(inner, max_size=2)}),
        max_size=2,
    ),
    max_leaves=8,
)


def _identifier_for(tags: list[str]) -> Dataset:
    """A STUDY-level identifier asking for every tag (as empty return keys)."""
    elements = [(0x00080052, b"STUDY ")]
    elements += [(int(tag, 16), b"") for tag in tags if re.fullmatch(r"[0-9A-F]{8}", tag)]
    return decode(BytesIO(_implicit_le(elements)), True, True)


@FAST
@given(_dicom_json | _json)
# Found by this test: each made pynetdicom fail the whole C-FIND (0xC312) on encoding.
@example({"00100010": {"vr": "AE", "Value": ["\u0100"]}})
@example({"00280010": {"vr": "US", "Value": [70000]}})
@example({"00280010": {"vr": "UN", "InlineBinary": "AgAUI23t"}})
@example({"00100010": {"vr": "FD", "Value": [None, None]}})
@example({"00181063": {"vr": "FL", "Value": [1e300]}})
@example({"7FE00010": {"vr": "UN"}})
def test_qido_json_to_answer_never_raises(obj: Any) -> None:
    """Any JSON from an upstream: a dataset, and an answer pynetdicom can put on the wire."""
    result = dataset_from_json(obj)
    assert isinstance(result, Dataset)
    answer = shape_response(result, _identifier_for(_JSON_TAGS), QueryLevel.STUDY)
    assert encode(answer, True, True) is not None, answer


def test_deeply_nested_json_does_not_blow_the_stack() -> None:
    """A sequence nested 1000 deep (a hostile upstream) ends as a dataset, not RecursionError."""
    obj: dict[str, Any] = {"00100010": {"vr": "PN", "Value": ["Doe"]}}
    for _ in range(1000):
        obj = {"00081110": {"vr": "SQ", "Value": [obj]}}
    assert isinstance(dataset_from_json(obj), Dataset)


def test_one_bad_upstream_attribute_spoils_only_itself() -> None:
    """Values that cannot go on the wire are answered empty; the rest of the match survives."""
    result = dataset_from_json(
        {
            "00100020": {"vr": "LO", "Value": ["P1"]},
            "00280010": {"vr": "US", "Value": [70000]},
            "00080060": {"vr": "CS", "Value": ["\u0100"]},
        }
    )
    identifier = _identifier_for(["00100020", "00280010", "00080060"])
    answer = shape_response(result, identifier, QueryLevel.STUDY)
    assert encode(answer, True, True) is not None
    assert (answer.PatientID, answer.Rows, answer.Modality) == ("P1", None, "")


# ------------------------------------------------------------------------------- STOW-RS

_stow_json = st.recursive(
    st.one_of(
        _json_scalar,
        st.sampled_from(["00081199", "00081198", "00081155", "00081196", "00081197", "Value"]),
    ),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["00081199", "00081198", "00081155", "00081196", "00081197", "Value"])
            | st.text(max_size=4),
            inner,
            max_size=4,
        )
    ),
    max_leaves=25,
)


@FAST
@given(
    st.integers(100, 599),
    st.sampled_from(["application/dicom+json", "text/html", ""]),
    st.binary(max_size=200) | _stow_json.map(lambda obj: json.dumps(obj).encode()),
)
@example(200, "application/dicom+json", b"[" * 100_000)  # found: RecursionError escaped
def test_stow_response_parsing_never_raises(status: int, content_type: str, body: bytes) -> None:
    """Whatever an upstream answers a STOW-RS with: a StowResponse, never an exception."""
    response = parse_stow_response(status, content_type, body)
    assert isinstance(response, StowResponse) and response.http_status == status
    assert len(response.body_excerpt) <= 300


def test_stow_answer_nested_too_deep_keeps_its_http_status() -> None:
    """A 503 whose body nests deeper than json can parse still reads as a 503 (-> 0xA700)."""
    response = parse_stow_response(503, "application/dicom+json", b'{"a":' * 50_000)
    assert (response.http_status, response.referenced, response.failed) == (503, {}, {})
