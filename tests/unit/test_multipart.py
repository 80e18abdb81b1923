"""Unit tests for the pure multipart/related codec in dicom_adapter.dicomweb.multipart."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator

import pytest

from dicom_adapter.dicomweb.multipart import (
    Event,
    MultipartError,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    body_tail,
    boundary_from_content_type,
    new_boundary,
    parse_content_type,
    part_head,
    related_content_type,
)

BOUNDARY = "dicomadapter-0123456789abcdef0123456789abcdef"
DELIM = b"\r\n--" + BOUNDARY.encode()

Part = tuple[dict[str, str], bytes]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def build_body(
    payloads: Iterable[bytes],
    boundary: str = BOUNDARY,
    part_type: str = "application/dicom",
    preamble: bytes = b"",
    epilogue: bytes = b"",
) -> bytes:
    """Build a multipart body the way a streaming producer would."""
    out = bytearray(preamble)
    for i, payload in enumerate(payloads):
        out += part_head(boundary, part_type, first=(i == 0 and not preamble))
        out += payload
    out += body_tail(boundary)
    out += epilogue
    return bytes(out)


def collect(events: Iterable[Event]) -> list[Part]:
    """Fold an event stream into (headers, body) pairs, checking event ordering rules."""
    parts: list[Part] = []
    current: tuple[dict[str, str], bytearray] | None = None
    for ev in events:
        if isinstance(ev, PartStart):
            assert current is None, "PartStart while a part is open"
            current = (ev.headers, bytearray())
        elif isinstance(ev, PartData):
            assert current is not None, "PartData outside a part"
            assert isinstance(ev.data, bytes)
            assert len(ev.data) > 0, "empty PartData emitted"
            current[1].extend(ev.data)
        else:
            assert isinstance(ev, PartEnd)
            assert current is not None, "PartEnd outside a part"
            parts.append((current[0], bytes(current[1])))
            current = None
    assert current is None, "part left open"
    return parts


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    """Yield ``data`` in pieces of ``size`` bytes."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def parse_chunks(pieces: Iterable[bytes], boundary: str = BOUNDARY) -> list[Part]:
    """Feed pieces into a fresh parser, close it and return the collected parts."""
    parser = MultipartParser(boundary)
    events: list[Event] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    parser.close()
    assert parser.done
    return collect(events)


def parse_all(data: bytes, boundary: str = BOUNDARY) -> list[Part]:
    """Parse ``data`` fed in one chunk."""
    return parse_chunks([data], boundary)


DICOM_HEADERS = {"content-type": "application/dicom"}


def tricky_payloads() -> list[bytes]:
    """Payloads that stress delimiter detection, plus random binary blobs."""
    rng = random.Random(20240611)
    b = BOUNDARY.encode()
    payloads = [
        b"",
        b"\r\n--",
        b"\r\n--" + b[:-1],  # almost a delimiter, at the very end of the part
        b"\r\n--" + b + b"X",  # delimiter text followed by more boundary chars: data
        b"\r\n--" + b + b"-X",  # a single dash after boundary text: data
        b"--" + b + b"\r\n",  # boundary not preceded by CRLF: data
        b"x--" + b + b"--\r\n",  # close-delimiter-like text not preceded by CRLF: data
        b"\r\n--other-boundary\r\n",
        b"\r\r\r\n\n\n--\r\n-",
        b"\r",
        b"\r\n",
        b"\n--" + b + b"\r\n",  # LF only before the dashes: data
        b"trailing CR\r",
        b"\x00" * 10,
    ]
    for n in (1, 7, 64, 333, 1024):
        payloads.append(rng.randbytes(n))
    # Random blob sprinkled with delimiter prefixes of every length.
    blob = bytearray()
    for k in range(len(DELIM)):
        blob += rng.randbytes(rng.randint(0, 5)) + DELIM[:k]
    payloads.append(bytes(blob))
    for p in payloads:
        assert DELIM + b"\r\n" not in p and DELIM + b"--" not in p
    return payloads


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------


def test_new_boundary_format_and_uniqueness() -> None:
    seen = {new_boundary() for _ in range(200)}
    assert len(seen) == 200
    for b in seen:
        assert re.fullmatch(r"dicomadapter-[0-9a-f]{32}", b), b
        assert len(b) <= 70  # RFC 2046 limit


def test_new_boundary_round_trips_through_content_type() -> None:
    b = new_boundary()
    assert boundary_from_content_type(related_content_type(b)) == b


def test_related_content_type_exact() -> None:
    assert related_content_type("abc") == (
        'multipart/related; type="application/dicom"; boundary=abc'
    )
    assert related_content_type("abc", "application/dicom+json") == (
        'multipart/related; type="application/dicom+json"; boundary=abc'
    )


def test_related_content_type_quotes_boundary_with_special_chars() -> None:
    value = related_content_type("a b:c")
    assert value == 'multipart/related; type="application/dicom"; boundary="a b:c"'
    assert boundary_from_content_type(value) == "a b:c"


def test_part_head_and_body_tail_exact() -> None:
    assert part_head("B") == b"--B\r\nContent-Type: application/dicom\r\n\r\n"
    assert part_head("B", first=True) == b"--B\r\nContent-Type: application/dicom\r\n\r\n"
    assert part_head("B", first=False) == b"\r\n--B\r\nContent-Type: application/dicom\r\n\r\n"
    assert part_head("xyz", "application/octet-stream", first=False) == (
        b"\r\n--xyz\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    assert body_tail("B") == b"\r\n--B--\r\n"


# --------------------------------------------------------------------------------------------
# content type parsing
# --------------------------------------------------------------------------------------------


def test_parse_content_type_quoted() -> None:
    assert parse_content_type('multipart/related; type="application/dicom"; boundary="abc"') == (
        "multipart/related",
        {"type": "application/dicom", "boundary": "abc"},
    )


def test_parse_content_type_unquoted_and_case() -> None:
    assert parse_content_type("Multipart/Related; TYPE=application/dicom; Boundary=AbC") == (
        "multipart/related",
        {"type": "application/dicom", "boundary": "AbC"},
    )


def test_parse_content_type_whitespace_tolerant() -> None:
    value = '  multipart/related ;type = "application/dicom" ;  boundary =  abc  ; '
    assert parse_content_type(value) == (
        "multipart/related",
        {"type": "application/dicom", "boundary": "abc"},
    )
    assert parse_content_type("\tapplication/json\t") == ("application/json", {})


def test_parse_content_type_semicolon_and_escapes_in_quotes() -> None:
    value = r'multipart/related; type="application/dicom; transfer-syntax=*"; a="x\"y\\z"; b=1'
    assert parse_content_type(value) == (
        "multipart/related",
        {"type": "application/dicom; transfer-syntax=*", "a": 'x"y\\z', "b": "1"},
    )


def test_parse_content_type_empty_values_and_odd_params() -> None:
    assert parse_content_type('multipart/related; boundary=""; ; flag; x=') == (
        "multipart/related",
        {"boundary": "", "x": ""},
    )
    # First occurrence of a duplicated parameter wins.
    assert parse_content_type("text/plain; charset=a; CHARSET=b")[1] == {"charset": "a"}


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "; boundary=abc",
        'multipart/related; boundary="abc',
        'multipart/related; boundary="abc\\',
        'multipart/related; boundary="abc"def',
        "multipart/related; =abc",
    ],
)
def test_parse_content_type_rejects_malformed(value: str) -> None:
    with pytest.raises(MultipartError):
        parse_content_type(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('multipart/related; type="application/dicom"; boundary="abc"', "abc"),
        ("multipart/related; type=application/dicom; boundary=abc", "abc"),
        ("MULTIPART/RELATED; BOUNDARY=MixedCase", "MixedCase"),
        ('multipart/mixed; boundary="with space; and semicolon"', "with space; and semicolon"),
        ("multipart/form-data;boundary=x", "x"),
    ],
)
def test_boundary_from_content_type(value: str, expected: str) -> None:
    assert boundary_from_content_type(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('multipart/related; type="application/dicom"', "no boundary"),
        ('multipart/related; boundary=""', "no boundary"),
        ("multipart/related; boundary=", "no boundary"),
        ("application/dicom; boundary=abc", "multipart"),
        ("application/json", "multipart"),
        ("multipartrelated; boundary=abc", "multipart"),
        ("", "empty media type"),
    ],
)
def test_boundary_from_content_type_errors(value: str, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        boundary_from_content_type(value)


def test_multipart_error_is_value_error() -> None:
    assert issubclass(MultipartError, ValueError)


# --------------------------------------------------------------------------------------------
# parser: round trips and chunking
# --------------------------------------------------------------------------------------------


def test_simple_two_parts_single_feed() -> None:
    parser = MultipartParser(BOUNDARY)
    body = build_body([b"first", b"second part"])
    events = parser.feed(body)
    assert events == [
        PartStart(DICOM_HEADERS),
        PartData(b"first"),
        PartEnd(),
        PartStart(DICOM_HEADERS),
        PartData(b"second part"),
        PartEnd(),
    ]
    assert parser.done
    parser.close()


def test_round_trip_single_feed() -> None:
    payloads = tricky_payloads()
    assert parse_all(build_body(payloads)) == [(DICOM_HEADERS, p) for p in payloads]


@pytest.mark.parametrize("size", range(1, 41))
def test_round_trip_every_chunk_size(size: int) -> None:
    payloads = tricky_payloads()
    body = build_body(payloads, preamble=b"preamble\r\n", epilogue=b"\r\nepilogue")
    assert parse_chunks(chunks_of(body, size)) == [(DICOM_HEADERS, p) for p in payloads]


def test_round_trip_random_chunking() -> None:
    payloads = tricky_payloads()
    body = build_body(payloads)
    expected = [(DICOM_HEADERS, p) for p in payloads]
    rng = random.Random(7)
    for _ in range(50):
        pieces: list[bytes] = []
        i = 0
        while i < len(body):
            n = rng.randint(1, 300)
            pieces.append(body[i : i + n])
            i += n
        assert parse_chunks(pieces) == expected


def test_every_single_split_offset_small_body() -> None:
    b = BOUNDARY.encode()
    payloads = [b"ab\r\n--" + b[:5], b"", b"\r\n--" + b + b"z\r\n"]
    body = build_body(payloads, preamble=b"pre", epilogue=b"post")
    expected = [(DICOM_HEADERS, p) for p in payloads]
    for cut in range(len(body) + 1):
        assert parse_chunks([body[:cut], body[cut:]]) == expected, cut


def test_every_double_split_offset_tiny_body() -> None:
    payloads = [b"\r\n-", b"x"]
    body = build_body(payloads, boundary="b")
    expected = [(DICOM_HEADERS, p) for p in payloads]
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1):
            assert parse_chunks([body[:i], body[i:j], body[j:]], "b") == expected, (i, j)


def test_many_parts_in_one_chunk() -> None:
    payloads = [str(i).encode() * (i % 5) for i in range(300)]
    assert parse_all(build_body(payloads)) == [(DICOM_HEADERS, p) for p in payloads]


def test_data_emitted_immediately_when_it_cannot_start_a_delimiter() -> None:
    parser = MultipartParser("B")
    assert parser.feed(b"--B\r\n\r\n") == [PartStart({})]
    assert parser.feed(b"abc") == [PartData(b"abc")]
    assert parser._buf == b""
    # A trailing partial delimiter is held back; the data before it is not.
    assert parser.feed(b"def\r\n-") == [PartData(b"def")]
    assert parser._buf == b"\r\n-"
    # Once the held bytes can no longer be a delimiter they are released.
    assert parser.feed(b"x") == [PartData(b"\r\n-x")]
    assert parser._buf == b""
    # A CR not at the tail of the window is not held back.
    assert parser.feed(b"\rab") == [PartData(b"\rab")]
    assert parser.feed(b"\r\n--B--") == [PartEnd()]
    assert parser.done


def test_boundary_text_inside_data_is_data() -> None:
    body = (
        b"--B\r\n\r\n"
        b"a--B\r\n"  # not preceded by CRLF
        b"\r\n--C\r\n"  # CRLF + dashes + other text
        b"\r\n--BB\r\n"  # boundary is a prefix of a longer token
        b"\r\n--B-\r\n"  # single dash after boundary
        b"\r\n--B--\r\n"
    )
    assert parse_all(body, "B") == [({}, b"a--B\r\n\r\n--C\r\n\r\n--BB\r\n\r\n--B-\r\n")]


# --------------------------------------------------------------------------------------------
# parser: framing details
# --------------------------------------------------------------------------------------------


def test_preamble_is_ignored() -> None:
    preamble = b"This is a preamble.\r\n--B is not at line start\r\n--BX\r\n--B-y\r\n\r\n"
    body = build_body([b"payload"], boundary="B", preamble=preamble)
    assert body.startswith(preamble + b"\r\n--B\r\n")
    assert parse_all(body, "B") == [(DICOM_HEADERS, b"payload")]
    for size in (1, 2, 3, 5):
        assert parse_chunks(chunks_of(body, size), "B") == [(DICOM_HEADERS, b"payload")]


def test_preamble_is_not_held_in_memory() -> None:
    parser = MultipartParser("B")
    for _ in range(1000):
        assert parser.feed(b"x" * 1000 + b"\r\n--") == []
        assert len(parser._buf) <= len(b"\r\n--B")
    assert parser.feed(b"B\r\n\r\nz\r\n--B--") == [PartStart({}), PartData(b"z"), PartEnd()]


def test_epilogue_is_ignored_and_feed_after_done_is_noop() -> None:
    epilogue = b"\r\nepilogue\r\n--B\r\n\r\nnot a part\r\n--B--\r\n"
    body = build_body([b"one"], boundary="B", epilogue=epilogue)
    parser = MultipartParser("B")
    events = parser.feed(body)
    assert collect(events) == [(DICOM_HEADERS, b"one")]
    assert parser.done
    assert parser._buf == b""
    assert parser.feed(b"\r\n--B\r\n\r\nmore\r\n--B--") == []
    assert parser.done
    parser.close()
    parser.close()  # idempotent


def test_close_delimiter_without_trailing_crlf() -> None:
    assert parse_all(b"--B\r\n\r\nabc\r\n--B--", "B") == [({}, b"abc")]


def test_body_with_only_close_delimiter() -> None:
    parser = MultipartParser("B")
    assert parser.feed(b"--B--\r\n") == []
    assert parser.done


def test_transport_padding() -> None:
    body = b"--B \t \r\nContent-Type: a/b\r\n\r\none\r\n--B\t\r\n\r\ntwo\r\n--B--  \r\n"
    expected = [({"content-type": "a/b"}, b"one"), ({}, b"two")]
    assert parse_all(body, "B") == expected
    for size in range(1, 8):
        assert parse_chunks(chunks_of(body, size), "B") == expected


def test_excessive_transport_padding_raises() -> None:
    parser = MultipartParser("B")
    with pytest.raises(MultipartError, match="padding"):
        parser.feed(b"--B" + b" " * 5000 + b"\r\n\r\n")


def test_excessive_transport_padding_raises_when_streamed() -> None:
    parser = MultipartParser("B")
    parser.feed(b"--B")
    with pytest.raises(MultipartError, match="padding"):
        for _ in range(5000):
            parser.feed(b" ")
            assert len(parser._buf) < 4096


def test_headers_case_whitespace_folding_and_duplicates() -> None:
    body = (
        b"--B\r\n"
        b"CONTENT-TYPE:   application/dicom; transfer-syntax=1.2.840.10008.1.2.1  \r\n"
        b"content-location :  http://x/y\t\r\n"
        b"X-Folded: first\r\n"
        b"   second\r\n"
        b"X-Dup: 1\r\n"
        b"x-dup: 2\r\n"
        b"X-Empty:\r\n"
        b"\r\n"
        b"body"
        b"\r\n--B--\r\n"
    )
    assert parse_all(body, "B") == [
        (
            {
                "content-type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
                "content-location": "http://x/y",
                "x-folded": "first second",
                "x-dup": "1, 2",
                "x-empty": "",
            },
            b"body",
        )
    ]


def test_header_values_non_ascii() -> None:
    body = "--B\r\nX-Name: Ünïcode\r\n\r\nz\r\n--B--".encode()
    assert parse_all(body, "B") == [({"x-name": "Ünïcode"}, b"z")]
    body = b"--B\r\nX-Name: \xff\r\n\r\nz\r\n--B--"
    assert parse_all(body, "B") == [({"x-name": "\xff"}, b"z")]


def test_bare_lf_in_delimiter_lines_and_headers() -> None:
    body = b"--B\nContent-Type: a/b\nX-Other: c\n\nbody1\r\n--B\n\nbody2\r\n--B--\n"
    expected = [({"content-type": "a/b", "x-other": "c"}, b"body1"), ({}, b"body2")]
    assert parse_all(body, "B") == expected
    for size in (1, 2, 3):
        assert parse_chunks(chunks_of(body, size), "B") == expected


def test_empty_parts() -> None:
    # No headers and no body; headers and no body; no headers with body.
    body = b"--B\r\n\r\n\r\n--B\r\nContent-Type: a/b\r\n\r\n\r\n--B\r\n\r\nx\r\n--B--\r\n"
    expected: list[Part] = [({}, b""), ({"content-type": "a/b"}, b""), ({}, b"x")]
    for size in range(1, 10):
        parser = MultipartParser("B")
        events: list[Event] = []
        for piece in chunks_of(body, size):
            events.extend(parser.feed(piece))
        parser.close()
        assert collect(events) == expected
        assert not any(isinstance(e, PartData) and not e.data for e in events)
    parser = MultipartParser("B")
    assert parser.feed(body) == [
        PartStart({}),
        PartEnd(),
        PartStart({"content-type": "a/b"}),
        PartEnd(),
        PartStart({}),
        PartData(b"x"),
        PartEnd(),
    ]


def test_body_starting_with_crlf_is_preserved() -> None:
    payloads = [b"\r\n", b"\r\n\r\nabc", b"\r\n--"]
    assert parse_all(build_body(payloads)) == [(DICOM_HEADERS, p) for p in payloads]


# --------------------------------------------------------------------------------------------
# parser: errors
# --------------------------------------------------------------------------------------------


def test_truncated_body_close_raises_for_every_prefix() -> None:
    body = build_body([b"abc", b"\r\n--" + BOUNDARY.encode() + b"X"], preamble=b"pre\r\n")
    complete_at = body.index(DELIM + b"--") + len(DELIM) + 2
    for cut in range(len(body) + 1):
        parser = MultipartParser(BOUNDARY)
        parser.feed(body[:cut])
        if cut >= complete_at:
            assert parser.done, cut
            parser.close()
        else:
            assert not parser.done, cut
            with pytest.raises(MultipartError, match="truncated"):
                parser.close()


def test_close_on_empty_input_raises() -> None:
    parser = MultipartParser("B")
    assert parser.feed(b"") == []
    with pytest.raises(MultipartError, match="truncated"):
        parser.close()


def test_header_overflow_raises() -> None:
    parser = MultipartParser("B", max_header_bytes=100)
    with pytest.raises(MultipartError, match="exceeds 100 bytes"):
        parser.feed(b"--B\r\nX-Big: " + b"a" * 200 + b"\r\n\r\nbody\r\n--B--")


def test_header_overflow_raises_when_streamed_without_terminator() -> None:
    parser = MultipartParser("B", max_header_bytes=1000)
    parser.feed(b"--B\r\nX-Big: ")
    with pytest.raises(MultipartError, match="exceeds"):
        for _ in range(10_000):
            parser.feed(b"a" * 10)
            assert len(parser._buf) <= 1000 + 20


def test_header_limit_boundary() -> None:
    # Header section = header line + CRLF + blank line CRLF.
    line = b"X: " + b"a" * 91  # 94 bytes, section = 94 + 2 + 2 = 98
    ok = b"--B\r\n" + line + b"\r\n\r\nz\r\n--B--"
    assert parse_chunks([ok], "B") == [({"x": "a" * 91}, b"z")]
    parser = MultipartParser("B", max_header_bytes=98)
    assert collect(parser.feed(ok)) == [({"x": "a" * 91}, b"z")]
    parser = MultipartParser("B", max_header_bytes=97)
    with pytest.raises(MultipartError, match="exceeds 97 bytes"):
        parser.feed(ok)
    parser = MultipartParser("B", max_header_bytes=97)
    with pytest.raises(MultipartError, match="exceeds 97 bytes"):
        for piece in chunks_of(ok, 1):
            parser.feed(piece)


@pytest.mark.parametrize(
    "headers",
    [b"no colon here", b" leading continuation: x", b": no name"],
)
def test_malformed_header_line_raises(headers: bytes) -> None:
    parser = MultipartParser("B")
    with pytest.raises(MultipartError, match="header"):
        parser.feed(b"--B\r\n" + headers + b"\r\n\r\nbody\r\n--B--")


def test_parser_fails_permanently_after_error() -> None:
    parser = MultipartParser("B", max_header_bytes=10)
    with pytest.raises(MultipartError):
        parser.feed(b"--B\r\nX-Long-Header: value\r\n\r\n")
    assert not parser.done
    with pytest.raises(MultipartError, match="failed state"):
        parser.feed(b"more")
    with pytest.raises(MultipartError, match="failed state"):
        parser.close()


@pytest.mark.parametrize("boundary", ["", "a\r\nb", "a\nb", "bö"])
def test_invalid_boundary_rejected(boundary: str) -> None:
    with pytest.raises(MultipartError):
        MultipartParser(boundary)


def test_invalid_max_header_bytes_rejected() -> None:
    with pytest.raises(ValueError):
        MultipartParser("B", max_header_bytes=0)


# --------------------------------------------------------------------------------------------
# parser: memory and performance
# --------------------------------------------------------------------------------------------


def test_large_streamed_part_bounded_memory() -> None:
    mib = 1 << 20
    rng = random.Random(99)
    block = bytearray(rng.randbytes(mib))
    # End every block with a partial delimiter so the parser must hold bytes back on each feed,
    # and put a near-delimiter at the start so the held bytes turn out to be data.
    tail = DELIM[:-1]
    block[-len(tail) :] = tail
    block[: len(DELIM) - 1] = b"X" * (len(DELIM) - 1)
    chunk = bytes(block)
    assert DELIM not in chunk + chunk

    n_chunks = 64
    parser = MultipartParser(BOUNDARY)
    head = part_head(BOUNDARY)
    events = parser.feed(head)
    assert events == [PartStart(DICOM_HEADERS)]
    total_in = 0
    total_out = 0
    max_buf = 0
    n_events = 0
    for _ in range(n_chunks):
        evs = parser.feed(chunk)
        total_in += len(chunk)
        n_events += len(evs)
        for ev in evs:
            assert isinstance(ev, PartData)
            total_out += len(ev.data)
        max_buf = max(max_buf, len(parser._buf))
        assert len(parser._buf) < 4096
        # Everything except the held-back partial delimiter has been emitted.
        assert total_out == total_in - len(parser._buf)
    assert max_buf == len(tail)
    assert n_events <= 2 * n_chunks
    evs = parser.feed(body_tail(BOUNDARY))
    assert parser.done
    parser.close()
    assert evs[-1] == PartEnd()
    total_out += sum(len(e.data) for e in evs if isinstance(e, PartData))
    assert total_out == n_chunks * mib


def test_many_false_delimiters_is_fast_and_correct() -> None:
    # ~2 MB of data in which every 8 bytes is a full delimiter followed by a non-boundary char.
    unit = b"\r\n--B" + b"xy"
    payload = unit * 300_000
    body = b"--B\r\n\r\n" + payload + b"\r\n--B--"
    assert parse_chunks(chunks_of(body, 65536), "B") == [({}, payload)]
