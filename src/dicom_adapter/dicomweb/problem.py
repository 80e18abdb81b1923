"""Pure reading of an upstream's HTTP failure: the ErrorComment a modality sees, why a 403 happened.

Google answers failures with {"error": {"code", "message", "status"}}. Its message is shown
only for statuses about access, quota and availability: a message about a request's content
(INVALID_ARGUMENT, ALREADY_EXISTS, ...) may quote the data set, so there the status alone is
shown. Other servers' bodies are never shown (Orthanc and proxies may echo anything).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from dicom_adapter.errors import lo_text

# Google canonical statuses whose messages name projects, permissions and quotas, not data.
MESSAGE_SHOWN = frozenset(
    {
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "NOT_FOUND",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "INTERNAL",
    }
)


@dataclass(frozen=True)
class HttpProblem:
    """An HTTP failure as an operator may see it."""

    http_status: int
    status: str  # Google's canonical status, else the HTTP reason phrase
    message: str  # Google's message when it may be shown, else ""
    google_message: str  # Google's message, whatever it says (for --check, never for peers)

    @property
    def comment(self) -> str:
        """The ErrorComment: `Http_<code>, <STATUS>, <message>` (the Java adapter's form)."""
        parts = [f"Http_{self.http_status}", self.status, self.message]
        return lo_text(", ".join(part for part in parts if part))


def _google_error(body: bytes) -> dict[str, Any] | None:
    if not body.lstrip().startswith((b"{", b"[")):
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(parsed, list) and parsed and isinstance(parsed[0], dict):
        parsed = parsed[0]  # some Google front ends wrap the error in a list
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else None


def read_problem(http_status: int, body: bytes) -> HttpProblem:
    """The failure of one HTTP answer (status code and body)."""
    reason = httpx.codes.get_reason_phrase(http_status) or "HTTP error"
    error = _google_error(body)
    if error is None:
        return HttpProblem(http_status, reason, "", "")
    status = error.get("status")
    message = error.get("message")
    status_text = status.strip() if isinstance(status, str) and status.strip() else reason
    message_text = message.strip() if isinstance(message, str) else ""
    shown = message_text if status_text in MESSAGE_SHOWN else ""
    return HttpProblem(http_status, status_text, shown, message_text)


def http_error_comment(http_status: int, body: bytes) -> str:
    """The ErrorComment for an HTTP failure answer."""
    return read_problem(http_status, body).comment


# Why Google refuses with 403, from the texts its answers carry (the GKE guide lists these).
API_DISABLED_FIX = (
    "the Cloud Healthcare API is not enabled in the project: "
    "gcloud services enable healthcare.googleapis.com"
)
SCOPES_FIX = (
    "the credentials lack the OAuth scope: create the node pool with "
    "--scopes=https://www.googleapis.com/auth/cloud-healthcare, or use Workload Identity"
)
ROLE_FIX = "the service account lacks a role on the DICOM store: grant roles/healthcare.dicomEditor"


def explain_refusal(problem: HttpProblem) -> str:
    """The fix for a 401/403, from what the answer says ("" when it says nothing known)."""
    text = problem.google_message.lower()
    if "has not been used in project" in text or "is disabled" in text:
        return API_DISABLED_FIX
    if "insufficient authentication scopes" in text:
        return SCOPES_FIX
    if "permission" in text and ("denied" in text or "does not have" in text):
        return ROLE_FIX
    return ""
