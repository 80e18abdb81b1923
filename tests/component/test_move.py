"""C-MOVE over real associations: scripted QIDO-RS/WADO-RS upstream, in-process storage SCP.

The requester is a pynetdicom move SCU; the destination is a pynetdicom storage SCP on a free
port that records what each C-STORE sub-operation carried and answers a scripted status.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicom_adapter.importer import retrieve
from dicom_adapter.status import Status
from tests.rig import refused_port
from tests.rig.component import (
    DEST_AET,
    MOVE_MODEL,
    MSG_ID,
    SCU_AET,
    Archive,
    Destination,
    Instance,
    RunningImporter,
    Setup,
    accept_params,
    c_move,
    cancel_at_second_pending,
    dataset_bytes,
    dictionary_flag,
    image_level,
    is_qido,
    make_instance,
    make_study,
    move_association,
    qido_requests,
    relative_path,
    remaining,
    study_level,
    wado_requests,
)

# --- the cases ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "calling_aet"),
    [((), "ADAPTER"), (("--dimse_cmove_aet=MOVER",), "MOVER")],
    ids=["default-calling-aet", "dimse-cmove-aet"],
)
def test_study_moves_every_series_over_one_association(
    setup: Setup, flags: tuple[str, ...], calling_aet: str
) -> None:
    instances = make_study(3, 2)
    importer, destination = setup(Archive(instances), *flags)

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUCCESS
    assert result.counts() == (5, 0, 0)
    assert result.failed_uids() == []
    assert remaining(result) == [4, 3, 2, 1, 0]
    assert [int(p.NumberOfCompletedSuboperations) for p in result.pending] == [1, 2, 3, 4, 5]
    assert all(int(p.NumberOfFailedSuboperations) == 0 for p in result.pending)

    qidos = qido_requests(importer)  # the series and their instance counts, not the instances
    assert len(qidos) == 2  # the second, at offset 2, is empty and ends paging
    assert relative_path(qidos[0]) == f"studies/{instances[0].study}/series"
    assert qidos[0].url.params.get_list("includefield") == ["00201209"]
    wados = wado_requests(importer)  # the whole study in one request, both series
    assert [relative_path(r) for r in wados] == [f"studies/{instances[0].study}"]
    for request in wados:
        assert accept_params(request) == {"type": "application/dicom", "transfer-syntax": "*"}
        assert request.headers["Accept"].startswith("multipart/related;")
        assert request.headers["Accept-Encoding"] == "identity"
    assert len(importer.upstream.requests) == 3

    assert (destination.requested, destination.accepted) == (1, 1)
    assert len({r.association for r in destination.received}) == 1
    received = destination.by_uid()
    assert len(destination.received) == 5
    assert set(received) == {i.uid for i in instances}
    for instance in instances:
        item = received[instance.uid]
        assert item.dataset == dataset_bytes(instance.stored)  # byte for byte, pixels included
        assert dcmread(io.BytesIO(instance.stored)).SOPInstanceUID == item.sop_instance_uid
        assert item.transfer_syntax == ExplicitVRLittleEndian
        assert item.calling_aet == calling_aet
        assert item.called_aet == DEST_AET
        assert item.originator_aet == SCU_AET
        assert item.originator_message_id == MSG_ID


def test_instance_missing_from_series_response_is_a_failed_sub_operation(setup: Setup) -> None:
    instances = make_study(3)
    missing = instances[1].uid
    importer, destination = setup(Archive(instances, omit_from_series={missing}))

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert result.counts() == (2, 1, 0)
    assert result.failed_uids() == [missing]
    assert remaining(result) == [2, 1, 0]
    assert set(destination.by_uid()) == {instances[0].uid, instances[2].uid}


def test_without_a_count_the_names_of_instances_that_did_not_come_are_not_known(
    setup: Setup,
) -> None:
    """Fewer instances came than the series' counts say and the instance listing that would
    name them fails: they fail unnamed."""
    instances = make_study(3)
    archive = Archive(instances, omit_from_series={instances[1].uid})

    def no_instance_listing(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/instances"):
            return httpx.Response(400, text="no instance-level queries today")
        return archive(request)

    importer, destination = setup(archive)
    importer.upstream.responder = no_instance_listing

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert result.counts() == (2, 1, 0)
    assert result.failed_uids() == []
    assert set(destination.by_uid()) == {instances[0].uid, instances[2].uid}


def test_instances_beyond_the_count_are_sub_operations_too(setup: Setup) -> None:
    """WADO-RS returns an instance more than the series' count (stored in between): it is
    delivered and counted, the total grows, Remaining never goes below zero."""
    instances = make_study(3)
    importer, destination = setup(Archive(instances, count_offset=-1))

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUCCESS
    assert result.counts() == (3, 0, 0)
    assert all(count >= 0 for count in remaining(result))
    assert remaining(result)[-1] == 0
    assert set(destination.by_uid()) == {i.uid for i in instances}


def test_a_count_beyond_what_a_response_can_carry_neither_crashes_nor_fails_the_move(
    setup: Setup,
) -> None:
    """A server counting 70003 instances (more than the 16-bit counts carry) that returns 3:
    pending responses say 65535 remaining, the instance listing then settles the count."""
    instances = make_study(3)
    importer, destination = setup(Archive(instances, count_offset=70_000))

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUCCESS
    assert result.counts() == (3, 0, 0)
    assert remaining(result)[0] == 65535
    assert set(destination.by_uid()) == {i.uid for i in instances}


def test_series_not_found_fails_every_sub_operation(setup: Setup) -> None:
    instances = make_study(3)
    importer, destination = setup(Archive(instances, wado_status=404))

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.OUT_OF_RESOURCES_SUBOPERATIONS
    assert result.counts() == (0, 3, 0)
    assert result.failed_uids() == sorted(i.uid for i in instances)
    assert destination.received == []
    assert len(wado_requests(importer)) == 1  # a 404 is not retried


def test_instance_with_an_unencodable_sop_class_fails_alone(setup: Setup) -> None:
    """An upstream instance whose SOP Class UID no association item can carry (over 64
    characters) fails by itself; proposing it first would have failed the association, and
    with it every other instance of the move."""
    instances = make_study(3)
    bad = instances[0]
    ds = dcmread(io.BytesIO(bad.stored))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1." * 40)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    instances[0] = replace(bad, stored=buffer.getvalue())
    importer, destination = setup(Archive(instances))

    result = c_move(importer, study_level(bad.study))

    assert result.status == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert result.counts() == (2, 1, 0)
    assert result.failed_uids() == [bad.uid]
    assert set(destination.by_uid()) == {instances[1].uid, instances[2].uid}


@pytest.mark.parametrize("count", [3, 12])  # 12: more than the send queue holds
def test_unreachable_destination_fails_everything_promptly(
    start_importer: Callable[..., RunningImporter], count: int
) -> None:
    instances = make_study(count)
    with refused_port() as port:
        importer = start_importer(dictionary_flag(port), "--shutdown_grace_period=0.5")
        importer.upstream.responder = Archive(instances)

        result = c_move(importer, study_level(instances[0].study), dimse_timeout=2)

    assert result.status == Status.OUT_OF_RESOURCES_SUBOPERATIONS
    assert result.counts() == (0, count, 0)
    assert result.failed_uids() == sorted(i.uid for i in instances)
    assert result.seconds < 1.5


def test_refused_and_warned_sub_operations_are_counted(setup: Setup) -> None:
    instances = make_study(5)
    refused, warned = instances[1].uid, instances[3].uid
    statuses = {
        refused: int(Status.OUT_OF_RESOURCES),
        warned: int(Status.COERCION_OF_DATA_ELEMENTS),
    }
    importer, destination = setup(Archive(instances), statuses=statuses)

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert result.counts() == (3, 1, 1)
    assert result.failed_uids() == [refused]
    assert remaining(result) == [4, 3, 2, 1, 0]
    assert len(destination.received) == 5
    assert destination.accepted == 1  # a refused instance does not end the association


def test_refused_stored_syntax_is_refetched_in_one_the_destination_accepts(setup: Setup) -> None:
    instances = make_study(3)
    importer, destination = setup(
        Archive(instances), contexts=((CTImageStorage, (ImplicitVRLittleEndian,)),)
    )

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUCCESS
    assert result.counts() == (3, 0, 0)
    study, series = instances[0].study, instances[0].series
    wados = wado_requests(importer)
    assert relative_path(wados[0]) == f"studies/{study}"
    assert accept_params(wados[0])["transfer-syntax"] == "*"
    refetches = wados[1:]
    assert sorted(relative_path(r) for r in refetches) == sorted(
        f"studies/{study}/series/{series}/instances/{i.uid}" for i in instances
    )
    for request in refetches:
        assert accept_params(request)["transfer-syntax"] == ImplicitVRLittleEndian
        assert request.headers["Accept-Encoding"] == "identity"
    assert destination.accepted == 1
    received = destination.by_uid()
    assert set(received) == {i.uid for i in instances}
    for instance in instances:
        item = received[instance.uid]
        assert item.transfer_syntax == ImplicitVRLittleEndian
        assert item.dataset == dataset_bytes(instance.implicit)


def test_image_level_fetches_each_instance(setup: Setup) -> None:
    instances = make_study(3)
    wanted = [instances[0], instances[2]]
    study, series = instances[0].study, instances[0].series
    importer, destination = setup(Archive(instances))

    result = c_move(importer, image_level(study, series, [i.uid for i in wanted]))

    assert result.status == Status.SUCCESS
    assert result.counts() == (2, 0, 0)
    qidos = qido_requests(importer)
    assert len(qidos) == 2  # the second is the empty page that ends paging
    assert sorted(qidos[0].url.params["SOPInstanceUID"].split(",")) == sorted(i.uid for i in wanted)
    assert sorted(relative_path(r) for r in wado_requests(importer)) == sorted(
        f"studies/{study}/series/{series}/instances/{i.uid}" for i in wanted
    )
    received = destination.by_uid()
    assert set(received) == {i.uid for i in wanted}
    for instance in wanted:
        assert received[instance.uid].dataset == dataset_bytes(instance.stored)


@dataclass
class HeldListing:
    importer: RunningImporter
    destination: Destination
    instances: list[Instance]
    held: list[bool]  # whether the destination held its instance when the listing went


def held_listing_move(setup: Setup, hold_at: int) -> HeldListing:
    """A study of a Secondary Capture, two CT instances and a Secondary Capture whose QIDO-RS
    listing is answered only once the destination holds the `hold_at`-th instance: the
    association opens for Secondary Capture alone and must be widened for CT."""
    study = generate_uid()
    series = generate_uid()
    instances = [make_instance(study, series, 1, sop_class=SecondaryCaptureImageStorage)]
    instances += [make_instance(study, series, n) for n in (2, 3)]
    instances += [make_instance(study, series, 4, sop_class=SecondaryCaptureImageStorage)]
    archive = Archive(instances)
    held: list[bool] = []

    async def listing_once_held(request: httpx.Request) -> httpx.Response:
        held.append(await asyncio.to_thread(destination.holding.wait, 10))
        destination.release.set()
        return archive(request)

    def responder(request: httpx.Request) -> httpx.Response | Coroutine[Any, Any, httpx.Response]:
        return listing_once_held(request) if is_qido(request) else archive(request)

    both = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    importer, destination = setup(
        archive, contexts=((SecondaryCaptureImageStorage, both), (CTImageStorage, both))
    )
    importer.upstream.responder = responder
    destination.hold_at = hold_at
    return HeldListing(importer, destination, instances, held)


def test_sending_starts_before_the_listing_and_a_new_class_widens_the_association(
    setup: Setup,
) -> None:
    """The QIDO-RS listing is answered only once the destination holds the third instance:
    the sub-operations start with the first WADO-RS part. The association opened for the
    first part's class (Secondary Capture) is reopened to propose CT when a CT part comes."""
    move = held_listing_move(setup, hold_at=3)
    destination, instances = move.destination, move.instances

    result = c_move(move.importer, study_level(instances[0].study))

    assert move.held[0], "nothing was sent before the listing"
    assert result.status == Status.SUCCESS
    assert result.counts() == (4, 0, 0)
    assert remaining(result) == [3, 2, 1, 0]  # one pending per sub-operation, as without wait
    assert (destination.requested, destination.accepted) == (2, 2)
    assert destination.proposed == [
        {SecondaryCaptureImageStorage},
        {SecondaryCaptureImageStorage, CTImageStorage},
    ]
    received = destination.by_uid()
    assert [r.sop_instance_uid for r in destination.received] == [i.uid for i in instances]
    for instance in instances:
        assert received[instance.uid].dataset == dataset_bytes(instance.stored)


def test_a_refused_widened_association_is_tried_again_after_a_pause(setup: Setup) -> None:
    """A destination limiting its associations may still count the one just released: the
    widened association, refused once ("local limit exceeded"), is opened on the next try."""
    move = held_listing_move(setup, hold_at=1)
    destination, instances = move.destination, move.instances
    destination.refuse = lambda number, classes: number == 2

    result = c_move(move.importer, study_level(instances[0].study))

    assert result.status == Status.SUCCESS
    assert result.counts() == (4, 0, 0)
    assert (destination.requested, destination.accepted) == (3, 2)
    widened = {SecondaryCaptureImageStorage, CTImageStorage}
    assert destination.proposed == [{SecondaryCaptureImageStorage}, widened, widened]
    assert [r.sop_instance_uid for r in destination.received] == [i.uid for i in instances]


def test_a_class_the_destination_never_takes_fails_alone(setup: Setup) -> None:
    """Every association proposing CT is refused: after three tries the association is
    reopened as it was (Secondary Capture); the CT instances fail, the others are delivered."""
    move = held_listing_move(setup, hold_at=1)
    destination, instances = move.destination, move.instances
    destination.refuse = lambda number, classes: CTImageStorage in classes

    result = c_move(move.importer, study_level(instances[0].study))

    assert result.status == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert result.counts() == (2, 2, 0)
    assert sorted(result.failed_uids()) == sorted(i.uid for i in instances[1:3])
    widened = {SecondaryCaptureImageStorage, CTImageStorage}
    assert destination.proposed == [
        {SecondaryCaptureImageStorage},
        *[widened] * 3,
        {SecondaryCaptureImageStorage},
    ]
    assert [r.sop_instance_uid for r in destination.received] == [
        instances[0].uid,
        instances[3].uid,
    ]


def test_a_move_longer_than_the_network_timeout_is_answered_and_not_aborted(
    setup: Setup,
) -> None:
    """The requester sends nothing while it waits, so pynetdicom's idle timer (restarted only
    by a received PDU) ran out during the move: it aborted the association right after the
    final response. The answer restarts it."""
    instances = make_study(2)
    importer, destination = setup(Archive(instances), "--network_timeout=1")
    destination.hold_at = 1
    releaser = threading.Timer(1.5, destination.release.set)  # past the network timeout
    releaser.start()
    assoc = move_association(importer)
    try:
        statuses = [
            s for s, _ in assoc.send_c_move(study_level(instances[0].study), DEST_AET, MOVE_MODEL)
        ]
        assert statuses[-1].Status == Status.SUCCESS
        assoc.release()
    finally:
        releaser.cancel()
        destination.release.set()
    assert assoc.is_released and not assoc.is_aborted


def test_pending_responses_are_at_most_one_per_interval_and_the_final_counts_hold(
    setup: Setup,
) -> None:
    """A fast local move gets a pending C-MOVE-RSP for its first sub-operation, then at most
    one per PENDING_INTERVAL, and the last counts before the final response."""
    retrieve.PENDING_INTERVAL = 60.0  # start_importer puts the default back
    instances = make_study(3, 2)
    importer, destination = setup(Archive(instances))

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUCCESS
    assert result.counts() == (5, 0, 0)
    assert remaining(result) == [4, 0]  # the first, then what the interval held back
    assert len(destination.received) == 5


def test_failed_listing_opens_no_association(setup: Setup) -> None:
    instances = make_study(2)
    importer, destination = setup(Archive(instances, qido_status=400))

    result = c_move(importer, study_level(instances[0].study))

    assert result.pending == []
    assert result.status == Status.PROCESSING_FAILURE  # UpstreamError of a 4xx
    assert len(importer.upstream.requests) == 1  # the QIDO; no WADO
    assert (destination.requested, destination.received) == (0, [])


def test_unknown_destination_is_a801_and_nothing_else(setup: Setup) -> None:
    instances = make_study(2)
    importer, destination = setup(Archive(instances))

    result = c_move(importer, study_level(instances[0].study), destination="NOWHERE")

    assert result.pending == []
    assert result.status == Status.MOVE_DESTINATION_UNKNOWN
    assert importer.upstream.requests == []
    assert destination.requested == 0


def test_cancel_stops_the_sub_operations_and_reports_what_was_done(setup: Setup) -> None:
    instances = make_study(40)
    importer, destination = setup(Archive(instances))
    destination.hold_at = 3  # the third C-STORE waits until the C-CANCEL has been sent

    statuses = cancel_at_second_pending(importer, destination, instances[0].study)

    final = statuses[-1]
    assert final.Status == Status.CANCEL
    completed = int(final.NumberOfCompletedSuboperations)
    assert completed >= 3  # the two reported before the cancel, and the held one
    assert int(final.NumberOfRemainingSuboperations) == 40 - completed
    assert int(final.NumberOfFailedSuboperations) == 0
    assert len(destination.received) < 40
    assert destination.accepted == 1


def test_cancel_while_a_data_set_is_half_sent_aborts_and_answers_within_2_s(
    setup: Setup,
) -> None:
    study = generate_uid()
    series = generate_uid()
    big = make_instance(study, series, 2, pixel_bytes=48 << 20)  # more than TCP buffers hold
    instances = [make_instance(study, series, 1), big, make_instance(study, series, 3)]
    importer, destination = setup(Archive(instances))
    destination.stall_after = 1 << 20  # the big one stops flowing after 1 MiB

    assoc = move_association(importer)
    cancelled_at: list[float] = []

    def cancel_once_stalled() -> None:
        if destination.stalled.wait(15):
            cancelled_at.append(time.monotonic())
            assoc.send_c_cancel(MSG_ID, assoc.accepted_contexts[0].context_id)

    canceller = threading.Thread(target=cancel_once_stalled, daemon=True)
    canceller.start()
    statuses: list[Dataset] = []
    try:
        for status, _ in assoc.send_c_move(study_level(study), DEST_AET, MOVE_MODEL, msg_id=MSG_ID):
            assert "Status" in status, "no C-MOVE response (DIMSE timeout or abort)"
            statuses.append(status)
        answered_at = time.monotonic()
    finally:
        destination.resume.set()
        canceller.join(5)
        assoc.release()

    assert cancelled_at, "the destination never stalled: the big data set went through"
    final = statuses[-1]
    assert final.Status == Status.CANCEL
    assert answered_at - cancelled_at[0] < 2.0
    assert int(final.NumberOfCompletedSuboperations) == 1
    assert int(final.NumberOfRemainingSuboperations) == 2
    assert int(final.NumberOfFailedSuboperations) == 0
    assert [r.sop_instance_uid for r in destination.received] == [instances[0].uid]


def test_wado_stream_breaking_mid_study_fails_the_rest(setup: Setup) -> None:
    instances = make_study(5)
    importer, destination = setup(Archive(instances, truncate_after_parts=2))

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert result.counts() == (2, 3, 0)
    delivered = {item.sop_instance_uid for item in destination.received}
    assert len(delivered) == 2
    assert result.failed_uids() == sorted({i.uid for i in instances} - delivered)


def test_server_capping_qido_limit_moves_every_instance(setup: Setup) -> None:
    """A server that gives no instance counts per series: the instances are listed, here 3
    at a time (it caps the page size)."""
    instances = make_study(4, 3)  # 7 instances listed 3 at a time
    archive = Archive(instances, series_counts=False)

    def capped(request: httpx.Request) -> httpx.Response:
        if is_qido(request):
            limit = min(3, int(request.url.params["limit"]))
            request = httpx.Request(
                "GET", request.url.copy_set_param("limit", limit), headers=request.headers
            )
        return archive(request)

    importer, destination = setup(archive)
    importer.upstream.responder = capped

    result = c_move(importer, study_level(instances[0].study))

    assert result.status == Status.SUCCESS
    assert result.counts() == (7, 0, 0)
    assert set(destination.by_uid()) == {i.uid for i in instances}
    qidos = qido_requests(importer)
    assert relative_path(qidos[0]) == f"studies/{instances[0].study}/series"
    listing = [r for r in qidos if r.url.path.endswith("/instances")]
    assert [r.url.params["offset"] for r in listing] == ["0", "3", "6", "7"]
