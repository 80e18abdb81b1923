"""ErrorComment texts: the Java adapter's `Http_<code>, <STATUS>, <message>`, LO-safe, no data."""

from __future__ import annotations

import json

import httpx
import pytest

from dicom_adapter.dicomweb.client import failure_cause
from dicom_adapter.dicomweb.problem import (
    API_DISABLED_FIX,
    ROLE_FIX,
    SCOPES_FIX,
    explain_refusal,
    http_error_comment,
    read_problem,
)
from dicom_adapter.dicomweb.stow import failure_comment, parse_stow_response
from dicom_adapter.errors import (
    InvalidDatasetError,
    UpstreamUnavailableError,
    error_comment,
    lo_text,
)

API_DISABLED = (
    "Cloud Healthcare API has not been used in project 123456 before or it is disabled. "
    "Enable it by visiting https://console.developers.google.com/apis/api/"
    "healthcare.googleapis.com/overview?project=123456 then retry."
)
SCOPES = "Request had insufficient authentication scopes."
ROLE = (
    "Permission 'healthcare.dicomStores.dicomWebWrite' denied on resource "
    "'projects/p/locations/l/datasets/d/dicomStores/s' (or it may not exist)."
)


def google(code: int, message: str, status: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "status": status}}).encode()


@pytest.mark.parametrize(
    ("message", "comment", "fix"),
    [
        (
            API_DISABLED,
            "Http_403, PERMISSION_DENIED, Cloud Healthcare API has not been u",
            API_DISABLED_FIX,
        ),
        (SCOPES, "Http_403, PERMISSION_DENIED, Request had insufficient authentica", SCOPES_FIX),
        (ROLE, "Http_403, PERMISSION_DENIED, Permission 'healthcare.dicomStores.", ROLE_FIX),
    ],
)
def test_google_403_bodies_give_the_java_form_and_their_fix(
    message: str, comment: str, fix: str
) -> None:
    body = google(403, message, "PERMISSION_DENIED")
    assert http_error_comment(403, body) == comment
    assert len(comment) == 64
    assert explain_refusal(read_problem(403, body)) == fix


def test_message_about_the_data_set_is_not_shown() -> None:
    body = google(400, "invalid PatientName 'Doe^Jane' in instance", "INVALID_ARGUMENT")
    assert http_error_comment(400, body) == "Http_400, INVALID_ARGUMENT"


def test_non_google_body_is_never_shown() -> None:
    body = b'{"HttpError": "Bad Request", "Message": "patient Doe^Jane rejected"}'
    assert http_error_comment(400, body) == "Http_400, Bad Request"
    assert http_error_comment(502, b"<html>Doe^Jane</html>") == "Http_502, Bad Gateway"


def test_unknown_403_text_has_no_fix() -> None:
    assert explain_refusal(read_problem(403, b"Forbidden")) == ""


def test_lo_text_is_a_valid_lo_value() -> None:
    text = lo_text("a\\b\r\n\tc  d\x00é" + "x" * 80)
    assert text.startswith("a b c d ?x")
    assert len(text) == 64
    assert "\\" not in text and text.isascii() and text.isprintable()


def test_stow_failure_comment_comes_from_the_answer() -> None:
    response = parse_stow_response(
        403, "application/json", google(403, SCOPES, "PERMISSION_DENIED")
    )
    assert failure_comment(response, "1.2.3").startswith("Http_403, PERMISSION_DENIED, Request")
    failed = {
        "00081198": {
            "vr": "SQ",
            "Value": [
                {
                    "00081155": {"vr": "UI", "Value": ["1.2.3"]},
                    "00081197": {"vr": "US", "Value": [0xA700]},
                }
            ],
        }
    }
    response = parse_stow_response(200, "application/dicom+json", json.dumps(failed).encode())
    assert failure_comment(response, "1.2.3") == "Http_200, STOW-RS FailureReason 0xA700"


def test_transport_failures_name_the_cause() -> None:
    request = httpx.Request("POST", "http://dicomweb.test/studies")
    refused = httpx.ConnectError("connect to h:1: [Errno 111] Connection refused", request=request)
    assert failure_cause(refused) == "connection refused"
    assert failure_cause(httpx.ReadTimeout("slow", request=request)) == "timeout"
    unknown = httpx.ConnectError("[Errno -2] Name or service not known", request=request)
    assert failure_cause(unknown) == "DICOMweb host not found"


def test_error_comment_of_our_errors() -> None:
    assert error_comment(InvalidDatasetError("dataset has no SOPInstanceUID")) == (
        "dataset has no SOPInstanceUID"
    )
    quoted = InvalidDatasetError("cannot parse 'Doe^Jane'", comment="dataset cannot be parsed")
    assert error_comment(quoted) == "dataset cannot be parsed"
    assert error_comment(UpstreamUnavailableError("x", comment="timeout")) == "timeout"
    assert error_comment(TimeoutError()) == "timeout"
    assert error_comment(KeyError("Doe^Jane")) == "internal error"
