"""Pure codec for the few DICOM upper-layer PDUs and DIMSE commands a C-STORE SCU, and the
storage-only SCP (`store_scp.py`), need.

PS3.8 §9.3 (PDU layouts) and PS3.7 §9.3.1 / annex E (C-STORE command set, Implicit VR
Little Endian). No I/O: `store_scu.py` moves these bytes over asyncio streams. Why our own
and not pynetdicom's: per sub-operation pynetdicom costs ~2.5 ms of GIL time (message
objects, a DUL thread, a reactor thread); framing a file that is already encoded costs a
few struct.pack calls.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1495.1"
IMPLEMENTATION_VERSION = "DICOM_ADAPTER"

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_MOVE_RSP = 0x8021
C_GET_RSP = 0x8010
NO_DATASET = 0x0101

_HEAD = struct.Struct(">BBI")
_PDV_HEAD = struct.Struct(">BBIIBB")  # PDU type, reserved, PDU length, PDV length, ctx, ctrl
_ITEM = struct.Struct(">BBH")
_ELEMENT = struct.Struct("<HHI")

CONTEXT_RESULTS = {
    0: "acceptance",
    1: "user rejection",
    2: "no reason",
    3: "abstract syntax not supported",
    4: "transfer syntaxes not supported",
}


class PduError(ValueError):
    """Bytes that are not a well-formed PDU or command set."""


def pdu_header(pdu_type: int, length: int) -> bytes:
    """The 6-byte PDU header: type, reserved, big-endian length of what follows."""
    return _HEAD.pack(pdu_type, 0, length)


def parse_pdu_header(head: bytes) -> tuple[int, int]:
    """(PDU type, body length) of a 6-byte header."""
    if len(head) != 6:
        raise PduError("a PDU header is 6 bytes")
    pdu_type, _, length = _HEAD.unpack(head)
    return pdu_type, length


def _item(item_type: int, body: bytes) -> bytes:
    if len(body) > 0xFFFF:
        raise PduError(f"item 0x{item_type:02X} of {len(body)} bytes exceeds 65535")
    return _ITEM.pack(item_type, 0, len(body)) + body


def _ascii(text: str, what: str) -> bytes:
    """Text for the wire; AE titles and UIDs may come from peers or upstreams, so checked."""
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise PduError(f"{what} {text[:80]!r} is not ASCII") from None


def _ae_field(aet: str) -> bytes:
    raw = _ascii(aet, "AE title")
    if not 0 < len(raw) <= 16:
        raise PduError(f"AE title {aet!r} must be 1 to 16 characters")
    return raw.ljust(16, b" ")


@dataclass(frozen=True)
class ProposedContext:
    """One presentation context of an A-ASSOCIATE-RQ (ID odd, 1..255)."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


def associate_rq(
    calling_aet: str, called_aet: str, contexts: Sequence[ProposedContext], max_pdu: int
) -> bytes:
    """A whole A-ASSOCIATE-RQ PDU."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode("ascii"))]
    for cx in contexts:
        if not (1 <= cx.context_id <= 255 and cx.context_id % 2 == 1):
            raise PduError(f"presentation context ID {cx.context_id} is not odd in 1..255")
        sub = [_item(0x30, _ascii(cx.abstract_syntax, "abstract syntax"))]
        sub += [_item(0x40, _ascii(ts, "transfer syntax")) for ts in cx.transfer_syntaxes]
        items.append(_item(0x20, bytes([cx.context_id, 0, 0, 0]) + b"".join(sub)))
    user = [
        _item(0x51, struct.pack(">I", max_pdu)),
        _item(0x52, IMPLEMENTATION_CLASS_UID.encode("ascii")),
        _item(0x55, IMPLEMENTATION_VERSION.encode("ascii")),
    ]
    items.append(_item(0x50, b"".join(user)))
    body = (
        struct.pack(">HH", 1, 0)
        + _ae_field(called_aet)
        + _ae_field(calling_aet)
        + bytes(32)
        + b"".join(items)
    )
    return pdu_header(A_ASSOCIATE_RQ, len(body)) + body


@dataclass(frozen=True)
class ContextResult:
    """The acceptor's answer for one proposed presentation context."""

    context_id: int
    result: int
    transfer_syntax: str

    @property
    def accepted(self) -> bool:
        """True when the acceptor accepted the context."""
        return self.result == 0


@dataclass(frozen=True)
class AssociateAccept:
    """What an A-ASSOCIATE-AC says: context results and the peer's maximum PDU length."""

    contexts: tuple[ContextResult, ...]
    max_pdu: int  # 0 means no limit
    extra: dict[int, bytes] = field(default_factory=dict)


def _items(body: bytes, start: int) -> Iterator[tuple[int, bytes]]:
    pos = start
    while pos < len(body):
        if pos + 4 > len(body):
            raise PduError("truncated item header")
        item_type, _, length = _ITEM.unpack_from(body, pos)
        end = pos + 4 + length
        if end > len(body):
            raise PduError(f"item 0x{item_type:02X} runs past the end of the PDU")
        yield item_type, body[pos + 4 : end]
        pos = end


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace")


def parse_associate_ac(body: bytes) -> AssociateAccept:
    """Parse the body (after the 6-byte header) of an A-ASSOCIATE-AC."""
    if len(body) < 68:
        raise PduError("A-ASSOCIATE-AC is shorter than its fixed fields")
    results: list[ContextResult] = []
    max_pdu = 0
    for item_type, value in _items(body, 68):
        if item_type == 0x21:
            if len(value) < 4:
                raise PduError("truncated presentation context item")
            syntax = ""
            for sub_type, sub_value in _items(value, 4):
                if sub_type == 0x40:
                    syntax = _uid(sub_value)
            results.append(ContextResult(value[0], value[2], syntax))
        elif item_type == 0x50:
            for sub_type, sub_value in _items(value, 0):
                if sub_type == 0x51 and len(sub_value) == 4:
                    (max_pdu,) = struct.unpack(">I", sub_value)
    return AssociateAccept(tuple(results), max_pdu)


def describe_reject(body: bytes) -> str:
    """Human words for an A-ASSOCIATE-RJ body (result, source, reason)."""
    if len(body) < 4:
        return "rejected"
    result, source, reason = body[1], body[2], body[3]
    kind = "permanently" if result == 1 else "transiently"
    reasons = {
        (1, 2): "application context not supported",
        (1, 3): "calling AE title not recognized",
        (1, 7): "called AE title not recognized",
        (2, 2): "protocol version not supported",
        (3, 1): "temporary congestion",
        (3, 2): "local limit exceeded",
    }
    words = reasons.get((source, reason), f"source {source}, reason {reason}")
    return f"rejected {kind}: {words}"


@dataclass(frozen=True)
class AssociateRequest:
    """What an A-ASSOCIATE-RQ proposes (after `check_associate_rq` passed)."""

    called_aet: str  # trailing (and leading) spaces and NULs removed
    calling_aet: str
    application_context: str
    contexts: tuple[ProposedContext, ...]
    max_pdu: int  # the requestor's maximum PDU length; 0: no limit
    user_items: tuple[int, ...]  # types of the user information sub-items, in order
    raw_called: bytes  # the 16-byte fields, echoed in the A-ASSOCIATE-AC
    raw_calling: bytes


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """Parse the body (after the 6-byte header) of an A-ASSOCIATE-RQ."""
    if len(body) < 68:
        raise PduError("A-ASSOCIATE-RQ is shorter than its fixed fields")
    contexts: list[ProposedContext] = []
    application_context = ""
    max_pdu = 0
    user_items: list[int] = []
    for item_type, value in _items(body, 68):
        if item_type == 0x10:
            application_context = _uid(value)
        elif item_type == 0x20:
            if len(value) < 4:
                raise PduError("truncated presentation context item")
            abstract = ""
            syntaxes: list[str] = []
            for sub_type, sub_value in _items(value, 4):
                if sub_type == 0x30:
                    abstract = _uid(sub_value)
                elif sub_type == 0x40:
                    syntaxes.append(_uid(sub_value))
            contexts.append(ProposedContext(value[0], abstract, tuple(syntaxes)))
        elif item_type == 0x50:
            for sub_type, sub_value in _items(value, 0):
                user_items.append(sub_type)
                if sub_type == 0x51 and len(sub_value) == 4:
                    (max_pdu,) = struct.unpack(">I", sub_value)

    def aet(raw: bytes) -> str:
        return raw.decode("ascii", "replace").strip("\x00 ")

    return AssociateRequest(
        called_aet=aet(body[4:20]),
        calling_aet=aet(body[20:36]),
        application_context=application_context,
        contexts=tuple(contexts),
        max_pdu=max_pdu,
        user_items=tuple(user_items),
        raw_called=bytes(body[4:20]),
        raw_calling=bytes(body[20:36]),
    )


def associate_ac(
    request: AssociateRequest,
    results: Sequence[ContextResult],
    max_pdu: int,
    *,
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID,
    implementation_version: str = IMPLEMENTATION_VERSION,
) -> bytes:
    """A whole A-ASSOCIATE-AC PDU answering `request` (PS3.8 9.3.3): one item per proposed
    context, in `results`' order; `max_pdu` is the longest P-DATA we accept (0: no limit)."""
    items = [_item(0x10, _ascii(request.application_context, "application context"))]
    for result in results:
        syntax = _item(0x40, _ascii(result.transfer_syntax, "transfer syntax"))
        items.append(_item(0x21, bytes([result.context_id, 0, result.result, 0]) + syntax))
    user = [
        _item(0x51, struct.pack(">I", max_pdu)),
        _item(0x52, _ascii(implementation_class_uid, "implementation class UID")),
    ]
    if implementation_version:
        user.append(_item(0x55, _ascii(implementation_version, "implementation version")))
    items.append(_item(0x50, b"".join(user)))
    body = (
        struct.pack(">HH", 1, 0)
        + request.raw_called
        + request.raw_calling
        + bytes(32)
        + b"".join(items)
    )
    return pdu_header(A_ASSOCIATE_AC, len(body)) + body


def release_rq() -> bytes:
    """A-RELEASE-RQ."""
    return pdu_header(A_RELEASE_RQ, 4) + bytes(4)


def release_rp() -> bytes:
    """A-RELEASE-RP."""
    return pdu_header(A_RELEASE_RP, 4) + bytes(4)


def abort(source: int = 0, reason: int = 0) -> bytes:
    """A-ABORT (PS3.8 9.3.8): from the service user (source 0, no reason) unless told."""
    return pdu_header(A_ABORT, 4) + bytes((0, 0, source, reason))


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    return pdu_header(A_ASSOCIATE_RJ, 4) + bytes((0, result, source, reason))


# What the SCP answers an A-ASSOCIATE-RQ it will not hand to pynetdicom
MAX_ASSOCIATE_RQ = 65536  # bytes after the header; 128 contexts of long UIDs fit in ~20 KiB
MAX_RQ_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context IDs 1-255
MAX_TRANSFER_SYNTAXES = 64  # per presentation context
REJECT_PERMANENT = associate_rj(1, 1, 1)  # permanent, service user, no reason given
ABORT_UNEXPECTED_PDU = abort(2, 1)  # provider: unrecognized PDU
ABORT_UNEXPECTED_PARAMETER = abort(2, 2)  # provider (also: a PDU longer than allowed)
ABORT_INVALID_PARAMETER = abort(2, 6)


class Refusal(PduError):
    """Why an A-ASSOCIATE-RQ is refused, and the PDU that says so to the peer."""

    def __init__(self, reason: str, answer: bytes) -> None:
        super().__init__(reason)
        self.answer = answer


def _rq_items(body: bytes, start: int) -> Iterator[tuple[int, bytes]]:
    """`_items`, with a malformed item refused by A-ABORT (invalid parameter value)."""
    try:
        yield from _items(body, start)
    except Refusal:
        raise
    except PduError as exc:
        raise Refusal(str(exc), ABORT_INVALID_PARAMETER) from None


def _check_uid(value: bytes, what: str) -> None:
    if len(value) > 64:
        raise Refusal(f"{what} longer than 64 characters", REJECT_PERMANENT)
    raw = value.rstrip(b"\0")
    if not raw or any(c not in b"0123456789." for c in raw):
        raise Refusal(f"{what} is not a UID", REJECT_PERMANENT)


def _check_ae_title(raw: bytes, what: str) -> None:
    raw = raw.rstrip(b"\0 ")  # some implementations pad with NUL instead of spaces
    if any(c < 0x20 or c > 0x7E or c == 0x5C for c in raw) or not raw.strip(b" "):
        raise Refusal(f"{what} is not an AE title", REJECT_PERMANENT)


def check_associate_rq(body: bytes) -> None:
    """Refusal unless `body` (after the 6-byte header) is a sane A-ASSOCIATE-RQ.

    Structure (every item inside its parent, fixed fields present) and bounds (AE titles,
    UID lengths, at most 128 presentation contexts); the rest is pynetdicom's job.
    """
    if len(body) < 68:
        raise Refusal("shorter than its fixed fields", ABORT_INVALID_PARAMETER)
    _check_ae_title(body[4:20], "called AE title")
    _check_ae_title(body[20:36], "calling AE title")
    contexts = 0
    for item_type, value in _rq_items(body, 68):
        if item_type == 0x10:
            _check_uid(value, "application context name")
        elif item_type == 0x20:
            contexts += 1
            if contexts > MAX_RQ_CONTEXTS:
                raise Refusal(
                    f"more than {MAX_RQ_CONTEXTS} presentation contexts", REJECT_PERMANENT
                )
            if len(value) < 4:
                raise Refusal("truncated presentation context", ABORT_INVALID_PARAMETER)
            syntaxes = 0
            for sub_type, sub_value in _rq_items(value, 4):
                if sub_type == 0x30:
                    _check_uid(sub_value, "abstract syntax")
                elif sub_type == 0x40:
                    syntaxes += 1
                    if syntaxes > MAX_TRANSFER_SYNTAXES:
                        raise Refusal("too many transfer syntaxes", REJECT_PERMANENT)
                    _check_uid(sub_value, "transfer syntax")
        elif item_type == 0x50:
            for sub_type, sub_value in _rq_items(value, 0):
                if sub_type == 0x52:
                    _check_uid(sub_value, "implementation class UID")
        # other item types: pynetdicom decides (PS3.8 leaves room for new ones)


def pdv_header(context_id: int, fragment_length: int, *, command: bool, last: bool) -> bytes:
    """Header of a P-DATA-TF PDU carrying exactly one PDV of `fragment_length` bytes."""
    control = (1 if command else 0) | (2 if last else 0)
    return _PDV_HEAD.pack(
        P_DATA_TF, 0, fragment_length + 6, fragment_length + 2, context_id, control
    )


WRITE_GROUP = 256 << 10  # bytes of PDUs handed to one socket write


def framed_groups(
    context_id: int,
    data: bytes | bytearray | memoryview,
    fragment: int,
    *,
    last: bool,
    prefix: Sequence[bytes | memoryview] = (),
    group_bytes: int = WRITE_GROUP,
) -> Iterator[list[bytes | memoryview]]:
    """P-DATA-TF PDUs (one data set PDV each, at most `fragment` bytes) carrying `data`, in
    groups of about `group_bytes` for one write each; `prefix` (e.g. the command's PDUs)
    leads the first group. `last`: the final fragment ends the data set."""
    view = memoryview(data)
    total = len(view)
    group: list[bytes | memoryview] = list(prefix)
    if total == 0 and last:
        group.append(pdv_header(context_id, 0, command=False, last=True))
    pos = grouped = 0
    while pos < total:
        end = min(pos + fragment, total)
        group.append(pdv_header(context_id, end - pos, command=False, last=last and end == total))
        group.append(view[pos:end])
        grouped += end - pos
        pos = end
        if grouped >= group_bytes and pos < total:
            yield group
            group, grouped = [], 0
    if group:
        yield group


def max_fragment(peer_max_pdu: int, cap: int = 1 << 20) -> int:
    """Largest PDV fragment the peer accepts (its limit counts the 6-byte PDV item header).

    Always even: PS3.8 E.1 wants every fragment of a message to be an even number of bytes
    (DCMTK aborts on an odd one), and a peer may announce an odd maximum PDU length.
    """
    if peer_max_pdu == 0:
        return cap & ~1
    if peer_max_pdu < 8:
        raise PduError(f"peer maximum PDU length {peer_max_pdu} is too small")
    return min(peer_max_pdu - 6, cap) & ~1


@dataclass(frozen=True)
class Pdv:
    """One presentation data value item of a P-DATA-TF."""

    context_id: int
    command: bool
    last: bool
    data: bytes


def parse_p_data(body: bytes) -> list[Pdv]:
    """The PDV items of a P-DATA-TF body."""
    pdvs: list[Pdv] = []
    pos = 0
    while pos < len(body):
        if pos + 6 > len(body):
            raise PduError("truncated PDV item")
        (length,) = struct.unpack_from(">I", body, pos)
        if length < 2 or pos + 4 + length > len(body):
            raise PduError("PDV item length does not fit the PDU")
        context_id, control = body[pos + 4], body[pos + 5]
        pdvs.append(
            Pdv(context_id, bool(control & 1), bool(control & 2), body[pos + 6 : pos + 4 + length])
        )
        pos += 4 + length
    return pdvs


def _element(group: int, elem: int, value: bytes) -> bytes:
    return _ELEMENT.pack(group, elem, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = _ascii(uid, "UID")
    if len(raw) > 64:  # PS3.5 6.2: peers reject (pynetdicom aborts on) a longer UID
        raise PduError(f"UID {uid[:80]!r} is longer than 64 characters")
    return raw + b"\x00" if len(raw) % 2 else raw


def encodable_uid(uid: str) -> bool:
    """True when `uid` can go into a DIMSE command or association item (ASCII, <= 64 chars)."""
    try:
        _ui(uid)
    except PduError:
        return False
    return True


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def c_store_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    priority: int = 0,
    move_originator_aet: str = "",
    move_originator_message_id: int | None = None,
) -> bytes:
    """The C-STORE-RQ command set (Implicit VR Little Endian), data set present."""
    elements = [
        _element(0x0000, 0x0002, _ui(sop_class_uid)),
        _element(0x0000, 0x0100, _us(C_STORE_RQ)),
        _element(0x0000, 0x0110, _us(message_id)),
        _element(0x0000, 0x0700, _us(priority)),
        _element(0x0000, 0x0800, _us(0x0000)),
        _element(0x0000, 0x1000, _ui(sop_instance_uid)),
    ]
    if move_originator_aet:
        aet = _ascii(move_originator_aet, "move originator AE title")
        elements.append(_element(0x0000, 0x1030, aet + b" " if len(aet) % 2 else aet))
    if move_originator_message_id is not None:
        elements.append(_element(0x0000, 0x1031, _us(move_originator_message_id)))
    rest = b"".join(elements)
    return _element(0x0000, 0x0000, struct.pack("<I", len(rest))) + rest


def _response(
    command_field: int, message_id_responded_to: int, sop_class_uid: str | None, status: int
) -> list[bytes]:
    """The leading elements of a response without data set, in tag order."""
    elements = []
    if sop_class_uid is not None:
        elements.append(_element(0x0000, 0x0002, _ui(sop_class_uid)))
    elements += [
        _element(0x0000, 0x0100, _us(command_field)),
        _element(0x0000, 0x0120, _us(message_id_responded_to)),
        _element(0x0000, 0x0800, _us(NO_DATASET)),
        _element(0x0000, 0x0900, _us(status)),
    ]
    return elements


def _command(elements: list[bytes]) -> bytes:
    rest = b"".join(elements)
    return _element(0x0000, 0x0000, struct.pack("<I", len(rest))) + rest


def c_store_rsp(
    message_id_responded_to: int,
    sop_class_uid: str | None,
    sop_instance_uid: str | None,
    status: int,
    *,
    error_comment: str | None = None,
) -> bytes:
    """The C-STORE-RSP command set, the bytes pynetdicom's encoder gives for the same fields
    (tag order; absent UIDs left out; ErrorComment LO padded with a space). PduError for what
    this encoder does not carry (non-ASCII or over-long text): use pynetdicom's then."""
    elements = _response(C_STORE_RSP, message_id_responded_to, sop_class_uid, status)
    if error_comment is not None:
        text = _ascii(error_comment, "ErrorComment")
        if len(text) > 64 or any(byte < 0x20 for byte in text):
            raise PduError("ErrorComment is not plain LO text")
        elements.append(_element(0x0000, 0x0902, text + b" " if len(text) % 2 else text))
    if sop_instance_uid is not None:
        elements.append(_element(0x0000, 0x1000, _ui(sop_instance_uid)))
    return _command(elements)


def c_echo_rsp(message_id_responded_to: int, sop_class_uid: str | None, status: int) -> bytes:
    """The C-ECHO-RSP command set (PS3.7 9.3.5.2), the bytes pynetdicom's encoder gives."""
    return _command(_response(C_ECHO_RSP, message_id_responded_to, sop_class_uid, status))


def sub_operation_count(value: int) -> int:
    """A sub-operation count as its US element can carry it: 0-65535 (a retrieve of more
    instances, or a server's count that large, reports 65535 until fewer remain)."""
    return max(0, min(value, 0xFFFF))


def c_move_pending_rsp(
    message_id_responded_to: int,
    sop_class_uid: str,
    status: int,
    *,
    remaining: int,
    completed: int,
    failed: int,
    warning: int,
    command_field: int = C_MOVE_RSP,
) -> bytes:
    """A C-MOVE-RSP (or, with `command_field`, C-GET-RSP) command set without identifier
    (pending responses carry only counts)."""
    rest = b"".join(
        [
            _element(0x0000, 0x0002, _ui(sop_class_uid)),
            _element(0x0000, 0x0100, _us(command_field)),
            _element(0x0000, 0x0120, _us(message_id_responded_to)),
            _element(0x0000, 0x0800, _us(NO_DATASET)),
            _element(0x0000, 0x0900, _us(status)),
            _element(0x0000, 0x1020, _us(sub_operation_count(remaining))),
            _element(0x0000, 0x1021, _us(sub_operation_count(completed))),
            _element(0x0000, 0x1022, _us(sub_operation_count(failed))),
            _element(0x0000, 0x1023, _us(sub_operation_count(warning))),
        ]
    )
    return _element(0x0000, 0x0000, struct.pack("<I", len(rest))) + rest


@dataclass(frozen=True)
class CommandSet:
    """The fields of a received command set that a C-STORE SCU or the storage SCP look at."""

    command_field: int
    message_id_responded_to: int | None
    status: int | None
    error_comment: str
    message_id: int | None = None
    data_set_present: bool = False  # CommandDataSetType other than 0x0101
    affected_sop_class_uid: str | None = None  # None: absent
    affected_sop_instance_uid: str | None = None


def parse_command(raw: bytes) -> CommandSet:
    """Decode an Implicit VR Little Endian command set (group 0000 only)."""
    values: dict[int, bytes] = {}
    pos = 0
    while pos < len(raw):
        if pos + 8 > len(raw):
            raise PduError("truncated command element")
        group, elem, length = _ELEMENT.unpack_from(raw, pos)
        if group != 0x0000 or pos + 8 + length > len(raw):
            raise PduError(f"bad command element ({group:04X},{elem:04X})")
        values[elem] = raw[pos + 8 : pos + 8 + length]
        pos += 8 + length

    def us(elem: int) -> int | None:
        value = values.get(elem)
        return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None

    command_field = us(0x0100)
    if command_field is None:
        raise PduError("command set has no CommandField")

    def uid(elem: int) -> str | None:
        value = values.get(elem)
        return None if value is None else _uid(value)

    comment = values.get(0x0902, b"").rstrip(b"\x00 ").decode("ascii", "replace")
    data_set_type = us(0x0800)
    return CommandSet(
        command_field,
        us(0x0120),
        us(0x0900),
        comment,
        message_id=us(0x0110),
        data_set_present=data_set_type is not None and data_set_type != NO_DATASET,
        affected_sop_class_uid=uid(0x0002),
        affected_sop_instance_uid=uid(0x1000),
    )
