"""Pure multipart/related codec for DICOMweb (RFC 2046 / RFC 2387).

This module performs no I/O.  It provides:

* helpers to *build* a ``multipart/related`` body incrementally (:func:`new_boundary`,
  :func:`related_content_type`, :func:`part_head`, :func:`body_tail`), so callers can stream
  parts without ever holding a whole body in memory;
* helpers to read the ``Content-Type`` header (:func:`parse_content_type`,
  :func:`boundary_from_content_type`);
* :class:`MultipartParser`, an incremental push parser that turns arbitrary chunks of a
  multipart body into :class:`PartStart` / :class:`PartData` / :class:`PartEnd` events while
  holding back only the few bytes that could be the beginning of a split delimiter.

Framing follows RFC 2046 section 5.1.1: an optional preamble, delimiters ``CRLF "--" boundary``
(the first one may start the body without the CRLF), optional transport padding (spaces or
tabs) before the line break, a header section terminated by an empty line, the part body, and
the close delimiter ``"--" boundary "--"`` followed by an ignored epilogue.  Bare LF line endings
are tolerated on delimiter lines and in header sections; the delimiter that ends a part body
must be preceded by CRLF.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import Enum, auto
from typing import TypeAlias

__all__ = [
    "Event",
    "MultipartError",
    "MultipartParser",
    "PartData",
    "PartEnd",
    "PartStart",
    "body_tail",
    "boundary_from_content_type",
    "new_boundary",
    "parse_content_type",
    "part_head",
    "related_content_type",
]

_CRLF = b"\r\n"

# RFC 2045 "tspecials" plus space and controls: characters that force a parameter value to be
# quoted when we generate a Content-Type header.
_TSPECIALS = frozenset('()<>@,;:\\"/[]?= \t')

# Upper bound on transport padding (spaces/tabs) accepted after a boundary.  Keeps the amount of
# held-back data bounded even when a peer sends pathological padding.
_MAX_PADDING = 1024


class MultipartError(ValueError):
    """Malformed multipart body or content type."""


def new_boundary() -> str:
    """Return a fresh random boundary made only of RFC 2046-safe characters."""
    return "dicomadapter-" + secrets.token_hex(16)


def _quote_if_needed(value: str) -> str:
    """Return ``value`` as an RFC 2045 token, quoting it when it contains special characters."""
    if value and not any(ch in _TSPECIALS or ord(ch) < 0x21 or ord(ch) > 0x7E for ch in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def related_content_type(boundary: str, part_type: str = "application/dicom") -> str:
    """Return the ``multipart/related`` Content-Type header value for ``boundary``."""
    escaped_type = part_type.replace("\\", "\\\\").replace('"', '\\"')
    return f'multipart/related; type="{escaped_type}"; boundary={_quote_if_needed(boundary)}'


def part_head(boundary: str, part_type: str = "application/dicom", first: bool = True) -> bytes:
    """Return the delimiter line and headers that introduce one part."""
    lead = b"" if first else _CRLF
    return (
        lead
        + b"--"
        + boundary.encode("ascii")
        + _CRLF
        + b"Content-Type: "
        + part_type.encode("ascii")
        + _CRLF
        + _CRLF
    )


def body_tail(boundary: str) -> bytes:
    """Return the close delimiter that ends a multipart body."""
    return _CRLF + b"--" + boundary.encode("ascii") + b"--" + _CRLF


def _skip_ws(value: str, i: int) -> int:
    """Return the first index at or after ``i`` that is not a space or tab."""
    n = len(value)
    while i < n and value[i] in " \t":
        i += 1
    return i


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type value into a lower-cased media type and its parameters."""
    n = len(value)
    semi = value.find(";")
    end = n if semi == -1 else semi
    media_type = value[:end].strip().lower()
    if not media_type:
        raise MultipartError(f"empty media type in Content-Type {value!r}")
    params: dict[str, str] = {}
    i = end
    while i < n:
        # value[i] is ";" here.
        i = _skip_ws(value, i + 1)
        if i >= n:
            break
        if value[i] == ";":
            continue
        name_end = i
        while name_end < n and value[name_end] not in "=;":
            name_end += 1
        name = value[i:name_end].strip().lower()
        if name_end >= n or value[name_end] == ";":
            # A parameter without "=": not valid, but harmless; ignore it.
            i = name_end
            continue
        if not name:
            raise MultipartError(f"parameter without a name in Content-Type {value!r}")
        i = _skip_ws(value, name_end + 1)
        if i < n and value[i] == '"':
            chars: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise MultipartError(f"unterminated quoted string in Content-Type {value!r}")
                ch = value[i]
                if ch == "\\":
                    if i + 1 >= n:
                        raise MultipartError(
                            f"unterminated quoted string in Content-Type {value!r}"
                        )
                    chars.append(value[i + 1])
                    i += 2
                elif ch == '"':
                    i += 1
                    break
                else:
                    chars.append(ch)
                    i += 1
            param_value = "".join(chars)
            i = _skip_ws(value, i)
            if i < n and value[i] != ";":
                raise MultipartError(
                    f"unexpected text after quoted value of {name!r} in Content-Type {value!r}"
                )
        else:
            value_end = value.find(";", i)
            if value_end == -1:
                value_end = n
            param_value = value[i:value_end].strip()
            i = value_end
        params.setdefault(name, param_value)
    return media_type, params


def boundary_from_content_type(value: str) -> str:
    """Return the boundary of a ``multipart/*`` Content-Type value."""
    media_type, params = parse_content_type(value)
    if not media_type.startswith("multipart/"):
        raise MultipartError(f"expected a multipart/* content type, got {media_type!r}")
    boundary = params.get("boundary", "")
    if not boundary:
        raise MultipartError(f"content type {value!r} has no boundary parameter")
    return boundary


@dataclass(frozen=True)
class PartStart:
    """Start of a part, with its headers (names lower-cased, values stripped)."""

    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    """A non-empty chunk of the current part's body."""

    data: bytes


@dataclass(frozen=True)
class PartEnd:
    """End of the current part."""


Event: TypeAlias = PartStart | PartData | PartEnd


class _State(Enum):
    """Where the parser is in the body."""

    PREAMBLE = auto()
    HEADERS = auto()
    BODY = auto()
    DONE = auto()
    FAILED = auto()


class _After(Enum):
    """Classification of the bytes following a candidate delimiter."""

    NEED_MORE = auto()
    NOT_DELIMITER = auto()
    NEXT_PART = auto()
    CLOSE = auto()


def _decode_header_text(raw: bytes) -> str:
    """Decode a header section as UTF-8, falling back to Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _parse_headers(raw: bytes) -> dict[str, str]:
    """Parse a header section into a dict of lower-cased names to stripped values."""
    headers: dict[str, str] = {}
    last: str | None = None
    for line in _decode_header_text(raw).split("\n"):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if line[0] in " \t":
            # Obsolete line folding (RFC 5322): continuation of the previous header.
            if last is None:
                raise MultipartError("part header section starts with a continuation line")
            headers[last] = (headers[last] + " " + line.strip()).strip()
            continue
        name, sep, val = line.partition(":")
        name = name.strip().lower()
        if not sep or not name:
            raise MultipartError(f"malformed part header line {line!r}")
        val = val.strip()
        if name in headers:
            headers[name] = headers[name] + ", " + val
        else:
            headers[name] = val
        last = name
    return headers


class MultipartParser:
    """Incremental multipart parser: feed any chunks, get events; never buffers a whole part."""

    def __init__(self, boundary: str, max_header_bytes: int = 16384) -> None:
        """Create a parser for bodies delimited by ``boundary``."""
        if not boundary:
            raise MultipartError("multipart boundary must not be empty")
        if "\r" in boundary or "\n" in boundary:
            raise MultipartError("multipart boundary must not contain line breaks")
        try:
            encoded = boundary.encode("ascii")
        except UnicodeEncodeError as exc:
            raise MultipartError(f"multipart boundary {boundary!r} is not ASCII") from exc
        if max_header_bytes <= 0:
            raise ValueError("max_header_bytes must be positive")
        self._delim = b"\r\n--" + encoded
        self._max_header_bytes = max_header_bytes
        self._state = _State.PREAMBLE
        # Unconsumed input.  Starts with a virtual CRLF so that a body beginning directly with
        # "--boundary" matches the same delimiter pattern as every later delimiter.
        self._buf = _CRLF
        # In HEADERS state: offset into _buf from which to resume searching for the blank line.
        self._header_scan = 0

    @property
    def buffered(self) -> int:
        """Bytes held back between feeds: at most a header section or a split delimiter."""
        return len(self._buf)

    @property
    def done(self) -> bool:
        """Whether the close delimiter has been seen."""
        return self._state is _State.DONE

    def close(self) -> None:
        """Signal end of input; raise MultipartError if the body was truncated."""
        if self._state is _State.DONE:
            return
        if self._state is _State.FAILED:
            raise MultipartError("multipart parser is in a failed state")
        raise MultipartError("truncated multipart body: close delimiter not seen")

    def feed(self, chunk: bytes) -> list[Event]:
        """Consume ``chunk`` and return the events it completes."""
        if self._state is _State.DONE:
            return []
        if self._state is _State.FAILED:
            raise MultipartError("multipart parser is in a failed state")
        if not chunk:
            return []
        buf = self._buf + chunk if self._buf else bytes(chunk)
        events: list[Event] = []
        pos = 0
        try:
            while True:
                # The scanners return more=False once the close delimiter has been seen.
                if self._state is _State.HEADERS:
                    pos, more = self._scan_headers(buf, pos, events)
                else:
                    pos, more = self._scan_body(buf, pos, events)
                if not more:
                    break
        except MultipartError:
            self._state = _State.FAILED
            self._buf = b""
            raise
        # After the close delimiter pos == len(buf): the epilogue is dropped.
        self._buf = buf[pos:]
        return events

    def _classify_after(self, buf: bytes, pos: int) -> tuple[_After, int]:
        """Classify what follows a delimiter match ending at ``pos``.

        For NEXT_PART the returned index is the start of the line break ending the delimiter
        line (kept so the header scan can find an immediately following empty line).
        """
        n = len(buf)
        rest = buf[pos : pos + 2]
        if rest == b"--":
            return _After.CLOSE, pos + 2
        if rest in (b"", b"-"):
            return _After.NEED_MORE, pos
        window = buf[pos : pos + _MAX_PADDING + 2]
        j = pos + len(window) - len(window.lstrip(b" \t"))
        if j >= n:
            if j - pos > _MAX_PADDING:
                raise MultipartError("transport padding after boundary is too long")
            return _After.NEED_MORE, pos
        if j - pos > _MAX_PADDING:
            raise MultipartError("transport padding after boundary is too long")
        c = buf[j]
        if c == 0x0A:
            return _After.NEXT_PART, j
        if c == 0x0D:
            if j + 1 >= n:
                return _After.NEED_MORE, pos
            if buf[j + 1] == 0x0A:
                return _After.NEXT_PART, j
        return _After.NOT_DELIMITER, pos

    def _scan_body(self, buf: bytes, pos: int, events: list[Event]) -> tuple[int, bool]:
        """Scan preamble or part body from ``pos``; return (new position, keep looping)."""
        delim = self._delim
        in_body = self._state is _State.BODY
        emit_from = pos
        search_from = pos
        while True:
            idx = buf.find(delim, search_from)
            if idx == -1:
                # Hold back only a suffix that could be the start of a split delimiter.  The
                # delimiter contains a single CR (its first byte), so that suffix, if any, starts
                # at the last CR of the final len(delim) - 1 bytes.
                keep = len(buf)
                cr = buf.rfind(b"\r", max(search_from, len(buf) - len(delim) + 1))
                if cr != -1 and delim.startswith(buf[cr:]):
                    keep = cr
                if in_body and keep > emit_from:
                    events.append(PartData(buf[emit_from:keep]))
                return keep, False
            if in_body and idx > emit_from:
                events.append(PartData(buf[emit_from:idx]))
            emit_from = idx
            kind, nxt = self._classify_after(buf, idx + len(delim))
            if kind is _After.NOT_DELIMITER:
                search_from = idx + 1
                continue
            if kind is _After.NEED_MORE:
                return idx, False
            if in_body:
                events.append(PartEnd())
            if kind is _After.CLOSE:
                self._state = _State.DONE
                return len(buf), False
            self._state = _State.HEADERS
            self._header_scan = 0
            return nxt, True

    def _scan_headers(self, buf: bytes, pos: int, events: list[Event]) -> tuple[int, bool]:
        """Scan a header section starting at the delimiter line's line break."""
        # buf[pos] is the CR or LF ending the delimiter line; keeping it lets an empty header
        # section (the delimiter line directly followed by a blank line) match the same patterns.
        lead = 2 if buf[pos] == 0x0D else 1
        scan = pos + self._header_scan
        crlf_end = buf.find(b"\n\r\n", scan)
        lf_end = buf.find(b"\n\n", scan)
        if crlf_end == -1 and lf_end == -1:
            if len(buf) - pos - lead > self._max_header_bytes:
                raise MultipartError(f"part header section exceeds {self._max_header_bytes} bytes")
            # A terminator split across feeds can start at most 2 bytes before the end.
            self._header_scan = max(0, len(buf) - pos - 2)
            return pos, False
        if crlf_end != -1 and (lf_end == -1 or crlf_end < lf_end):
            end, after = crlf_end, crlf_end + 3
        else:
            end, after = lf_end, lf_end + 2
        if after - pos - lead > self._max_header_bytes:
            raise MultipartError(f"part header section exceeds {self._max_header_bytes} bytes")
        headers = _parse_headers(buf[pos:end])
        events.append(PartStart(headers))
        self._state = _State.BODY
        self._header_scan = 0
        return after, True
