"""pynetdicom internals (issue 8 point 13): checked at startup, skipped with one WARNING."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.service_class import QueryRetrieveServiceClass

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
    hooks.reset()
    yield
    hooks.reset()


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
