"""Order of processing (issue 10 point 4): destinations are chosen from the attributes as
received, then the instance is prepared (redaction, transcoding), then delivered."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from dicom_adapter.importer import app
from dicom_adapter.importer.prepare import Preparation
from dicom_adapter.status import Status
from tests.rig.component import JSON, RunningImporter, c_store, make_ct, stow_json

MODALITY_CT = b"\x08\x00\x60\x00CS\x02\x00CT"  # (0008,0060) CS "CT", explicit VR LE


def relabel_as_ct(path: Path) -> None:
    """A preparation step that changes a routed-on attribute (as redaction may)."""
    ds = dcmread(path)
    ds.Modality = "CT"
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("spooled", [False, True], ids=["synchronous", "spool"])
def test_routing_sees_the_attributes_as_received_delivery_the_prepared_file(
    start_importer: Callable[..., RunningImporter],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    spooled: bool,
) -> None:
    monkeypatch.setattr(app, "build_preparation", lambda steps: Preparation([relabel_as_ct]))
    routes = [{"filter": "Modality=MG", "dicomweb_destination": "http://mg.test/dicom-web"}]
    flags = [f"--destination_config_inline={json.dumps(routes)}"]
    if spooled:
        flags.append(f"--persistent_file_storage_location={tmp_path / 'spool'}")
    importer = start_importer(*flags)
    ds = make_ct()
    ds.Modality = "MG"
    importer.upstream.responder = lambda request: httpx.Response(
        200, headers=JSON, content=stow_json([(str(ds.SOPInstanceUID), None)])
    )
    assert c_store(importer, ds) == Status.SUCCESS
    [request] = importer.upstream.requests
    assert str(request.url) == "http://mg.test/dicom-web/studies"  # routed as received (MG)
    assert MODALITY_CT in importer.upstream.bodies[0]  # delivered as prepared (CT)
