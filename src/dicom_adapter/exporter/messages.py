"""Pub/Sub message data → WADO-RS instance path (pure, no I/O)."""

from __future__ import annotations

import re

from dicom_adapter.errors import AdapterError

_UID = r"[0-9A-Za-z.\-_]+"
_INSTANCE_PATH = re.compile(rf"^studies/{_UID}/series/{_UID}/instances/{_UID}$")
_HEALTHCARE_PREFIX = re.compile(r"^projects/.+?/dicomStores/[^/]+/dicomWeb/")


class MalformedMessage(AdapterError):
    """The message data names no instance: a permanent failure (retrying cannot help)."""


def instance_path(data: bytes) -> str:
    """`studies/X/series/Y/instances/Z` from the message data, or raise MalformedMessage.

    Accepts the bare path or a Cloud Healthcare notification
    (`projects/.../dicomStores/S/dicomWeb/studies/...`), with surrounding whitespace or a
    leading slash.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage("message data is not UTF-8 text") from None
    text = text.strip().lstrip("/")
    if not text.startswith("studies/"):
        match = _HEALTHCARE_PREFIX.match(text)
        if match is None:
            raise MalformedMessage(f"not a WADO-RS instance path: {_excerpt(text)!r}")
        text = text[match.end() :]
    text = text.rstrip("/")
    if not _INSTANCE_PATH.match(text) or any(part in (".", "..") for part in text.split("/")):
        raise MalformedMessage(f"not a WADO-RS instance path: {_excerpt(text)!r}")
    return text


def _excerpt(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
