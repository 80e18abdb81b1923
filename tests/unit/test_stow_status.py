"""Unit tests for STOW-RS response parsing and the C-STORE status table (SPEC §1.3)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dicom_adapter.dicomweb.stow import StowResponse, parse_stow_response, status_for
from dicom_adapter.status import Status

UID = "1.2.826.0.1.3680043.8.498.1"
OTHER_UID = "1.2.826.0.1.3680043.8.498.2"
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
JSON_TYPE = "application/dicom+json"


def ref_item(uid: str, warning: Any = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": [SOP_CLASS]},
        "00081155": {"vr": "UI", "Value": [uid]},
        "00081190": {"vr": "UR", "Value": [f"http://h/studies/1/series/2/instances/{uid}"]},
    }
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return item


def failed_item(uid: str, reason: Any = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": [SOP_CLASS]},
        "00081155": {"vr": "UI", "Value": [uid]},
    }
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def body(
    referenced: list[dict[str, Any]] | None = None,
    failed: list[dict[str, Any]] | None = None,
    top_warning: int | None = None,
) -> dict[str, Any]:
    dataset: dict[str, Any] = {"00081190": {"vr": "UR", "Value": ["http://h/studies/1"]}}
    if referenced is not None:
        dataset["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed is not None:
        dataset["00081198"] = {"vr": "SQ", "Value": failed}
    if top_warning is not None:
        dataset["00081196"] = {"vr": "US", "Value": [top_warning]}
    return dataset


def status(http_status: int, payload: Any = None, content_type: str = JSON_TYPE) -> int:
    raw = b"" if payload is None else json.dumps(payload).encode()
    return status_for(parse_stow_response(http_status, content_type, raw), UID)


# --------------------------------------------------------------------------------------------
# parse_stow_response
# --------------------------------------------------------------------------------------------


def test_parse_referenced_and_failed() -> None:
    raw = json.dumps(
        body(
            referenced=[ref_item(UID), ref_item(OTHER_UID, 0xB000)],
            failed=[failed_item("1.2.3", 0xA900), failed_item("1.2.4")],
        )
    ).encode()
    parsed = parse_stow_response(202, JSON_TYPE, raw)
    assert parsed.http_status == 202
    assert parsed.referenced == {UID: None, OTHER_UID: 0xB000}
    assert parsed.failed == {"1.2.3": 0xA900, "1.2.4": None}
    assert parsed.top_warning is None
    assert parsed.body_excerpt == raw.decode()[:300]


def test_parse_top_level_warning() -> None:
    raw = json.dumps(body(referenced=[ref_item(UID)], top_warning=0xB007)).encode()
    assert parse_stow_response(202, JSON_TYPE, raw).top_warning == 0xB007


def test_parse_array_wrapped_body() -> None:
    raw = json.dumps([body(referenced=[ref_item(UID, 0xB006)])]).encode()
    parsed = parse_stow_response(200, JSON_TYPE, raw)
    assert parsed.referenced == {UID: 0xB006}


def test_parse_json_without_json_content_type() -> None:
    raw = json.dumps(body(referenced=[ref_item(UID)])).encode()
    parsed = parse_stow_response(200, "text/plain", raw)
    assert parsed.referenced == {UID: None}


def test_parse_non_json_body() -> None:
    raw = b"<html><body>502 Bad Gateway</body></html>"
    parsed = parse_stow_response(502, "text/html", raw)
    assert parsed == StowResponse(
        http_status=502, body_excerpt=raw.decode(), http_comment="Http_502, Bad Gateway"
    )


def test_parse_broken_json_body() -> None:
    parsed = parse_stow_response(200, JSON_TYPE, b'{"00081199": {"vr": "SQ", "Value": [')
    assert parsed.referenced == {}
    assert parsed.failed == {}


def test_parse_empty_body() -> None:
    parsed = parse_stow_response(200, JSON_TYPE, b"")
    assert parsed == StowResponse(http_status=200)


def test_parse_non_utf8_body() -> None:
    parsed = parse_stow_response(500, "text/plain", b"\xff\xfe error")
    assert parsed.http_status == 500
    assert parsed.referenced == {}
    assert "error" in parsed.body_excerpt


def test_parse_body_excerpt_is_bounded() -> None:
    parsed = parse_stow_response(500, "text/plain", b"x" * 10_000)
    assert parsed.body_excerpt == "x" * 300


def test_parse_failure_reason_as_string() -> None:
    raw = json.dumps(body(failed=[failed_item(UID, str(0xA900))])).encode()
    assert parse_stow_response(409, JSON_TYPE, raw).failed == {UID: 0xA900}


def test_parse_items_without_uid_are_ignored() -> None:
    raw = json.dumps(
        body(referenced=[{"00081150": {"vr": "UI", "Value": [SOP_CLASS]}}, ref_item(UID)])
    ).encode()
    assert parse_stow_response(200, JSON_TYPE, raw).referenced == {UID: None}


def test_parse_uid_whitespace_is_stripped() -> None:
    raw = json.dumps(body(referenced=[ref_item(UID + " ")])).encode()
    assert parse_stow_response(200, JSON_TYPE, raw).referenced == {UID: None}


def test_parse_sequence_without_value() -> None:
    raw = json.dumps({"00081199": {"vr": "SQ"}, "00081198": {"vr": "SQ", "Value": None}}).encode()
    parsed = parse_stow_response(200, JSON_TYPE, raw)
    assert parsed.referenced == {}
    assert parsed.failed == {}


# --------------------------------------------------------------------------------------------
# status_for: the SPEC §1.3 table
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("http_status", [200, 202])
def test_stored_no_warning_is_success(http_status: int) -> None:
    assert status(http_status, body(referenced=[ref_item(UID)])) == Status.SUCCESS


@pytest.mark.parametrize(
    "warning",
    [
        Status.COERCION_OF_DATA_ELEMENTS,
        Status.ELEMENTS_DISCARDED,
        Status.DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
    ],
)
def test_stored_with_warning_reason(warning: Status) -> None:
    assert status(202, body(referenced=[ref_item(UID, int(warning))])) == warning


def test_stored_with_top_level_warning() -> None:
    payload = body(referenced=[ref_item(UID)], top_warning=int(Status.ELEMENTS_DISCARDED))
    assert status(202, payload) == Status.ELEMENTS_DISCARDED


def test_item_warning_beats_top_level_warning() -> None:
    payload = body(
        referenced=[ref_item(UID, int(Status.COERCION_OF_DATA_ELEMENTS))],
        top_warning=int(Status.ELEMENTS_DISCARDED),
    )
    assert status(202, payload) == Status.COERCION_OF_DATA_ELEMENTS


def test_stored_with_non_warning_reason_is_success() -> None:
    # A "WarningReason" outside 0xBxxx is not a warning; the instance is stored.
    assert status(200, body(referenced=[ref_item(UID, 0xA900)])) == Status.SUCCESS


def test_warning_reason_as_string() -> None:
    payload = body(referenced=[ref_item(UID, str(int(Status.COERCION_OF_DATA_ELEMENTS)))])
    assert status(202, payload) == Status.COERCION_OF_DATA_ELEMENTS


@pytest.mark.parametrize(
    ("http_status", "reason"),
    [
        (409, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS),
        (400, Status.CANNOT_UNDERSTAND),
        (409, Status.SOP_CLASS_NOT_SUPPORTED),
        (409, Status.PROCESSING_FAILURE),
        (409, Status.OUT_OF_RESOURCES),
        (200, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS),
        (202, Status.SOP_CLASS_NOT_SUPPORTED),
        (400, Status.SOP_CLASS_NOT_SUPPORTED),
    ],
)
def test_failure_reason_is_the_status(http_status: int, reason: Status) -> None:
    payload = body(referenced=[ref_item(OTHER_UID)], failed=[failed_item(UID, int(reason))])
    assert status(http_status, payload) == reason


def test_failure_reason_as_string() -> None:
    payload = body(failed=[failed_item(UID, str(int(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS)))])
    assert status(409, payload) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS


def test_failure_reason_for_other_instance_is_not_ours() -> None:
    payload = body(failed=[failed_item(OTHER_UID, int(Status.SOP_CLASS_NOT_SUPPORTED))])
    assert status(400, payload) == Status.CANNOT_UNDERSTAND


def test_failed_without_reason_falls_back_to_http_status() -> None:
    assert status(409, body(failed=[failed_item(UID)])) == Status.PROCESSING_FAILURE
    assert status(400, body(failed=[failed_item(UID)])) == Status.CANNOT_UNDERSTAND


def test_400_without_reason() -> None:
    assert status(400) == Status.CANNOT_UNDERSTAND
    assert status(400, {"error": "bad multipart"}) == Status.CANNOT_UNDERSTAND


@pytest.mark.parametrize("http_status", [401, 403])
def test_not_authorized(http_status: int) -> None:
    assert status(http_status) == Status.NOT_AUTHORIZED


def test_409_without_reason() -> None:
    assert status(409) == Status.PROCESSING_FAILURE
    assert status(409, body()) == Status.PROCESSING_FAILURE


def test_413_out_of_resources() -> None:
    assert status(413) == Status.OUT_OF_RESOURCES


@pytest.mark.parametrize("http_status", [408, 429, 500, 502, 503, 504, 507])
def test_transient_out_of_resources(http_status: int) -> None:
    assert status(http_status) == Status.OUT_OF_RESOURCES
    assert status(http_status, body()) == Status.OUT_OF_RESOURCES


@pytest.mark.parametrize("http_status", [404, 405, 406, 410, 415, 422, 302])
def test_other_codes_processing_failure(http_status: int) -> None:
    assert status(http_status) == Status.PROCESSING_FAILURE


# --------------------------------------------------------------------------------------------
# Orthanc quirks
# --------------------------------------------------------------------------------------------


def test_orthanc_200_with_empty_referenced_sequence_is_failure() -> None:
    code = status(200, body(referenced=[]))
    assert code == Status.PROCESSING_FAILURE
    assert code != Status.SUCCESS


def test_orthanc_200_with_no_sequences_is_failure() -> None:
    assert status(200, {}) == Status.PROCESSING_FAILURE


def test_200_referencing_only_another_instance_is_failure() -> None:
    assert status(200, body(referenced=[ref_item(OTHER_UID)])) == Status.PROCESSING_FAILURE


def test_200_with_empty_body_is_failure() -> None:
    assert status(200) == Status.PROCESSING_FAILURE


def test_200_with_non_json_body_is_failure() -> None:
    response = parse_stow_response(200, "text/html", b"<html>OK</html>")
    assert status_for(response, UID) == Status.PROCESSING_FAILURE


def test_orthanc_mixed_400_still_referencing_our_instance_is_success() -> None:
    payload = body(
        referenced=[ref_item(UID)],
        failed=[failed_item(OTHER_UID, int(Status.CANNOT_UNDERSTAND))],
    )
    assert status(400, payload) == Status.SUCCESS


def test_array_wrapped_body_decides_status() -> None:
    assert status(200, [body(referenced=[ref_item(UID)])]) == Status.SUCCESS
    payload = [body(failed=[failed_item(UID, int(Status.SOP_CLASS_NOT_SUPPORTED))])]
    assert status(409, payload) == Status.SOP_CLASS_NOT_SUPPORTED


def test_non_json_error_body_uses_http_status() -> None:
    response = parse_stow_response(503, "text/html", b"<html>Service Unavailable</html>")
    assert status_for(response, UID) == Status.OUT_OF_RESOURCES
    response = parse_stow_response(403, "text/plain", b"forbidden")
    assert status_for(response, UID) == Status.NOT_AUTHORIZED
