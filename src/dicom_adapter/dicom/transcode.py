"""Transcoding a received Part-10 file to one transfer syntax (--store_compress_to_transfer_syntax).

A preparation step (importer/prepare.py): it rewrites the file in place or leaves it as it
came; it never fails the C-STORE. Whatever cannot be transcoded (an undecodable or corrupt
input, pixels a codec refuses, a codec error) is stored as received with one WARNING naming
the SOP Instance UID, as the Java adapter does.

Hazard, memory: one instance is transcoded at a time per process (a lock), and one whose file
or decoded pixel data exceeds `max_bytes` is never decoded. To a compressed syntax, frames are
decoded and encoded one at a time and written out at once: the peak is the received data set
plus about one frame. To an uncompressed syntax, pydicom holds all decoded frames twice.
Hazard, time: the C-STORE is answered after its transcode, so `max_seconds` bounds it
(checked between frames: one frame may overshoot it). The codecs hold the GIL while they work
on a frame, so a large frame also stalls the event loop (uploads, health endpoints).
"""

from __future__ import annotations

import enum
import importlib
import itertools
import logging
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicom_adapter.dicom.deflate import inflated_bytes
from dicom_adapter.dicom.tags import EXTENDED_OFFSET_TABLE, PIXEL_DATA
from dicom_adapter.errors import ConfigError

logger = logging.getLogger(__name__)

TARGETS: dict[str, str] = {
    JPEG2000Lossless: "JPEG 2000 lossless",
    JPEGLSLossless: "JPEG-LS lossless",
    RLELossless: "RLE lossless",
    DeflatedExplicitVRLittleEndian: "Deflated Explicit VR Little Endian",
    ExplicitVRLittleEndian: "Explicit VR Little Endian (decompressed)",
}
DEFAULT_MAX_BYTES = 512 << 20
DEFAULT_MAX_SECONDS = 10.0
CODECS_INSTALL = "pip install 'dicom-adapter[codecs]'"
# What the extra installs, by import name: numpy, pylibjpeg, pylibjpeg-openjpeg (JPEG 2000),
# pylibjpeg-libjpeg (JPEG, JPEG-LS decoding), pylibjpeg-rle, pyjpegls (JPEG-LS encoding).
CODEC_MODULES = ("numpy", "pylibjpeg", "openjpeg", "libjpeg", "rle", "jpeg_ls")
UNDEFINED_LENGTH = 0xFFFFFFFF
# pydicom logs each codec plugin's failure with a traceback, then raises with all their messages
_PLUGIN_LOGGERS = ("pydicom.pixels.decoders.base", "pydicom.pixels.encoders.base")
_PROBLEM_CHARS = 500


class Outcome(enum.Enum):
    """What a transcoding step did with one file."""

    TRANSCODED = "transcoded"
    ALREADY = "already in the target syntax"
    NO_PIXELS = "no pixel data to compress"
    TOO_LARGE = "over the size cap"
    TOO_SLOW = "over the time cap"
    FAILED = "failed"


class TranscodeError(Exception):
    """The instance cannot be transcoded; it is stored as received."""


class TooSlowError(TranscodeError):
    """The transcode would finish past its time budget (checked between frames)."""


class _NoPluginTracebacks(logging.Filter):
    """Drops pydicom's per-plugin tracebacks: the error raised after them names each failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


def missing_codecs() -> list[str]:
    """Import names of the codec packages that cannot be imported (empty: all there)."""
    missing: list[str] = []
    for name in CODEC_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


_JPEG_SOF = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}) | {0xF7}  # F7: JPEG-LS
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_J2K_SEARCH = 4096  # a JP2 wrapper (not DICOM, but seen) puts boxes before the codestream
# A JPEG has a handful of marker segments before its SOF (each, even a large ICC profile, one
# step); a longer walk (runs of fill bytes, junk segments) is Python work under the transcoder
# lock, so past this many steps (about 1 ms) the frame counts as unreadable.
_JPEG_MAX_STEPS = 4096


def codestream_shape(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) a JPEG, JPEG-LS or JPEG 2000 frame says it decodes to.

    Read from its SOF or SIZ marker segment without decoding; None when there is none.
    """
    if frame[:2] == b"\xff\xd8":  # JPEG / JPEG-LS: walk the marker segments up to SOF
        pos = 2
        for _ in range(_JPEG_MAX_STEPS):
            if pos + 4 > len(frame):
                return None
            if frame[pos] != 0xFF:
                return None
            code = frame[pos + 1]
            if code == 0xFF:  # fill byte
                pos += 1
                continue
            if code in _JPEG_STANDALONE:
                pos += 2
                continue
            if code in _JPEG_SOF and pos + 10 <= len(frame):
                rows, columns, components = struct.unpack_from(">HHB", frame, pos + 5)
                # rows 0: the JPEG's DNL marker gives them later; we do not look for it
                return (rows, columns, components) if rows and columns else None
            if code == 0xDA:  # start of scan before any frame header
                return None
            pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
        return None
    siz = frame.find(_J2K_SOC_SIZ, 0, _J2K_SEARCH)
    if siz < 0 or siz + 42 > len(frame):
        return None
    x, y, x0, y0 = struct.unpack_from(">IIII", frame, siz + 8)
    (components,) = struct.unpack_from(">H", frame, siz + 40)
    return max(0, y - y0), max(0, x - x0), components


def _check_codestreams(ds: Dataset, deadline: float) -> None:
    """Refuse, before decoding, frames that claim more pixels than the data set describes."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    frames = int(ds.get("NumberOfFrames") or 1)
    for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
        _check_time(deadline)
        shape = codestream_shape(frame)
        if shape is None:
            raise TranscodeError(f"frame {index + 1} has no readable frame header")
        if shape[0] * shape[1] * shape[2] > rows * columns * samples:
            raise TranscodeError(
                f"frame {index + 1} claims {shape[0]}x{shape[1]}x{shape[2]} pixels, the data set "
                f"{rows}x{columns}x{samples}"
            )


def decoded_pixel_bytes(header: Dataset) -> int:
    """Bytes the header says the decoded pixel data takes (0 when it describes no image)."""
    try:
        frames = int(header.get("NumberOfFrames") or 1)
        bits = (
            int(header.Rows)
            * int(header.Columns)
            * int(header.get("SamplesPerPixel") or 1)
            * int(header.BitsAllocated)
        )
    except (AttributeError, TypeError, ValueError):
        return 0
    return (max(0, frames) * max(0, bits) + 7) // 8


class Transcoder:
    """The transcoding step: `transcoder(path)` rewrites a received file in `target` syntax."""

    def __init__(
        self,
        target: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_seconds: float = DEFAULT_MAX_SECONDS,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"unsupported target transfer syntax {target}")
        self.target = UID(target)
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self._one_at_a_time = threading.Lock()  # the memory bound: one decoded instance
        for name in _PLUGIN_LOGGERS:
            plugin_logger = logging.getLogger(name)
            if not any(isinstance(f, _NoPluginTracebacks) for f in plugin_logger.filters):
                plugin_logger.addFilter(_NoPluginTracebacks())

    def __call__(self, path: Path) -> None:
        """Transcode `path` in place, or leave it as received and log why; never raises."""
        self.transcode_file(path)

    def transcode_file(self, path: Path) -> Outcome:
        """Transcode `path` in place; the outcome says whether it was (never raises)."""
        sop_instance_uid = "(unknown)"
        deadline = time.monotonic() + self.max_seconds  # the peer waits for its answer
        try:
            meta = read_file_meta_info(path)
            sop_instance_uid = str(meta.get("MediaStorageSOPInstanceUID") or sop_instance_uid)
            source = UID(meta.get("TransferSyntaxUID") or "")
            if source == self.target:
                return Outcome.ALREADY
            size = path.stat().st_size
            if source.is_deflated:  # reading the header inflates it all: bound that first
                size = max(size, inflated_bytes(path, self.max_bytes + 1))
            if size <= self.max_bytes:
                header = dcmread(path, stop_before_pixels=True)
                sop_instance_uid = str(header.get("SOPInstanceUID") or sop_instance_uid)
                size = max(size, decoded_pixel_bytes(header))
                del header
            if size > self.max_bytes:
                logger.warning(
                    "instance %s stored as received (%s): %d bytes (file or decoded pixel data) "
                    "exceed --transcode_max_bytes (%d)",
                    sop_instance_uid,
                    source.name,
                    size,
                    self.max_bytes,
                    extra={"sop_instance_uid": sop_instance_uid},
                )
                return Outcome.TOO_LARGE
            if not self._one_at_a_time.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TooSlowError("other instances were being transcoded")
            try:
                return self._rewrite(path, source, deadline)
            finally:
                self._one_at_a_time.release()
        except TooSlowError as exc:
            logger.warning(
                "instance %s stored as received: transcoding to %s not done within "
                "--transcode_max_seconds (%g s): %s",
                sop_instance_uid,
                self.target.name,
                self.max_seconds,
                exc,
                extra={"sop_instance_uid": sop_instance_uid},
            )
            return Outcome.TOO_SLOW
        except Exception as exc:
            problem = " ".join(f"{type(exc).__name__}: {exc}".split())[:_PROBLEM_CHARS]
            logger.warning(
                "instance %s stored as received: transcoding to %s failed: %s",
                sop_instance_uid,
                self.target.name,
                problem,
                extra={"sop_instance_uid": sop_instance_uid},
            )
            return Outcome.FAILED

    def _rewrite(self, path: Path, source: UID, deadline: float) -> Outcome:
        if source == ExplicitVRBigEndian:
            raise TranscodeError("Explicit VR Big Endian input is not converted")
        ds = dcmread(path)
        has_pixels = bool(ds.get("PixelData"))  # redaction may have emptied it
        if not has_pixels and self.target.is_compressed:
            return Outcome.NO_PIXELS
        if has_pixels and source.is_encapsulated and source != RLELossless:
            _check_codestreams(ds, deadline)  # a codec allocates what its codestream says
        # A name the C-STORE spool's sweep removes (cstore-*.dcm) if we die while writing it.
        sibling = path.with_name(f"{path.stem}.transcoded{path.suffix}")
        try:
            if self.target.is_compressed:
                _write_encapsulated(ds, source, self.target, sibling, deadline)
            else:
                _write_native(ds, source, self.target, sibling, deadline)
            os.replace(sibling, path)
        finally:
            sibling.unlink(missing_ok=True)
        return Outcome.TRANSCODED


def _write_native(ds: Dataset, source: UID, target: UID, dest: Path, deadline: float) -> None:
    """Decompressed (Explicit VR LE or Deflated): pydicom holds all decoded frames, twice."""
    if ds.get("PixelData") and source.is_compressed:
        ds.decompress(as_rgb=True, generate_instance_uid=False)
        for tag in EXTENDED_OFFSET_TABLE:  # described the fragments just decoded
            if tag in ds:
                del ds[tag]
    _check_time(deadline)
    ds.file_meta.TransferSyntaxUID = target
    ds.save_as(dest, enforce_file_format=True)  # group length recomputed


def _check_time(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise TooSlowError("given up")


def _write_encapsulated(ds: Dataset, source: UID, target: UID, dest: Path, deadline: float) -> None:
    """Decode and encode frame by frame, each encoded frame written out at once.

    Memory: the received data set plus one decoded and one encoded frame. The attributes
    before Pixel Data go through pydicom (group length recomputed), then Pixel Data as one
    fragment per frame after an empty Basic Offset Table (PS3.5 A.4), then what followed it.
    """
    frames = get_decoder(source).iter_array(ds, as_rgb=True)
    first, properties = next(frames)  # decoding may change the photometric interpretation
    header = Dataset({elem.tag: elem for elem in ds if elem.tag < PIXEL_DATA})
    trailing = Dataset({elem.tag: elem for elem in ds if elem.tag > PIXEL_DATA})
    for tag in EXTENDED_OFFSET_TABLE:
        if tag in header:
            del header[tag]
    header.PhotometricInterpretation = properties["photometric_interpretation"]
    if "planar_configuration" in properties:
        header.PlanarConfiguration = properties["planar_configuration"]
    if "pixel_representation" in properties:
        header.PixelRepresentation = properties["pixel_representation"]
    header.file_meta = FileMetaDataset(ds.file_meta)
    header.file_meta.TransferSyntaxUID = target
    header.preamble = ds.preamble
    encoder = get_encoder(target)
    header.save_as(dest, enforce_file_format=True)
    with dest.open("ab") as out:
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, UNDEFINED_LENGTH))
        out.write(struct.pack("<HHI", 0xFFFE, 0xE000, 0))  # empty Basic Offset Table
        for array, frame_properties in itertools.chain([(first, properties)], frames):
            _check_time(deadline)
            options: dict[str, Any] = dict(frame_properties)
            fragment = encoder.encode(array, **options)
            padding = b"\x00" * (len(fragment) % 2)
            out.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment) + len(padding)))
            out.write(fragment)
            out.write(padding)
        out.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))  # sequence delimiter
        if len(trailing):
            fp = DicomFileLike(out)
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_dataset(fp, trailing)


def transcoding_step(
    target: str, max_bytes: int, max_seconds: float = DEFAULT_MAX_SECONDS
) -> Transcoder | None:
    """The step for --store_compress_to_transfer_syntax (None when unset).

    Raises ConfigError (one line, exit 2) when the codecs extra is not installed.
    """
    if not target:
        return None
    missing = missing_codecs()
    if missing:
        raise ConfigError(
            "store_compress_to_transfer_syntax",
            f"needs the image codecs ({', '.join(missing)} missing): {CODECS_INSTALL}",
        )
    return Transcoder(target, max_bytes=max_bytes, max_seconds=max_seconds)
