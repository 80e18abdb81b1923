"""Error tree: each error carries the DIMSE status to answer with and whether a retry may help."""

import re

from dicom_adapter.status import Status

ERROR_COMMENT_MAX = 64  # ErrorComment (0000,0902) is LO: 64 characters
_NOT_LO = re.compile(r"[\x00-\x1f\x7f\\]+")  # control characters and backslash are not LO text


class AdapterError(Exception):
    """Base of every error the adapter raises on purpose."""

    status: Status = Status.PROCESSING_FAILURE
    retryable: bool = False

    def __init__(
        self, message: str, *, status: Status | None = None, comment: str | None = None
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        # What the peer's operator reads in ErrorComment. Our own messages by default; a raise
        # that quotes foreign text (a decoder's exception, an upstream body) passes its own.
        self.comment = message if comment is None else comment


class ConfigError(AdapterError):
    """Bad configuration: the CLI prints one line and exits 2."""

    def __init__(self, flag: str, problem: str) -> None:
        label = flag if flag.isupper() else f"--{flag}"
        super().__init__(f"{label}: {problem}" if flag else problem)
        self.flag = flag
        self.problem = problem


class InvalidDatasetError(AdapterError):
    """The peer's dataset cannot be understood (e.g. no SOP Instance UID)."""

    status = Status.CANNOT_UNDERSTAND


class UpstreamError(AdapterError):
    """The DICOMweb server answered with a failure."""

    http_status: int = 0  # the HTTP status of that answer, when it was one (e.g. 404)


class UpstreamUnavailableError(UpstreamError):
    """The DICOMweb server is unreachable, overloaded or timed out (after retries)."""

    status = Status.OUT_OF_RESOURCES
    retryable = True


class UpstreamAuthError(UpstreamError):
    """The DICOMweb server refused our credentials, or we could not obtain any."""

    status = Status.NOT_AUTHORIZED


class BridgeError(AdapterError):
    """A call across the thread/loop boundary was refused or timed out."""


class BridgeClosedError(BridgeError):
    """The event loop is shutting down; no new work is accepted."""

    status = Status.OUT_OF_RESOURCES


def lo_text(text: str) -> str:
    """`text` as an LO value in the command set's repertoire (ASCII, no backslash), 64 chars."""
    ascii_text = text.encode("ascii", "replace").decode("ascii")
    return " ".join(_NOT_LO.sub(" ", ascii_text).split())[:ERROR_COMMENT_MAX].rstrip()


def error_comment(exc: BaseException) -> str:
    """The ErrorComment for a failure: the cause in an operator's words, never patient data."""
    if isinstance(exc, AdapterError):
        return lo_text(exc.comment)
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "internal error"
