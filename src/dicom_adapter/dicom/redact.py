"""Redaction of a received Part-10 file, as the Java adapter's DicomRedactor does, at any depth.

Semantics (the Java adapter's, from its deid-redactor library):
- a removed attribute stays, with an empty value (zero length); a removed sequence has no items;
- with a keep list, every attribute not on it is emptied;
- SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID (and MediaStorageSOPInstanceUID in the
  file meta) are always replaced by `2.25.` + the decimal value of the name-based UUID of the
  old UID (`java.util.UUID.nameUUIDFromBytes`), whatever the lists say;
- PixelData emptied in a compressed transfer syntax: the file meta says Explicit VR Little Endian.
Ours differs: attributes inside sequences are redacted too, at any depth (the four UIDs as
well); a keep list also keeps what storing and decoding the instance needs (KEEP_ALWAYS); the
data set's group length attributes (retired; stale once values are emptied) are dropped.

Memory: the attributes before PixelData (and any after it) are parsed; the pixel data element
is copied from file to file in 1 MiB chunks, never held in memory. Only a Deflated file, or an
explicit VR file holding implicit VR elements, is read whole (one instance in memory).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicom_adapter.dicom import tags
from dicom_adapter.dicom.deflate import MAX_INFLATED_BYTES, inflated_bytes, is_deflated
from dicom_adapter.dicom.tags import EXTENDED_OFFSET_TABLE, PIXEL_DATA
from dicom_adapter.errors import InvalidDatasetError

logger = logging.getLogger(__name__)

CHC_BASIC = "CHC_BASIC"
# Java's TagFilterProfile enum: its unspecified value loads CHC_BASIC too.
PROFILES = (CHC_BASIC, "TAG_FILTER_PROFILE_UNSPECIFIED")
CHC_BASIC_RESOURCE = "chc_basic_remove_list.txt"

MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003
# Replaced by the Java formula wherever they occur, never emptied.
REPLACED_UIDS = frozenset({0x00080018, 0x0020000D, 0x0020000E})  # SOP Instance, Study, Series
# Kept by a keep list even when it does not name them: without them the instance cannot be
# stored (SOPClassUID), kept text cannot be decoded (SpecificCharacterSet), or kept pixel data
# cannot be decoded (the Image Pixel module's description). None of them is patient data.
KEEP_ALWAYS = frozenset(
    {
        0x00080005,  # SpecificCharacterSet
        0x00080016,  # SOPClassUID
        0x00280002,  # SamplesPerPixel
        0x00280004,  # PhotometricInterpretation
        0x00280006,  # PlanarConfiguration
        0x00280008,  # NumberOfFrames
        0x00280010,  # Rows
        0x00280011,  # Columns
        0x00280100,  # BitsAllocated
        0x00280101,  # BitsStored
        0x00280102,  # HighBit
        0x00280103,  # PixelRepresentation
    }
)

_COPY_CHUNK = 1 << 20
_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN"})
_LONG_LENGTH_VRS |= {b"UR", b"UT", b"SV", b"UV"}
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)


class RedactionConfigError(ValueError):
    """A redaction flag names an unknown tag or profile; the message names it."""


def parse_tag(text: str) -> int:
    """A DICOM keyword (`PatientName`) or 8 hex digits (`00100010`) → tag number."""
    name = text.strip()
    try:
        return tags.parse_tag(name)
    except ValueError:
        raise RedactionConfigError(
            f"unknown tag {name!r} (not a DICOM keyword or 8 hex digits)"
        ) from None


def parse_tag_list(text: str) -> frozenset[int]:
    """A comma-separated list of tags, as the Java flags take it (blank entries ignored)."""
    return frozenset(parse_tag(part) for part in text.split(",") if part.strip())


def chc_basic_keywords() -> list[str]:
    """The CHC_BASIC remove list shipped in the package, in its order."""
    text = resources.files(__package__).joinpath(CHC_BASIC_RESOURCE).read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def chc_basic_tags() -> frozenset[int]:
    """The CHC_BASIC remove list as tag numbers."""
    return frozenset(parse_tag(keyword) for keyword in chc_basic_keywords())


def java_uid(uid: str) -> str:
    """The Java adapter's replacement UID: `2.25.` + java.util.UUID.nameUUIDFromBytes(uid)."""
    digest = bytearray(hashlib.md5(uid.encode("utf-8"), usedforsecurity=False).digest())
    digest[6] = (digest[6] & 0x0F) | 0x30  # version 3: name-based, MD5
    digest[8] = (digest[8] & 0x3F) | 0x80  # IETF variant
    return "2.25." + str(int.from_bytes(digest, "big"))


def _replaced(value: Any) -> Any:
    if isinstance(value, MultiValue | list):
        return [java_uid(str(v)) if str(v) else "" for v in value]
    text = str(value or "")
    return java_uid(text) if text else value


def _vr_of(tag: int, vr: str | None) -> str:
    """The element's VR for writing it empty; an ambiguous dictionary VR takes its first."""
    if not vr:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
    return vr.split(" or ")[0]


@dataclass(frozen=True)
class Redactor:
    """One configured redaction: a remove list, or a keep list (`keep=True`)."""

    tags: frozenset[int]
    keep: bool = False
    # a file read whole (Deflated: its inflated size; mis-encoded) is refused past this
    max_in_memory: int = MAX_INFLATED_BYTES

    def removes(self, tag: int) -> bool:
        """True when the attribute's value must be emptied."""
        if self.keep:
            return tag not in self.tags and tag not in KEEP_ALWAYS
        return tag in self.tags

    def redact_dataset(self, ds: Dataset) -> None:
        """Redact `ds` in place, recursing into every sequence item it keeps."""
        for tag in list(ds.keys()):
            number = int(tag)
            if number & 0xFFFF == 0 and number >> 16 != 0x0002:
                del ds[tag]  # a group length: stale once values change
                continue
            raw = ds.get_item(tag)
            if raw is None:
                continue
            if number in REPLACED_UIDS:
                elem = ds[tag]
                elem.value = _replaced(elem.value)
                continue
            if self.removes(number):
                vr = _vr_of(number, raw.VR)
                ds[tag] = DataElement(tag, vr, Sequence() if vr == "SQ" else None)
                continue
            if _vr_of(number, raw.VR) == "SQ":
                value = ds[tag].value
                if isinstance(value, Sequence):
                    for item in value:
                        self.redact_dataset(item)

    def redact_meta(
        self, meta: FileMetaDataset, pixels_emptied: bool, ds: Dataset | None = None
    ) -> None:
        """The file meta: MediaStorageSOPInstanceUID replaced; the syntax if pixels went.

        Pixels emptied in an encapsulated syntax: the Extended Offset Table in `ds`, which
        described the fragments, goes with them.
        """
        if MEDIA_STORAGE_SOP_INSTANCE_UID in meta:
            elem = meta[MEDIA_STORAGE_SOP_INSTANCE_UID]
            elem.value = _replaced(elem.value)
        syntax = UID(str(meta.get("TransferSyntaxUID", "")))
        if pixels_emptied and syntax.is_compressed:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            for tag in EXTENDED_OFFSET_TABLE:
                if ds is not None and tag in ds:
                    del ds[tag]

    def redact_file(self, source: Path, target: Path) -> None:
        """Write the redacted `source` to `target` (a new file); raises InvalidDatasetError."""
        try:
            with source.open("rb") as src:
                # pydicom inflates a Deflated body whole, even for the header: bound it first
                deflated = is_deflated(source)
                size = (
                    inflated_bytes(source, self.max_in_memory + 1)
                    if deflated
                    else source.stat().st_size
                )
                if deflated:
                    self._check_in_memory(size)
                head = dcmread(src, stop_before_pixels=True)
                bulk_at = src.tell()
                # deflated: the offsets are in the inflated stream; mis-encoded: pydicom has to
                # re-encode every element. Both are read whole, pixel data included: capped.
                syntax = UID(str(head.file_meta.get("TransferSyntaxUID", "")))
                if deflated or syntax.is_deflated or _misencoded(head):
                    self._check_in_memory(size)
                    self._redact_in_memory(source, target)
                    return
                self._redact_streaming(src, head, bulk_at, target)
        except InvalidDatasetError:
            raise
        except (
            InvalidDicomError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,  # pydicom: required file meta elements missing
            EOFError,
            struct.error,
            zlib.error,
        ) as exc:
            # the type only: a parser message may quote a value (patient data)
            raise InvalidDatasetError(f"dataset cannot be redacted ({type(exc).__name__})") from exc

    def _check_in_memory(self, size: int) -> None:
        if size > self.max_in_memory:
            raise InvalidDatasetError(
                f"dataset too large to redact in memory ({size} bytes)",
                comment="dataset too large to redact",
            )

    def _redact_in_memory(self, source: Path, target: Path) -> None:
        ds = dcmread(source)
        ds.walk(lambda _ds, _elem: None)  # every element decoded, written in the declared syntax
        self.redact_dataset(ds)
        emptied = PIXEL_DATA in ds and not ds[PIXEL_DATA].value
        self.redact_meta(ds.file_meta, emptied, ds)
        ds.save_as(target, enforce_file_format=True)

    def _redact_streaming(self, src: BinaryIO, head: Dataset, bulk_at: int, target: Path) -> None:
        implicit, little = head.original_encoding
        if implicit is None or little is None:
            raise InvalidDatasetError("dataset cannot be redacted: unknown encoding")
        self.redact_dataset(head)
        bulk = _bulk_element(src, bulk_at, implicit=implicit, little=little)
        tail = Dataset()
        if bulk is not None:
            src.seek(bulk.end)
            rest = src.read()
            if rest:
                tail = read_dataset(io.BytesIO(rest), implicit, little)
                self.redact_dataset(tail)
        bulk_emptied = bulk is not None and self.removes(bulk.tag)
        pixels_emptied = (
            bulk is not None and bulk.tag == PIXEL_DATA and (bulk_emptied or bulk.value_length == 0)
        )
        meta = head.file_meta
        self.redact_meta(meta, pixels_emptied, head)
        charset = head.get("SpecificCharacterSet", "ISO_IR 6")
        with target.open("wb") as out:
            out.write(b"\0" * 128 + b"DICM")
            meta_buffer = DicomBytesIO()
            write_file_meta_info(meta_buffer, meta, enforce_standard=True)
            out.write(meta_buffer.getvalue())
            out.write(_encode(head, implicit=implicit, little=little))
            if bulk is not None:
                if bulk_emptied:
                    empty = DataElement(bulk.tag, _vr_of(bulk.tag, bulk.vr), None)
                    buffer = _encoder(implicit=implicit, little=little)
                    write_data_element(buffer, empty)
                    out.write(buffer.getvalue())
                else:
                    _copy_range(src, out, bulk.start, bulk.end - bulk.start)
            if len(tail):
                out.write(_encode(tail, implicit=implicit, little=little, charset=charset))


def _misencoded(head: Dataset) -> bool:
    """True when an explicit VR file holds implicit VR elements (pydicom reads them anyway)."""
    implicit, _ = head.original_encoding
    return not implicit and any(element.VR is None for element in head.elements())


@dataclass(frozen=True)
class _Bulk:
    """Where the pixel data element is in the file: [start, end), its tag, VR, value length."""

    tag: int
    vr: str | None
    start: int
    end: int
    value_length: int


def _bulk_element(src: BinaryIO, start: int, *, implicit: bool, little: bool) -> _Bulk | None:
    """The element pydicom stopped before (pixel data), located by reading headers only."""
    order = "<" if little else ">"
    src.seek(start)
    header = src.read(8)
    if len(header) < 8:
        return None
    group, element = struct.unpack(order + "HH", header[:4])
    tag = (group << 16) | element
    vr: str | None = None
    vr_bytes = header[4:6]
    if implicit or not (vr_bytes.isalpha() and vr_bytes.isupper()):
        # implicit, or an "explicit" file whose element is implicit (pydicom reads those too)
        (length,) = struct.unpack(order + "I", header[4:8])
        position = start + 8
    else:
        vr = vr_bytes.decode("ascii")
        if vr_bytes in _LONG_LENGTH_VRS:
            (length,) = struct.unpack(order + "I", src.read(4))
            position = start + 12
        else:
            (length,) = struct.unpack(order + "H", header[6:8])
            position = start + 8
    if length != _UNDEFINED_LENGTH:
        return _Bulk(tag, vr, start, position + length, length)
    # encapsulated: walk the item headers up to the sequence delimiter
    src.seek(position)
    while True:
        item = src.read(8)
        if len(item) < 8:
            raise InvalidDatasetError("dataset cannot be redacted: pixel data is truncated")
        item_group, item_element, item_length = struct.unpack(order + "HHI", item)
        position += 8
        if (item_group, item_element) == _SEQUENCE_DELIMITER:
            return _Bulk(tag, vr, start, position, position - start)
        if item_length == _UNDEFINED_LENGTH:
            raise InvalidDatasetError("dataset cannot be redacted: a pixel data item has no length")
        position += item_length
        src.seek(position)


def _encoder(*, implicit: bool, little: bool) -> DicomBytesIO:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit
    buffer.is_little_endian = little
    return buffer


def _encode(ds: Dataset, *, implicit: bool, little: bool, charset: Any = "ISO_IR 6") -> bytes:
    buffer = _encoder(implicit=implicit, little=little)
    write_dataset(buffer, ds, parent_encoding=charset)
    return buffer.getvalue()


def _copy_range(src: BinaryIO, out: BinaryIO, start: int, length: int) -> None:
    """Copy `length` bytes of `src` from `start` to `out`, one chunk in memory at a time."""
    src.seek(start)
    remaining = length
    while remaining > 0:
        chunk = src.read(min(remaining, _COPY_CHUNK))
        if not chunk:
            raise InvalidDatasetError("dataset cannot be redacted: pixel data is truncated")
        out.write(chunk)
        remaining -= len(chunk)


class RedactionStep:
    """The C-STORE preparation step: rewrites the received file redacted (sibling + replace)."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor

    def __call__(self, path: Path) -> None:
        # named like the received file (prefix and suffix): a crashed run's sweep removes it
        sibling = path.with_name(f"{path.stem}.redacting{path.suffix}")
        try:
            self.redactor.redact_file(path, sibling)
            if not path.exists():  # the association ended meanwhile and its cleanup removed it
                raise FileNotFoundError(f"{path} was removed while it was being redacted")
            os.replace(sibling, path)
        finally:
            sibling.unlink(missing_ok=True)


def redactor_from_flags(remove_list: str, keep_list: str, profile: str) -> Redactor | None:
    """The Redactor the three Java flags configure; None when none is set.

    Raises RedactionConfigError for an unknown tag or profile, or more than one flag set.
    """
    given = [bool(remove_list.strip()), bool(keep_list.strip()), bool(profile.strip())]
    if sum(given) > 1:
        raise RedactionConfigError(
            "only one of --redact_remove_list, --redact_keep_list, --redact_filter_profile "
            "may be set"
        )
    if remove_list.strip():
        return Redactor(parse_tag_list(remove_list))
    if keep_list.strip():
        return Redactor(parse_tag_list(keep_list), keep=True)
    if profile.strip():
        if profile.strip() not in PROFILES:
            raise RedactionConfigError(f"unknown profile {profile.strip()!r} (known: {CHC_BASIC})")
        return Redactor(chc_basic_tags())
    return None


def redaction_step(remove_list: str, keep_list: str, profile: str) -> RedactionStep | None:
    """The preparation step for the configured redaction, or None when redaction is off."""
    redactor = redactor_from_flags(remove_list, keep_list, profile)
    if redactor is None:
        return None
    kind = "keep list" if redactor.keep else ("profile CHC_BASIC" if profile else "remove list")
    logger.info("C-STORE redaction on: %s of %d tags", kind, len(redactor.tags))
    return RedactionStep(redactor)
