"""A few attributes of a Part-10 file, read without reading the file whole: identity and filters.

Both readers stop right after the last attribute asked for (everything before PixelData at
most), so a C-STORE costs the same whatever the instance's size.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID

from dicom_adapter.dicom.part10 import LONG_VRS, NeedMoreData, NotPart10Error, read_file_meta
from dicom_adapter.errors import InvalidDatasetError

UNPARSABLE_COMMENT = "dataset cannot be parsed"
_IDENTITY_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_IDENTITY_TAGS = (0x00080016, 0x00080018, 0x0020000D, 0x0020000E)  # the same, as tags


@dataclass(frozen=True)
class InstanceIdentity:
    """The UIDs that name an instance on the DICOMweb side."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str


def read_until(source: Path | bytes, tags: Sequence[int]) -> Dataset:
    """The data set's `tags`, parsed no further than the last of them (InvalidDatasetError).
    `source`: a Part-10 file, or its bytes."""
    last = max(tags)

    def past_last(tag: BaseTag, vr: str | None, length: int) -> bool:
        return int(tag) > last

    try:
        with source.open("rb") if isinstance(source, Path) else io.BytesIO(source) as stream:
            return read_partial(stream, stop_when=past_last, specific_tags=list(tags))
    except (
        InvalidDicomError,
        ValueError,
        EOFError,
        OSError,
        KeyError,
        TypeError,
        zlib.error,
    ) as exc:
        # the type only: pydicom's message may quote a value (patient data)
        raise InvalidDatasetError(
            f"dataset cannot be parsed ({type(exc).__name__})", comment=UNPARSABLE_COMMENT
        ) from exc


def read_identity(source: Path | bytes) -> InstanceIdentity:
    """The instance's UIDs (hot path: every C-STORE); InvalidDatasetError without SOP UIDs."""
    fast = _fast_identity(source)
    if fast is not None:
        return fast
    ds = read_until(source, _IDENTITY_TAGS)
    values = {key: str(ds.get(key, "") or "").strip() for key in _IDENTITY_KEYWORDS}
    for key in ("SOPClassUID", "SOPInstanceUID"):
        if not values[key]:
            raise InvalidDatasetError(f"dataset has no {key}")
    return InstanceIdentity(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_uid=values["StudyInstanceUID"],
        series_uid=values["SeriesInstanceUID"],
    )


def element_values(element: DataElement) -> list[str]:
    """An element's values as strings (trailing spaces trimmed); empty for binary/sequences."""
    if element.VR == "SQ":
        return []
    value = element.value
    if value is None or isinstance(value, bytes | bytearray):
        return []
    items: Iterable[object] = value if isinstance(value, MultiValue | list) else [value]
    out = [str(item).rstrip(" \0") for item in items]
    return [v for v in out if v]


def read_filter_attributes(path: Path, tags: Sequence[int]) -> dict[int, list[str]]:
    """The routing filters' attributes of a Part-10 file, each as its values' strings."""
    if not tags:
        return {}
    ds = read_until(path, tags)
    found: dict[int, list[str]] = {}
    for tag in tags:
        if tag in ds:
            try:
                found[tag] = element_values(ds[tag])
            except (ValueError, TypeError, KeyError) as exc:
                name = keyword_for_tag(tag) or f"{tag:08X}"
                raise InvalidDatasetError(
                    f"{name} cannot be decoded ({type(exc).__name__})",
                    comment=f"{name} cannot be decoded",
                ) from exc
    return found


# --------------------------------------------------------------------------------------------
# The identity of a plain file, read without pydicom.
#
# Hot path: every received C-STORE. pydicom's read_partial builds a Dataset element by element;
# for a CT slice from the benchmark that was ~0.3 ms of GIL time per instance, against ~0.03 ms
# here. Anything this reader is not sure of (Deflated or big endian data sets, a private
# transfer syntax, VR bytes that are not a VR, a UID that is not digits and dots, a head that
# ends early, sequences nested deeper than _MAX_DEPTH) is read by pydicom, as before: its answer
# and its errors stay the reference.

_HEAD_READ = 16 << 10
_MAX_DEPTH = 8
_LAST_IDENTITY_TAG = max(_IDENTITY_TAGS)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_HEADER = struct.Struct("<HHI")
_EXPLICIT = struct.Struct("<HH2sH")
_UID_TEXT = re.compile(r"[0-9.]*")


class _Unsure(Exception):
    """The fast reader leaves this data set to pydicom."""


def _fast_identity(source: Path | bytes) -> InstanceIdentity | None:
    """The identity of a Part-10 file in Implicit or Explicit VR Little Endian (encapsulated
    pixel data included); None for anything else."""
    try:
        if isinstance(source, Path):
            with source.open("rb") as stream:
                head = stream.read(_HEAD_READ)
            complete = len(head) < _HEAD_READ
        else:
            head, complete = source, True
        meta = read_file_meta(head, complete=complete)
        syntax = UID(meta.transfer_syntax)
        if syntax.is_deflated or not syntax.is_little_endian:
            return None
        implicit = syntax.is_implicit_VR
        found = _scan(memoryview(head), meta.dataset_offset, implicit, complete)
        values = {tag: _uid_text(raw) for tag, raw in found.items()}
    except (_Unsure, NeedMoreData, NotPart10Error, ValueError, OSError, struct.error):
        return None
    sop_class, sop_instance, study, series = (values.get(tag, "") for tag in _IDENTITY_TAGS)
    if not sop_class or not sop_instance:
        return None  # pydicom's reader raises the error that names what is missing
    return InstanceIdentity(sop_class, sop_instance, study, series)


def _uid_text(raw: bytes) -> str:
    text = raw.rstrip(b"\0").decode("ascii").strip()  # UnicodeDecodeError: a ValueError
    if not _UID_TEXT.fullmatch(text):
        raise _Unsure
    return text


def _element(data: memoryview, pos: int, implicit: bool) -> tuple[int, int, int, bool]:
    """(tag, value start, value length, contents implicit) of the element header at pos."""
    if pos + 8 > len(data):
        raise _Unsure
    if implicit:
        group, elem, length = _HEADER.unpack_from(data, pos)
        return group << 16 | elem, pos + 8, length, True
    group, elem, vr, short_length = _EXPLICIT.unpack_from(data, pos)
    if not (vr.isalpha() and vr.isupper()):
        raise _Unsure  # pydicom switches to implicit VR for such files: let it
    if vr in LONG_VRS:
        if pos + 12 > len(data):
            raise _Unsure
        (length,) = struct.unpack_from("<I", data, pos + 8)
        # an undefined-length UN holds Implicit VR Little Endian (PS3.5 6.2.2)
        return group << 16 | elem, pos + 12, length, vr == b"UN"
    return group << 16 | elem, pos + 8, short_length, False


def _skip_sequence(data: memoryview, pos: int, implicit: bool, depth: int) -> int:
    """Where the undefined-length sequence whose items start at pos ends."""
    if depth > _MAX_DEPTH:
        raise _Unsure
    while True:
        if pos + 8 > len(data):
            raise _Unsure
        group, elem, length = _HEADER.unpack_from(data, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unsure
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements up to the item delimiter
            if pos + 8 > len(data):
                raise _Unsure
            group, elem = struct.unpack_from("<HH", data, pos)
            if group << 16 | elem == _ITEM_END:
                pos += 8
                break
            _tag, start, length, inner = _element(data, pos, implicit)
            if length == _UNDEFINED:
                pos = _skip_sequence(data, start, implicit or inner, depth + 1)
            else:
                pos = start + length


def _scan(data: memoryview, pos: int, implicit: bool, complete: bool) -> dict[int, bytes]:
    """The raw values of the identity tags among the data set's top-level elements."""
    found: dict[int, bytes] = {}
    while pos < len(data):
        tag, start, length, inner = _element(data, pos, implicit)
        if tag > _LAST_IDENTITY_TAG:
            return found
        if length == _UNDEFINED:
            pos = _skip_sequence(data, start, implicit or inner, 1)
            continue
        pos = start + length
        if tag in _IDENTITY_TAGS:
            if pos > len(data):
                raise _Unsure
            found[tag] = bytes(data[start:pos])
    if not complete or pos != len(data):
        raise _Unsure  # the head ended before the identity tags were passed
    return found
