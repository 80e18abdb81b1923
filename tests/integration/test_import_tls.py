"""DICOM TLS on the DIMSE port (SPEC §3): DCMTK peers with certificates from a test CA."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.rig import (
    Importer,
    Orthanc,
    Pki,
    generate_ct_series,
    importer_binary,
    make_pki,
    run_dcmtk,
)

AET = "TLSADAPTER"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with Orthanc(workdir=tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def tls_flags(pki: Pki) -> list[str]:
    return [f"--tls_certificate={pki.server_cert}", f"--tls_private_key={pki.server_key}"]


def echoscu_tls(port: int, key: Path, cert: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    # -ta: a regression (a handshake stuck in the accept thread) fails instead of hanging
    args = ["echoscu", "-ta", "20", "-aec", AET, "+tls", str(key), str(cert), "+cf", str(ca)]
    return run_dcmtk([*args, "127.0.0.1", str(port)], timeout=60)


def test_tls_echo_and_store(pki: Pki, orthanc: Orthanc, tmp_path: Path) -> None:
    files = generate_ct_series(tmp_path / "ct", 3, rows=32, cols=32)
    with Importer(
        orthanc.dicomweb_url, *tls_flags(pki), aet=AET, log_dir=tmp_path, ready_by_http=True
    ) as importer:
        echo = echoscu_tls(importer.port, pki.client_key, pki.client_cert, pki.ca)
        assert echo.returncode == 0, echo.stderr
        store = run_dcmtk(
            [
                "storescu", "-aec", AET, "+tls", str(pki.client_key), str(pki.client_cert),
                "+cf", str(pki.ca), "127.0.0.1", str(importer.port), *map(str, files),
            ],
            timeout=60,
        )  # fmt: skip
        assert store.returncode == 0, store.stderr
        plain = run_dcmtk(["echoscu", "-aec", AET, "127.0.0.1", str(importer.port)], timeout=60)
        assert plain.returncode != 0  # no TLS, no association
    for path in files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert orthanc.find_instance(uid) is not None


def test_client_certificates_required_with_a_ca(pki: Pki, orthanc: Orthanc, tmp_path: Path) -> None:
    flags = [*tls_flags(pki), f"--tls_ca_certificates={pki.ca}"]
    with Importer(
        orthanc.dicomweb_url, *flags, aet=AET, log_dir=tmp_path, ready_by_http=True
    ) as importer:
        signed = echoscu_tls(importer.port, pki.client_key, pki.client_cert, pki.ca)
        assert signed.returncode == 0, signed.stderr
        stranger = echoscu_tls(importer.port, pki.stranger_key, pki.stranger_cert, pki.ca)
        assert stranger.returncode != 0
        anonymous = run_dcmtk(
            ["echoscu", "-aec", AET, "+tla", "+cf", str(pki.ca), "127.0.0.1", str(importer.port)],
            timeout=60,
        )
        assert anonymous.returncode != 0
        assert importer.running()


def test_a_silent_client_does_not_hold_up_the_others(
    pki: Pki, orthanc: Orthanc, tmp_path: Path
) -> None:
    with Importer(
        orthanc.dicomweb_url, *tls_flags(pki), aet=AET, log_dir=tmp_path, ready_by_http=True
    ) as importer:
        silent = socket.create_connection(("127.0.0.1", importer.port))
        try:
            started = time.monotonic()
            echo = echoscu_tls(importer.port, pki.client_key, pki.client_cert, pki.ca)
            assert echo.returncode == 0, echo.stderr
            assert time.monotonic() - started < 10  # not behind the silent client's handshake
        finally:
            silent.close()


def test_unusable_certificate_is_a_startup_error(pki: Pki, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(importer_binary()),
            f"--dimse_aet={AET}",
            "--dicomweb_address=http://127.0.0.1:9/dicom-web",
            "--metrics_port=-1",
            f"--tls_certificate={tmp_path / 'missing.crt'}",
            f"--tls_private_key={pki.server_key}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "tls_certificate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
