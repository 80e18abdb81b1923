"""In-process dicom-import with a scripted DICOMweb upstream (httpx.MockTransport), or a real
server through the production transport.

The fixtures live in tests/rig/component_fixtures.py (tests/faults/conftest.py binds them too),
the helpers in tests/rig/component.py.
"""

from tests.rig.component_fixtures import setup, start_importer  # noqa: F401
