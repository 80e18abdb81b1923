"""WADO-RS multipart parts → Part-10 instances, each in memory or (when large) in a spool file.

The multipart stream is consumed part by part: small instances stay in memory (a CT slice is
~0.5 MB), anything above `memory_limit` continues into a file in `spool_dir`, so memory does
not grow with instance size. A process-wide `MemoryBudget` caps the bytes all instances in
memory hold together (C-MOVE prefetch of every association, export fetches): a part that does
not fit goes to the spool, so memory does not grow with the number of associations either.
Each finished part carries its file meta (SOP class, SOP instance, transfer syntax, where the
data set starts), read without pydicom. Spool file I/O runs in threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from dicom_adapter.dicom.part10 import (
    DatasetFile,
    DatasetSource,
    FileMeta,
    NeedMoreData,
    NotPart10Error,
    read_file_meta,
)
from dicom_adapter.dicomweb import multipart

DEFAULT_MEMORY_LIMIT = 4 << 20
DEFAULT_MEMORY_BUDGET = 256 << 20
META_HEAD = 256 * 1024  # the meta group is read from this much of the start of the part
SPOOL_WRITE = 1 << 20  # spooled bytes are written in a thread once this much has arrived


class MemoryBudget:
    """Bytes that fetched instances may hold in memory, shared by every fetch of the process.

    Each reservation belongs to one FetchedInstance (or its collector) and is given back when
    that instance is discarded, however the fetch ends. Thread-safe.
    """

    def __init__(self, limit: int = DEFAULT_MEMORY_BUDGET) -> None:
        self.limit = limit
        self._used = 0
        self._peak = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        """Bytes reserved right now."""
        return self._used

    @property
    def peak(self) -> int:
        """The most bytes reserved at once so far."""
        return self._peak

    def try_reserve(self, size: int) -> bool:
        """Reserve `size` bytes if they fit in what is left; False (nothing reserved) if not."""
        with self._lock:
            if self._used + size > self.limit:
                return False
            self._used += size
            self._peak = max(self._peak, self._used)
            return True

    def release(self, size: int) -> None:
        """Give back bytes reserved earlier."""
        with self._lock:
            self._used = max(0, self._used - size)


@dataclass
class FetchedInstance:
    """One WADO-RS part: its bytes (memory or file) and file meta, or why it is unusable."""

    headers: dict[str, str]
    meta: FileMeta | None = None
    data: bytes | None = None
    path: Path | None = None
    size: int = 0
    error: str = ""
    _head: bytearray = field(default_factory=bytearray, repr=False)
    _budget: MemoryBudget | None = field(default=None, repr=False)
    _reserved: int = field(default=0, repr=False)

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
        """Free the memory (and its budget) or delete the spool file."""
        self._free_memory()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.path = None

    async def adiscard(self) -> None:
        """`discard` from the event loop: a spool file is deleted in a thread."""
        self._free_memory()
        path, self.path = self.path, None
        if path is not None:
            await asyncio.to_thread(_unlink, path)

    def _free_memory(self) -> None:
        self.data = None
        self._give_back(self._reserved)

    def _give_back(self, size: int) -> None:
        size = min(size, self._reserved)
        self._reserved -= size
        if self._budget is not None and size:
            self._budget.release(size)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _assemble(chunks: list[bytes]) -> bytes:
    """The chunks as one buffer: a part read in one piece is kept as it is (no copy); else one
    join (a zeroed buffer filled chunk by chunk cost a memset more; the transient second copy
    is at most the per-instance memory limit)."""
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Collector:
    """Accumulates one part: in memory while it fits the limit and the budget, else a file."""

    def __init__(
        self,
        headers: dict[str, str],
        spool_dir: Path,
        memory_limit: int,
        budget: MemoryBudget | None,
    ) -> None:
        self.instance = FetchedInstance(headers, _budget=budget)
        self._spool_dir = spool_dir
        self._limit = memory_limit
        self._budget = budget
        self._chunks: list[bytes] = []  # joined once at the end: growing a buffer copies more
        self._buffered = 0  # bytes in _chunks not yet written, once spooling
        self._file: BinaryIO | None = None

    async def add(self, chunk: bytes) -> None:
        item = self.instance
        item.size += len(chunk)
        if len(item._head) < META_HEAD:
            item._head += chunk[: META_HEAD - len(item._head)]
        self._chunks.append(chunk)
        if self._file is not None:
            self._buffered += len(chunk)
            if self._buffered >= SPOOL_WRITE:
                await self._flush()
            return
        fits = item.size <= self._limit
        if fits and self._budget is not None:
            fits = self._budget.try_reserve(len(chunk))
            if fits:
                item._reserved += len(chunk)
        if not fits:
            fd, name = await asyncio.to_thread(
                tempfile.mkstemp, prefix="wado-", suffix=".dcm", dir=self._spool_dir
            )
            self._file = os.fdopen(fd, "wb")
            item.path = Path(name)
            await self._flush()
            item._give_back(item._reserved)  # what was in memory is in the file now

    async def _flush(self) -> None:
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        assert self._file is not None
        await asyncio.to_thread(self._file.writelines, chunks)

    async def finish(self) -> FetchedInstance:
        item = self.instance
        if self._file is not None:
            await self._flush()
            file, self._file = self._file, None
            await asyncio.to_thread(file.close)
        else:
            item.data = _assemble(self._chunks)
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
        """Drop the part (sync: it runs in `finally` blocks, also on cancellation)."""
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
    budget: MemoryBudget | None = None,
) -> AsyncIterator[FetchedInstance]:
    """Each complete part of a WADO-RS response as a FetchedInstance (the caller discards it).

    An unfinished part (the stream failed or the consumer stopped) is deleted here. Without
    a `budget`, only `memory_limit` (per instance) decides memory or spool.
    """
    current: _Collector | None = None
    try:
        async for event in events:
            if isinstance(event, multipart.PartStart):
                if current is not None:
                    current.abandon()
                current = _Collector(event.headers, spool_dir, memory_limit, budget)
            elif isinstance(event, multipart.PartData):
                if current is not None:
                    await current.add(event.data)
            elif current is not None:
                collector, current = current, None
                try:
                    finished = await collector.finish()
                except BaseException:
                    collector.abandon()
                    raise
                yield finished
    finally:
        if current is not None:
            current.abandon()
