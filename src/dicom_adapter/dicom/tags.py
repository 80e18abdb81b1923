"""Tag numbers and tag names shared by routing, redaction and transcoding."""

from __future__ import annotations

import re

from pydicom.datadict import tag_for_keyword

PIXEL_DATA = 0x7FE00010
# Extended Offset Table and its lengths: they describe encapsulated fragments, and go with them
EXTENDED_OFFSET_TABLE = (0x7FE00001, 0x7FE00002)
_HEX_TAG = re.compile(r"[0-9A-Fa-f]{8}")


def parse_tag(key: str) -> int:
    """A DICOM keyword (`PatientName`) or 8 hex digits (`00100010`); ValueError when neither."""
    if _HEX_TAG.fullmatch(key):
        return int(key, 16)
    tag = tag_for_keyword(key) if key else None
    if tag is None:
        raise ValueError(f"unknown DICOM keyword {key!r} (use a keyword or 8 hex digits)")
    return int(tag)
