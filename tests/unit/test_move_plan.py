"""Pure parts of the C-MOVE pipeline: presentation contexts offered and the final status."""

from __future__ import annotations

from typing import Any

from pydicom import Dataset

from dicom_adapter.dicom.syntaxes import EXPLICIT_VR_LE, IMPLICIT_VR_LE, uncompressed_for
from dicom_adapter.dicomweb.qido import QueryRoot
from dicom_adapter.dimse.scu import MAX_CONTEXTS, RequestedContext
from dicom_adapter.importer.retrieve import (
    COMMON_SYNTAXES,
    InstanceRef,
    MoveProgress,
    early_fetch_paths,
    fetch_paths,
    move_contexts,
)
from dicom_adapter.status import Status

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
JPEG_2000 = "1.2.840.10008.1.2.4.90"


def pairs(contexts: list[RequestedContext]) -> list[tuple[str, str]]:
    out = []
    for cx in contexts:
        (syntax,) = cx.transfer_syntaxes
        out.append((cx.abstract_syntax, syntax))
    return out


def test_first_seen_syntax_and_uncompressed_come_first_one_syntax_per_context() -> None:
    offered = pairs(move_contexts([CT, MR], {CT: JPEG_2000}))
    assert offered[:5] == [
        (CT, JPEG_2000),
        (CT, EXPLICIT_VR_LE),
        (CT, IMPLICIT_VR_LE),
        (MR, EXPLICIT_VR_LE),
        (MR, IMPLICIT_VR_LE),
    ]
    assert len(offered) == len(set(offered))  # JPEG 2000 for CT is not offered twice
    assert (MR, JPEG_2000) in offered
    assert {s for _, s in offered} == {EXPLICIT_VR_LE, IMPLICIT_VR_LE, *COMMON_SYNTAXES}


def test_many_sop_classes_stay_within_128_contexts_keeping_the_essentials() -> None:
    classes = [f"1.2.840.10008.5.1.4.1.1.{n}" for n in range(60)]
    offered = pairs(move_contexts(classes, {classes[0]: JPEG_2000}))
    assert len(offered) == MAX_CONTEXTS
    for sop_class in classes:
        assert (sop_class, EXPLICIT_VR_LE) in offered
        assert (sop_class, IMPLICIT_VR_LE) in offered
    assert (classes[0], JPEG_2000) in offered


def test_final_status() -> None:
    assert MoveProgress(0, completed=3).final_status() == Status.SUCCESS
    assert MoveProgress(0).final_status() == Status.SUCCESS  # nothing to move
    some = MoveProgress(0, completed=2, failed=1, failed_uids=["1.2.3"])
    assert some.final_status() == 0xB000
    warned = MoveProgress(0, completed=2, warning=1)
    assert warned.final_status() == 0xB000
    only_warnings = MoveProgress(0, warning=2, failed=1)
    assert only_warnings.final_status() == 0xB000
    assert MoveProgress(0, failed=3).final_status() == 0xA702


def test_fail_counts_and_snapshot_shares_the_failed_list() -> None:
    progress = MoveProgress(remaining=2)
    snapshot = progress.snapshot()
    progress.fail("1.2.3")
    assert (progress.remaining, progress.failed, progress.failed_uids) == (1, 1, ["1.2.3"])
    assert snapshot.remaining == 2
    assert snapshot.failed_uids == ["1.2.3"]


def identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value.split("\\") if "\\" in value else value)
    return ds


def test_study_and_series_level_fetches_start_without_the_listing() -> None:
    assert early_fetch_paths(identifier("STUDY", StudyInstanceUID="1.2"), QueryRoot.STUDY) == [
        "studies/1.2"
    ]
    assert early_fetch_paths(identifier("STUDY", StudyInstanceUID="1.2\\1.3"), QueryRoot.STUDY) == [
        "studies/1.2",
        "studies/1.3",
    ]
    series = identifier("SERIES", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.1\\1.2.2")
    assert early_fetch_paths(series, QueryRoot.STUDY) == [
        "studies/1.2/series/1.2.1",
        "studies/1.2/series/1.2.2",
    ]


def test_levels_that_need_the_listing_first() -> None:
    assert early_fetch_paths(identifier("PATIENT", PatientID="P1"), QueryRoot.PATIENT) is None
    image = identifier("IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.1")
    image.SOPInstanceUID = "1.2.1.1"
    assert early_fetch_paths(image, QueryRoot.STUDY) is None
    no_study = identifier("SERIES", SeriesInstanceUID="1.2.1")  # study not given: QIDO finds it
    assert early_fetch_paths(no_study, QueryRoot.STUDY) is None


def test_fetch_paths_from_the_listing() -> None:
    refs = [
        InstanceRef("1.2", "1.2.1", "1.2.1.1", CT),
        InstanceRef("1.2", "1.2.1", "1.2.1.2", CT),
        InstanceRef("1.3", "1.3.1", "1.3.1.1", MR),
    ]
    assert fetch_paths(refs, "PATIENT") == ["studies/1.2", "studies/1.3"]
    assert fetch_paths(refs, "SERIES") == ["studies/1.2/series/1.2.1", "studies/1.3/series/1.3.1"]
    assert fetch_paths(refs[:2], "IMAGE") == [
        "studies/1.2/series/1.2.1/instances/1.2.1.1",
        "studies/1.2/series/1.2.1/instances/1.2.1.2",
    ]


def test_refetch_syntax_is_an_uncompressed_one_the_peer_accepted() -> None:
    assert uncompressed_for([JPEG_2000, EXPLICIT_VR_LE], JPEG_2000) == EXPLICIT_VR_LE
    assert uncompressed_for([IMPLICIT_VR_LE, EXPLICIT_VR_LE], JPEG_2000) == EXPLICIT_VR_LE
    assert uncompressed_for([IMPLICIT_VR_LE], EXPLICIT_VR_LE) == IMPLICIT_VR_LE
    assert uncompressed_for([EXPLICIT_VR_LE], EXPLICIT_VR_LE) is None  # refused: no refetch helps
    assert uncompressed_for([JPEG_2000], "1.2.840.10008.1.2.4.50") is None


def test_an_eager_retrieve_holds_a_bounded_number_of_instances_for_the_listing() -> None:
    """A receiver that refuses every fetched instance as it is (its class or syntax) makes them
    wait for the listing; past MAX_SET_ASIDE the rest stays in the bounded queue, so the
    fetch pauses instead of pulling the whole study into memory and the spool."""
    import asyncio

    from dicom_adapter.dicom.part10 import FileMeta
    from dicom_adapter.dicomweb.instances import FetchedInstance
    from dicom_adapter.importer import retrieve

    class Refusing:
        unreachable = ""

        async def sendable_unlisted(self, instance: FetchedInstance) -> bool:
            return False

    async def scenario() -> tuple[int, int]:
        queue: asyncio.Queue[FetchedInstance | None] = asyncio.Queue()
        for n in range(100):
            meta = FileMeta(CT, f"1.2.3.{n}", JPEG_2000, 0)
            queue.put_nowait(FetchedInstance({}, meta=meta, data=b"x"))
        queue.put_nowait(None)  # the fetch ended
        listing: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sender: Any = Refusing()
        prelude = await retrieve._send_unlisted(listing, queue, sender, asyncio.Event())
        listing.cancel()
        return len(prelude.set_aside), queue.qsize()

    held, left = asyncio.run(scenario())
    assert held == retrieve.MAX_SET_ASIDE
    assert left == 100 - retrieve.MAX_SET_ASIDE + 1  # and the end marker
