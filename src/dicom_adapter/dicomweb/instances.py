"""WADO-RS multipart parts → Part-10 instances, each in memory or (when large) in a spool file.

The multipart stream is consumed part by part: small instances stay in memory (a CT slice is
~0.5 MB), anything above `memory_limit` continues into a file in `spool_dir`, so memory does
not grow with instance size. Each finished part carries its file meta (SOP class, SOP
instance, transfer syntax, where the data set starts), read without pydicom.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from dicom_adapter.dicomweb import multipart
from dicom_adapter.dimse.part10 import (
    DatasetFile,
    DatasetSource,
    FileMeta,
    NeedMoreData,
    NotPart10Error,
    read_file_meta,
)

DEFAULT_MEMORY_LIMIT = 4 << 20
META_HEAD = 256 * 1024  # the meta group is read from this much of the start of the part


@dataclass
class FetchedInstance:
    """One WADO-RS part: its bytes (memory or file) and file meta, or why it is unusable."""

    headers: dict[str, str]
    meta: FileMeta | None = None
    data: bytearray | None = None
    path: Path | None = None
    size: int = 0
    error: str = ""
    _head: bytearray = field(default_factory=bytearray, repr=False)

    def dataset(self) -> DatasetSource:
        """The encoded data set (after the meta group), for StoreAssociation.c_store."""
        if self.meta is None:
            raise ValueError(f"instance has no usable file meta: {self.error}")
        if self.path is not None:
            return DatasetFile(self.path, self.meta.dataset_offset)
        assert self.data is not None
        return memoryview(self.data)[self.meta.dataset_offset :]

    def part10_bytes(self) -> bytes:
        """The whole Part-10 file (reads the spool file when spooled)."""
        if self.path is not None:
            return self.path.read_bytes()
        return bytes(self.data or b"")

    def discard(self) -> None:
        """Free the memory or delete the spool file."""
        self.data = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.path = None


class _Collector:
    """Accumulates one part, switching from memory to a file past the limit."""

    def __init__(self, headers: dict[str, str], spool_dir: Path, memory_limit: int) -> None:
        self.instance = FetchedInstance(headers)
        self._spool_dir = spool_dir
        self._limit = memory_limit
        self._chunks: list[bytes] = []  # joined once at the end: growing a buffer copies more
        self._file: BinaryIO | None = None

    def add(self, chunk: bytes) -> None:
        item = self.instance
        item.size += len(chunk)
        if len(item._head) < META_HEAD:
            item._head += chunk[: META_HEAD - len(item._head)]
        if self._file is not None:
            self._file.write(chunk)
            return
        self._chunks.append(chunk)
        if item.size > self._limit:
            fd, name = tempfile.mkstemp(prefix="wado-", suffix=".dcm", dir=self._spool_dir)
            self._file = os.fdopen(fd, "wb")
            item.path = Path(name)
            self._file.writelines(self._chunks)
            self._chunks = []

    def finish(self) -> FetchedInstance:
        item = self.instance
        if self._file is not None:
            self._file.close()
            self._file = None
        else:
            item.data = bytearray().join(self._chunks)
            self._chunks = []
        try:
            item.meta = read_file_meta(item._head, complete=item.size <= len(item._head))
        except NotPart10Error as exc:
            item.error = str(exc)
        except NeedMoreData:
            item.error = f"file meta group longer than {META_HEAD} bytes"
        item._head = bytearray()
        return item

    def abandon(self) -> None:
        self._chunks = []
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        self.instance.discard()


async def collect_instances(
    events: AsyncIterator[multipart.Event],
    *,
    spool_dir: Path,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
) -> AsyncIterator[FetchedInstance]:
    """Each complete part of a WADO-RS response as a FetchedInstance (the caller discards it).

    An unfinished part (the stream failed or the consumer stopped) is deleted here.
    """
    current: _Collector | None = None
    try:
        async for event in events:
            if isinstance(event, multipart.PartStart):
                if current is not None:
                    current.abandon()
                current = _Collector(event.headers, spool_dir, memory_limit)
            elif isinstance(event, multipart.PartData):
                if current is not None:
                    current.add(event.data)
            elif current is not None:
                finished, current = current.finish(), None
                yield finished
    finally:
        if current is not None:
            current.abandon()
