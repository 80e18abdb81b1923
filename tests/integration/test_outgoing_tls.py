"""Outgoing DICOM TLS (issue 11): C-MOVE destinations and pynetdicom associations to TLS peers."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_adapter.dimse.scu import (
    AssociationRejectedError,
    AssociationTarget,
    RequestedContext,
    associate,
    client_tls_context,
)
from tests.rig import (
    Importer,
    Orthanc,
    Pki,
    StoreSCP,
    dcmsend,
    generate_ct_series,
    importer_binary,
    make_pki,
    run_dcmtk,
)

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def study(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("tls-study")
    files = generate_ct_series(folder, 4, rows=32, cols=32, patient_id="TLSMOVE")
    assert dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, [folder]).returncode == 0
    return files


@pytest.fixture
def tls_scp(pki: Pki, tmp_path: Path) -> Iterator[StoreSCP]:
    with StoreSCP(tmp_path / "received", aet="TLSSCP", tls=pki) as scp:
        yield scp


def client_flags(pki: Pki, ca: Path) -> list[str]:
    return [
        f"--outgoing_tls_ca_certificates={ca}",
        f"--outgoing_tls_certificate={pki.client_cert}",
        f"--outgoing_tls_private_key={pki.client_key}",
    ]


def movescu(
    importer: Importer, destination: str, study_uid: str
) -> subprocess.CompletedProcess[str]:
    args = ["movescu", "-S", "-aet", "MOVESCU", "-aec", importer.aet, "-aem", destination]
    args += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
    return run_dcmtk([*args, "127.0.0.1", str(importer.port)], timeout=120)


def test_c_move_to_a_tls_destination(
    orthanc: Orthanc, study: list[Path], tls_scp: StoreSCP, pki: Pki, tmp_path: Path
) -> None:
    aets = json.dumps([{"name": "TLSSCP", "host": "127.0.0.1", "port": tls_scp.port, "tls": True}])
    with Importer(
        orthanc.dicomweb_url,
        f"--aet_dictionary_inline={aets}",
        *client_flags(pki, pki.ca),
        log_dir=tmp_path,
    ) as importer:
        study_uid = str(dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
        result = movescu(importer, "TLSSCP", study_uid)
        assert result.returncode == 0, result.stdout + result.stderr
    received = {str(ds.SOPInstanceUID) for ds in tls_scp.received()}
    assert received == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study}


def test_an_untrusted_destination_gets_nothing_and_the_log_says_why(
    orthanc: Orthanc, study: list[Path], tls_scp: StoreSCP, pki: Pki, tmp_path: Path
) -> None:
    aets = json.dumps([{"name": "TLSSCP", "host": "127.0.0.1", "port": tls_scp.port, "tls": True}])
    with Importer(
        orthanc.dicomweb_url,
        f"--aet_dictionary_inline={aets}",
        *client_flags(pki, pki.stranger_cert),  # trusts another CA than the SCP's
        log_dir=tmp_path,
    ) as importer:
        study_uid = str(dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
        movescu(importer, "TLSSCP", study_uid)
        assert importer.running()
        log = importer.log_text()
    assert tls_scp.count() == 0
    assert "TLS handshake with TLSSCP@127.0.0.1" in log
    assert "CERTIFICATE_VERIFY_FAILED" in log


def test_pynetdicom_associations_use_tls_too(pki: Pki, tls_scp: StoreSCP) -> None:
    """The commitment report path (pynetdicom's SCU) over TLS: an echo to the TLS storescp."""
    context = client_tls_context(
        str(pki.ca), str(pki.client_cert), str(pki.client_key), check_hostname=True
    )
    target = AssociationTarget("ADAPTER", tls_scp.aet, "127.0.0.1", tls_scp.port, tls=context)
    with associate(target, [RequestedContext(VERIFICATION, (IMPLICIT_LE,))]) as assoc:
        assert int(assoc.send_c_echo().Status) == 0
    plain = AssociationTarget("ADAPTER", tls_scp.aet, "127.0.0.1", tls_scp.port)
    with (
        pytest.raises(AssociationRejectedError),
        associate(plain, [RequestedContext(VERIFICATION, (IMPLICIT_LE,))]),
    ):
        pass


@pytest.mark.parametrize(
    ("entry", "flags", "named"),
    [
        ({"tls": "yes"}, [], "tls"),
        ({"tls": True}, ["--outgoing_tls_ca_certificates=/nonexistent/ca.pem"], "outgoing_tls_ca"),
        ({"tls": True}, ["--outgoing_tls_certificate=/nonexistent/c.pem"], "outgoing_tls_private"),
    ],
)
def test_bad_outgoing_tls_configuration_stops_startup(
    entry: dict[str, object], flags: list[str], named: str
) -> None:
    aets = json.dumps([{"name": "PACS", "host": "127.0.0.1", "port": 104, **entry}])
    result = subprocess.run(
        [
            str(importer_binary()),
            "--dimse_aet=ADAPTER",
            "--dicomweb_address=http://127.0.0.1:9/dicom-web",
            "--metrics_port=-1",
            f"--aet_dictionary_inline={aets}",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_routed_dimse_destination_over_tls(
    orthanc: Orthanc, tls_scp: StoreSCP, pki: Pki, tmp_path: Path
) -> None:
    files = generate_ct_series(tmp_path / "ct", 3, rows=32, cols=32, patient_id="TLSROUTE")
    config = json.dumps(
        [{"filter": "", "name": "TLSSCP", "host": "127.0.0.1", "port": tls_scp.port, "tls": True}]
    )
    with Importer(
        orthanc.dicomweb_url,
        f"--destination_config_inline={config}",
        "--send_to_all_matching_destinations",
        f"--persistent_file_storage_location={tmp_path / 'spool'}",
        *client_flags(pki, pki.ca),
        log_dir=tmp_path,
    ) as importer:
        sent = dcmsend("127.0.0.1", importer.port, importer.aet, files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
    received = {str(ds.SOPInstanceUID) for ds in tls_scp.received()}
    assert received == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
