"""Pure parsing of STOW-RS responses (PS3.18 10.5.3): what was stored, warned about, or failed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dicom_adapter.dicomweb.problem import http_error_comment
from dicom_adapter.status import Status, is_failure_code, is_warning_code

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
    attempts: int = 1  # requests sent: more than one means an earlier answer may have been lost
    http_comment: str = ""  # ErrorComment for a failed HTTP answer (`Http_403, ...`)


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
    comment = http_error_comment(http_status, body) if http_status >= 300 else ""
    dataset: Any = None
    if body.strip() and ("json" in content_type.lower() or body.lstrip()[:1] in (b"{", b"[")):
        try:
            dataset = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json can go
            dataset = None
    if isinstance(dataset, list) and dataset and isinstance(dataset[0], dict):
        dataset = dataset[0]
    if not isinstance(dataset, dict):
        return StowResponse(http_status=http_status, body_excerpt=excerpt, http_comment=comment)
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
        http_comment=comment,
    )


def _warning_status(reason: int | None) -> int:
    if reason is not None and is_warning_code(reason):
        return reason
    return Status.SUCCESS


def status_for(response: StowResponse, sop_instance_uid: str) -> int:
    """The C-STORE status for one instance, decided from the STOW body first, then HTTP code.

    Orthanc answers 400 yet stores the good part of a mixed body, and 200 with nothing
    stored for a malformed one, so the body's sequences outrank the HTTP status.
    """
    if sop_instance_uid in response.referenced:
        reason = response.referenced[sop_instance_uid]
        return _warning_status(reason if reason is not None else response.top_warning)
    if sop_instance_uid in response.failed:
        reason = response.failed[sop_instance_uid]
        if reason is not None and is_failure_code(reason):
            return reason
    code = response.http_status
    if code < 300:
        return Status.PROCESSING_FAILURE  # "success" that stored nothing
    if code == 400:
        return Status.CANNOT_UNDERSTAND
    if code in (401, 403):
        return Status.NOT_AUTHORIZED
    if code == 409:
        return Status.PROCESSING_FAILURE
    if code in (408, 413, 429) or code >= 500:
        return Status.OUT_OF_RESOURCES
    return Status.PROCESSING_FAILURE


def failure_comment(response: StowResponse, sop_instance_uid: str) -> str:
    """The ErrorComment for an instance `status_for` did not call stored."""
    if response.http_comment:
        return response.http_comment
    reason = response.failed.get(sop_instance_uid)
    if reason is not None:
        return f"Http_{response.http_status}, STOW-RS FailureReason 0x{reason:04X}"
    return f"Http_{response.http_status}, STOW-RS answer names no stored instance"
