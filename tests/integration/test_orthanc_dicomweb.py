"""The DICOMweb client and the status mapping against a real Orthanc, quirks included."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy, make_http_client
from dicom_adapter.dicomweb.stow import parse_stow_response, status_for
from dicom_adapter.status import Status
from tests.rig import Orthanc, generate_ct_series

T = TypeVar("T")


def with_client(fn: Callable[[DicomwebClient], Awaitable[T]]) -> T:
    async def main() -> T:
        http = make_http_client(timeout=30)
        try:
            return await fn(DicomwebClient(http, RetryPolicy(deadline=2)))
        finally:
            await http.aclose()

    return asyncio.run(main())


def broken_instance(tmp_path: Path) -> tuple[Path, str]:
    """A Part-10 file whose dataset is cut off in the middle of an element."""
    good = generate_ct_series(tmp_path / "broken", 1, rows=8, cols=8)[0]
    data = good.read_bytes()
    sop_instance_uid = str(dcmread(good).SOPInstanceUID)
    path = tmp_path / "broken.dcm"
    path.write_bytes(data[: len(data) // 2] + b"\xff\xff\xff\xff garbage")
    return path, sop_instance_uid


def test_stored_instance_is_success_and_duplicate_is_still_success(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    path = generate_ct_series(tmp_path, 1, rows=16, cols=16)[0]
    uid = str(dcmread(path).SOPInstanceUID)
    url = f"{orthanc.dicomweb_url}/studies"
    first = with_client(lambda c: c.stow(url, [path]))
    again = with_client(lambda c: c.stow(url, [path]))
    assert first.http_status == 200
    assert status_for(first, uid) == Status.SUCCESS
    assert status_for(again, uid) == Status.SUCCESS  # Orthanc: duplicates are a silent 200
    assert orthanc.find_instance(uid) is not None


def test_mixed_body_is_400_but_the_good_instance_is_stored(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    good = generate_ct_series(tmp_path / "good", 1, rows=16, cols=16)[0]
    good_uid = str(dcmread(good).SOPInstanceUID)
    bad, bad_uid = broken_instance(tmp_path)
    response = with_client(lambda c: c.stow(f"{orthanc.dicomweb_url}/studies", [good, bad]))
    assert response.http_status == 400
    assert status_for(response, good_uid) == Status.SUCCESS
    assert orthanc.find_instance(good_uid) is not None
    assert status_for(response, bad_uid) == Status.CANNOT_UNDERSTAND
    assert orthanc.find_instance(bad_uid) is None


def test_malformed_body_is_200_with_nothing_stored_and_maps_to_failure(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    path = generate_ct_series(tmp_path, 1, rows=16, cols=16)[0]
    uid = str(dcmread(path).SOPInstanceUID)
    body = b"--A\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n--A--\r\n"
    reply = httpx.post(
        f"{orthanc.dicomweb_url}/studies",
        content=body,
        headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=WRONG',
            "Accept": "application/dicom+json",
        },
    )
    response = parse_stow_response(reply.status_code, reply.headers["Content-Type"], reply.content)
    assert response.http_status == 200
    assert response.referenced == {}
    assert status_for(response, uid) == Status.PROCESSING_FAILURE
    assert orthanc.find_instance(uid) is None


def test_qido_keeps_wildcards_and_carets_that_orthanc_does_not_decode(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    patient_id = f"Q{generate_uid()[-12:]}"
    files = generate_ct_series(tmp_path, 3, rows=8, cols=8, patient_id=patient_id)
    with_client(lambda c: c.stow(f"{orthanc.dicomweb_url}/studies", files))

    async def query(client: DicomwebClient) -> list[str]:
        found = []
        params = [("PatientName", f"Rig^{patient_id[:6]}*"), ("includefield", "00100020")]
        async for study in client.qido(f"{orthanc.dicomweb_url}/studies", params):
            found.append(study["00100020"]["Value"][0])
        return found

    assert with_client(query) == [patient_id]


def test_qido_pages_until_exhausted(orthanc: Orthanc, tmp_path: Path) -> None:
    files = generate_ct_series(tmp_path, 7, rows=8, cols=8)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    with_client(lambda c: c.stow(f"{orthanc.dicomweb_url}/studies", files))

    async def query(client: DicomwebClient) -> list[str]:
        url = f"{orthanc.dicomweb_url}/studies/{study_uid}/instances"
        return [i["00080018"]["Value"][0] async for i in client.qido(url, [], page_size=3)]

    found = with_client(query)
    assert sorted(found) == sorted(str(dcmread(f).SOPInstanceUID) for f in files)


def test_wado_streams_the_instance_back(orthanc: Orthanc, tmp_path: Path) -> None:
    path = generate_ct_series(tmp_path, 1, rows=64, cols=64)[0]
    sent = dcmread(path)
    with_client(lambda c: c.stow(f"{orthanc.dicomweb_url}/studies", [path]))
    url = (
        f"{orthanc.dicomweb_url}/studies/{sent.StudyInstanceUID}/series/"
        f"{sent.SeriesInstanceUID}/instances/{sent.SOPInstanceUID}"
    )
    dest = tmp_path / "back.dcm"
    headers = with_client(lambda c: c.retrieve_instance_to(url, dest))
    assert headers["content-type"].startswith("application/dicom")
    back = dcmread(dest)
    assert back.SOPInstanceUID == sent.SOPInstanceUID
    assert back.PixelData == sent.PixelData
