"""In-process dicom-import with a scripted DICOMweb upstream (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from pydicom import config as pydicom_config
from pynetdicom import _config

from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.config.parse import parse_settings
from dicom_adapter.dimse import pynetdicom_hooks
from dicom_adapter.importer.app import ImportService

Responder = Callable[[httpx.Request], httpx.Response]


@dataclass
class Upstream:
    """A scripted DICOMweb server: records requests, answers with `responder`."""

    responder: Responder | None = None
    requests: list[httpx.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.requests.append(request)
        self.bodies.append(body)
        assert self.responder is not None, "test did not script the upstream"
        return self.responder(request)


@dataclass
class RunningImporter:
    """An ImportService running on its own loop thread."""

    port: int
    aet: str
    upstream: Upstream
    service: ImportService
    loop: asyncio.AbstractEventLoop

    @property
    def metrics_url(self) -> str:
        """Root of the service's metrics and health endpoints (bound to a free port)."""
        return f"http://127.0.0.1:{self.service.metrics_port}"


@pytest.fixture
def start_importer() -> Iterator[Callable[..., RunningImporter]]:
    """Factory: start an in-process importer with extra flags; stopped at teardown."""
    stops: list[Callable[[], None]] = []

    def start(*flags: str) -> RunningImporter:
        upstream = Upstream()
        argv = [
            "--dimse_aet=ADAPTER",
            "--dimse_port=0",
            "--dicomweb_address=http://dicomweb.test/dicom-web",
            "--log_format=text",
            "--metrics_port=0",  # any free port: never the default 9090
            *flags,
        ]
        settings = parse_settings(ImporterSettings, argv, prog="t", description="", environ={})
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        service = ImportService(settings, {}, transport=httpx.MockTransport(upstream.handle))
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

    saved = _process_wide_settings()
    yield start
    for stop in stops:
        stop()
    _restore_process_wide_settings(saved)
    pynetdicom_hooks.reset()  # every hook undone: the next test (or peer) sees pynetdicom


# What configure_pynetdicom() sets for the whole process. Restored after each test, so the
# in-process importer does not change how other tests' own pynetdicom peers behave.
_PYNETDICOM_SETTINGS = (
    "STORE_RECV_CHUNKED_DATASET",
    "STORE_SEND_CHUNKED_DATASET",
    "UNRESTRICTED_STORAGE_SERVICE",
    "LOG_REQUEST_IDENTIFIERS",
    "LOG_RESPONSE_IDENTIFIERS",
    "LOG_HANDLER_LEVEL",
)


def _process_wide_settings() -> tuple[dict[str, object], int, int]:
    pynetdicom_values = {name: getattr(_config, name) for name in _PYNETDICOM_SETTINGS}
    validation = pydicom_config.settings
    return pynetdicom_values, validation.reading_validation_mode, validation.writing_validation_mode


def _restore_process_wide_settings(saved: tuple[dict[str, object], int, int]) -> None:
    pynetdicom_values, reading, writing = saved
    for name, value in pynetdicom_values.items():
        setattr(_config, name, value)
    pydicom_config.settings.reading_validation_mode = reading
    pydicom_config.settings.writing_validation_mode = writing
