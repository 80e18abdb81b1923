"""SPEC §3: an allow-list of calling AE titles, and services that can be turned off [G#146]."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.config.parse import parse_settings
from dicom_adapter.errors import ConfigError
from tests.rig.component import RunningImporter

SERVICES = {
    "cfind": [
        StudyRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelFind,
    ],
    "retrieve": [
        StudyRootQueryRetrieveInformationModelMove,
        StudyRootQueryRetrieveInformationModelGet,
    ],
    "commitment": [StorageCommitmentPushModel],
}


def associate_seeing_rejections(
    importer: RunningImporter, calling_aet: str, contexts: list[str]
) -> tuple[Any, list[Any]]:
    rejections: list[Any] = []
    ae = AE(ae_title=calling_aet)
    for uid in contexts:
        ae.add_requested_context(uid)
    assoc = ae.associate(
        "127.0.0.1",
        importer.port,
        ae_title=importer.aet,
        evt_handlers=[(evt.EVT_REJECTED, lambda event: rejections.append(event))],
    )
    return assoc, rejections


def associate(importer: RunningImporter, calling_aet: str, contexts: list[str]) -> Any:
    return associate_seeing_rejections(importer, calling_aet, contexts)[0]


def accepted(assoc: Any) -> set[str]:
    return {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}


def test_only_allowed_calling_aets_may_associate(
    start_importer: Callable[..., RunningImporter],
) -> None:
    importer = start_importer("--allowed_calling_aets=MODALITY1, VIEWER")
    for allowed in ("MODALITY1", "VIEWER"):
        assoc = associate(importer, allowed, [Verification])
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    stranger, rejections = associate_seeing_rejections(importer, "STRANGER", [Verification])
    assert stranger.is_rejected
    (rejection,) = rejections
    primitive = rejection.assoc.acceptor.primitive  # the A-ASSOCIATE-RJ
    assert (primitive.result, primitive.result_source, primitive.diagnostic) == (0x01, 0x01, 0x03)


def test_every_calling_aet_may_associate_by_default(
    start_importer: Callable[..., RunningImporter],
) -> None:
    assoc = associate(start_importer(), "ANYONE", [Verification])
    assert assoc.is_established
    assoc.release()


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_a_disabled_service_is_not_offered(
    start_importer: Callable[..., RunningImporter], service: str
) -> None:
    everything = [uid for uids in SERVICES.values() for uid in uids]
    on = associate(start_importer(), "PEER", everything)
    assert accepted(on) == set(everything)
    on.release()

    off = associate(start_importer(f"--disable_{service}"), "PEER", [Verification, *everything])
    assert off.is_established  # the association stands; only that service's contexts are refused
    assert accepted(off) == {Verification, *everything} - set(SERVICES[service])
    off.release()


def test_bad_allow_list_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings(
            ImporterSettings,
            [
                "--dimse_aet=A",
                "--dicomweb_address=http://x/dicom-web",
                "--allowed_calling_aets=A,,B",
            ],
            prog="dicom-import",
            description="",
            environ={},
        )
    assert "allowed_calling_aets" in str(error.value)
