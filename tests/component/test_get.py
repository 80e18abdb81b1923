"""C-GET over a real association: scripted QIDO-RS/WADO-RS upstream, a pynetdicom get SCU
that stores what comes back on its own association (SCP role)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.association import Association

from dicom_adapter.dimse import pynetdicom_hooks
from dicom_adapter.importer import retrieve
from dicom_adapter.status import Status
from tests.rig.component import (
    GET_MSG_ID,
    STUDY_ROOT_GET,
    Archive,
    GetScu,
    RunningImporter,
    c_get,
    cget_metric,
    dataset_bytes,
    failed_uids,
    make_study,
    relative_path,
    study_level,
    wado_requests,
)

# --- the cases ---------------------------------------------------------------------------


def test_c_get_fetches_the_study_in_one_request_and_fails_only_what_is_missing(
    start_importer: Callable[..., RunningImporter],
) -> None:
    instances = make_study(3, 2)
    missing = instances[1].uid
    importer = start_importer()
    importer.upstream.responder = Archive(instances, omit_from_series={missing})

    responses, stored = c_get(importer, study_level(instances[0].study))

    final = responses[-1]
    assert final.Status == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (4, 1)
    assert sorted(stored) == sorted(i.uid for i in instances if i.uid != missing)
    fetches = [relative_path(r) for r in wado_requests(importer)]
    assert fetches == [f"studies/{instances[0].study}"]  # like C-MOVE: one WADO-RS per study


@pytest.mark.parametrize("raw", [True, False], ids=["framed-by-us", "hook-off-pynetdicom"])
def test_c_get_delivers_each_data_set_byte_for_byte_in_pdus_the_peer_accepts_and_is_counted(
    start_importer: Callable[..., RunningImporter], raw: bool
) -> None:
    pynetdicom_hooks.reset()
    pynetdicom_hooks.check(off=() if raw else (pynetdicom_hooks.RAW_P_DATA,))
    instances = make_study(3, 2)
    importer = start_importer()
    importer.upstream.responder = Archive(instances)
    scu = GetScu(max_pdu=1024)  # the data sets (~1 KB each) need several PDUs

    responses = scu.get(importer, study_level(instances[0].study))

    assert pynetdicom_hooks.available(pynetdicom_hooks.RAW_P_DATA) is raw
    final = responses[-1][0]
    assert final.Status == Status.SUCCESS
    assert final.NumberOfCompletedSuboperations == len(instances)
    pending = [int(s.NumberOfRemainingSuboperations) for s, _ in responses[:-1]]
    assert pending == [4, 3, 2, 1, 0]  # one per sub-operation, however they were written
    assert scu.stored == {i.uid: dataset_bytes(i.stored) for i in instances}
    assert scu.p_data_sizes and max(scu.p_data_sizes) <= 1024
    cget_metric(importer, "requests_total", 1)
    cget_metric(importer, "cstore_requests_total", len(instances))
    cget_metric(importer, "cstore_errors_total", 0)
    cget_metric(
        importer, "cstore_bytes_total", sum(len(dataset_bytes(i.stored)) for i in instances)
    )
    cget_metric(importer, "qidors_requests_total", 1)
    cget_metric(importer, "seconds_count", 1)
    cget_metric(importer, "errors_total", 0)


def test_refused_syntax_is_refetched_and_refused_sub_operations_are_reported(
    start_importer: Callable[..., RunningImporter],
) -> None:
    instances = make_study(4)
    refused, warned = instances[1].uid, instances[2].uid
    importer = start_importer()
    importer.upstream.responder = Archive(instances)
    scu = GetScu(
        syntaxes=(ImplicitVRLittleEndian,),  # the stored Explicit VR is refused
        statuses={refused: 0xA700, warned: 0xB000},
    )

    responses = scu.get(importer, study_level(instances[0].study))

    final, identifier = responses[-1]
    assert final.Status == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    counts = (
        final.NumberOfCompletedSuboperations,
        final.NumberOfFailedSuboperations,
        final.NumberOfWarningSuboperations,
    )
    assert counts == (2, 1, 1)
    assert failed_uids(identifier) == [refused]
    # transcoded by the DICOMweb server (WADO-RS transfer-syntax=), not decoded by us
    assert scu.stored == {i.uid: dataset_bytes(i.implicit) for i in instances}
    assert set(scu.syntax_of.values()) == {ImplicitVRLittleEndian}
    cget_metric(importer, "cstore_errors_total", 1)
    cget_metric(importer, "warnings_total", 1)


def test_cancel_stops_the_sub_operations_and_the_association_stays_usable(
    start_importer: Callable[..., RunningImporter],
) -> None:
    instances = make_study(8)
    importer = start_importer()
    importer.upstream.responder = Archive(instances)

    def cancel_at_second(assoc: Association, n: int) -> None:
        if n == 2:
            assoc.send_c_cancel(GET_MSG_ID, query_model=STUDY_ROOT_GET)

    scu = GetScu(on_store=cancel_at_second)
    with scu.associate(importer) as assoc:
        responses = list(
            assoc.send_c_get(study_level(instances[0].study), STUDY_ROOT_GET, msg_id=GET_MSG_ID)
        )
        echo = assoc.send_c_echo()

    final = responses[-1][0]
    assert final.Status == Status.CANCEL
    done = final.NumberOfCompletedSuboperations
    assert 2 <= done < len(instances)
    assert final.NumberOfRemainingSuboperations == len(instances) - done
    assert len(scu.stored) == done
    assert echo.Status == Status.SUCCESS
    cget_metric(importer, "cancels_total", 1)


def test_without_the_get_routing_hook_c_get_is_refused_not_half_served(
    start_importer: Callable[..., RunningImporter],
) -> None:
    pynetdicom_hooks.reset()
    pynetdicom_hooks.check(off=(pynetdicom_hooks.GET_ROUTING,))
    instances = make_study(2)
    importer = start_importer()
    importer.upstream.responder = Archive(instances)

    responses, stored = c_get(importer, study_level(instances[0].study))

    assert responses[-1].Status == Status.OUT_OF_RESOURCES_SUBOPERATIONS
    assert stored == []
    assert importer.upstream.requests == []  # nothing listed or fetched


def test_pending_c_get_responses_are_at_most_one_per_interval(
    start_importer: Callable[..., RunningImporter],
) -> None:
    """After the first sub-operation, at most one pending C-GET-RSP per PENDING_INTERVAL, and
    the last counts before the final response."""
    retrieve.PENDING_INTERVAL = 60.0  # start_importer puts the default back
    instances = make_study(3, 2)
    importer = start_importer()
    importer.upstream.responder = Archive(instances)

    responses, stored = c_get(importer, study_level(instances[0].study))

    assert responses[-1].Status == Status.SUCCESS
    assert [int(s.NumberOfRemainingSuboperations) for s in responses[:-1]] == [4, 0]
    assert sorted(stored) == sorted(i.uid for i in instances)
