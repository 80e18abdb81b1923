"""--check lines without servers: MockTransport upstreams, local files, the CLI's flag line."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import httpx
import pytest

from dicom_adapter.cli import run_export, run_import
from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.config.parse import parse_settings
from dicom_adapter.dicom import transcode
from dicom_adapter.preflight import (
    CheckResult,
    check_dicomweb,
    check_spool,
    check_tls,
    check_transcoding,
    report,
)

ROOT = (
    "https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb"
)

REFUSALS = {
    "api": (
        "Cloud Healthcare API has not been used in project 42 before or it is disabled. "
        "Enable it by visiting https://console.developers.google.com/apis/api/"
        "healthcare.googleapis.com/overview?project=42 then retry.",
        "gcloud services enable healthcare.googleapis.com",
    ),
    "scopes": (
        "Request had insufficient authentication scopes.",
        "--scopes=https://www.googleapis.com/auth/cloud-healthcare",
    ),
    "role": (
        "Permission 'healthcare.dicomStores.dicomWebRead' denied on resource "
        "'projects/p/locations/l/datasets/d/dicomStores/s' (or it may not exist).",
        "grant roles/healthcare.dicomEditor",
    ),
}


def qido(answer: httpx.Response) -> tuple[CheckResult, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer

    result = asyncio.run(
        check_dicomweb("DICOMweb", ROOT, None, timeout=5, transport=httpx.MockTransport(handler))
    )
    return result, seen


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_google_403_is_explained_from_its_text(case: str) -> None:
    message, fix = REFUSALS[case]
    body = {"error": {"code": 403, "message": message, "status": "PERMISSION_DENIED"}}

    result, _ = qido(httpx.Response(403, json=body))

    assert result.verdict == "FAIL"
    assert result.line.startswith("FAIL DICOMweb — HTTP 403 PERMISSION_DENIED: ")
    assert fix in result.detail


def test_answering_upstream_is_ok_after_one_qido_with_limit_1() -> None:
    result, seen = qido(httpx.Response(200, json=[]))

    assert result.verdict == "OK"
    assert [str(r.url) for r in seen] == [f"{ROOT}/studies?limit=1"]


def test_wrong_store_is_a_404_fail() -> None:
    result, _ = qido(httpx.Response(404, json={"error": {"code": 404, "status": "NOT_FOUND"}}))

    assert result.verdict == "FAIL"
    assert "no DICOMweb service at this address" in result.detail


def test_unwritable_spool_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")  # root may write anywhere: a file blocks mkdir

    result = check_spool(str(blocker / "spool"), headroom=0)

    assert result.verdict == "FAIL"
    assert "not writable" in result.detail


def test_spool_below_headroom_fails_and_writable_spool_is_ok(tmp_path: Path) -> None:
    assert check_spool(str(tmp_path / "spool"), headroom=0).verdict == "OK"
    full = check_spool(str(tmp_path / "spool"), headroom=1 << 60)
    assert full.verdict == "FAIL"
    assert "0xA700" in full.detail
    assert list((tmp_path / "spool").iterdir()) == []  # the probe file is gone


def test_tls_files(tmp_path: Path) -> None:
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert check_tls(str(cert), str(key), "").verdict == "OK"
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")

    result = check_tls(str(bad), str(key), "")

    assert result.verdict == "FAIL"
    assert result.detail.startswith("--tls_certificate: cannot load")


def test_exit_code_is_0_only_without_fail() -> None:
    lines: list[str] = []
    ok, warn = CheckResult("OK", "a", "fine"), CheckResult("WARN", "b", "maybe")
    assert report([ok, warn], lines.append) == 0
    assert report([ok, CheckResult("FAIL", "c", "fix it")], lines.append) == 1
    assert lines[:2] == ["OK a — fine", "WARN b — maybe"]


def test_flag_problem_is_a_fail_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_import(["--check", "--dimse_aet=ADAPTER"]) == 1
    assert capsys.readouterr().out == "FAIL flags — --dicomweb_address: is required\n"
    assert run_export(["--check=true", "--dicomweb_addr=http://h/dicom-web"]) == 1
    assert capsys.readouterr().out.startswith("FAIL flags — ")


def test_without_check_a_flag_problem_is_still_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_import(["--check=false", "--dimse_aet=ADAPTER"]) == 2
    assert "dicomweb_address: is required" in capsys.readouterr().err
    assert run_import(["--check", "false", "--dimse_aet=ADAPTER"]) == 2
    assert "dicomweb_address: is required" in capsys.readouterr().err


def import_settings(*flags: str) -> ImporterSettings:
    base = ["--dimse_aet=ADAPTER", "--dicomweb_address=http://dicomweb.test/dicom-web"]
    return parse_settings(
        ImporterSettings, [*base, *flags], prog="dicom-import", description="t", environ={}
    )


def test_transcoding_without_the_codecs_fails_as_startup_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = import_settings("--store_compress_to_transfer_syntax=1.2.840.10008.1.2.4.90")
    assert check_transcoding(settings).verdict == "OK"
    monkeypatch.setattr(transcode, "missing_codecs", lambda: ["pylibjpeg-openjpeg"])
    result = check_transcoding(settings)
    assert result.verdict == "FAIL"
    assert "dicom-adapter[codecs]" in result.line
