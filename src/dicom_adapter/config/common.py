"""Settings shared by both services; field name = flag name, upper-case field name = env var."""

from __future__ import annotations

from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field
from pydantic.config import JsonDict
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

LATER: JsonDict = {"status": "not supported yet"}
DEPRECATED: JsonDict = {"status": "deprecated"}
NEW: JsonDict = {"status": "new"}


def later_flag(default: Any, description: str) -> Any:
    """A Java flag whose feature arrives in a later release: parsed, refused when set."""
    return Field(default, description=description, json_schema_extra=LATER)


def new_flag(default: Any, description: str) -> Any:
    """A flag the Java adapter does not have."""
    return Field(default, description=description, json_schema_extra=NEW)


class CommonSettings(BaseSettings):
    """Flags both `dicom-import` and `dicom-export` take."""

    model_config = SettingsConfigDict(frozen=True, case_sensitive=False, extra="ignore")
    deprecation_replacement: ClassVar[str] = ""  # the flag that replaces the deprecated ones

    verbose: bool = Field(False, description="Log debug messages.")
    oauth_scopes: str = Field(
        "",
        description="Comma-separated OAuth scopes for Google credentials "
        "(default https://www.googleapis.com/auth/cloud-platform).",
    )
    monitoring_project_id: str = Field(
        "",
        description="Cloud Monitoring project id to export metrics to "
        "(custom.googleapis.com/dicomadapter/...; empty = Prometheus only).",
    )
    monitoring_flush_interval: float = new_flag(
        60.0,
        "Seconds between two Cloud Monitoring writes (one CreateTimeSeries call) with "
        "--monitoring_project_id; Cloud Monitoring refuses points of a series closer than 5 s.",
    )
    dicomweb_bearer_token: str = new_flag(
        "", "Static bearer token for a non-Google DICOMweb server (prefer the env var)."
    )
    dicomweb_basic_auth: str = new_flag(
        "",
        "user:password for HTTP basic auth to a non-Google DICOMweb server (prefer the env var).",
    )
    http_timeout: float = new_flag(
        10.0,
        "Seconds any single HTTP connect/read/write step may take before it fails "
        "(less than --upstream_retry_deadline).",
    )
    upstream_retry_deadline: float = new_flag(
        20.0,
        "Seconds transient upstream failures (429, 5xx, connection errors, timeouts) are retried "
        "before giving up; no attempt runs past it.",
    )
    log_format: Literal["json", "text"] = new_flag(
        "json", "Log line format: json (one object per line, Cloud Logging fields) or text."
    )
    shutdown_grace_period: float = new_flag(
        30.0, "Seconds to let running work finish after SIGTERM before aborting it."
    )
    check: bool = new_flag(
        False,
        "Verify the configuration instead of serving (DICOMweb reachable and authorized, "
        "peers, spool, TLS, subscription): one line per check, exit 0 when none failed.",
    )
    fetch_memory_budget: int = new_flag(
        256,
        "MiB that WADO-RS-fetched instances (C-MOVE prefetch, export fetches) may hold in memory "
        "together, process-wide; instances beyond it are spooled to disk.",
    )
    outgoing_tls_ca_certificates: str = new_flag(
        "",
        'PEM CA certificates that outgoing DICOM TLS peers (AET entries with "tls": true, '
        "--peer_dimse_tls) must chain to; empty: the system's trust store.",
    )
    outgoing_tls_certificate: str = new_flag(
        "", "PEM client certificate for outgoing DICOM TLS peers that require one."
    )
    outgoing_tls_private_key: str = new_flag("", "PEM private key of --outgoing_tls_certificate.")
    outgoing_tls_check_hostname: bool = new_flag(
        True,
        "Outgoing DICOM TLS: the peer's certificate must name the host (or IP) we connect to; "
        "false still verifies the chain.",
    )

    @property
    def outgoing_tls_options(self) -> dict[str, Any]:
        """Keyword arguments of dimse.scu.client_tls_context from the --outgoing_tls_* flags."""
        return {
            "ca_certificates": self.outgoing_tls_ca_certificates,
            "certificate": self.outgoing_tls_certificate,
            "private_key": self.outgoing_tls_private_key,
            "check_hostname": self.outgoing_tls_check_hostname,
        }

    @property
    def fetch_memory_budget_bytes(self) -> int:
        """--fetch_memory_budget in bytes."""
        return max(0, self.fetch_memory_budget) << 20

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only explicit values: config.parse is the one place that reads the environment."""
        return (init_settings,)

    def cross_check(self) -> list[tuple[str, str]]:
        """Problems between flags, as (flag, problem) pairs; empty when consistent."""
        problems: list[tuple[str, str]] = []
        if not self.monitoring_flush_interval > 0:
            problems.append(("monitoring_flush_interval", "must be more than 0 seconds"))
        if self.dicomweb_bearer_token and self.dicomweb_basic_auth:
            problems.append(("dicomweb_basic_auth", "use either a bearer token or basic auth"))
        if self.dicomweb_basic_auth and ":" not in self.dicomweb_basic_auth:
            problems.append(("dicomweb_basic_auth", "expected user:password"))
        if self.fetch_memory_budget < 0:
            problems.append(("fetch_memory_budget", "must be 0 (always spool) or more MiB"))
        return problems + self.timeout_nesting()

    def timeout_nesting(self) -> list[tuple[str, str]]:
        """One problem when the timeouts do not nest (an HTTP attempt must fit in the retries)."""
        if self.http_timeout < self.upstream_retry_deadline:
            return []
        return [
            (
                "http_timeout",
                f"timeouts must nest: --http_timeout ({self.http_timeout:g}) < "
                f"--upstream_retry_deadline ({self.upstream_retry_deadline:g})",
            )
        ]


def valid_aet(value: str) -> str:
    """An AE title, trimmed; ValueError when it cannot be one (pydantic field validators)."""
    value = value.strip()
    if len(value) > 16:
        raise ValueError("an AE title has at most 16 characters")
    if "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError("an AE title may not contain backslashes or control characters")
    return value


METRICS_PORT_HELP = (
    "Port of the Prometheus /metrics and the /healthz, /readyz probes "
    "(0 = any free port, -1 = disabled)."
)


def valid_metrics_port(value: int) -> int:
    """A --metrics_port value: -1 (disabled), 0 (any free port) or a TCP port."""
    if not -1 <= value <= 65535:
        raise ValueError("must be -1 (disabled), 0 (any free port) or a port up to 65535")
    return value


def check_http_url(flag: str, url: str) -> list[tuple[str, str]]:
    """A (flag, problem) pair when `url` is not an absolute http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [(flag, f"not an http(s) URL: {url!r}")]
    return []
