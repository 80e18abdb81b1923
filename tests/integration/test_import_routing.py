"""Destination routing in single mode (issue 10 point 1): real Orthancs, dcmsend, dicom-import.

`Modality=MG` goes to a second Orthanc, everything else to --dicomweb_address; with and
without the durable spool (the Java adapter ignores routing when its backup is on; we do not).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_adapter.status import Status
from tests.rig import Orthanc, StartImporter, dcmsend, generate_ct_series, parse_dcmsend_debug


@pytest.fixture(scope="module")
def second_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """The routed-to DICOMweb store."""
    with Orthanc(aet="SECOND", workdir=tmp_path_factory.mktemp("orthanc-second")) as server:
        yield server


def mixed_instances(folder: Path, ct: int, mg: int, seed: int) -> dict[str, tuple[str, Path]]:
    """SOP Instance UID -> (modality, file): `ct` CT instances and `mg` relabelled as MG."""
    paths = generate_ct_series(folder, ct + mg, rows=16, cols=16, seed=seed)
    found: dict[str, tuple[str, Path]] = {}
    for index, path in enumerate(paths):
        ds = dcmread(path)
        if index >= ct:
            ds.Modality = "MG"
            ds.save_as(path, enforce_file_format=True)
        found[str(ds.SOPInstanceUID)] = (str(ds.Modality), path)
    return found


@pytest.mark.parametrize("spooled", [False, True], ids=["synchronous", "spool"])
def test_single_mode_routes_mg_to_the_second_store(
    orthanc: Orthanc,
    second_orthanc: Orthanc,
    start_importer: StartImporter,
    tmp_path: Path,
    spooled: bool,
) -> None:
    routes = [
        {"filter": "Modality=MG", "dicomweb_destination": second_orthanc.dicomweb_url},
        {"filter": "AETitle=NOBODY", "dicomweb_destination": "http://127.0.0.1:9/dicom-web"},
    ]
    spool_args = [f"--persistent_file_storage_location={tmp_path / 'spool'}"] if spooled else []
    importer = start_importer(f"--destination_config_inline={json.dumps(routes)}", *spool_args)
    instances = mixed_instances(tmp_path / "data", ct=3, mg=3, seed=11 + spooled)
    sent = dcmsend(
        "127.0.0.1",
        importer.port,
        importer.aet,
        [path for _, path in instances.values()],
        extra=["-d"],
    )
    statuses = parse_dcmsend_debug(sent.stdout + sent.stderr)
    assert statuses == dict.fromkeys(instances, Status.SUCCESS)
    for uid, (modality, _) in instances.items():
        in_first = orthanc.find_instance(uid) is not None
        in_second = second_orthanc.find_instance(uid) is not None
        assert (in_first, in_second) == (modality == "CT", modality == "MG"), (uid, modality)
    if spooled:  # each destination's queue emptied
        assert not list((tmp_path / "spool").glob("**/queue/*.dcm"))
