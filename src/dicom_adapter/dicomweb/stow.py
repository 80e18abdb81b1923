"""Pure parsing of STOW-RS responses (PS3.18 10.5.3): what was stored, warned about, or failed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
WARNING_REASON = "00081196"
FAILURE_REASON = "00081197"


@dataclass(frozen=True)
class StowResponse:
    """The HTTP answer to one STOW-RS request, reduced to what decides the C-STORE status."""

    http_status: int
    referenced: dict[str, int | None] = field(default_factory=dict)  # uid -> WarningReason
    failed: dict[str, int | None] = field(default_factory=dict)  # uid -> FailureReason
    top_warning: int | None = None
    body_excerpt: str = ""


def _first_int(element: Any) -> int | None:
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if isinstance(values, list) and values and isinstance(values[0], int | str):
        try:
            return int(values[0])
        except ValueError:
            return None
    return None


def _first_str(element: Any) -> str | None:
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if isinstance(values, list) and values and isinstance(values[0], str):
        return values[0].strip()
    return None


def _items(dataset: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = dataset.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    if not isinstance(values, list):
        return []
    return [item for item in values if isinstance(item, dict)]


def parse_stow_response(http_status: int, content_type: str, body: bytes) -> StowResponse:
    """Parse a DICOM JSON STOW response; anything unparsable yields empty sequences."""
    excerpt = " ".join(body[:600].decode("utf-8", "replace").split())[:300]
    dataset: Any = None
    if body.strip() and ("json" in content_type.lower() or body.lstrip()[:1] in (b"{", b"[")):
        try:
            dataset = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json can go
            dataset = None
    if isinstance(dataset, list) and dataset and isinstance(dataset[0], dict):
        dataset = dataset[0]
    if not isinstance(dataset, dict):
        return StowResponse(http_status=http_status, body_excerpt=excerpt)
    referenced: dict[str, int | None] = {}
    for item in _items(dataset, REFERENCED_SOP_SEQUENCE):
        uid = _first_str(item.get(REFERENCED_SOP_INSTANCE_UID))
        if uid:
            referenced[uid] = _first_int(item.get(WARNING_REASON))
    failed: dict[str, int | None] = {}
    for item in _items(dataset, FAILED_SOP_SEQUENCE):
        uid = _first_str(item.get(REFERENCED_SOP_INSTANCE_UID))
        if uid:
            failed[uid] = _first_int(item.get(FAILURE_REASON))
    return StowResponse(
        http_status=http_status,
        referenced=referenced,
        failed=failed,
        top_warning=_first_int(dataset.get(WARNING_REASON)),
        body_excerpt=excerpt,
    )
