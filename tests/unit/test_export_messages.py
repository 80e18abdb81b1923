"""Unit tests for Pub/Sub message data → WADO-RS instance path (SPEC §2)."""

from __future__ import annotations

import pytest

from dicom_adapter.exporter.messages import MalformedMessage, instance_path
from dicom_adapter.exporter.sinks import PermanentFailure, TransientFailure, classify_cstore_status

PATH = "studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"


@pytest.mark.parametrize(
    "data",
    [
        PATH,
        f"/{PATH}",
        f"  {PATH}\n",
        f"{PATH}/",
        f"projects/p/locations/us-central1/datasets/d/dicomStores/s/dicomWeb/{PATH}",
        f"/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb/{PATH}\n",
    ],
)
def test_accepted_forms(data: str) -> None:
    assert instance_path(data.encode()) == PATH


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   ",
        b"hello",
        b"studies/1.2.3",
        b"studies/1.2.3/series/1.2.3.4",
        b"studies/1/series/2/instances/3/frames/1",
        b"studies/1/series/2/instances/",
        b"projects/p/dicomStores/s/studies/1/series/2/instances/3",
        b"studies/1/../instances/3/series/4",
        b"studies/1/series/2/instances/3?x=1",
        b"\xff\xfe",
        b"studies/../series/2/instances/3",
    ],
)
def test_rejected_forms(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        instance_path(data)


def test_malformed_is_permanent() -> None:
    assert MalformedMessage("x").retryable is False


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (0x0000, None),
        (0xB000, None),
        (0xB007, None),
        (0xA700, TransientFailure),
        (0xA7FF, TransientFailure),
        (0xA900, PermanentFailure),
        (0x0122, PermanentFailure),
        (0xC000, TransientFailure),
        (0x0110, TransientFailure),
    ],
)
def test_cstore_status_classes(code: int, expected: type | None) -> None:
    assert classify_cstore_status(code) is expected
