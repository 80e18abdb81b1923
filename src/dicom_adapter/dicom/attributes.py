"""A few attributes of a Part-10 file, read without reading the file whole: identity and filters.

Both readers stop right after the last attribute asked for (everything before PixelData at
most), so a C-STORE costs the same whatever the instance's size.
"""

from __future__ import annotations

import io
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
