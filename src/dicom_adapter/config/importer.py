"""Settings of `dicom-import` (SPEC §1.1): the Java adapter's flags, plus ours."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import NoDecode

from dicom_adapter.config.common import (
    DEPRECATED,
    METRICS_PORT_HELP,
    NEW,
    CommonSettings,
    check_http_url,
    new_flag,
    valid_aet,
    valid_metrics_port,
)
from dicom_adapter.dicom.redact import (
    CHC_BASIC,
    PROFILES,
    RedactionConfigError,
    parse_tag_list,
)
from dicom_adapter.dicom.transcode import CODECS_INSTALL
from dicom_adapter.dicom.transcode import DEFAULT_MAX_BYTES as DEFAULT_TRANSCODE_MAX_BYTES
from dicom_adapter.dicom.transcode import DEFAULT_MAX_SECONDS as DEFAULT_TRANSCODE_MAX_SECONDS
from dicom_adapter.dicom.transcode import TARGETS as TRANSCODE_TARGETS
from dicom_adapter.spool.gcs import GcsLocation

GOOGLE_HOST = "healthcare.googleapis.com"
GOOGLE_DICOMWEB = re.compile(
    r"^https://healthcare\.googleapis\.com/[^/]+/projects/[^/]+/locations/[^/]+"
    r"/datasets/[^/]+/dicomStores/[^/]+/dicomWeb/?$"
)


class ImporterSettings(CommonSettings):
    """Every flag of dicom-import."""

    deprecation_replacement: ClassVar[str] = "dicomweb_address"

    dimse_aet: str = Field("", description="AE title of this DIMSE SCP (required).")
    dimse_port: int = Field(
        0, ge=0, le=65535, description="Port to listen on for DIMSE (0 = any free port)."
    )
    dimse_cmove_aet: str = Field(
        "",
        description="Calling AE title for C-STORE sub-operations of C-MOVE (default --dimse_aet).",
    )
    dicomweb_address: str = Field(
        "",
        description="DICOMweb root; STOW-RS goes to <root>/studies. For the Cloud Healthcare "
        "API: https://healthcare.googleapis.com/v1/projects/P/locations/L/datasets/D/"
        "dicomStores/S/dicomWeb.",
    )
    dicomweb_addr: str = Field(
        "",
        description="Deprecated: DICOMweb server address, used with --dicomweb_stow_path "
        "(C-STORE only).",
        json_schema_extra=DEPRECATED,
    )
    dicomweb_stow_path: str = Field(
        "",
        description="Deprecated: STOW-RS path appended to --dicomweb_addr.",
        json_schema_extra=DEPRECATED,
    )
    aet_dictionary: str = Field(
        "", description="Path to a JSON array of {name, host, port} peers (AET dictionary)."
    )
    aet_dictionary_inline: str = Field(
        "", description="The AET dictionary as inline JSON (takes precedence over the file)."
    )
    redact_remove_list: str = Field(
        "",
        description="Tags (keywords or 8 hex digits, comma-separated) whose values are emptied "
        "during C-STORE, at any depth; the instance UIDs are replaced.",
    )
    redact_keep_list: str = Field(
        "",
        description="Tags (keywords or 8 hex digits, comma-separated) kept during C-STORE; every "
        "other value is emptied, at any depth; the instance UIDs are replaced.",
    )
    redact_filter_profile: str = Field(
        "", description="Redaction profile: CHC_BASIC (the Java adapter's remove list)."
    )
    destination_config_path: str = Field(
        "",
        description="Path to a JSON array of routing rules {filter, dicomweb_destination | "
        "name/host/port}; unmatched instances go to --dicomweb_address.",
    )
    destination_config_inline: str = Field(
        "", description="Routing rules as inline JSON (takes precedence over the file)."
    )
    store_compress_to_transfer_syntax: str = Field(
        "",
        description="Transfer syntax UID to transcode received instances to, after redaction: "
        "1.2.840.10008.1.2.4.90 (JPEG 2000 lossless), .4.80 (JPEG-LS lossless), .5 (RLE "
        "lossless), .1.99 (Deflated Explicit VR LE) or .1 (Explicit VR LE, decompressed). Needs "
        f"{CODECS_INSTALL}. What cannot be transcoded is stored as received (one WARNING).",
    )
    transcode_max_bytes: int = new_flag(
        DEFAULT_TRANSCODE_MAX_BYTES,
        "Instances whose file or decoded pixel data is larger are stored as received, not "
        "transcoded (bytes; bounds transcoding memory, one instance at a time).",
    )
    transcode_max_seconds: float = new_flag(
        DEFAULT_TRANSCODE_MAX_SECONDS,
        "Seconds one transcode may take (checked between frames); past it the instance is "
        "stored as received. The C-STORE is answered after it: keep this plus "
        "--cstore_answer_deadline below the sender's timeout.",
    )
    fuzzy_matching: bool = Field(
        False, description="Ask the DICOMweb server for fuzzy person-name matching in C-FIND."
    )
    persistent_file_storage_location: str = Field(
        "",
        description="Spool directory for durable store-and-forward: every C-STORE is fsynced "
        "there before anything else, uploaded from there, kept until stored; or "
        "gs://bucket/prefix (Cloud Storage, one prefix per replica: env HOSTNAME).",
    )
    gcs_backup_project_id: str = Field(
        "",
        description="Google Cloud project of the gs:// spool's Cloud Storage client "
        "(ignored with a local spool, as in the Java adapter).",
    )
    persistent_file_upload_retry_amount: int = Field(
        0, description="Upload retries for spooled instances before they move to failed/."
    )
    auto_ack_cstore: bool = Field(
        False,
        description="Answer C-STORE success once the instance is fsynced in the spool; "
        "upload in the background (needs --persistent_file_storage_location).",
    )
    min_upload_delay: int = Field(
        100, gt=0, description="Minimum delay before a spooled upload retry (ms)."
    )
    max_waiting_time_between_uploads: int = Field(
        5000,
        description="Maximum delay between spooled upload retries (ms); the delay doubles "
        "from --min_upload_delay up to it.",
    )
    http_error_codes_to_retry: Annotated[frozenset[int], NoDecode] = Field(
        frozenset(),
        description="Extra HTTP status codes (below 500) to retry, comma-separated.",
    )
    send_to_all_matching_destinations: bool = Field(
        False,
        description="Send to every matching destination (STOW-RS and DIMSE), not only the "
        "first; each is delivered and retried on its own (needs "
        "--persistent_file_storage_location).",
    )
    stow_http2: bool = Field(False, description="Use HTTP/2 for STOW-RS (false by default).")
    stow_overwrite: bool = Field(
        False,
        description="On 409 Conflict, delete the stored instance and store it again.",
    )
    max_associations: int = new_flag(32, "Maximum concurrent DIMSE associations.")
    max_pending_associations: int = new_flag(
        64,
        "Connections that may be negotiating an association at once (not yet holding one of "
        "--max_associations); past it the oldest is closed. Each is closed after --acse_timeout.",
    )
    max_pdu_size: int = new_flag(262144, "Maximum PDU size we receive (bytes; 0 = unlimited).")
    pynetdicom_storage: bool = new_flag(
        False,
        "Serve storage-only associations (C-STORE, C-ECHO) with pynetdicom, as every other "
        "association is, instead of the adapter's own storage SCP (a fallback; slower).",
    )
    acse_timeout: float = new_flag(30.0, "Seconds to wait for association messages.")
    dimse_timeout: float = new_flag(120.0, "Seconds to wait for DIMSE messages from the peer.")
    network_timeout: float = new_flag(
        300.0, "Seconds an idle association stays open before it is closed."
    )
    metrics_port: int = new_flag(9090, METRICS_PORT_HELP)
    allowed_calling_aets: str = new_flag(
        "",
        "Comma-separated calling AE titles allowed to associate (empty = any); others get "
        "A-ASSOCIATE-RJ (calling AE title not recognized).",
    )
    tls_certificate: str = new_flag(
        "", "PEM certificate (chain) for DICOM TLS on the DIMSE port; needs --tls_private_key."
    )
    tls_private_key: str = new_flag("", "PEM private key of --tls_certificate.")
    tls_ca_certificates: str = new_flag(
        "", "PEM CA certificates: with it, peers must present a certificate they signed."
    )
    disable_cfind: bool = new_flag(False, "Do not offer C-FIND (Study/Patient Root).")
    disable_retrieve: bool = new_flag(False, "Do not offer C-MOVE and C-GET.")
    disable_commitment: bool = new_flag(False, "Do not offer storage commitment.")
    spool_upload_concurrency: int = new_flag(4, "STOW-RS requests in flight for spooled instances.")
    spool_upload_batch: int = new_flag(
        10,
        "Spooled instances per STOW-RS request, at most: a request takes those already waiting; "
        "while another is in flight it waits up to 50 ms for more (1: one per request).",
    )
    spool_upload_batch_bytes: int = new_flag(
        16 << 20,
        "Bytes of instances per spooled STOW-RS request, at most (one larger instance goes alone).",
    )
    spool_free_space_headroom: int = new_flag(
        1 << 30,
        "Bytes that must stay free on the spool's volume; below it new C-STOREs get 0xA700 "
        "and /readyz answers not-ready.",
    )
    spool_max_bytes: int = Field(
        0,
        ge=0,
        json_schema_extra=NEW,
        description="Byte cap of the spool (incoming/, queue/ and failed/ together; 0 = none); "
        "past it new C-STOREs get 0xA700 and /readyz answers not-ready until uploads make room.",
    )
    cstore_answer_deadline: float = new_flag(
        25.0,
        "Seconds from the last byte of a C-STORE data set to its response: upstream retries stop "
        "in time to answer 0xA700 (retry later) before it. More than --upstream_retry_deadline.",
    )

    @field_validator("http_error_codes_to_retry", mode="before")
    @classmethod
    def _split_codes(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.replace(";", ",").split(",")]
            try:
                codes = frozenset(int(p) for p in parts if p)
            except ValueError:
                raise ValueError(
                    "expected comma-separated HTTP status codes, e.g. 409,429"
                ) from None
            bad = sorted(c for c in codes if not 100 <= c <= 599)
            if bad:
                raise ValueError(f"not an HTTP status code: {bad[0]}")
            return codes
        return value

    @field_validator("redact_remove_list", "redact_keep_list")
    @classmethod
    def _check_tag_list(cls, value: str) -> str:
        try:
            parse_tag_list(value)  # an unknown tag stops startup, named
        except RedactionConfigError as exc:
            raise PydanticCustomError("redaction", str(exc)) from None
        return value

    @field_validator("redact_filter_profile")
    @classmethod
    def _check_profile(cls, value: str) -> str:
        if value.strip() and value.strip() not in PROFILES:
            raise PydanticCustomError(
                "redaction", f"unknown profile {value.strip()!r} (known: {CHC_BASIC})"
            )
        return value.strip()

    @field_validator("store_compress_to_transfer_syntax")
    @classmethod
    def _check_transcode_target(cls, value: str) -> str:
        value = value.strip()
        if value and value not in TRANSCODE_TARGETS:
            raise ValueError(
                f"cannot transcode to {value}; supported: " + ", ".join(TRANSCODE_TARGETS)
            )
        return value

    @field_validator("metrics_port")
    @classmethod
    def _check_metrics_port(cls, value: int) -> int:
        return valid_metrics_port(value)

    @field_validator("dimse_aet", "dimse_cmove_aet")
    @classmethod
    def _check_aet(cls, value: str) -> str:
        return valid_aet(value)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_allowed_aets(cls, value: str) -> str:
        titles = [valid_aet(title) for title in value.split(",")] if value.strip() else []
        if any(not title for title in titles):
            raise ValueError("an empty AE title in the list")
        return ",".join(titles)

    @property
    def allowed_calling_aet_list(self) -> list[str]:
        """The calling AE titles allowed to associate; empty means any."""
        return self.allowed_calling_aets.split(",") if self.allowed_calling_aets else []

    @property
    def stow_url(self) -> str:
        """Where STOW-RS goes; --dicomweb_address wins over the deprecated pair."""
        if self.dicomweb_address:
            return self.dicomweb_address.rstrip("/") + "/studies"
        return self.dicomweb_addr.rstrip("/") + "/" + self.dicomweb_stow_path.lstrip("/")

    @property
    def dicomweb_root(self) -> str:
        """DICOMweb root for QIDO/WADO (empty when only the deprecated STOW pair is set)."""
        return self.dicomweb_address.rstrip("/")

    def cross_check(self) -> list[tuple[str, str]]:
        """Problems between flags, as (flag, problem) pairs; empty when consistent."""
        problems: list[tuple[str, str]] = []
        if not self.dimse_aet:
            problems.append(("dimse_aet", "is required"))
        if self.dicomweb_address:
            problems.extend(_check_address("dicomweb_address", self.dicomweb_address))
        elif self.dicomweb_addr or self.dicomweb_stow_path:
            if not (self.dicomweb_addr and self.dicomweb_stow_path):
                missing = "dicomweb_stow_path" if self.dicomweb_addr else "dicomweb_addr"
                problems.append((missing, "the deprecated pair needs both flags set"))
            else:
                problems.extend(_check_address("dicomweb_addr", self.dicomweb_addr))
        else:
            problems.append(("dicomweb_address", "is required"))
        if bool(self.tls_certificate) != bool(self.tls_private_key):
            missing = "tls_private_key" if self.tls_certificate else "tls_certificate"
            problems.append(
                (missing, "DICOM TLS needs both --tls_certificate and --tls_private_key")
            )
        if self.tls_ca_certificates and not self.tls_certificate:
            problems.append(
                ("tls_ca_certificates", "needs --tls_certificate and --tls_private_key")
            )
        location = self.persistent_file_storage_location
        if location.startswith("gs://"):
            try:
                GcsLocation.parse(location)
            except ValueError as exc:
                problems.append(("persistent_file_storage_location", str(exc)))
        if self.auto_ack_cstore and not location:
            problems.append(("auto_ack_cstore", "needs --persistent_file_storage_location"))
        if self.send_to_all_matching_destinations and not location:
            problems.append(
                ("send_to_all_matching_destinations", "needs --persistent_file_storage_location")
            )
        redaction = [self.redact_remove_list, self.redact_keep_list, self.redact_filter_profile]
        if sum(1 for value in redaction if value.strip()) > 1:
            problems.append(
                (
                    "redact_filter_profile" if self.redact_filter_profile else "redact_keep_list",
                    "only one of --redact_remove_list, --redact_keep_list, "
                    "--redact_filter_profile may be set",
                )
            )
        if self.transcode_max_bytes <= 0:
            problems.append(("transcode_max_bytes", "must be a positive number of bytes"))
        if self.transcode_max_seconds <= 0:
            problems.append(("transcode_max_seconds", "must be a positive number of seconds"))
        return problems + super().cross_check()

    def timeout_nesting(self) -> list[tuple[str, str]]:
        """One problem naming the three flags when they do not nest."""
        if self.http_timeout < self.upstream_retry_deadline < self.cstore_answer_deadline:
            return []
        return [
            (
                "cstore_answer_deadline",
                f"timeouts must nest: --http_timeout ({self.http_timeout:g}) < "
                f"--upstream_retry_deadline ({self.upstream_retry_deadline:g}) < "
                f"--cstore_answer_deadline ({self.cstore_answer_deadline:g})",
            )
        ]


def _check_address(flag: str, url: str) -> list[tuple[str, str]]:
    problems = check_http_url(flag, url)
    if problems:
        return problems
    parts = urlsplit(url)
    if (
        parts.hostname == GOOGLE_HOST
        and flag == "dicomweb_address"
        and not GOOGLE_DICOMWEB.match(url)
    ):
        return [
            (
                flag,
                "a Cloud Healthcare API address must look like https://healthcare.googleapis.com/"
                "<version>/projects/<p>/locations/<l>/datasets/<d>/dicomStores/<s>/dicomWeb",
            )
        ]
    return []
