"""C-GET over a real association: scripted QIDO-RS/WADO-RS upstream, a pynetdicom get SCU
that stores what comes back on its own association (SCP role)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydicom import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt

from dicom_adapter.status import Status
from tests.component.conftest import (
    Archive,
    RunningImporter,
    make_study,
    relative_path,
    study_level,
    wado_requests,
)

STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"


def c_get(importer: RunningImporter, identifier: Dataset) -> tuple[list[Dataset], list[str]]:
    """The responses of one C-GET and the SOP Instance UIDs stored on the association."""
    stored: list[str] = []

    def on_store(event: Any) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(STUDY_ROOT_GET)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1",
        importer.port,
        ae_title=importer.aet,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        responses = [status for status, _ in assoc.send_c_get(identifier, STUDY_ROOT_GET)]
    finally:
        assoc.release()
    return responses, stored


def test_c_get_fetches_the_study_in_one_request_and_fails_only_what_is_missing(
    start_importer: Callable[..., RunningImporter],
) -> None:
    instances = make_study(3, 2)
    missing = instances[1].uid
    importer = start_importer()
    importer.upstream.responder = Archive(instances, omit_from_series={missing})

    responses, stored = c_get(importer, study_level(instances[0].study))

    final = responses[-1]
    assert final.Status == Status.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (4, 1)
    assert sorted(stored) == sorted(i.uid for i in instances if i.uid != missing)
    fetches = [relative_path(r) for r in wado_requests(importer)]
    assert fetches == [f"studies/{instances[0].study}"]  # like C-MOVE: one WADO-RS per study
