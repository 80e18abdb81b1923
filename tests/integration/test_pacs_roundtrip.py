"""A second Orthanc acting as the hospital PACS uses the adapter through its REST API.

It pushes a study to the adapter (C-STORE → STOW-RS into the DICOMweb Orthanc), queries it
(C-FIND → QIDO-RS), deletes its own copy and retrieves it back (C-MOVE → WADO-RS → C-STORE).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydicom import dcmread

from tests.rig import Importer, Orthanc, dcmsend, wait_until
from tests.rig.find import write_dataset


def test_push_query_and_retrieve_back(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data")
    study_uid = next(
        str(ds.StudyInstanceUID)
        for ds in (
            dcmread(p, stop_before_pixels=True) for p in sorted((tmp_path / "data").iterdir())
        )
        if ds.StudyDescription == "CT HEAD"
    )
    with Orthanc(workdir=tmp_path / "dicomweb") as backend:
        importer = Importer(backend.dicomweb_url, aet="ADAPTER", log_dir=tmp_path)
        with Orthanc(
            aet="PACS",
            modalities={"adapter": ["ADAPTER", "127.0.0.1", importer.port]},
            workdir=tmp_path / "pacs",
        ) as pacs:
            aets = json.dumps([{"name": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}])
            importer.extra_args.append(f"--aet_dictionary_inline={aets}")
            with importer:
                assert (
                    dcmsend("127.0.0.1", pacs.dicom_port, pacs.aet, [tmp_path / "data"]).returncode
                    == 0
                )
                (pacs_study,) = pacs.client.post("/tools/lookup", content=study_uid).json()
                study_id = pacs_study["ID"]

                # 1. push: PACS -> adapter -> STOW-RS -> DICOMweb Orthanc
                push = pacs.client.post(
                    "/modalities/adapter/store", json={"Resources": [study_id], "Synchronous": True}
                )
                assert push.status_code == 200, push.text
                assert push.json()["FailedInstancesCount"] == 0
                assert len(backend.client.get("/studies").json()) == 1

                # 2. query: PACS -> adapter -> QIDO-RS
                query = pacs.client.post(
                    "/modalities/adapter/query",
                    json={
                        "Level": "Study",
                        "Query": {"StudyInstanceUID": study_uid, "StudyDescription": ""},
                    },
                )
                assert query.status_code == 200, query.text
                answers = pacs.client.get(f"/queries/{query.json()['ID']}/answers?expand").json()
                assert len(answers) == 1
                assert answers[0]["0008,1030"]["Value"] == "CT HEAD"

                # 3. retrieve back: PACS deletes its copy, then C-MOVE from the adapter to itself
                assert pacs.client.delete(f"/studies/{study_id}").status_code == 200
                assert pacs.client.post("/tools/lookup", content=study_uid).json() == []
                moved = pacs.client.post(
                    "/modalities/adapter/move",
                    json={
                        "Level": "Study",
                        "Resources": [{"StudyInstanceUID": study_uid}],
                        "TargetAet": "PACS",
                        "Synchronous": True,
                    },
                )
                assert moved.status_code == 200, moved.text
                wait_until(  # the move is asynchronous inside Orthanc
                    lambda: pacs.client.post("/tools/lookup", content=study_uid).json(),
                    30.0,
                    "the study to come back to the PACS",
                )
                back = pacs.client.get(f"/studies/{study_id}/instances").json()
                assert len(back) == 5
