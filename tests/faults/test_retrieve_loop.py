"""Nothing blocks the importer's event loop: a C-MOVE, a C-STORE series and a SIGTERM drain.

asyncio's debug mode logs every callback that holds the loop longer than
`slow_callback_duration` ("Executing <Handle ...> took 0.123 seconds"); none may appear.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterator

import httpx
import pytest
from pynetdicom import AE, _config

from dicom_adapter.status import Status
from tests.rig.component import (
    JSON,
    Archive,
    RunningImporter,
    Setup,
    c_move,
    make_ct,
    make_study,
    stow_json,
    study_level,
)

SLOW = 0.1  # seconds a callback may hold the loop


class SlowCallbacks(logging.Handler):
    """Collects asyncio's slow-callback warnings, from whichever thread logs them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing") and " took " in message:
            self.messages.append(message)


@pytest.fixture
def slow_callbacks() -> Iterator[SlowCallbacks]:
    handler = SlowCallbacks()
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(handler)
    try:
        yield handler
    finally:
        asyncio_logger.removeHandler(handler)


def watch(importer: RunningImporter) -> None:
    """Debug mode on the importer's running loop, with the slow-callback threshold."""

    async def configure() -> None:
        loop = asyncio.get_running_loop()
        loop.slow_callback_duration = SLOW
        loop.set_debug(True)

    asyncio.run_coroutine_threadsafe(configure(), importer.loop).result(5)


def stow_answers(uids: list[str]) -> Callable[[httpx.Request], httpx.Response]:
    """STOW-RS stores whichever of `uids` the body carries."""

    def answer(request: httpx.Request) -> httpx.Response:
        body = request.read()
        uid = next(uid for uid in uids if uid.encode() in body)
        return httpx.Response(200, headers=JSON, content=stow_json([(uid, None)]))

    return answer


def scenario(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 50-instance C-MOVE, a 20-instance C-STORE, then a drain with an association open."""
    instances = make_study(50)
    importer, destination = setup(Archive(instances), "--shutdown_grace_period=0.3")
    watch(importer)

    result = c_move(importer, study_level(instances[0].study))
    assert result.status == Status.SUCCESS
    assert len(destination.received) == 50

    series = [make_ct() for _ in range(20)]
    importer.upstream.responder = stow_answers([str(ds.SOPInstanceUID) for ds in series])
    # `setup` turned pynetdicom's process-wide unrestricted storage off for the destination;
    # the importer's storage SCP needs it back
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", True)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(series[0].SOPClassUID, series[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert assoc.is_established
    try:
        for ds in series:
            rsp = assoc.send_c_store(ds)
            assert int(rsp.Status) == Status.SUCCESS
    finally:
        assoc.release()

    running = ae.associate("127.0.0.1", importer.port, ae_title=importer.aet)
    assert running.is_established  # still open when the drain starts: it gets aborted
    try:
        stop = asyncio.run_coroutine_threadsafe(importer.service.stop(), importer.loop)
        stop.result(30)
    finally:
        running.abort()


def sites(messages: list[str]) -> set[str]:
    """What was slow (coroutine or callback name), without per-run task names and ids."""
    found = set()
    for message in messages:
        match = re.search(r"coro=<([\w.<>]+)|<(?:Timer)?Handle ([\w.<>]+)", message)
        found.add(next(g for g in match.groups() if g) if match else message)
    return found


def test_move_store_and_drain_log_no_slow_callback(
    setup: Setup, slow_callbacks: SlowCallbacks, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A blocking call is slow every time; on a busy machine the scheduler can stretch any one
    # callback past the threshold once. So a slow site must show up again in a second run.
    scenario(setup, monkeypatch)
    first = sites(slow_callbacks.messages)
    if not first:
        return
    slow_callbacks.messages.clear()
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
    scenario(setup, monkeypatch)
    assert first & sites(slow_callbacks.messages) == set(), slow_callbacks.messages
