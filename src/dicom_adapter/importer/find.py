"""C-FIND → QIDO-RS (SPEC §1.5): translate the identifier, page through QIDO, shape answers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from pydicom import Dataset

from dicom_adapter.dicomweb.client import DicomwebClient
from dicom_adapter.dicomweb.qido import (
    QueryLevel,
    QueryRoot,
    build_queries,
    dataset_from_json,
    patient_key,
    shape_response,
)
from dicom_adapter.errors import AdapterError
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry

logger = logging.getLogger(__name__)

RETRIEVE_AE_TITLE = 0x00080054
# The attribute that identifies one answer at each level, for merging several queries.
_UNIQUE_KEY = {
    QueryLevel.STUDY: "StudyInstanceUID",
    QueryLevel.SERIES: "SeriesInstanceUID",
    QueryLevel.IMAGE: "SOPInstanceUID",
}


class FindService:
    """Answers C-FIND identifiers from a DICOMweb server."""

    def __init__(
        self,
        client: DicomwebClient,
        dicomweb_root: str,
        *,
        retrieve_aet: str,
        fuzzy: bool = False,
        page_size: int = 1000,
        metrics: ImportMetrics | None = None,
    ) -> None:
        self._client = client
        self._root = dicomweb_root.rstrip("/")
        self._retrieve_aet = retrieve_aet
        self._fuzzy = fuzzy
        self._page_size = page_size
        self._metrics = metrics or ImportMetrics(MetricsRegistry())

    async def find(self, identifier: Dataset, root: QueryRoot) -> AsyncIterator[Dataset]:
        """Yield one shaped answer per match; several QIDO queries are merged without repeats."""
        queries = build_queries(identifier, root, fuzzy=self._fuzzy)
        retrieve_aet = self._retrieve_aet if RETRIEVE_AE_TITLE in identifier else None
        seen: set[object] = set()
        for query in queries:
            url = f"{self._root}/{query.path}"
            self._metrics.cfind_qidors_requests.inc()
            pages = aiter(self._client.qido(url, query.params, page_size=self._page_size))
            while True:
                try:
                    item = await anext(pages)
                except StopAsyncIteration:
                    break
                except AdapterError:
                    self._metrics.cfind_qidors_errors.inc()
                    raise
                result = dataset_from_json(item)
                key: object = None
                if query.level is QueryLevel.PATIENT:
                    key = patient_key(result)
                elif len(queries) > 1:
                    key = str(result.get(_UNIQUE_KEY[query.level], "") or "") or None
                if key is not None:
                    if key in seen:
                        continue
                    seen.add(key)
                yield shape_response(result, identifier, query.level, retrieve_aet=retrieve_aet)
