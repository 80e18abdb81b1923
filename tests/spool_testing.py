"""Stand-ins and factories shared by the spool tests (unit and component)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
from pydicom import dcmread

from dicom_adapter.dicom.attributes import InstanceIdentity
from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy
from dicom_adapter.dicomweb.multipart import (
    MultipartParser,
    PartData,
    PartEnd,
    boundary_from_content_type,
)
from dicom_adapter.importer.store import StoreService
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry
from dicom_adapter.spool.base import Spool, StoreOutcome
from dicom_adapter.spool.local import LocalSpool
from dicom_adapter.spool.uploader import SpoolUploader
from tests.rig import generate_ct_series


class ScriptedStore(StoreService):
    """Answers each upload attempt with the next scripted outcome (an exception is raised)."""

    def __init__(self, script: list[StoreOutcome | Exception]) -> None:
        client = DicomwebClient(httpx.AsyncClient(), RetryPolicy(deadline=1.0))
        super().__init__(client, stow_url="http://x/studies", dicomweb_root="", overwrite=False)
        self.script = script
        self.calls: list[tuple[float, bool]] = []

    async def store_outcome(
        self, path: Path, identity: InstanceIdentity, *, may_exist: bool = False
    ) -> StoreOutcome:
        self.calls.append((time.monotonic(), may_exist))
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        return step


def spool_with(tmp_path: Path, n: int) -> LocalSpool:
    spool = LocalSpool(tmp_path / "spool", headroom_bytes=0)
    for path in generate_ct_series(spool.incoming, n, rows=4, cols=4):
        spool.commit(path, path.stem)
    return spool


def single_uploader(spool: Spool, store: StoreService) -> SpoolUploader:
    """One worker, no retries, no delays: each queued instance gets exactly one attempt."""
    return SpoolUploader(
        spool,
        store,
        ImportMetrics(MetricsRegistry()),
        concurrency=1,
        retries=0,
        min_delay=0,
        max_delay=0,
    )


def part_uids(request: httpx.Request) -> list[str]:
    """The SOP Instance UIDs of a STOW-RS request's parts, in order."""
    parser = MultipartParser(boundary_from_content_type(request.headers["content-type"]))
    uids, current = [], bytearray()
    for event in parser.feed(request.content):
        if isinstance(event, PartData):
            current += event.data
        elif isinstance(event, PartEnd):
            uids.append(str(dcmread(io.BytesIO(bytes(current))).SOPInstanceUID))
            current = bytearray()
    parser.close()
    return uids
