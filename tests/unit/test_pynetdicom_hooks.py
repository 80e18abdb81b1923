"""pynetdicom internals (issue 8 point 13): checked at startup, skipped with one WARNING."""

from __future__ import annotations

import logging
from collections.abc import Iterator

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
