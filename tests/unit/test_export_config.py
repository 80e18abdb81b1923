"""Unit tests for flag/env parsing of dicom-export (SPEC §0, §2) and its console script."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from dicom_adapter.config.exporter import ExporterSettings
from dicom_adapter.config.parse import deprecation_notes, flag_status, parse_settings
from dicom_adapter.errors import ConfigError
from dicom_adapter.exporter.sinks import DEFAULT_PERMANENT_STATUSES

SOURCE = "http://source.example:8042/dicom-web"
PEER = "http://peer.example:8042/dicom-web"
REQUIRED = [f"--dicomweb_addr={SOURCE}", "--project_id=p1", "--subscription_id=s1"]
CSTORE = ["--peer_dimse_aet=PACS", "--peer_dimse_ip=10.0.0.5", "--peer_dimse_port=104"]

JAVA_FLAGS = [
    "peer_dimse_aet",
    "peer_dimse_ip",
    "peer_dimse_port",
    "client_aet",
    "peer_dicomweb_address",
    "peer_dicomweb_addr",
    "peer_dicomweb_stow_path",
    "use_gcp_application_default_credentials",
    "dicomweb_addr",
    "project_id",
    "subscription_id",
    "oauth_scopes",
    "verbose",
    "monitoring_project_id",
]


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> ExporterSettings:
    return parse_settings(
        ExporterSettings, argv, prog="dicom-export", description="test", environ=environ or {}
    )


def problem(argv: Sequence[str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(argv)
    return info.value


def test_every_java_flag_exists() -> None:
    missing = [f for f in JAVA_FLAGS if f not in ExporterSettings.model_fields]
    assert missing == []


def test_new_flags_are_marked_new() -> None:
    for name in ("max_messages", "max_bytes", "nack_permanent_failures"):
        assert flag_status(ExporterSettings.model_fields[name]) == "new"


def test_cstore_sink_and_defaults() -> None:
    settings = parse([*REQUIRED, *CSTORE])
    assert settings.cstore_sink and not settings.stow_sink
    assert settings.client_aet == "EXPORTADAPTER"
    assert settings.peer_dimse_port == 104
    assert settings.max_messages == 16
    assert settings.max_bytes == 256 * 1024 * 1024
    assert settings.nack_permanent_failures is False
    assert settings.use_gcp_application_default_credentials is False
    assert settings.subscription_path == "projects/p1/subscriptions/s1"
    assert settings.source_root == SOURCE


def test_stow_sink() -> None:
    settings = parse([*REQUIRED, f"--peer_dicomweb_address={PEER}/"])
    assert settings.stow_sink and not settings.cstore_sink
    assert settings.stow_url == f"{PEER}/studies"


def test_deprecated_stow_pair() -> None:
    settings = parse(
        [*REQUIRED, f"--peer_dicomweb_addr={PEER}", "--peer_dicomweb_stow_path=/studies"]
    )
    assert settings.stow_url == f"{PEER}/studies"
    assert len(deprecation_notes(settings)) == 2


def test_deprecated_pair_needs_both() -> None:
    assert problem([*REQUIRED, f"--peer_dicomweb_addr={PEER}"]).flag == "peer_dicomweb_stow_path"


def test_both_sinks_is_an_error() -> None:
    error = problem([*REQUIRED, *CSTORE, f"--peer_dicomweb_address={PEER}"])
    assert error.flag == "peer_dimse_aet"
    assert "not both" in str(error)


def test_no_sink_is_an_error() -> None:
    error = problem(REQUIRED)
    assert error.flag == "peer_dicomweb_address"
    assert "no sink" in str(error)


@pytest.mark.parametrize("left_out", [0, 1, 2])
def test_cstore_sink_needs_all_three(left_out: int) -> None:
    flags = [f for i, f in enumerate(CSTORE) if i != left_out]
    error = problem([*REQUIRED, *flags])
    assert error.flag == ["peer_dimse_aet", "peer_dimse_ip", "peer_dimse_port"][left_out]


@pytest.mark.parametrize("left_out", [0, 1, 2])
def test_required_flags(left_out: int) -> None:
    flags = [f for i, f in enumerate(REQUIRED) if i != left_out]
    error = problem([*flags, *CSTORE])
    assert error.flag == ["dicomweb_addr", "project_id", "subscription_id"][left_out]
    assert "required" in str(error)


def test_bad_port_and_bad_url() -> None:
    assert problem([*REQUIRED, *CSTORE[:2], "--peer_dimse_port=70000"]).flag == "peer_dimse_port"
    assert problem(["--dicomweb_addr=ftp://x", *REQUIRED[1:], *CSTORE]).flag == "dicomweb_addr"


def test_flow_control_must_be_positive() -> None:
    assert problem([*REQUIRED, *CSTORE, "--max_messages=0"]).flag == "max_messages"


def test_bool_flags_and_env() -> None:
    settings = parse(
        [*REQUIRED, *CSTORE, "--use_gcp_application_default_credentials"],
        environ={"NACK_PERMANENT_FAILURES": "true", "MAX_MESSAGES": "4"},
    )
    assert settings.use_gcp_application_default_credentials is True
    assert settings.nack_permanent_failures is True
    assert settings.max_messages == 4


SCRIPT = Path(sys.executable).with_name("dicom-export")


def test_console_script_bad_flag_one_line_exit_2() -> None:
    result = subprocess.run(
        [str(SCRIPT), *REQUIRED, *CSTORE, "--peer_dimse_port=notanumber"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dicom-export: --peer_dimse_port")


def test_console_script_no_sink_exit_2() -> None:
    result = subprocess.run(
        [str(SCRIPT), *REQUIRED], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "--peer_dicomweb_address" in result.stderr


def test_metrics_port_defaults_next_to_the_importers() -> None:
    assert parse([*REQUIRED, *CSTORE]).metrics_port == 9091  # dicom-import has 9090
    assert flag_status(ExporterSettings.model_fields["metrics_port"]) == "new"
    assert parse([*REQUIRED, *CSTORE, "--metrics_port=-1"]).metrics_port == -1
    assert parse([*REQUIRED, *CSTORE], {"METRICS_PORT": "0"}).metrics_port == 0
    assert problem([*REQUIRED, *CSTORE, "--metrics_port=70000"]).flag == "metrics_port"


def test_retry_flags_defaults_and_bounds() -> None:
    settings = parse([*REQUIRED, *CSTORE])
    assert (settings.retry_backoff_initial, settings.retry_backoff_max) == (1.0, 600.0)
    assert settings.sink_probe_interval == 5.0
    assert settings.permanent_statuses == frozenset({0xA900, 0x0122}) == DEFAULT_PERMANENT_STATUSES
    for name in ("retry_backoff_initial", "retry_backoff_max", "sink_probe_interval"):
        assert flag_status(ExporterSettings.model_fields[name]) == "new"
        assert problem([*REQUIRED, *CSTORE, f"--{name}=0"]).flag == name
        assert problem([*REQUIRED, *CSTORE, f"--{name}=601"]).flag == name
    shorter = parse([*REQUIRED, *CSTORE, "--retry_backoff_initial=0.5", "--retry_backoff_max=8"])
    assert (shorter.retry_backoff_initial, shorter.retry_backoff_max) == (0.5, 8.0)
    error = problem([*REQUIRED, *CSTORE, "--retry_backoff_initial=10", "--retry_backoff_max=5"])
    assert error.flag == "retry_backoff_initial"


@pytest.mark.parametrize(
    ("text", "codes"),
    [
        ("0xA900,0x0122", {0xA900, 0x0122}),
        ("A900, 0122", {0xA900, 0x0122}),
        ("0xc000", {0xC000}),
        ("", set()),
    ],
)
def test_permanent_cstore_statuses_parse_hex(text: str, codes: set[int]) -> None:
    settings = parse([*REQUIRED, *CSTORE, f"--permanent_cstore_statuses={text}"])
    assert settings.permanent_statuses == frozenset(codes)


@pytest.mark.parametrize("text", ["0xG000", "12345", "0x1_0", "A900;;zz"])
def test_permanent_cstore_statuses_reject_non_hex(text: str) -> None:
    error = problem([*REQUIRED, *CSTORE, f"--permanent_cstore_statuses={text}"])
    assert error.flag == "permanent_cstore_statuses"
