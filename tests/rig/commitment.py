"""A storage-commitment requester (DCMTK has none): N-ACTION out, N-EVENT-REPORT back.

Shared by the component tests (in-process SCP) and the integration tests (dicom-import).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"  # SOP Class
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance
OUR_AET = "ADAPTER"
REQUESTER_AET = "MODALITY"
SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
WAIT = 10.0
SUCCESS = 0x0000


@dataclass
class Report:
    """One N-EVENT-REPORT the requester received."""

    event_type: int
    info: Dataset
    calling_aet: str
    called_aet: str
    roles: tuple[bool, bool]  # the requester's negotiated (SCU, SCP) roles for the report


class Requester:
    """A modality: sends N-ACTION, listens for the N-EVENT-REPORT on its own port."""

    def __init__(self, port: int, *, accept_roles: bool = False) -> None:
        self.port = port
        self.accept_roles = accept_roles
        self.reports: list[Report] = []
        self.received = threading.Event()
        self._server: Any = None

    def listen(self) -> None:
        ae = AE(ae_title=REQUESTER_AET)
        if self.accept_roles:  # explicitly accept our proposed SCP role for the report
            ae.add_supported_context(
                STORAGE_COMMITMENT_PUSH_MODEL, SYNTAXES, scu_role=True, scp_role=True
            )
        else:
            ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, SYNTAXES)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)],
        )

    def _on_report(self, event: Any) -> tuple[int, None]:
        (context,) = event.assoc.accepted_contexts
        self.reports.append(
            Report(
                event_type=int(event.event_type),
                info=event.event_information,
                calling_aet=str(event.assoc.requestor.ae_title).strip(),
                called_aet=str(event.assoc.acceptor.ae_title).strip(),
                roles=(bool(context.as_scu), bool(context.as_scp)),
            )
        )
        self.received.set()
        return SUCCESS, None

    def request(
        self, port: int, info: Dataset, *, aet: str = REQUESTER_AET, action_type: int = 1
    ) -> Dataset:
        ae = AE(ae_title=aet)
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL, SYNTAXES)
        assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AET)
        assert assoc.is_established
        try:
            status, _ = assoc.send_n_action(
                info, action_type, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE
            )
            assert "Status" in status, "no N-ACTION response"
            return status
        finally:
            assoc.release()

    def wait_report(self) -> Report:
        assert self.received.wait(WAIT), "no N-EVENT-REPORT arrived"
        assert len(self.reports) == 1
        return self.reports[0]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def action_information(
    instances: list[tuple[str, str]], transaction_uid: str | None = None
) -> Dataset:
    """The N-ACTION information asking to commit (SOP Class UID, SOP Instance UID) pairs."""
    info = Dataset()
    info.TransactionUID = transaction_uid or generate_uid()
    items = []
    for sop_class, sop_instance in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    info.ReferencedSOPSequence = items
    return info


def references(seq: Any) -> list[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of each item of a Referenced SOP Sequence."""
    return [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in seq]
