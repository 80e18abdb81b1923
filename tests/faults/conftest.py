"""Fixtures for the fault suite: real Orthanc, DCMTK and the console scripts, never skipped.

`start_importer` and `setup` are the in-process importer harness of tests/component
(tests/rig/component_fixtures.py), for the retrieve faults.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.rig import DICOMWEB_PLUGIN, ORTHANC_BINARY, Orthanc, importer_binary
from tests.rig.component_fixtures import setup, start_importer  # noqa: F401


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc for the fault suite; tests use fresh UIDs so they do not clash."""
    missing = [
        str(p) for p in (ORTHANC_BINARY, DICOMWEB_PLUGIN, importer_binary()) if not p.exists()
    ]
    if missing:
        pytest.fail("fault suite prerequisites missing: " + "; ".join(missing), pytrace=False)
    with Orthanc(workdir=tmp_path_factory.mktemp("orthanc-faults")) as server:
        yield server
