"""Test data written with pydicom: CT series, a streamed large instance, minimal Part-10 files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    generate_uid,
)


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def generate_ct_series(
    dest_dir: Path,
    count: int,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    patient_id: str = "PAT1",
    study_uid: str | None = None,
) -> list[Path]:
    """Write `count` CT instances (one new series) with random 12-bit pixels; return the paths."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_of_reference_uid = generate_uid()
    paths: list[Path] = []
    for index in range(count):
        sop_instance_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = _file_meta(CTImageStorage, sop_instance_uid)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_instance_uid
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "dicom-adapter tests"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "rig CT study"
        ds.SeriesDescription = f"rig CT series seed {seed}"
        ds.PatientName = f"Rig^{patient_id}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.SliceThickness = "1.0"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(index)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = float(index)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [0.5, 0.5]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        pixels = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16)
        ds.PixelData = pixels.astype("<u2").tobytes()
        path = dest_dir / f"ct_{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


LARGE_FRAME_ROWS = 1024
LARGE_FRAME_COLS = 1024
CHUNK_BYTES = 8 * 1024 * 1024


def write_large_instance(path: Path, size_bytes: int, seed: int = 0) -> str:
    """Write an 8-bit multi-frame Secondary Capture with ~`size_bytes` of pixel data, streamed.

    The pixel data is never held in memory: the header is written by pydicom, then the
    (7FE0,0010) element header and the pixel bytes are appended in 8 MB chunks.
    Returns the SOP Instance UID.
    """
    frame_bytes = LARGE_FRAME_ROWS * LARGE_FRAME_COLS
    frames = max(1, round(size_bytes / frame_bytes))
    pixel_length = frames * frame_bytes  # even, fits the 32-bit length below
    if pixel_length >= 0xFFFFFFFF:
        raise ValueError(f"{size_bytes} bytes do not fit a single explicit-length element")
    sop_class_uid = MultiFrameGrayscaleByteSecondaryCaptureImageStorage
    sop_instance_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class_uid, sop_instance_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.PatientName = "Rig^Large"
    ds.PatientID = "LARGE"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = "40"
    ds.Rows = LARGE_FRAME_ROWS
    ds.Columns = LARGE_FRAME_COLS
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.save_as(path, enforce_file_format=True)

    chunk = np.random.default_rng(seed).integers(0, 256, size=CHUNK_BYTES, dtype=np.uint8)
    chunk_bytes = chunk.tobytes()
    with path.open("ab") as fh:
        # Explicit VR little endian: tag group, element, VR "OB", 2 reserved bytes, 32-bit length
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, pixel_length))
        remaining = pixel_length
        while remaining > 0:
            n = min(remaining, CHUNK_BYTES)
            fh.write(chunk_bytes[:n] if n < CHUNK_BYTES else chunk_bytes)
            remaining -= n
    return sop_instance_uid


def part10_bytes(sop_class: str, uid: str, syntax: str, payload: bytes = b"pixels") -> bytes:
    """A Part-10 file: a real meta group, then one (0010,0020) element as its data set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(uid)
    meta.TransferSyntaxUID = UID(syntax)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_file_meta_info(out, meta, enforce_standard=True)
    value = payload + b" " * (len(payload) % 2)
    element = struct.pack("<HH2sH", 0x0010, 0x0020, b"LO", len(value)) + value
    return b"\0" * 128 + b"DICM" + out.getvalue() + element


def instance_paths(files: list[Path]) -> list[str]:
    """The WADO-RS path (`studies/.../series/.../instances/...`) of each Part-10 file."""
    from pydicom import dcmread

    paths = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        paths.append(
            f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        )
    return paths
