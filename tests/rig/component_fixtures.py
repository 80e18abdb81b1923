"""The pytest fixtures of the in-process importer harness (helpers in tests/rig/component.py).

`start_importer` and `setup` are bound by the conftest.py of each suite that uses them
(tests/component, tests/faults). The only rig module that imports pytest: `bench/` scripts
never import it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence

import httpx
import pytest
from pynetdicom import _config

from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.config.parse import parse_settings
from dicom_adapter.dimse import pynetdicom_hooks
from dicom_adapter.importer import retrieve
from dicom_adapter.importer.app import ImportService
from tests.rig import save_process_wide_settings
from tests.rig.component import (
    CT_BOTH,
    Archive,
    Destination,
    RunningImporter,
    Setup,
    Upstream,
    dictionary_flag,
)


@pytest.fixture
def start_importer() -> Iterator[Callable[..., RunningImporter]]:
    """Factory: start an in-process importer with extra flags; stopped at teardown.

    A pending response after every sub-operation (not at most one per PENDING_INTERVAL), so
    tests can follow the counts one by one (the interval has its own tests, which set it). Not
    with `monkeypatch`: its undo would run after the process-wide settings are restored here.
    """
    interval, retrieve.PENDING_INTERVAL = retrieve.PENDING_INTERVAL, 0.0
    stops: list[Callable[[], None]] = []

    def start(*flags: str, dicomweb_url: str | None = None) -> RunningImporter:
        """`dicomweb_url`: a real server, reached with the production transport instead of
        the scripted `upstream` behind httpx.MockTransport."""
        upstream = Upstream()
        argv = [
            "--dimse_aet=ADAPTER",
            "--dimse_port=0",
            f"--dicomweb_address={dicomweb_url or 'http://dicomweb.test/dicom-web'}",
            "--log_format=text",
            "--metrics_port=0",  # any free port: never the default 9090
            *flags,
        ]
        settings = parse_settings(ImporterSettings, argv, prog="t", description="", environ={})
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        mock = None if dicomweb_url else httpx.MockTransport(upstream.handle)
        service = ImportService(settings, {}, transport=mock)
        port = asyncio.run_coroutine_threadsafe(service.start(), loop).result(10)

        def stop() -> None:
            asyncio.run_coroutine_threadsafe(service.stop(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

        stops.append(stop)
        return RunningImporter(
            port=port, aet="ADAPTER", upstream=upstream, service=service, loop=loop
        )

    saved = save_process_wide_settings()
    yield start
    for stop in stops:
        stop()
    saved.restore()
    retrieve.PENDING_INTERVAL = interval
    pynetdicom_hooks.reset()  # every hook undone: the next test (or peer) sees pynetdicom


@pytest.fixture
def setup(
    start_importer: Callable[..., RunningImporter], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Setup]:
    """Factory: (importer scripted with `archive`, destination in its AET dictionary)."""
    destinations: list[Destination] = []

    def start(
        archive: Archive,
        *flags: str,
        contexts: Sequence[tuple[str, Sequence[str]]] = CT_BOTH,
        statuses: dict[str, int] | None = None,
    ) -> tuple[RunningImporter, Destination]:
        destination = Destination(contexts, statuses or {})
        destinations.append(destination)
        importer = start_importer(dictionary_flag(destination.port), *flags)
        importer.upstream.responder = archive
        # Starting the importer turns on pynetdicom's process-wide unrestricted storage
        # (every storage context accepted in the first syntax offered); the destination
        # negotiates like an ordinary SCP with the contexts it was given.
        monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
        return importer, destination

    yield start
    for destination in destinations:
        destination.stop()
