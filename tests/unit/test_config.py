"""Unit tests for flag/env parsing of dicom-import (SPEC §0, §1.1) and the console script."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

from dicom_adapter.config.common import later_flag
from dicom_adapter.config.exporter import ExporterSettings
from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.config.parse import deprecation_notes, flag_status, parse_settings
from dicom_adapter.errors import ConfigError

ADDRESS = "http://dicomweb.example:8042/dicom-web"
BASE = ["--dimse_aet=ADAPTER", f"--dicomweb_address={ADDRESS}"]
GOOGLE_OK = (
    "https://healthcare.googleapis.com/v1/projects/p1/locations/us-central1"
    "/datasets/ds/dicomStores/store/dicomWeb"
)

# Every flag of the Java adapter's import side (SPEC §1.1).
JAVA_FLAGS = [
    "dimse_aet",
    "dimse_port",
    "dimse_cmove_aet",
    "dicomweb_address",
    "dicomweb_addr",
    "dicomweb_stow_path",
    "oauth_scopes",
    "verbose",
    "aet_dictionary",
    "aet_dictionary_inline",
    "monitoring_project_id",
    "redact_remove_list",
    "redact_keep_list",
    "redact_filter_profile",
    "destination_config_path",
    "destination_config_inline",
    "store_compress_to_transfer_syntax",
    "fuzzy_matching",
    "persistent_file_storage_location",
    "gcs_backup_project_id",
    "persistent_file_upload_retry_amount",
    "auto_ack_cstore",
    "min_upload_delay",
    "max_waiting_time_between_uploads",
    "http_error_codes_to_retry",
    "send_to_all_matching_destinations",
    "stow_http2",
    "stow_overwrite",
]


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> ImporterSettings:
    return parse_settings(
        ImporterSettings,
        argv,
        prog="dicom-import",
        description="test",
        environ={} if environ is None else environ,
    )


def config_error(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(argv, environ)
    return info.value


# --------------------------------------------------------------------------------------------
# flag syntax
# --------------------------------------------------------------------------------------------


def test_equals_syntax() -> None:
    settings = parse(["--dimse_aet=ADAPTER", f"--dicomweb_address={ADDRESS}", "--dimse_port=11112"])
    assert settings.dimse_aet == "ADAPTER"
    assert settings.dimse_port == 11112
    assert settings.stow_url == f"{ADDRESS}/studies"
    assert settings.dicomweb_root == ADDRESS


def test_space_separated_syntax() -> None:
    settings = parse(
        ["--dimse_aet", "ADAPTER", "--dicomweb_address", ADDRESS, "--dimse_port", "104"]
    )
    assert settings.dimse_aet == "ADAPTER"
    assert settings.dimse_port == 104
    assert settings.dicomweb_address == ADDRESS


def test_bare_bool_means_true() -> None:
    settings = parse([*BASE, "--stow_http2", "--verbose"])
    assert settings.stow_http2 is True
    assert settings.verbose is True


def test_bool_defaults_false() -> None:
    settings = parse(BASE)
    assert settings.stow_http2 is False
    assert settings.stow_overwrite is False
    assert settings.verbose is False


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--stow_overwrite=false"], False),
        (["--stow_overwrite=true"], True),
        (["--stow_overwrite", "false"], False),
        (["--stow_overwrite", "true"], True),
        (["--stow_overwrite"], True),
    ],
)
def test_bool_value_forms(argv: list[str], expected: bool) -> None:
    assert parse([*BASE, *argv]).stow_overwrite is expected


def test_bare_bool_followed_by_another_flag() -> None:
    settings = parse(
        ["--stow_overwrite", "--dimse_aet", "ADAPTER", f"--dicomweb_address={ADDRESS}"]
    )
    assert settings.stow_overwrite is True
    assert settings.dimse_aet == "ADAPTER"


def test_bad_bool_value_names_the_flag() -> None:
    error = config_error([*BASE, "--stow_http2=maybe"])
    assert error.flag == "stow_http2"
    assert "--stow_http2" in str(error)


def test_bad_int_value_names_the_flag() -> None:
    error = config_error([*BASE, "--dimse_port=abc"])
    assert error.flag == "dimse_port"
    assert "--dimse_port" in str(error)


def test_port_out_of_range() -> None:
    error = config_error([*BASE, "--dimse_port=70000"])
    assert error.flag == "dimse_port"


def test_unknown_flag_is_config_error() -> None:
    error = config_error([*BASE, "--no_such_flag=1"])
    assert "--no_such_flag" in str(error)


def test_abbreviated_flag_is_not_accepted() -> None:
    error = config_error([*BASE, "--stow_over"])
    assert "--stow_over" in str(error)


def test_missing_value_is_config_error() -> None:
    error = config_error(["--dicomweb_address", ADDRESS, "--dimse_aet"])
    assert "--dimse_aet" in str(error)


def test_java_defaults() -> None:
    settings = parse(BASE)
    assert settings.min_upload_delay == 100
    assert settings.max_waiting_time_between_uploads == 5000
    assert settings.http_error_codes_to_retry == frozenset()
    assert settings.aet_dictionary == ""
    assert settings.aet_dictionary_inline == ""


# --------------------------------------------------------------------------------------------
# environment variables
# --------------------------------------------------------------------------------------------


def test_every_setting_from_env() -> None:
    settings = parse(
        [],
        {
            "DIMSE_AET": "FROMENV",
            "DICOMWEB_ADDRESS": ADDRESS,
            "DIMSE_PORT": "4242",
            "STOW_HTTP2": "true",
            "HTTP_ERROR_CODES_TO_RETRY": "409,429",
            "AET_DICTIONARY_INLINE": "[]",
        },
    )
    assert settings.dimse_aet == "FROMENV"
    assert settings.dicomweb_address == ADDRESS
    assert settings.dimse_port == 4242
    assert settings.stow_http2 is True
    assert settings.http_error_codes_to_retry == frozenset({409, 429})
    assert settings.aet_dictionary_inline == "[]"


def test_flag_wins_over_env() -> None:
    settings = parse(
        ["--dimse_aet=FROMFLAG", "--dimse_port=11112", "--stow_http2=false"],
        {
            "DIMSE_AET": "FROMENV",
            "DIMSE_PORT": "4242",
            "STOW_HTTP2": "true",
            "DICOMWEB_ADDRESS": ADDRESS,
        },
    )
    assert settings.dimse_aet == "FROMFLAG"
    assert settings.dimse_port == 11112
    assert settings.stow_http2 is False
    assert settings.dicomweb_address == ADDRESS  # only in env: env is used


def test_bad_env_value_names_the_env_var() -> None:
    error = config_error(BASE, {"DIMSE_PORT": "abc"})
    assert error.flag == "dimse_port"
    assert "DIMSE_PORT" in str(error)


def test_explicit_environ_ignores_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIMSE_PORT", "4242")
    settings = parse(BASE, {})
    assert settings.dimse_port == 0


def test_process_environment_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIMSE_PORT", "4242")
    settings = parse_settings(ImporterSettings, BASE, prog="dicom-import", description="test")
    assert settings.dimse_port == 4242


# --------------------------------------------------------------------------------------------
# --http_error_codes_to_retry
# --------------------------------------------------------------------------------------------


def test_http_error_codes_comma_list() -> None:
    settings = parse([*BASE, "--http_error_codes_to_retry=409,429"])
    assert settings.http_error_codes_to_retry == frozenset({409, 429})


def test_http_error_codes_repeated_flag() -> None:
    settings = parse(
        [*BASE, "--http_error_codes_to_retry=409", "--http_error_codes_to_retry", "429"]
    )
    assert settings.http_error_codes_to_retry == frozenset({409, 429})


@pytest.mark.parametrize("value", ["abc", "409,x", "99", "600"])
def test_http_error_codes_invalid(value: str) -> None:
    error = config_error([*BASE, f"--http_error_codes_to_retry={value}"])
    assert error.flag == "http_error_codes_to_retry"
    assert "--http_error_codes_to_retry" in str(error)


# --------------------------------------------------------------------------------------------
# flags whose feature is not supported yet
# --------------------------------------------------------------------------------------------


def test_every_java_flag_is_supported() -> None:
    for model in (ImporterSettings, ExporterSettings):
        later = [n for n, i in model.model_fields.items() if flag_status(i) == "not supported yet"]
        assert later == [], f"{model.__name__}: {later}"


class FutureSettings(ImporterSettings):
    """A flag whose feature arrives later: the parser must refuse it when set."""

    future_feature: str = later_flag("", "Not built yet.")


def parse_future(argv: Sequence[str], environ: Mapping[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_settings(FutureSettings, argv, prog="dicom-import", description="t", environ=environ)
    return info.value


def test_a_flag_not_supported_yet_is_accepted_unset_and_refused_when_set() -> None:
    settings = parse_settings(
        FutureSettings, BASE, prog="dicom-import", description="t", environ={}
    )
    assert "future_feature" not in settings.model_fields_set
    by_flag = parse_future([*BASE, "--future_feature=x"], {})
    assert by_flag.flag == "future_feature"
    assert "--future_feature" in str(by_flag) and "not supported" in str(by_flag)
    by_env = parse_future(BASE, {"FUTURE_FEATURE": "x"})
    assert by_env.flag == "future_feature" and "not supported" in str(by_env)


# --------------------------------------------------------------------------------------------
# deprecated --dicomweb_addr + --dicomweb_stow_path
# --------------------------------------------------------------------------------------------


def test_deprecated_pair_sets_stow_url_and_notes() -> None:
    settings = parse(
        [
            "--dimse_aet=ADAPTER",
            "--dicomweb_addr=https://healthcare.googleapis.com/v1",
            "--dicomweb_stow_path=/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb/studies",
        ]
    )
    assert settings.stow_url == (
        "https://healthcare.googleapis.com/v1"
        "/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb/studies"
    )
    notes = deprecation_notes(settings)
    assert notes
    joined = "\n".join(notes)
    assert "--dicomweb_addr" in joined
    assert "--dicomweb_stow_path" in joined
    assert "deprecated" in joined
    assert "--dicomweb_address" in joined


def test_deprecated_pair_joins_with_one_slash() -> None:
    settings = parse(
        ["--dimse_aet=ADAPTER", "--dicomweb_addr=http://h:8042/", "--dicomweb_stow_path=studies"]
    )
    assert settings.stow_url == "http://h:8042/studies"


def test_deprecated_pair_from_env_also_noted() -> None:
    settings = parse(
        ["--dimse_aet=ADAPTER"],
        {"DICOMWEB_ADDR": "http://h:8042", "DICOMWEB_STOW_PATH": "/dicom-web/studies"},
    )
    assert settings.stow_url == "http://h:8042/dicom-web/studies"
    assert any("--dicomweb_addr" in note for note in deprecation_notes(settings))


def test_no_deprecation_notes_for_current_flags() -> None:
    assert deprecation_notes(parse(BASE)) == []


def test_deprecated_addr_without_stow_path() -> None:
    error = config_error(["--dimse_aet=ADAPTER", "--dicomweb_addr=http://h:8042"])
    assert error.flag == "dicomweb_stow_path"
    assert "--dicomweb_stow_path" in str(error)


def test_deprecated_stow_path_without_addr() -> None:
    error = config_error(["--dimse_aet=ADAPTER", "--dicomweb_stow_path=/studies"])
    assert error.flag == "dicomweb_addr"
    assert "--dicomweb_addr" in str(error)


def test_new_address_wins_over_deprecated_pair() -> None:
    settings = parse(
        [*BASE, "--dicomweb_addr=http://old:1", "--dicomweb_stow_path=/old/studies"],
    )
    assert settings.stow_url == f"{ADDRESS}/studies"


def test_no_address_at_all() -> None:
    error = config_error(["--dimse_aet=ADAPTER"])
    assert error.flag == "dicomweb_address"


@pytest.mark.parametrize("url", ["ftp://h/dicomweb", "dicomweb.example/dicom-web", "http://"])
def test_address_must_be_http_url(url: str) -> None:
    error = config_error(["--dimse_aet=ADAPTER", f"--dicomweb_address={url}"])
    assert error.flag == "dicomweb_address"


# --------------------------------------------------------------------------------------------
# Cloud Healthcare address pattern
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", [GOOGLE_OK, GOOGLE_OK + "/", GOOGLE_OK.replace("/v1/", "/v1beta1/")]
)
def test_google_address_accepted(url: str) -> None:
    settings = parse(["--dimse_aet=ADAPTER", f"--dicomweb_address={url}"])
    assert settings.stow_url == url.rstrip("/") + "/studies"


@pytest.mark.parametrize(
    "url",
    [
        "https://healthcare.googleapis.com/v1/projects/p1/locations/l/datasets/ds/dicomStores/s",
        "https://healthcare.googleapis.com/v1/projects/p1/datasets/ds/dicomStores/s/dicomWeb",
        "https://healthcare.googleapis.com/projects/p1/locations/l/datasets/ds/dicomStores/s/dicomWeb",
        GOOGLE_OK + "/studies",
        GOOGLE_OK.replace("https://", "http://"),
    ],
)
def test_google_address_rejected(url: str) -> None:
    error = config_error(["--dimse_aet=ADAPTER", f"--dicomweb_address={url}"])
    assert error.flag == "dicomweb_address"
    assert "--dicomweb_address" in str(error)
    assert "dicomStores" in str(error)


def test_non_google_host_not_held_to_google_pattern() -> None:
    settings = parse(["--dimse_aet=ADAPTER", "--dicomweb_address=https://pacs.example/dcm4chee"])
    assert settings.stow_url == "https://pacs.example/dcm4chee/studies"


# --------------------------------------------------------------------------------------------
# --dimse_aet
# --------------------------------------------------------------------------------------------


def test_dimse_aet_required() -> None:
    error = config_error([f"--dicomweb_address={ADDRESS}"])
    assert error.flag == "dimse_aet"
    assert str(error).startswith("--dimse_aet")


def test_dimse_aet_blank_is_missing() -> None:
    error = config_error(["--dimse_aet=   ", f"--dicomweb_address={ADDRESS}"])
    assert error.flag == "dimse_aet"


def test_dimse_aet_sixteen_chars_accepted() -> None:
    assert parse(["--dimse_aet=ABCDEFGHIJKLMNOP", f"--dicomweb_address={ADDRESS}"]).dimse_aet == (
        "ABCDEFGHIJKLMNOP"
    )


def test_dimse_aet_seventeen_chars_rejected() -> None:
    error = config_error(["--dimse_aet=ABCDEFGHIJKLMNOPQ", f"--dicomweb_address={ADDRESS}"])
    assert error.flag == "dimse_aet"
    assert "16" in str(error)


def test_dimse_aet_backslash_rejected() -> None:
    error = config_error(["--dimse_aet=AB\\CD", f"--dicomweb_address={ADDRESS}"])
    assert error.flag == "dimse_aet"


# --------------------------------------------------------------------------------------------
# misc
# --------------------------------------------------------------------------------------------


def test_settings_are_frozen() -> None:
    settings = parse(BASE)
    with pytest.raises(ValidationError):
        settings.dimse_aet = "OTHER"
    assert settings.dimse_aet == "ADAPTER"


def test_basic_auth_and_bearer_exclusive() -> None:
    error = config_error([*BASE, "--dicomweb_bearer_token=t", "--dicomweb_basic_auth=u:p"])
    assert error.flag == "dicomweb_basic_auth"


def test_basic_auth_needs_colon() -> None:
    error = config_error([*BASE, "--dicomweb_basic_auth=userpass"])
    assert error.flag == "dicomweb_basic_auth"


def test_every_java_flag_is_a_setting() -> None:
    assert set(JAVA_FLAGS) <= set(ImporterSettings.model_fields)


# --------------------------------------------------------------------------------------------
# the real console script
# --------------------------------------------------------------------------------------------

SCRIPT = Path(sys.executable).with_name("dicom-import")


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "100"},
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--no_such_flag=1"], "--no_such_flag"),
        (
            ["--dimse_aet=ADAPTER", f"--dicomweb_address={ADDRESS}", "--dimse_port=abc"],
            "dimse_port",
        ),
        (["--dimse_aet=ABCDEFGHIJKLMNOPQ", f"--dicomweb_address={ADDRESS}"], "dimse_aet"),
        ([f"--dicomweb_address={ADDRESS}"], "dimse_aet"),
        (
            [*BASE, "--persistent_file_storage_location=gs:///prefix"],
            "persistent_file_storage_location",
        ),
    ],
)
def test_script_bad_config_one_line_exit_2(args: list[str], flag: str) -> None:
    result = run_script(*args)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert flag in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_script_help_lists_every_java_flag_and_env_var() -> None:
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for name in JAVA_FLAGS:
        assert f"--{name}" in text, name
        assert name.upper() in text, name.upper()
    assert "DIMSE_AET" in text
    assert "Traceback" not in result.stderr


def test_metrics_port_default_range_and_env() -> None:
    assert parse(BASE).metrics_port == 9090
    assert flag_status(ImporterSettings.model_fields["metrics_port"]) == "new"
    assert parse([*BASE, "--metrics_port=0"]).metrics_port == 0
    assert parse([*BASE, "--metrics_port", "-1"]).metrics_port == -1
    assert parse(BASE, {"METRICS_PORT": "9100"}).metrics_port == 9100
    for bad in ("-2", "65536", "abc"):
        error = config_error([*BASE, f"--metrics_port={bad}"])
        assert error.flag == "metrics_port", bad


# --------------------------------------------------------------------------------------------
# the durable spool (issue 9)


def test_local_spool_flags_are_supported(tmp_path: Path) -> None:
    settings = parse(
        [
            *BASE,
            f"--persistent_file_storage_location={tmp_path}",
            "--auto_ack_cstore",
            "--persistent_file_upload_retry_amount=3",
            "--min_upload_delay=10",
            "--max_waiting_time_between_uploads=80",
        ]
    )
    assert settings.persistent_file_storage_location == str(tmp_path)
    assert settings.auto_ack_cstore
    assert settings.spool_upload_concurrency == 4
    assert settings.spool_free_space_headroom == 1 << 30


def test_gs_spool_flags_are_supported() -> None:
    settings = parse(
        [
            *BASE,
            "--persistent_file_storage_location=gs://bucket/prefix",
            "--gcs_backup_project_id=my-project",
            "--auto_ack_cstore",
        ]
    )
    assert settings.persistent_file_storage_location == "gs://bucket/prefix"
    assert settings.gcs_backup_project_id == "my-project"


@pytest.mark.parametrize("location", ["gs://", "gs:///prefix", "gs://bucket/a/../b"])
def test_bad_gs_location_is_refused(location: str) -> None:
    error = config_error([*BASE, f"--persistent_file_storage_location={location}"])
    assert error.flag == "persistent_file_storage_location"


def test_gcs_project_is_accepted_with_a_local_spool(tmp_path: Path) -> None:
    """The Java adapter's own manifests pass it whatever the location: never a startup error."""
    settings = parse(
        [*BASE, f"--persistent_file_storage_location={tmp_path}", "--gcs_backup_project_id=p"]
    )
    assert settings.gcs_backup_project_id == "p"


def test_auto_ack_needs_a_spool() -> None:
    error = config_error([*BASE, "--auto_ack_cstore"])
    assert error.flag == "auto_ack_cstore"
    assert "--persistent_file_storage_location" in str(error)


def test_min_upload_delay_must_be_positive() -> None:
    error = config_error([*BASE, "--min_upload_delay=0"])
    assert error.flag == "min_upload_delay"
