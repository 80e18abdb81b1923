"""C-FIND → QIDO-RS (SPEC §1.5): translate the identifier, page through QIDO, shape answers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

from pydicom import Dataset

from dicom_adapter.dicomweb.client import DicomwebClient
from dicom_adapter.dicomweb.qido import (
    NUMBER_OF_PATIENT_RELATED_INSTANCES,
    NUMBER_OF_PATIENT_RELATED_SERIES,
    NUMBER_OF_PATIENT_RELATED_STUDIES,
    NUMBER_OF_SERIES_RELATED_INSTANCES,
    NUMBER_OF_STUDY_RELATED_INSTANCES,
    NUMBER_OF_STUDY_RELATED_SERIES,
    SERIES_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    QidoQuery,
    QueryLevel,
    QueryRoot,
    build_queries,
    count_of,
    dataset_from_json,
    lists_whole_patients,
    path_uid,
    patient_key,
    requested_counts,
    set_count,
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
# Counting where QIDO gives no count costs QIDO listings per answer: one per patient when a
# PATIENT query matches on more than patient identity; one per study or series (two for a
# study whose series carry no instance count) when the server omits NumberOfStudyRelated* /
# NumberOfSeriesRelatedInstances. At most this many answers per C-FIND are counted that way;
# past it, the counts of further answers are left empty (one WARNING).
MAX_COUNT_LOOKUPS = 100
_STUDY_COUNTS = (NUMBER_OF_STUDY_RELATED_SERIES, NUMBER_OF_STUDY_RELATED_INSTANCES)
PatientKey = tuple[str, str]


@dataclass
class _Tally:
    """What one patient holds; series and instances are None once any study's count is unknown."""

    studies: int = 0
    series: int | None = 0
    instances: int | None = 0

    def add_study(self, counts: tuple[int, int] | None) -> None:
        self.studies += 1
        if counts is None or self.series is None or self.instances is None:
            self.series = self.instances = None
            return
        self.series += counts[0]
        self.instances += counts[1]

    def apply(self, result: Dataset) -> None:
        """Fill the patient counts the result lacks (QIDO's own values win)."""
        for tag, count in (
            (NUMBER_OF_PATIENT_RELATED_STUDIES, self.studies),
            (NUMBER_OF_PATIENT_RELATED_SERIES, self.series),
            (NUMBER_OF_PATIENT_RELATED_INSTANCES, self.instances),
        ):
            if count is not None and count_of(result, tag) is None:
                set_count(result, tag, count)


class _FindRun:
    """One C-FIND: its QIDO listings, metrics and the budget of count lookups."""

    def __init__(self, service: FindService) -> None:
        self._service = service
        self._lookups_left = MAX_COUNT_LOOKUPS
        self._warned = False

    async def results(self, path: str, params: Sequence[tuple[str, str]]) -> AsyncIterator[Dataset]:
        """Every match of one QIDO query (paged), as Datasets; failures are counted."""
        service = self._service
        service.metrics.cfind_qidors_requests.inc()
        pages = aiter(
            service.client.qido(f"{service.root}/{path}", params, page_size=service.page_size)
        )
        while True:
            try:
                item = await anext(pages)
            except StopAsyncIteration:
                return
            except AdapterError:
                service.metrics.cfind_qidors_errors.inc()
                raise
            yield dataset_from_json(item)

    def lookup_allowed(self) -> bool:
        """Take one count lookup from the budget; False (warned once) when it is spent."""
        if self._lookups_left > 0:
            self._lookups_left -= 1
            return True
        if not self._warned:
            self._warned = True
            logger.warning(
                "C-FIND: more than %d answers need a QIDO listing to count their related "
                "studies/series/instances; the counts of the rest are left empty",
                MAX_COUNT_LOOKUPS,
            )
        return False

    async def count(self, path: str, params: Sequence[tuple[str, str]] = ()) -> int:
        """How many matches a QIDO query has (paged; nothing kept)."""
        total = 0
        async for _ in self.results(path, params):
            total += 1
        return total

    async def study_counts(self, study_uid: object, *, instances: bool) -> tuple[int, int] | None:
        """(series, instances) of a study the server gave no counts for; None if not counted.

        Series come from one listing of the study's series; instances from their
        NumberOfSeriesRelatedInstances, else from a second listing of the study's instances.
        """
        uid = path_uid(study_uid)
        if uid is None or not self.lookup_allowed():
            return None
        series = 0
        per_series: int | None = 0  # None once a series comes without its instance count
        async for result in self.results(
            f"studies/{uid}/series",
            [("includefield", f"{NUMBER_OF_SERIES_RELATED_INSTANCES:08X}")],
        ):
            series += 1
            count = count_of(result, NUMBER_OF_SERIES_RELATED_INSTANCES)
            per_series = None if per_series is None or count is None else per_series + count
        if per_series is not None:
            return series, per_series
        if not instances:
            return series, 0
        return series, await self.count(f"studies/{uid}/instances")

    async def add_study(self, tally: _Tally, study: Dataset, counts: frozenset[int]) -> None:
        """Count one study of a patient, with its series and instances when those are asked."""
        if not counts - {NUMBER_OF_PATIENT_RELATED_STUDIES}:
            tally.add_study((0, 0))
            return
        given = (
            count_of(study, NUMBER_OF_STUDY_RELATED_SERIES),
            count_of(study, NUMBER_OF_STUDY_RELATED_INSTANCES),
        )
        if given[0] is not None and given[1] is not None:
            tally.add_study((given[0], given[1]))
            return
        need_instances = NUMBER_OF_PATIENT_RELATED_INSTANCES in counts
        tally.add_study(
            await self.study_counts(study.get("StudyInstanceUID"), instances=need_instances)
        )

    async def patient_tally(self, key: PatientKey, counts: frozenset[int]) -> _Tally | None:
        """Count a patient's studies with one QIDO listing (bounded); None if not counted."""
        patient_id, issuer = key
        if not patient_id or not self.lookup_allowed():
            return None
        params = [("PatientID", patient_id)]
        if issuer:  # else the answer merged every issuer of this ID, and so does the count
            params += [("IssuerOfPatientID", issuer), ("includefield", "00100021")]
        params += [
            ("includefield", f"{tag:08X}")
            for tag in (NUMBER_OF_STUDY_RELATED_SERIES, NUMBER_OF_STUDY_RELATED_INSTANCES)
        ]
        tally = _Tally()
        async for study in self.results("studies", params):
            found_id, found_issuer = patient_key(study)
            # an ID with * or ? matches more than this patient: keep only this one's studies
            if found_id == patient_id and (not issuer or found_issuer == issuer):
                await self.add_study(tally, study, counts)
        return tally if tally.studies else None

    async def fill_level_counts(
        self, result: Dataset, identifier: Dataset, level: QueryLevel, counts: frozenset[int]
    ) -> None:
        """Fill the STUDY or SERIES count keys QIDO did not give, by counting (bounded)."""
        missing = {tag for tag in counts if count_of(result, tag) is None}
        if not missing:
            return
        study_uid = _value(result, STUDY_INSTANCE_UID) or _value(identifier, STUDY_INSTANCE_UID)
        if level is QueryLevel.STUDY:
            need_instances = NUMBER_OF_STUDY_RELATED_INSTANCES in missing
            found = await self.study_counts(study_uid, instances=need_instances)
            if found is not None:  # instances are 0 when not counted, but then not missing
                for tag, count in zip(_STUDY_COUNTS, found, strict=True):
                    if tag in missing:
                        set_count(result, tag, count)
        elif level is QueryLevel.SERIES:
            study = path_uid(study_uid)
            series = path_uid(_value(result, SERIES_INSTANCE_UID))
            if study is not None and series is not None and self.lookup_allowed():
                count = await self.count(f"studies/{study}/series/{series}/instances")
                set_count(result, NUMBER_OF_SERIES_RELATED_INSTANCES, count)


def _value(ds: Dataset, tag: int) -> object:
    """The value of an element of `ds`, None when absent."""
    elem = ds.get(tag)
    return getattr(elem, "value", None)


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
        self.client = client
        self.root = dicomweb_root.rstrip("/")
        self._retrieve_aet = retrieve_aet
        self._fuzzy = fuzzy
        self.page_size = page_size
        self.metrics = metrics or ImportMetrics(MetricsRegistry())

    async def find(self, identifier: Dataset, root: QueryRoot) -> AsyncIterator[Dataset]:
        """Yield one shaped answer per match; several QIDO queries are merged without repeats."""
        queries = build_queries(identifier, root, fuzzy=self._fuzzy)
        level = queries[0].level
        retrieve_aet = self._retrieve_aet if RETRIEVE_AE_TITLE in identifier else None
        counts = requested_counts(identifier, level)
        run = _FindRun(self)
        results: AsyncIterator[Dataset]
        if level is QueryLevel.PATIENT:
            results = self._patients(run, queries, counts)
        else:
            results = self._merged(run, queries, identifier, counts)
        async for result in results:
            yield shape_response(result, identifier, level, retrieve_aet=retrieve_aet)

    async def _merged(
        self,
        run: _FindRun,
        queries: list[QidoQuery],
        identifier: Dataset,
        counts: frozenset[int],
    ) -> AsyncIterator[Dataset]:
        """STUDY/SERIES/IMAGE matches of every query, without repeats, counts filled."""
        seen: set[str] = set()
        for query in queries:
            async for result in run.results(query.path, query.params):
                if len(queries) > 1:
                    key = str(result.get(_UNIQUE_KEY[query.level], "") or "")
                    if key:
                        if key in seen:
                            continue
                        seen.add(key)
                if counts:
                    await run.fill_level_counts(result, identifier, query.level, counts)
                yield result

    async def _patients(
        self, run: _FindRun, queries: list[QidoQuery], counts: frozenset[int]
    ) -> AsyncIterator[Dataset]:
        """One study per patient (the first), with the patient counts asked for."""
        if counts and len(queries) == 1 and lists_whole_patients(queries[0]):
            async for result in self._patients_counted_in_listing(run, queries[0], counts):
                yield result
            return
        seen: set[PatientKey] = set()
        for query in queries:
            async for result in run.results(query.path, query.params):
                key = patient_key(result)
                if key in seen:
                    continue
                seen.add(key)
                if any(count_of(result, tag) is None for tag in counts):
                    tally = await run.patient_tally(key, counts)
                    if tally is not None:
                        tally.apply(result)
                yield result

    async def _patients_counted_in_listing(
        self, run: _FindRun, query: QidoQuery, counts: frozenset[int]
    ) -> AsyncIterator[Dataset]:
        """One study per patient of a query that lists whole patients, counted from the listing.

        No request per patient: the counts come from the listing itself, which must end
        before the first answer. Up to one page of studies is kept for answering; a longer
        listing is paged a second time instead of being held (memory: one small tally per
        patient, like the de-duplication set).
        """
        tallies: dict[PatientKey, _Tally] = {}
        kept: list[Dataset] | None = []
        async for study in run.results(query.path, query.params):
            await run.add_study(tallies.setdefault(patient_key(study), _Tally()), study, counts)
            if kept is not None and len(kept) < self.page_size:
                kept.append(study)
            else:
                kept = None
        source = _aiter(kept) if kept is not None else run.results(query.path, query.params)
        seen: set[PatientKey] = set()
        async for study in source:
            key = patient_key(study)
            if key in seen:
                continue
            seen.add(key)
            tally = tallies.get(key)
            if tally is not None:  # a patient new since the first listing is left uncounted
                tally.apply(study)
            yield study


async def _aiter(items: Iterable[Dataset]) -> AsyncIterator[Dataset]:
    """The items as an async iterator."""
    for item in items:
        yield item
