"""Which associations the adapter's storage SCP takes (dimse/store_scp.py): pynetdicom's own
negotiation is the oracle for the contexts it accepts."""

from __future__ import annotations

import pytest
from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.presentation import PresentationContext, negotiate_unrestricted

from dicom_adapter.dimse import pdu
from dicom_adapter.dimse.store_scp import negotiate, storage_like

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
COMMITMENT = "1.2.840.10008.1.20.1"
PRIVATE = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image Storage
UNKNOWN = "1.2.840.10008.5.1.4.1.1.999999"  # a storage class newer than pynetdicom
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
J2K = "1.2.840.10008.1.2.4.91"


def request(*contexts: tuple[int, str, tuple[str, ...]]) -> pdu.AssociateRequest:
    return pdu.AssociateRequest(
        called_aet="IMPORTER",
        calling_aet="MODALITY",
        application_context=pdu.APPLICATION_CONTEXT,
        contexts=tuple(pdu.ProposedContext(*cx) for cx in contexts),
        max_pdu=16384,
        user_items=(0x51, 0x52),
        raw_called=b"IMPORTER".ljust(16),
        raw_calling=b"MODALITY".ljust(16),
    )


def pynetdicom_answer(
    contexts: list[tuple[int, str, tuple[str, ...]]],
) -> list[tuple[int | None, int | None, str]]:
    """pynetdicom's unrestricted negotiation with our supported Verification context."""
    proposed = []
    for context_id, abstract, syntaxes in contexts:
        cx = PresentationContext()
        cx.context_id = context_id
        cx.abstract_syntax = abstract
        cx.transfer_syntax = list(syntaxes)
        proposed.append(cx)
    ours = PresentationContext()
    ours.abstract_syntax = VERIFICATION
    ours.transfer_syntax = list(ALL_TRANSFER_SYNTAXES)
    results, _ = negotiate_unrestricted(proposed, [ours], {})
    return [(cx.context_id, cx.result, str(cx.transfer_syntax[0])) for cx in results]


@pytest.mark.parametrize(
    "contexts",
    [
        [(1, CT, (J2K, EXPLICIT))],
        [(1, CT, (EXPLICIT, IMPLICIT)), (3, VERIFICATION, (EXPLICIT, IMPLICIT))],
        [(5, PRIVATE, (IMPLICIT,)), (7, UNKNOWN, (EXPLICIT,))],
        [(1, VERIFICATION, ("1.2.840.10008.1.2.2", EXPLICIT))],
    ],
)
def test_accepted_contexts_are_pynetdicoms(
    contexts: list[tuple[int, str, tuple[str, ...]]],
) -> None:
    results = negotiate(request(*contexts))
    assert results is not None
    answered = [(r.context_id, r.result, r.transfer_syntax) for r in results]
    assert answered == pynetdicom_answer(contexts)


@pytest.mark.parametrize(
    "contexts",
    [
        [(1, CT, (EXPLICIT,)), (3, STUDY_FIND, (EXPLICIT,))],  # a query service: pynetdicom's
        [(1, COMMITMENT, (EXPLICIT,))],
        [(1, VERIFICATION, ("1.2.3.4",))],  # no transfer syntax of ours: pynetdicom rejects
        [(2, CT, (EXPLICIT,))],  # an even context ID
        [(1, CT, (EXPLICIT,)), (1, CT, (IMPLICIT,))],  # the same ID twice
        [(1, CT, ())],  # no transfer syntax proposed
        [],  # nothing proposed at all
    ],
)
def test_anything_else_is_left_to_pynetdicom(
    contexts: list[tuple[int, str, tuple[str, ...]]],
) -> None:
    assert negotiate(request(*contexts)) is None


@pytest.mark.parametrize(
    ("uid", "expected"),
    [(CT, True), (PRIVATE, True), (UNKNOWN, True), (VERIFICATION, False), (STUDY_FIND, False)],
)
def test_storage_like(uid: str, expected: bool) -> None:
    assert storage_like(uid) is expected
