"""Issue 10 point 5, mirroring the Java adapter's integration test: route, redact, transcode.

dcmsend of mixed CT and MG instances through one dicom-import with
`--redact_filter_profile=CHC_BASIC`, `--store_compress_to_transfer_syntax=<JPEG 2000
lossless>` and a destination config sending `Modality=MG` to a second Orthanc: every CT
lands in the first store and every MG in the second, CHC_BASIC attributes are empty at every
depth, the UIDs follow the Java formula, the transfer syntax is JPEG 2000 lossless and the
decoded pixels equal the originals.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from dicom_adapter.dicom.redact import chc_basic_tags, java_uid
from tests.rig import Orthanc, StartImporter, dcmsend, generate_ct_series

JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
MG_STORAGE = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image - For Presentation


@pytest.fixture(scope="module")
def mammo_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with Orthanc(aet="MAMMO", workdir=tmp_path_factory.mktemp("orthanc-mammo")) as server:
        yield server


def mixed_study(folder: Path) -> list[Dataset]:
    """Four CT and three MG instances with patient data at the top and two sequence levels."""
    originals: list[Dataset] = []
    for index, path in enumerate(generate_ct_series(folder, 7, rows=64, cols=64, seed=5)):
        ds = dcmread(path)
        if index >= 4:
            ds.Modality = "MG"
            ds.SOPClassUID = MG_STORAGE
            ds.file_meta.MediaStorageSOPClassUID = UID(MG_STORAGE)
        inner = Dataset()
        inner.PatientName = "Nested^Twice"
        outer = Dataset()
        outer.PatientName = "Nested^Once"
        outer.PatientID = "NESTED-ID"
        outer.ConceptNameCodeSequence = Sequence([inner])
        ds.AnatomicRegionSequence = Sequence([outer])
        ds.PatientBirthDate = "19700101"
        ds.save_as(path, enforce_file_format=True)
        originals.append(dcmread(path))
    return originals


def every_item(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from every_item(item)


def test_route_redact_transcode_like_the_java_integration_test(
    orthanc: Orthanc, mammo_store: Orthanc, start_importer: StartImporter, tmp_path: Path
) -> None:
    originals = mixed_study(tmp_path / "study")
    routes = [{"filter": "Modality=MG", "dicomweb_destination": mammo_store.dicomweb_url}]
    importer = start_importer(
        "--redact_filter_profile=CHC_BASIC",
        f"--store_compress_to_transfer_syntax={JPEG2000_LOSSLESS}",
        f"--destination_config_inline={json.dumps(routes)}",
    )
    sent = dcmsend("127.0.0.1", importer.port, importer.aet, [tmp_path / "study"])
    assert sent.returncode == 0, sent.stdout + sent.stderr

    listed = chc_basic_tags()
    for original in originals:
        store, other = (
            (mammo_store, orthanc) if original.Modality == "MG" else (orthanc, mammo_store)
        )
        uid = java_uid(str(original.SOPInstanceUID))
        assert other.find_instance(uid) is None, "routed to the wrong store"
        assert store.find_instance(str(original.SOPInstanceUID)) is None
        orthanc_id = store.find_instance(uid)
        assert orthanc_id is not None, f"{original.Modality} instance missing from {store.aet}"
        assert store.transfer_syntax(orthanc_id) == JPEG2000_LOSSLESS
        stored = store.instance_dataset(orthanc_id)
        for item in every_item(stored):
            for element in item:
                if int(element.tag) in listed:
                    assert element.is_empty, f"{element.keyword} kept a value"
        assert stored.PatientName == "" and stored.PatientBirthDate == ""
        assert stored.AnatomicRegionSequence[0].ConceptNameCodeSequence[0].PatientName == ""
        assert stored.StudyInstanceUID == java_uid(str(original.StudyInstanceUID))
        assert stored.SeriesInstanceUID == java_uid(str(original.SeriesInstanceUID))
        assert np.array_equal(stored.pixel_array, original.pixel_array)
