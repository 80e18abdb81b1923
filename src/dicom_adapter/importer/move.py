"""C-MOVE / C-GET → QIDO-RS + WADO-RS (SPEC §1.6): list the instances, fetch them to the spool.

pynetdicom's Q/R SCP does the C-STORE sub-operations (one association per C-MOVE, or the
requesting association for C-GET), the pending counts and FailedSOPInstanceUIDList; this
module supplies the instances. The first instance of each SOP class is fetched before the
destination association opens, so it can offer the transfer syntaxes the instances have;
the rest are fetched with several WADO-RS requests in flight while earlier ones are sent.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.multival import MultiValue

from dicom_adapter.dicomweb.client import DicomwebClient
from dicom_adapter.dicomweb.qido import IdentifierError, QueryRoot
from dicom_adapter.errors import AdapterError

logger = logging.getLogger(__name__)

_INCLUDE = ("0020000D", "0020000E", "00080018", "00080016")
_REQUIRED = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


@dataclass(frozen=True)
class InstanceRef:
    """One instance to retrieve."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Fetched:
    """An instance in the spool (path) or the reason it could not be fetched."""

    ref: InstanceRef
    path: Path | None
    transfer_syntax: str = ""
    error: str = ""


def _values(identifier: Dataset, keyword: str) -> list[str]:
    raw = identifier.get(keyword)
    if raw is None or raw == "":
        return []
    items = list(raw) if isinstance(raw, list | tuple | MultiValue) else [raw]
    return [str(v).strip() for v in items if str(v).strip()]


def instance_query(identifier: Dataset, root: QueryRoot) -> tuple[str, list[tuple[str, str]]]:
    """QIDO path and params listing every instance the retrieve identifier selects."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in _REQUIRED or (level == "PATIENT" and root is not QueryRoot.PATIENT):
        raise IdentifierError(f"cannot retrieve at QueryRetrieveLevel {level!r}")
    required = _REQUIRED[level]
    if not _values(identifier, required):
        raise IdentifierError(f"a {level} level retrieve needs {required}")
    params: list[tuple[str, str]] = []
    studies = _values(identifier, "StudyInstanceUID")
    path = "instances"
    if len(studies) == 1 and level != "PATIENT":
        path = f"studies/{studies[0]}/instances"
    elif studies and level != "PATIENT":
        params.append(("StudyInstanceUID", ",".join(studies)))
    if level == "PATIENT":
        params.append(("PatientID", _values(identifier, "PatientID")[0]))
    for keyword, from_level in (("SeriesInstanceUID", "SERIES"), ("SOPInstanceUID", "IMAGE")):
        wanted = _values(identifier, keyword)
        if wanted and level in (from_level, "IMAGE"):
            params.append((keyword, ",".join(wanted)))
    params.extend(("includefield", tag) for tag in _INCLUDE)
    return path, params


def _first(item: dict[str, object], tag: str) -> str:
    element = item.get(tag)
    if isinstance(element, dict):
        values = element.get("Value")
        if isinstance(values, list) and values and isinstance(values[0], str):
            return values[0]
    return ""


class RetrieveService:
    """Finds and fetches the instances of a C-MOVE or C-GET request."""

    def __init__(self, client: DicomwebClient, dicomweb_root: str, *, concurrency: int = 6) -> None:
        self._client = client
        self._root = dicomweb_root.rstrip("/")
        self._concurrency = concurrency

    async def list_instances(self, identifier: Dataset, root: QueryRoot) -> list[InstanceRef]:
        """Every instance the identifier selects (QIDO, paged), in server order, no repeats."""
        path, params = instance_query(identifier, root)
        refs: dict[str, InstanceRef] = {}
        async for item in self._client.qido(f"{self._root}/{path}", params):
            ref = InstanceRef(
                study_uid=_first(item, "0020000D"),
                series_uid=_first(item, "0020000E"),
                sop_instance_uid=_first(item, "00080018"),
                sop_class_uid=_first(item, "00080016"),
            )
            if ref.study_uid and ref.series_uid and ref.sop_instance_uid:
                refs.setdefault(ref.sop_instance_uid, ref)
        return list(refs.values())

    async def fetch_one(
        self, index: int, ref: InstanceRef, spool: Path, transfer_syntax: str = "*"
    ) -> Fetched:
        """WADO-RS one instance into `spool` (original syntax by default); failures reported."""
        url = (
            f"{self._root}/studies/{ref.study_uid}/series/{ref.series_uid}"
            f"/instances/{ref.sop_instance_uid}"
        )
        dest = spool / f"{index:06d}.dcm"
        try:
            await self._client.retrieve_instance_to(url, dest, transfer_syntax=transfer_syntax)
            meta = read_file_meta_info(dest)
        except (AdapterError, OSError, ValueError) as exc:
            logger.warning("WADO-RS of instance failed: %s", exc)
            return Fetched(ref, None, error=str(exc))
        return Fetched(ref, dest, transfer_syntax=str(meta.get("TransferSyntaxUID", "")))

    async def fetch_samples(self, refs: list[InstanceRef], spool: Path) -> dict[int, Fetched]:
        """The first instance of each SOP class, by position in `refs`."""
        firsts: dict[str, int] = {}
        for index, ref in enumerate(refs):
            firsts.setdefault(ref.sop_class_uid, index)
        fetched = await asyncio.gather(
            *(self.fetch_one(index, refs[index], spool) for index in firsts.values())
        )
        return dict(zip(firsts.values(), fetched, strict=True))

    async def fetch_in_order(
        self, refs: list[InstanceRef], spool: Path, ready: dict[int, Fetched]
    ) -> AsyncIterator[Fetched]:
        """Every instance in order, keeping up to `concurrency` WADO-RS requests ahead."""
        pending: dict[int, asyncio.Task[Fetched]] = {}
        next_index = 0

        def top_up(position: int) -> None:
            nonlocal next_index
            while next_index < len(refs) and next_index < position + self._concurrency:
                if next_index not in ready:
                    pending[next_index] = asyncio.ensure_future(
                        self.fetch_one(next_index, refs[next_index], spool)
                    )
                next_index += 1

        try:
            for position in range(len(refs)):
                top_up(position)
                if position in ready:
                    yield ready[position]
                else:
                    yield await pending.pop(position)
        finally:
            for task in pending.values():
                task.cancel()
            if pending:
                await asyncio.gather(*pending.values(), return_exceptions=True)

    @staticmethod
    def new_spool() -> Path:
        """A private directory for one retrieve's instances (removed by the caller)."""
        return Path(tempfile.mkdtemp(prefix="dicom-adapter-retrieve-"))
