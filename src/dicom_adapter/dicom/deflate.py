"""Bounded inflation of a Deflated Part-10 file: how large its data set is, before pydicom reads it.

Hazard, memory: pydicom inflates a Deflated data set whole (one zlib.decompress), even when it
reads only a few attributes; 1 KB deflates from about 1 MB of zeros, so a small file can make
any reader allocate hundreds of MiB. Callers measure with `inflated_bytes` first.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from pydicom.uid import UID

from dicom_adapter.dicom.part10 import read_path_meta
from dicom_adapter.errors import InvalidDatasetError

# 64 MiB inflated: far above a Deflated instance's usual size (Deflated carries structured
# reports, presentation states, small images) and a bounded peak for pydicom's whole-body read.
MAX_INFLATED_BYTES = 64 << 20
TOO_LARGE_COMMENT = "deflated data set too large"
UNPARSABLE_COMMENT = "dataset cannot be parsed"
_INFLATE_CHUNK = 1 << 20


class DeflateError(ValueError):
    """A Deflated file whose data set's start is unknown or whose stream is corrupt."""


def inflated_bytes(path: Path, limit: int) -> int:
    """Bytes a Deflated file's data set inflates to, counted up to `limit` (nothing kept).

    Raises DeflateError when the meta group's length is missing or the stream is corrupt.
    """
    try:
        meta = read_path_meta(path)
    except (ValueError, OSError) as exc:
        raise DeflateError("no readable meta group: where the data set starts is unknown") from exc
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        with path.open("rb") as source:
            source.seek(meta.dataset_offset)
            while total < limit and (chunk := source.read(_INFLATE_CHUNK)):
                while chunk and total < limit:
                    total += len(inflater.decompress(chunk, min(limit - total, _INFLATE_CHUNK)))
                    chunk = inflater.unconsumed_tail
    except zlib.error as exc:
        raise DeflateError(f"corrupt deflated stream ({exc})") from exc
    return total


def is_deflated(path: Path) -> bool:
    """True when the file's meta group names a Deflated transfer syntax (False if unreadable).

    Hot path (every C-STORE): the meta group's bytes are parsed directly, without pydicom.
    """
    try:
        return UID(read_path_meta(path).transfer_syntax).is_deflated
    except (ValueError, OSError):  # the readers after this one refuse it
        return False


def check_inflated_size(
    path: Path, limit: int | None = None, *, transfer_syntax: str | None = None
) -> None:
    """Refuse (InvalidDatasetError, 0xC000) a Deflated file inflating past `limit` or corrupt.

    `transfer_syntax`: the file's, when the caller knows it (the negotiated one of a received
    data set), so a file that is not Deflated is not opened here.
    """
    deflated = (
        UID(transfer_syntax).is_deflated if transfer_syntax is not None else is_deflated(path)
    )
    if not deflated:
        return
    limit = MAX_INFLATED_BYTES if limit is None else limit
    try:
        size = inflated_bytes(path, limit + 1)
    except (DeflateError, ValueError, OSError, EOFError) as exc:
        raise InvalidDatasetError(
            f"dataset cannot be parsed ({type(exc).__name__})", comment=UNPARSABLE_COMMENT
        ) from exc
    if size > limit:
        raise InvalidDatasetError(
            f"deflated data set inflates past {limit} bytes", comment=TOO_LARGE_COMMENT
        )
