"""Error tree: each error carries the DIMSE status to answer with and whether a retry may help."""

from dicom_adapter.status import Status


class AdapterError(Exception):
    """Base of every error the adapter raises on purpose."""

    status: Status = Status.PROCESSING_FAILURE
    retryable: bool = False

    def __init__(self, message: str, *, status: Status | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


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
