"""A Part-10 file's meta group: read (the UIDs that route it and where its data set starts)
and, for the C-STORE receive path, written.

PS3.10 §7.1: 128-byte preamble, "DICM", then group 0002 in Explicit VR Little Endian. The
data set after it is sent over DIMSE byte for byte, so nothing else of the file is parsed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

PREAMBLE = 128
META_READ = 64 << 10  # one read: a meta group a DICOM toolkit writes is far shorter
MAX_META_BYTES = 1 << 20  # a meta group not ended by then is refused (memory stays bounded)
LONG_VRS = frozenset(  # explicit VR: 2 reserved bytes and a 4-byte length
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
_TAGS = {
    0x0002: "media_storage_sop_class_uid",
    0x0003: "media_storage_sop_instance_uid",
    0x0010: "transfer_syntax_uid",
}


class NotPart10Error(ValueError):
    """The bytes are not a Part-10 file with a readable meta group."""


class NeedMoreData(Exception):
    """The meta group is not complete in the bytes given yet."""


@dataclass(frozen=True)
class DatasetFile:
    """An encoded data set inside a file: the bytes from `offset` to the end (a Part-10 body)."""

    path: Path
    offset: int


DatasetSource = bytes | bytearray | memoryview | DatasetFile


@dataclass(frozen=True)
class FileMeta:
    """What a sender needs from the meta group."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_offset: int


def read_file_meta(head: bytes | bytearray | memoryview, *, complete: bool = False) -> FileMeta:
    """Parse the meta group at the start of `head` (`complete`: head is the whole file).

    Raises NeedMoreData when `head` ends inside the meta group (give it more bytes), and
    NotPart10Error when it is not a Part-10 file or lacks one of the three UIDs.
    """
    data = memoryview(head)

    def short() -> Exception:
        return NotPart10Error("the file ends inside its meta group") if complete else NeedMoreData()

    if len(data) < PREAMBLE + 4:
        raise short()
    if bytes(data[PREAMBLE : PREAMBLE + 4]) != b"DICM":
        raise NotPart10Error("no DICM prefix after the 128-byte preamble")
    pos = PREAMBLE + 4
    found: dict[str, str] = {}
    meta_end = 0  # where (0002,0000) FileMetaInformationGroupLength says the group ends
    while True:
        if pos + 8 > len(data):
            if complete and pos == len(data) and pos >= meta_end:
                break  # an empty data set
            raise short()
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = bytes(data[pos + 4 : pos + 6])
        if vr in LONG_VRS:
            if pos + 12 > len(data):
                raise short()
            (length,) = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        if length == 0xFFFFFFFF:
            raise NotPart10Error(f"undefined length in file meta element (0002,{elem:04X})")
        end = start + length
        if end > len(data):
            raise short()
        if elem == 0x0000 and length == 4:
            meta_end = end + struct.unpack_from("<I", data, start)[0]
        name = _TAGS.get(elem)
        if name is not None:
            found[name] = bytes(data[start:end]).rstrip(b"\x00 ").decode("ascii", "replace")
        pos = end
    missing = [name for name in _TAGS.values() if not found.get(name)]
    if missing:
        raise NotPart10Error("file meta lacks " + ", ".join(missing))
    return FileMeta(
        found["media_storage_sop_class_uid"],
        found["media_storage_sop_instance_uid"],
        found["transfer_syntax_uid"],
        pos,
    )


def read_path_meta(path: Path) -> FileMeta:
    """The meta group of the Part-10 file at `path`, reading at most MAX_META_BYTES (blocking).

    Raises NotPart10Error (a ValueError) when it is not a Part-10 file or its meta group does
    not end within that bound, OSError when the file cannot be read.
    """
    head = b""
    with path.open("rb") as stream:
        while True:
            chunk = stream.read(META_READ)
            head += chunk
            try:
                return read_file_meta(head, complete=len(chunk) < META_READ)
            except NeedMoreData:
                if len(head) >= MAX_META_BYTES:
                    raise NotPart10Error(
                        f"the file meta group does not end within {MAX_META_BYTES} bytes"
                    ) from None


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def _meta_text(text: str, pad: bytes, limit: int) -> bytes:
    raw = text.encode("ascii")  # UnicodeEncodeError is a ValueError
    if len(raw) > limit:
        raise ValueError(f"meta value longer than {limit} characters")
    return raw + pad if len(raw) % 2 else raw


def file_meta_group(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_class_uid: str,
    implementation_version: str | None,
) -> bytes:
    """Group 0002 (without preamble and "DICM"): the bytes pydicom's write_file_meta_info gives
    for these values. Hot path (every received C-STORE): pydicom builds a Dataset and encodes
    it element by element, about 0.25 ms per file here. ValueError for a value this writer does
    not carry (non-ASCII, longer than its VR allows): write it with pydicom then."""
    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _meta_text(sop_class_uid, b"\0", 64)),
        _meta_element(0x0003, b"UI", _meta_text(sop_instance_uid, b"\0", 64)),
        _meta_element(0x0010, b"UI", _meta_text(transfer_syntax, b"\0", 64)),
        _meta_element(0x0012, b"UI", _meta_text(implementation_class_uid, b"\0", 64)),
        # pynetdicom always sets the name; None is written as an empty element, as pydicom does
        _meta_element(0x0013, b"SH", _meta_text(implementation_version or "", b" ", 16)),
    ]
    rest = b"".join(elements)
    return _meta_element(0x0000, b"UL", struct.pack("<I", len(rest))) + rest
