"""C-GET requesters that misbehave: the retrieve pipeline stops promptly, the SCP serves on."""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom.association import Association

from dicom_adapter.status import Status
from tests.rig import wait_until
from tests.rig.component import (
    GET_MSG_ID,
    STUDY_ROOT_GET,
    Archive,
    GetScu,
    RunningImporter,
    c_get,
    cget_metric,
    make_instance,
    make_study,
    study_level,
)


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


def test_requesters_that_stop_reading_do_not_hold_up_other_c_gets(
    start_importer: Callable[..., RunningImporter],
) -> None:
    """Two C-GET requesters stop reading (without closing) in the middle of a 16 MB data set;
    a third C-GET is served at once. The blocked writes used to wait in the loop's default
    executor, whose few threads (min(32, cores + 4); two here, to keep the test small) every
    `to_thread` of the daemon shares, for up to --network_timeout each."""
    big = make_study(1)
    big = [make_instance(big[0].study, big[0].series, 1, pixel_bytes=16 << 20)]
    small = make_study(2)
    importer = start_importer()
    importer.upstream.responder = Archive(big + small)
    importer.loop.call_soon_threadsafe(
        importer.loop.set_default_executor, concurrent.futures.ThreadPoolExecutor(2)
    )
    resume = threading.Event()
    stalled: list[Association] = []

    def stall(event: Any) -> None:  # in the requester's DUL thread: it stops reading
        if event.data[:1] == b"\x04" and event.assoc not in stalled:
            stalled.append(event.assoc)
            resume.wait(60)

    def unread(assoc: Association) -> int:
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0] if sock else 0

    getters = []
    with contextlib.ExitStack() as stack:
        for scu in (GetScu(on_data=stall), GetScu(on_data=stall)):
            assoc = stack.enter_context(scu.associate(importer))
            getter = threading.Thread(
                target=lambda a=assoc: list(
                    a.send_c_get(study_level(big[0].study), STUDY_ROOT_GET, msg_id=GET_MSG_ID)
                ),
                daemon=True,
            )
            getter.start()
            getters.append(getter)
        try:
            # both writes are under way and their buffers filling (a blocked write follows)
            wait_until(
                lambda: len(stalled) == 2 and all(unread(a) > 1 << 16 for a in stalled),
                30,
                "two requesters stalled with their socket buffers filling",
                detail=lambda: f"{len(stalled)} stalled, unread {[unread(a) for a in stalled]}",
            )
            started = time.monotonic()
            responses, stored = c_get(importer, study_level(small[0].study))
            assert responses[-1].Status == Status.SUCCESS
            assert sorted(stored) == sorted(i.uid for i in small)
            assert time.monotonic() - started < 5  # not a DIMSE timeout (15 s)
        finally:
            for assoc in stalled:  # the connection drops: each requester's C-GET ends at once
                sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            resume.set()
            for getter in getters:
                getter.join(10)
