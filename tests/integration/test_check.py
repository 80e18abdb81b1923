"""`dicom-import --check` and `dicom-export --check` as an operator runs them (issue 11.4).

Real Orthanc (DICOMweb + DIMSE), a port nobody listens on, the Pub/Sub test server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gcs_emulator import StorageEmulator
from tests.pubsub_server import PubSubServer
from tests.rig import Orthanc, StoreSCP, free_port, make_pki

PROJECT = "check-project"
TOPIC = f"projects/{PROJECT}/topics/instances"


def run_check(script: str, *flags: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Exit code and stdout lines of `<script> --check <flags>`."""
    result = subprocess.run(
        [str(Path(sys.executable).with_name(script)), "--check", "--log_format=text", *flags],
        env={**os.environ, "TCP_NODELAY": "1", **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    print(result.stdout, result.stderr[-3000:])
    return result.returncode, result.stdout.splitlines()


def dictionary(*peers: tuple[str, int]) -> str:
    entries = [{"name": name, "host": "127.0.0.1", "port": port} for name, port in peers]
    return "--aet_dictionary_inline=" + json.dumps(entries)


def test_import_check_against_orthanc_is_ok(orthanc: Orthanc, tmp_path: Path) -> None:
    code, lines = run_check(
        "dicom-import",
        "--dimse_aet=ADAPTER",
        f"--dicomweb_address={orthanc.dicomweb_url}",
        dictionary((orthanc.aet, orthanc.dicom_port)),
        f"--persistent_file_storage_location={tmp_path / 'spool'}",
        "--spool_free_space_headroom=0",
    )

    assert code == 0
    assert [line.split(" — ")[0] for line in lines] == [
        "OK flags",
        f"OK DICOMweb {orthanc.dicomweb_url}",
        f"OK peer {orthanc.aet}",
        f"OK spool {tmp_path / 'spool'}",
    ]
    assert lines[2].endswith(f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port} answered C-ECHO")


def test_import_check_with_a_stopped_upstream_fails(orthanc: Orthanc) -> None:
    stopped = free_port()
    code, lines = run_check(
        "dicom-import",
        "--dimse_aet=ADAPTER",
        f"--dicomweb_address=http://127.0.0.1:{stopped}/dicom-web",
        dictionary(("GONE", stopped), (orthanc.aet, orthanc.dicom_port)),
    )

    assert code == 1
    assert lines[1].startswith(
        f"FAIL DICOMweb http://127.0.0.1:{stopped}/dicom-web — connection refused"
    )
    # a peer that does not answer is only a warning: it may be switched off right now
    assert lines[2].startswith(f"WARN peer GONE — GONE@127.0.0.1:{stopped}: connection refused")
    assert lines[3].startswith(f"OK peer {orthanc.aet}")


@pytest.fixture
def pubsub() -> Iterator[PubSubServer]:
    with PubSubServer() as server:
        server.create_topic(TOPIC)
        server.create_subscription(f"projects/{PROJECT}/subscriptions/exists", TOPIC)
        yield server


def export_flags(orthanc: Orthanc, subscription: str) -> list[str]:
    return [
        f"--dicomweb_addr={orthanc.dicomweb_url}",
        f"--project_id={PROJECT}",
        f"--subscription_id={subscription}",
        f"--peer_dimse_aet={orthanc.aet}",
        "--peer_dimse_ip=127.0.0.1",
        f"--peer_dimse_port={orthanc.dicom_port}",
    ]


def test_export_check_against_orthanc_and_pubsub_is_ok(
    orthanc: Orthanc, pubsub: PubSubServer
) -> None:
    code, lines = run_check(
        "dicom-export",
        *export_flags(orthanc, "exists"),
        env={"PUBSUB_EMULATOR_HOST": pubsub.host},
    )

    assert code == 0
    assert [line.split(" — ")[0] for line in lines] == [
        "OK flags",
        f"OK DICOMweb source {orthanc.dicomweb_url}",
        f"OK sink {orthanc.aet}",
        f"OK Pub/Sub projects/{PROJECT}/subscriptions/exists",
    ]


def test_export_check_with_a_missing_subscription_fails(
    orthanc: Orthanc, pubsub: PubSubServer
) -> None:
    code, lines = run_check(
        "dicom-export",
        *export_flags(orthanc, "missing"),
        env={"PUBSUB_EMULATOR_HOST": pubsub.host},
    )

    assert code == 1
    assert lines[-1].startswith(
        f"FAIL Pub/Sub projects/{PROJECT}/subscriptions/missing — subscription not found"
    )


def test_import_check_covers_routing_outgoing_tls_and_a_gs_spool(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    with (
        StoreSCP(tmp_path / "received", aet="TLSSCP", tls=pki) as scp,
        StorageEmulator(bucket="check-bucket", log_dir=tmp_path) as emulator,
    ):
        routes = [
            {"filter": "Modality=MG", "dicomweb_destination": orthanc.dicomweb_url},
            {"filter": "", "name": "TLSSCP", "host": "127.0.0.1", "port": scp.port, "tls": True},
        ]
        flags = [
            "--dimse_aet=ADAPTER",
            f"--dicomweb_address={orthanc.dicomweb_url}",
            f"--destination_config_inline={json.dumps(routes)}",
            "--send_to_all_matching_destinations",
            f"--outgoing_tls_ca_certificates={pki.ca}",
            f"--outgoing_tls_certificate={pki.client_cert}",
            f"--outgoing_tls_private_key={pki.client_key}",
        ]
        local = f"--persistent_file_storage_location={tmp_path / 'spool'}"
        code, lines = run_check("dicom-import", *flags, local, "--spool_free_space_headroom=0")
        assert code == 0
        assert [line.split(" — ")[0] for line in lines] == [
            "OK flags",
            f"OK DICOMweb {orthanc.dicomweb_url}",
            "OK outgoing DICOM TLS",
            f"OK destination {orthanc.dicomweb_url}/studies",
            "OK destination TLSSCP",
            f"OK spool {tmp_path / 'spool'}",
        ]
        assert lines[4].endswith("answered C-ECHO over DICOM TLS")

        untrusted = [f for f in flags if not f.startswith("--outgoing_tls_ca")]
        untrusted.append(f"--outgoing_tls_ca_certificates={pki.stranger_cert}")
        code, lines = run_check("dicom-import", *untrusted, local, "--spool_free_space_headroom=0")
        assert code == 0  # a peer is only ever a warning
        assert any(
            line.startswith("WARN destination TLSSCP") and "CERTIFICATE_VERIFY_FAILED" in line
            for line in lines
        )

        gs_flags = ["--dimse_aet=ADAPTER", f"--dicomweb_address={orthanc.dicomweb_url}"]
        env = {**emulator.env, "HOSTNAME": "pod-check"}
        code, lines = run_check(
            "dicom-import",
            *gs_flags,
            "--persistent_file_storage_location=gs://check-bucket/spool",
            env=env,
        )
        assert code == 0
        assert lines[-1].startswith("OK spool gs://check-bucket/spool")
        code, lines = run_check(
            "dicom-import",
            *gs_flags,
            "--persistent_file_storage_location=gs://no-such-bucket/spool",
            env=env,
        )
        assert code == 1
        assert lines[-1].startswith("FAIL spool gs://no-such-bucket/spool")


def test_export_check_loads_the_outgoing_tls_files(
    orthanc: Orthanc, pubsub: PubSubServer, tmp_path: Path
) -> None:
    code, lines = run_check(
        "dicom-export",
        f"--dicomweb_addr={orthanc.dicomweb_url}",
        f"--project_id={PROJECT}",
        "--subscription_id=any",
        "--peer_dimse_aet=SINK",
        "--peer_dimse_ip=127.0.0.1",
        f"--peer_dimse_port={free_port()}",
        "--peer_dimse_tls",
        f"--outgoing_tls_ca_certificates={tmp_path / 'missing-ca.pem'}",
        env={"PUBSUB_EMULATOR_HOST": pubsub.host},
    )
    assert code == 1
    assert any(line.startswith("FAIL outgoing DICOM TLS") for line in lines)
