"""C-GET requesters that misbehave: the retrieve pipeline stops promptly, the SCP serves on."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from pynetdicom.association import Association

from dicom_adapter.status import Status
from tests.component import conftest as component
from tests.component.conftest import (
    GET_MSG_ID,
    STUDY_ROOT_GET,
    Archive,
    GetScu,
    RunningImporter,
    c_get,
    cget_metric,
    make_study,
    study_level,
)

start_importer = component.start_importer  # the fixtures of the component harness


def test_requester_vanishing_mid_get_ends_it_promptly_and_the_next_get_is_served(
    start_importer: Callable[..., RunningImporter],
) -> None:
    instances = make_study(8)
    importer = start_importer()
    importer.upstream.responder = Archive(instances)

    def vanish_at_second(assoc: Association, n: int) -> None:
        if n == 2:  # the connection drops while the adapter is sending the next data sets
            sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
            assert sock is not None
            sock.shutdown(socket.SHUT_RDWR)

    vanishing = GetScu(on_store=vanish_at_second)
    started = time.monotonic()
    with vanishing.associate(importer) as assoc:
        responses = list(
            assoc.send_c_get(study_level(instances[0].study), STUDY_ROOT_GET, msg_id=GET_MSG_ID)
        )
    assert all(s.Status == Status.PENDING for s, _ in responses if "Status" in s)  # no final
    cget_metric(importer, "errors_total", 1)  # the pipeline stopped, nobody answered
    assert time.monotonic() - started < 5  # not a DIMSE timeout (15 s)

    responses_after, stored = c_get(importer, study_level(instances[0].study))
    assert responses_after[-1].Status == Status.SUCCESS
    assert sorted(stored) == sorted(i.uid for i in instances)
