"""The A-ASSOCIATE-RQ check (dimse/pdu.py) of the pre-negotiation stage (pure, no sockets)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicom_adapter.dimse.pdu import (
    REJECT_PERMANENT,
    Refusal,
    check_associate_rq,
)


def item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def rq_body(
    *,
    called: bytes = b"ADAPTER",
    calling: bytes = b"PEER",
    contexts: int = 1,
    abstract_syntax: bytes = b"1.2.840.10008.1.1",
    syntaxes: int = 1,
) -> bytes:
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
    body += item(0x10, b"1.2.840.10008.3.1.1.1")
    for index in range(contexts):
        body += item(
            0x20,
            bytes(((2 * index + 1) & 0xFF, 0, 0, 0))
            + item(0x30, abstract_syntax)
            + b"".join(item(0x40, b"1.2.840.10008.1.2") for _ in range(syntaxes)),
        )
    return body + item(0x50, item(0x51, struct.pack(">I", 16384)))


def test_a_normal_request_passes() -> None:
    check_associate_rq(rq_body(contexts=128))
    check_associate_rq(rq_body(calling=b"PEER\0\0\0\0"))  # NUL padding seen in the field


@pytest.mark.parametrize(
    "body",
    [
        rq_body(contexts=129),
        rq_body(syntaxes=65),
        rq_body(abstract_syntax=b"1." * 40),
        rq_body(abstract_syntax=b"not-a-uid"),
        rq_body(calling=b"\x1b[2J"),
        rq_body(called=b" " * 16),
    ],
)
def test_out_of_bounds_requests_are_rejected(body: bytes) -> None:
    with pytest.raises(Refusal) as refused:
        check_associate_rq(body)
    assert refused.value.answer == REJECT_PERMANENT


def test_an_item_running_past_its_parent_is_aborted() -> None:
    body = rq_body()
    with pytest.raises(Refusal) as refused:
        check_associate_rq(body[:-3])
    assert refused.value.answer[0] == 0x07  # A-ABORT


@given(st.binary(max_size=2048))
def test_any_bytes_pass_or_raise_refusal_only(data: bytes) -> None:
    with contextlib.suppress(Refusal):
        check_associate_rq(rq_body()[:68] + data)
