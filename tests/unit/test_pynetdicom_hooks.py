"""pynetdicom internals (issue 8 point 13): checked at startup, skipped with one WARNING."""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.service_class import QueryRetrieveServiceClass
from tests.rig import save_process_wide_settings

from dicom_adapter.dimse import pdu
from dicom_adapter.dimse import pynetdicom_hooks as hooks
from dicom_adapter.dimse.server import (
    STUDY_ROOT_MOVE,
    build_ae,
    configure_pynetdicom,
    refuse_move,
    route_moves,
)

HOOK_WARNING = "pynetdicom internal"


@pytest.fixture(autouse=True)
def fresh_hooks() -> Iterator[None]:
    """No hook, and pynetdicom's settings as they were, before and after (configure_pynetdicom
    changes them for the whole process: later tests' pynetdicom peers would see them)."""
    saved = save_process_wide_settings()
    hooks.reset()
    yield
    hooks.reset()
    saved.restore()


def hook_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(HOOK_WARNING)]


def test_every_hook_passes_its_check_on_the_pinned_pynetdicom(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        assert all(hooks.check(off=()).values())
    assert hook_warnings(caplog) == []


def test_missing_move_scp_gives_one_warning_and_pynetdicoms_public_c_move(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(QueryRetrieveServiceClass, "_move_scp")
    with caplog.at_level(logging.WARNING):
        configure_pynetdicom()
        ae = build_ae(
            aet="ADAPTER",
            max_associations=2,
            max_pdu_size=16384,
            acse_timeout=5,
            dimse_timeout=5,
            network_timeout=5,
            retrieve=True,
        )
        routed = route_moves(ae, lambda request: None)
    (warning,) = hook_warnings(caplog)
    assert "move_routing" in warning and "_move_scp" in warning
    assert not routed  # the app binds pynetdicom's public EVT_C_MOVE handler instead
    assert not hasattr(QueryRetrieveServiceClass, "_move_scp")  # nothing patched
    assert list(refuse_move(object())) == [(None, None)]  # pynetdicom: 0xA801
    assert STUDY_ROOT_MOVE in [str(cx.abstract_syntax) for cx in ae.supported_contexts]


def test_reset_restores_every_process_wide_hook() -> None:
    original_move_scp = QueryRetrieveServiceClass._move_scp
    configure_pynetdicom()
    route_moves(AE(ae_title="X"), lambda request: None)
    assert QueryRetrieveServiceClass._move_scp is not original_move_scp
    hooks.reset()
    assert QueryRetrieveServiceClass._move_scp is original_move_scp


def test_hooks_switched_off_for_a_benchmark_are_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(hooks.OFF_ENV, "dul_wake, move_routing")
    configure_pynetdicom()
    assert not route_moves(AE(ae_title="X"), lambda request: None)
    assert not hooks.available(hooks.DUL_WAKE)
    assert hooks.available(hooks.WAITING_SOCKET)


def test_changed_spool_file_factory_gives_one_warning_and_pynetdicoms_files(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import dimse_messages

    def someone_elses_factory(*args: object, **kwargs: object) -> object:
        raise AssertionError("not called here")

    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", someone_elses_factory)
    with caplog.at_level(logging.WARNING):
        configure_pynetdicom()
        installed = hooks.install_spool_factory(lambda *a, **k: None)
    (warning,) = hook_warnings(caplog)
    assert "spool_files" in warning and "NamedTemporaryFile" in warning
    assert not installed
    assert dimse_messages.NamedTemporaryFile is someone_elses_factory  # type: ignore[attr-defined]


def test_reactor_poll_ends_when_a_message_is_queued_and_reset_restores_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The association reactor's 1 ms poll waits on its DIMSE queue: a queued request is
    served at once. Other sleeps (other threads, other durations) are real sleeps."""
    import queue
    import threading
    import time

    from pynetdicom import association

    configure_pynetdicom()
    assert association.time is not time  # type: ignore[attr-defined]
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    reactor_time: Any = association.time  # type: ignore[attr-defined]

    class Reactor(threading.Thread):  # stands in for pynetdicom's Association (a Thread)
        def __init__(self) -> None:
            super().__init__(daemon=True)
            self.dimse = SimpleNamespace(msg_queue=queue.Queue())
            self.polled = threading.Event()

        def run(self) -> None:
            reactor_time.sleep(0.001)  # returns: the message is already queued
            self.polled.set()

    reactor = Reactor()
    reactor.dimse.msg_queue.put((1, "C-STORE-RQ"))
    reactor.start()
    assert reactor.polled.wait(10.0)
    assert slept == []  # no real sleep for the reactor's poll
    reactor_time.sleep(0.001)  # not an association thread: a real (here: recorded) sleep
    reactor_time.sleep(0.01)
    assert slept == [0.001, 0.01]
    hooks.reset()
    assert association.time is time  # type: ignore[attr-defined]


def test_changed_reactor_loop_gives_one_warning_and_pynetdicoms_poll(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from pynetdicom import association

    monkeypatch.setattr(association, "time", SimpleNamespace(sleep=time.sleep), raising=False)
    with caplog.at_level(logging.WARNING):
        configure_pynetdicom()
    (warning,) = hook_warnings(caplog)
    assert "reactor_wake" in warning and "_run_reactor" in warning
    assert isinstance(association.time, SimpleNamespace)  # type: ignore[attr-defined]


class _Dimse:
    """What answer_stores_directly uses of pynetdicom's DIMSE provider."""

    def __init__(self, max_pdu: int) -> None:
        self.maximum_pdu_size = max_pdu
        self.through_pynetdicom: list[Any] = []
        self.queued: list[Any] = []
        self.dul = SimpleNamespace(send_pdu=self.queued.append)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        self.through_pynetdicom.append(primitive)


def _store_rsp(status: int = 0, **fields: Any) -> Any:
    from pynetdicom.dimse_primitives import C_STORE

    rsp: Any = C_STORE()
    rsp.MessageIDBeingRespondedTo = 5
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = "1.2.3.4.5"
    rsp.Status = status
    for name, value in fields.items():
        setattr(rsp, name, value)
    return rsp


def test_store_responses_are_encoded_by_us_and_anything_else_by_pynetdicom() -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_ECHO, C_STORE

    dimse = _Dimse(max_pdu=16384)
    assert hooks.answer_stores_directly(SimpleNamespace(dimse=dimse))
    plain = _store_rsp(0xA700, ErrorComment="adapter disk full")
    dimse.send_msg(plain, 3)
    [p_data] = dimse.queued
    message = C_STORE_RSP()
    message.primitive_to_message(plain)
    [by_pynetdicom] = message.encode_msg(3, 0)
    assert p_data.presentation_data_value_list == by_pynetdicom.presentation_data_value_list
    echo: Any = C_ECHO()
    echo.MessageIDBeingRespondedTo = 1
    echo.Status = 0
    request: Any = C_STORE()  # a request (a C-GET's sub-operation) is not a response
    request.MessageID = 2
    with_offending = _store_rsp(0xC000, OffendingElement=[0x00100010])
    non_ascii = _store_rsp(0xC000, ErrorComment="\u00e9chec")
    for primitive in (echo, request, with_offending, non_ascii):
        dimse.send_msg(primitive, 3)
    assert dimse.through_pynetdicom == [echo, request, with_offending, non_ascii]
    assert len(dimse.queued) == 1


def test_a_store_response_longer_than_the_peers_pdu_goes_through_pynetdicom() -> None:
    rsp = _store_rsp(0)
    command = pdu.c_store_rsp(5, rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID, 0)
    fits = _Dimse(max_pdu=len(command) + 6)
    too_small = _Dimse(max_pdu=len(command) + 5)  # pynetdicom fragments it
    for dimse in (fits, too_small):
        hooks.answer_stores_directly(SimpleNamespace(dimse=dimse))
        dimse.send_msg(rsp, 1)
    assert (len(fits.queued), fits.through_pynetdicom) == (1, [])
    assert (too_small.queued, too_small.through_pynetdicom) == ([], [rsp])


def test_received_meta_groups_are_what_pydicom_writes_and_reset_restores_its_writer() -> None:
    from pydicom import filewriter
    from pydicom.filebase import DicomBytesIO
    from pynetdicom import dimse_messages, dsutils

    def written() -> bytes:
        buffer = DicomBytesIO()
        create = getattr(dimse_messages, "create_file_meta")  # noqa: B009
        getattr(dimse_messages, "write_file_meta_info")(  # noqa: B009
            buffer,
            create(
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                sop_instance_uid=uid,
                transfer_syntax="1.2.840.10008.1.2.1",
            ),
        )
        return bytes(buffer.getvalue())

    by_pydicom = {}
    for uid in ("1.2.3.4", "1.2.3.\u00e9"):  # a peer's non-ASCII UID: pydicom writes it
        by_pydicom[uid] = written()
    assert hooks.fast_file_meta()
    assert getattr(dimse_messages, "create_file_meta") is not dsutils.create_file_meta  # noqa: B009
    for uid in by_pydicom:
        assert written() == by_pydicom[uid]
    hooks.reset()
    assert getattr(dimse_messages, "create_file_meta") is dsutils.create_file_meta  # noqa: B009
    assert getattr(dimse_messages, "write_file_meta_info") is filewriter.write_file_meta_info  # noqa: B009


def _socket_assoc(dimse: _Dimse, sock: socket.socket) -> Any:
    """An association whose DUL has this socket and an empty queue of PDUs to send."""
    dimse.dul = SimpleNamespace(
        send_pdu=dimse.queued.append,
        to_provider_queue=queue.Queue(),
        socket=SimpleNamespace(socket=sock),
    )
    return SimpleNamespace(dimse=dimse, dul=dimse.dul)


def test_a_store_response_is_written_by_the_associations_own_thread() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        dimse = _Dimse(max_pdu=16384)
        hooks.answer_stores_directly(_socket_assoc(dimse, ours))
        dimse.send_msg(_store_rsp(0), 1)
        command = pdu.c_store_rsp(5, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", 0)
        expected = pdu.pdv_header(1, len(command), command=True, last=True) + command
        peer.settimeout(5)
        assert peer.recv(4096) == expected
        assert dimse.queued == []  # the DUL thread was not involved


def test_a_store_response_waits_behind_what_the_dul_has_queued() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        dimse = _Dimse(max_pdu=16384)
        assoc = _socket_assoc(dimse, ours)
        hooks.answer_stores_directly(assoc)
        assoc.dul.to_provider_queue.put("an earlier PDU")
        dimse.send_msg(_store_rsp(0), 1)
        [queued] = dimse.queued  # behind the earlier one, in order
        assert queued.presentation_data_value_list[0][0] == 1
        with pytest.raises(BlockingIOError):
            peer.recv(4096, socket.MSG_DONTWAIT)


def test_a_store_response_to_a_full_socket_goes_through_the_dul() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        with contextlib.suppress(BlockingIOError):
            while True:  # the peer reads nothing: fill its buffer
                ours.send(b"x" * 65536, socket.MSG_DONTWAIT)
        dimse = _Dimse(max_pdu=16384)
        hooks.answer_stores_directly(_socket_assoc(dimse, ours))
        dimse.send_msg(_store_rsp(0), 1)
        assert len(dimse.queued) == 1  # nothing half-written: the DUL sends it when it can


def test_a_peer_that_stops_reading_mid_response_loses_its_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        with contextlib.suppress(BlockingIOError):
            while True:
                ours.send(b"x" * 65536, socket.MSG_DONTWAIT)
        monkeypatch.setattr(hooks, "STALLED_SEND", 0.2)
        dimse = _Dimse(max_pdu=16384)
        hooks.answer_stores_directly(_socket_assoc(dimse, ours))
        sends: list[int] = []

        def partial_send(data: Any, flags: int = 0) -> int:  # the kernel took 10 bytes, once
            sends.append(len(data))
            if len(sends) == 1:
                return 10
            raise BlockingIOError

        monkeypatch.setattr(hooks, "raw_socket", lambda assoc: _Partial(ours, partial_send))
        with caplog.at_level(logging.WARNING):
            dimse.send_msg(_store_rsp(0), 1)
        assert dimse.queued == []
        assert "closing the connection" in caplog.text
        peer.settimeout(5)  # what was buffered, then the end of the stream (no hang)
        while peer.recv(1 << 20):
            pass


class _Partial:
    """A socket whose sends go through `send` (to make one partial)."""

    def __init__(self, sock: socket.socket, send: Callable[[Any, int], int]) -> None:
        self._sock = sock
        self.send = send

    def fileno(self) -> int:
        return self._sock.fileno()

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)
