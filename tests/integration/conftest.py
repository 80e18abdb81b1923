"""Fixtures for the integration suite: one Orthanc per session, importers per test.

Missing Orthanc, its DICOMweb plugin or DCMTK is a failure, never a skip: CI installs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.rig import (
    DCMTK_TOOLS,
    DICOMWEB_PLUGIN,
    ORTHANC_BINARY,
    Importer,
    Orthanc,
    StartImporter,
    dcmtk_tool,
    importer_binary,
)

LOG_TAIL_ON_TEARDOWN = 6000


def _missing_prerequisites() -> list[str]:
    missing = [
        f"{path} (Debian package {package})"
        for path, package in ((ORTHANC_BINARY, "orthanc"), (DICOMWEB_PLUGIN, "orthanc-dicomweb"))
        if not path.exists()
    ]
    for tool in DCMTK_TOOLS:
        try:
            dcmtk_tool(tool)
        except FileNotFoundError:
            missing.append(f"{tool} (Debian package dcmtk)")
    if not importer_binary().exists():
        missing.append(f"{importer_binary()} (pip install -e .)")
    return missing


@pytest.fixture(scope="session", autouse=True)
def _prerequisites() -> None:
    """Fail loudly (not skip) when a binary the integration suite needs is not installed."""
    missing = _missing_prerequisites()
    if missing:
        pytest.fail("integration prerequisites missing: " + "; ".join(missing), pytrace=False)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc for the whole session; tests use fresh UIDs so they do not clash."""
    with Orthanc(workdir=tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def _print_log(importer: Importer) -> None:
    """Printed at teardown, so pytest shows the importer's log next to a failing test."""
    if importer.log_path.exists():
        print(f"--- importer log ({importer.log_path}), tail ---")
        print(importer.log_text()[-LOG_TAIL_ON_TEARDOWN:])


@pytest.fixture
def start_importer(orthanc: Orthanc, tmp_path: Path) -> Iterator[StartImporter]:
    """Factory: `start_importer(*extra_args, dicomweb_address=..., aet=...)` -> ready Importer.

    The DICOMweb address defaults to the session Orthanc; every importer started here is
    stopped (SIGTERM, then SIGKILL) when the test ends.
    """
    with ExitStack() as stack:
        started: list[Importer] = []

        def start(
            *extra_args: str, dicomweb_address: str | None = None, aet: str = "IMPORTER"
        ) -> Importer:
            importer = Importer(
                dicomweb_address or orthanc.dicomweb_url,
                *extra_args,
                aet=aet,
                log_dir=tmp_path / "logs",
            )
            started.append(importer)
            return stack.enter_context(importer)

        try:
            yield start
        finally:
            for importer in started:
                _print_log(importer)


@pytest.fixture
def importer(start_importer: StartImporter) -> Importer:
    """An importer in front of the session Orthanc, default flags."""
    return start_importer()
