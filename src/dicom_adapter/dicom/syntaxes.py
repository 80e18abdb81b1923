"""Transfer syntax UIDs the adapter names, and the one rule for refetching a refused instance.

C-MOVE, C-GET and the export sink all face a peer that refused an instance's stored syntax;
they all ask the DICOMweb server for an uncompressed syntax the peer accepted.
"""

from __future__ import annotations

from collections.abc import Collection

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)  # offered for every SOP class we send


def uncompressed_for(accepted: Collection[str], stored: str) -> str | None:
    """The syntax to refetch an instance in when the peer refused `stored`.

    Explicit VR Little Endian if the peer accepted it, else Implicit; None when it accepted
    neither (then nothing the server can transcode to will do).
    """
    return next((s for s in UNCOMPRESSED if s in accepted and s != stored), None)
