"""C-FIND test data: a small tree of three patients, five studies and their series, and the
query keys and identifiers the find tests and bench/bench_find.py share."""

from __future__ import annotations

from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_COUNTS = [
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
]
STUDY_COUNTS = ["NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
CT, MR, US = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.6.1"

# (patient id, name, birth date, [(study date, description, [(modality, sop class, n)])])
PATIENTS = [
    (
        "FP001",
        "Doe^John",
        "19700101",
        [
            ("20190105", "CT HEAD", [("CT", CT, 3), ("CT", CT, 2)]),
            ("20210611", "MR KNEE", [("MR", MR, 2)]),
        ],
    ),
    (
        "FP002",
        "Doe^Jane",
        "19851231",
        [
            ("20200611", "US ABDOMEN", [("US", US, 2), ("CT", CT, 1)]),
        ],
    ),
    (
        "FP003",
        "Smith^Anna^Marie",
        "19551120",
        [
            ("20211230", "MR BRAIN", [("MR", MR, 3)]),
            ("20220301", "CT CHEST", [("CT", CT, 2)]),
        ],
    ),
]


def write_dataset(folder: Path) -> None:
    """Write the PATIENTS tree into `folder`, one small 8-bit image per instance."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for patient_id, name, birth, studies in PATIENTS:
        for study_date, description, series_list in studies:
            study_uid = generate_uid()
            for series_number, (modality, sop_class, n) in enumerate(series_list, start=1):
                series_uid = generate_uid()
                for instance in range(1, n + 1):
                    ds = Dataset()
                    ds.file_meta = FileMetaDataset()
                    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
                    ds.SOPClassUID = sop_class
                    ds.SOPInstanceUID = generate_uid()
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                    ds.SpecificCharacterSet = "ISO_IR 100"
                    ds.PatientID = patient_id
                    ds.PatientName = name
                    ds.PatientBirthDate = birth
                    ds.PatientSex = "O"
                    ds.StudyInstanceUID = study_uid
                    ds.StudyDate = study_date
                    ds.StudyTime = "101500"
                    ds.StudyDescription = description
                    ds.AccessionNumber = f"A{study_date}"
                    ds.StudyID = "1"
                    ds.SeriesInstanceUID = series_uid
                    ds.SeriesNumber = series_number
                    ds.Modality = modality
                    ds.InstanceNumber = instance
                    ds.Rows = ds.Columns = 4
                    ds.BitsAllocated = ds.BitsStored = 8
                    ds.HighBit = 7
                    ds.PixelRepresentation = 0
                    ds.SamplesPerPixel = 1
                    ds.PhotometricInterpretation = "MONOCHROME2"
                    ds.PixelData = bytes(16)
                    count += 1
                    ds.save_as(folder / f"i{count:03d}.dcm", enforce_file_format=True)


def identifier(level: str, **keys: object) -> Dataset:
    """A C-FIND identifier at `level` with the given keys (empty string: return the key)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds
