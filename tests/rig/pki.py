"""A throw-away PKI (CA, server, client, stranger certificates) made with the openssl CLI."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    """A test CA, a server certificate (localhost, 127.0.0.1), a client one, and a stranger."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # self-signed: not from the CA
    stranger_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _issue(folder: Path, name: str, subject: str, ca: tuple[Path, Path], san: str) -> None:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", subject,
    )  # fmt: skip
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip


def make_pki(folder: Path) -> Pki:
    """Create the certificates with the openssl command line in `folder`."""
    d = folder
    d.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"),
        "-out", str(d / "ca.crt"), "-days", "2", "-subj", "/CN=dicom-adapter test CA",
    )  # fmt: skip
    ca = (d / "ca.crt", d / "ca.key")
    _issue(d, "server", "/CN=localhost", ca, "IP:127.0.0.1,DNS:localhost")
    _issue(d, "client", "/CN=MODALITY", ca, "DNS:modality.test")
    _openssl(
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
