"""DICOM TLS on the DIMSE port (SPEC §3): DCMTK peers with certificates from a test CA."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.rig import (
    Importer,
    Orthanc,
    generate_ct_series,
    importer_binary,
    run_dcmtk,
)

AET = "TLSADAPTER"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # self-signed: not from the CA
    stranger_key: Path


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def issue(folder: Path, name: str, subject: str, ca: tuple[Path, Path], san: str) -> None:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", subject,
    )  # fmt: skip
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"),
        "-out", str(d / "ca.crt"), "-days", "2", "-subj", "/CN=dicom-adapter test CA",
    )  # fmt: skip
    ca = (d / "ca.crt", d / "ca.key")
    issue(d, "server", "/CN=localhost", ca, "IP:127.0.0.1,DNS:localhost")
    issue(d, "client", "/CN=MODALITY", ca, "DNS:modality.test")
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "stranger.key"),
        "-out", str(d / "stranger.crt"), "-days", "2", "-subj", "/CN=stranger",
    )  # fmt: skip
    return Pki(
        ca=d / "ca.crt",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        stranger_cert=d / "stranger.crt",
        stranger_key=d / "stranger.key",
    )


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
