"""DICOM TLS flags: both halves of the key pair, and a CA only with them."""

from __future__ import annotations

import pytest

from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.config.parse import parse_settings
from dicom_adapter.errors import ConfigError

BASE = ["--dimse_aet=A", "--dicomweb_address=http://x/dicom-web"]


def parse(*flags: str) -> ImporterSettings:
    return parse_settings(ImporterSettings, [*BASE, *flags], prog="t", description="", environ={})


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--tls_certificate=c.pem"], "tls_private_key"),
        (["--tls_private_key=k.pem"], "tls_certificate"),
        (["--tls_ca_certificates=ca.pem"], "tls_ca_certificates"),
    ],
)
def test_incomplete_tls_flags_are_refused(flags: list[str], named: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(*flags)
    assert named in str(error.value)


def test_complete_tls_flags_parse() -> None:
    settings = parse(
        "--tls_certificate=c.pem", "--tls_private_key=k.pem", "--tls_ca_certificates=a"
    )
    assert (settings.tls_certificate, settings.tls_private_key) == ("c.pem", "k.pem")
    assert settings.tls_ca_certificates == "a"
    assert parse().tls_certificate == ""  # off by default
