"""Settings of `dicom-export` (SPEC §2): the Java adapter's flags, plus ours."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from dicom_adapter.config.common import (
    DEPRECATED,
    METRICS_PORT_HELP,
    CommonSettings,
    check_http_url,
    new_flag,
    valid_aet,
    valid_metrics_port,
)


def parse_statuses(text: str) -> frozenset[int]:
    """Status codes from "0xA900,0x0122" or "A900, 0122" (16-bit hex, with or without 0x)."""
    codes: set[int] = set()
    for part in text.replace(";", ",").split(","):
        digits = part.strip().lower().removeprefix("0x")
        if not digits:
            continue
        if len(digits) > 4 or any(c not in "0123456789abcdef" for c in digits):
            raise ValueError(f"not a 16-bit hex status code: {part.strip()!r} (e.g. 0xA900)")
        codes.add(int(digits, 16))
    return frozenset(codes)


class ExporterSettings(CommonSettings):
    """Every flag of dicom-export."""

    deprecation_replacement: ClassVar[str] = "peer_dicomweb_address"

    peer_dimse_aet: str = Field("", description="AE title of the C-STORE sink (C-STORE mode).")
    peer_dimse_ip: str = Field("", description="Host or IP of the C-STORE sink.")
    peer_dimse_port: int = Field(0, ge=0, le=65535, description="Port of the C-STORE sink.")
    client_aet: str = Field("EXPORTADAPTER", description="Our calling AE title for C-STORE.")
    peer_max_associations: int = new_flag(
        1,
        "C-STORE sink: associations used at the same time (many PACS limit associations per "
        "calling AE title; raise it only as far as the sink allows).",
    )
    peer_dimse_tls: bool = new_flag(
        False, "C-STORE to the sink over DICOM TLS (see --outgoing_tls_ca_certificates)."
    )
    peer_dicomweb_address: str = Field(
        "", description="DICOMweb root of the STOW-RS sink; STOW-RS goes to <root>/studies."
    )
    peer_dicomweb_addr: str = Field(
        "",
        description="Deprecated: DICOMweb address of the STOW-RS sink, used with "
        "--peer_dicomweb_stow_path.",
        json_schema_extra=DEPRECATED,
    )
    peer_dicomweb_stow_path: str = Field(
        "",
        description="Deprecated: STOW-RS path appended to --peer_dicomweb_addr.",
        json_schema_extra=DEPRECATED,
    )
    use_gcp_application_default_credentials: bool = Field(
        False,
        description="Authenticate to DICOMweb with Google Application Default Credentials "
        "(always used for googleapis.com hosts; the Java adapter inverts this flag).",
    )
    dicomweb_addr: str = Field(
        "", description="DICOMweb root instances are read from with WADO-RS (required)."
    )
    project_id: str = Field("", description="Google Cloud project of the subscription (required).")
    subscription_id: str = Field("", description="Pub/Sub subscription id to pull (required).")
    max_messages: int = new_flag(
        16, "Pub/Sub flow control: messages handled at the same time (at most)."
    )
    max_bytes: int = new_flag(
        256 * 1024 * 1024, "Pub/Sub flow control: bytes of message data outstanding (at most)."
    )
    nack_permanent_failures: bool = new_flag(
        False,
        "Nack messages that can never succeed (malformed, source 404/410, "
        "--permanent_cstore_statuses) after the retry backoff instead of acking them; pair "
        "with a dead-letter topic.",
    )
    metrics_port: int = new_flag(9091, METRICS_PORT_HELP)
    retry_backoff_initial: float = new_flag(
        1.0,
        "Seconds a message waits after its first failed attempt before it is retried; doubles "
        "with each further attempt (with jitter), up to --retry_backoff_max.",
    )
    retry_backoff_max: float = new_flag(
        600.0,
        "Longest wait (seconds) between two attempts of one message, and longest a message is "
        "held while the sink is unreachable before it is nacked (at most 600).",
    )
    sink_probe_interval: float = new_flag(
        5.0,
        "While the sink is unreachable, seconds between probes (one association or one "
        "request); exports resume after the first probe that gets through.",
    )
    permanent_cstore_statuses: str = new_flag(
        "0xA900,0x0122",
        "C-STORE (and STOW FailureReason) statuses that can never succeed, hex, "
        "comma-separated: the message is acked (or nacked with --nack_permanent_failures); "
        "every other failure is retried. Default 0xA900,0x0122.",
    )

    @field_validator("peer_dimse_aet", "client_aet")
    @classmethod
    def _check_aet(cls, value: str) -> str:
        return valid_aet(value)

    @field_validator("metrics_port")
    @classmethod
    def _check_metrics_port(cls, value: int) -> int:
        return valid_metrics_port(value)

    @field_validator("permanent_cstore_statuses")
    @classmethod
    def _check_statuses(cls, value: str) -> str:
        parse_statuses(value)
        return value

    @field_validator("retry_backoff_initial", "retry_backoff_max", "sink_probe_interval")
    @classmethod
    def _positive_seconds(cls, value: float) -> float:
        if not 0 < value <= 600:
            raise ValueError("must be more than 0 and at most 600 seconds")
        return value

    @field_validator("max_messages", "max_bytes", "peer_max_associations")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @property
    def permanent_statuses(self) -> frozenset[int]:
        """--permanent_cstore_statuses as numbers."""
        return parse_statuses(self.permanent_cstore_statuses)

    @property
    def cstore_sink(self) -> bool:
        """True when the sink is a DIMSE peer (C-STORE)."""
        return bool(self.peer_dimse_aet or self.peer_dimse_ip or self.peer_dimse_port)

    @property
    def stow_sink(self) -> bool:
        """True when the sink is a DICOMweb server (STOW-RS)."""
        return bool(
            self.peer_dicomweb_address or self.peer_dicomweb_addr or self.peer_dicomweb_stow_path
        )

    @property
    def stow_url(self) -> str:
        """Where STOW-RS goes; --peer_dicomweb_address wins over the deprecated pair."""
        if self.peer_dicomweb_address:
            return self.peer_dicomweb_address.rstrip("/") + "/studies"
        return self.peer_dicomweb_addr.rstrip("/") + "/" + self.peer_dicomweb_stow_path.lstrip("/")

    @property
    def source_root(self) -> str:
        """The source DICOMweb root, without a trailing slash."""
        return self.dicomweb_addr.rstrip("/")

    @property
    def subscription_path(self) -> str:
        """projects/P/subscriptions/S."""
        return f"projects/{self.project_id}/subscriptions/{self.subscription_id}"

    def cross_check(self) -> list[tuple[str, str]]:
        """Problems between flags, as (flag, problem) pairs; empty when consistent."""
        problems: list[tuple[str, str]] = []
        if self.cstore_sink and self.stow_sink:
            problems.append(
                (
                    "peer_dimse_aet",
                    "choose one sink: C-STORE (--peer_dimse_aet/ip/port) or STOW-RS "
                    "(--peer_dicomweb_address), not both",
                )
            )
        elif not self.cstore_sink and not self.stow_sink:
            problems.append(
                (
                    "peer_dicomweb_address",
                    "no sink: set --peer_dicomweb_address (STOW-RS) or --peer_dimse_aet, "
                    "--peer_dimse_ip and --peer_dimse_port (C-STORE)",
                )
            )
        elif self.cstore_sink:
            for flag, value in (
                ("peer_dimse_aet", self.peer_dimse_aet),
                ("peer_dimse_ip", self.peer_dimse_ip),
                ("peer_dimse_port", self.peer_dimse_port),
            ):
                if not value:
                    problems.append(
                        (
                            flag,
                            "the C-STORE sink needs --peer_dimse_aet, "
                            "--peer_dimse_ip and --peer_dimse_port",
                        )
                    )
        elif self.peer_dicomweb_address:
            problems.extend(check_http_url("peer_dicomweb_address", self.peer_dicomweb_address))
        elif not (self.peer_dicomweb_addr and self.peer_dicomweb_stow_path):
            missing = "peer_dicomweb_stow_path" if self.peer_dicomweb_addr else "peer_dicomweb_addr"
            problems.append((missing, "the deprecated pair needs both flags set"))
        else:
            problems.extend(check_http_url("peer_dicomweb_addr", self.peer_dicomweb_addr))
        if self.peer_max_associations > self.max_messages:
            problems.append(
                (
                    "peer_max_associations",
                    f"more than --max_messages ({self.max_messages}): the extra associations "
                    "could never be used",
                )
            )
        if self.peer_dimse_tls and not self.cstore_sink:
            problems.append(("peer_dimse_tls", "DICOM TLS needs the C-STORE sink (--peer_dimse_*)"))
        if not self.dicomweb_addr:
            problems.append(("dicomweb_addr", "is required"))
        else:
            problems.extend(check_http_url("dicomweb_addr", self.dicomweb_addr))
        if not self.project_id:
            problems.append(("project_id", "is required"))
        if not self.subscription_id:
            problems.append(("subscription_id", "is required"))
        if self.retry_backoff_initial > self.retry_backoff_max:
            problems.append(("retry_backoff_initial", "must not be more than --retry_backoff_max"))
        return problems + super().cross_check()
