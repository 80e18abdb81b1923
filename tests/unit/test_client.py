"""Unit tests for the async DICOMweb client against httpx.MockTransport (no sockets)."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import json
import random
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl

import httpx
import pytest
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_adapter.dicom.part10 import DatasetFile
from dicom_adapter.dicomweb import client as client_module
from dicom_adapter.dicomweb.client import (
    DicomwebClient,
    RetryPolicy,
    make_http_client,
    query_string,
)
from dicom_adapter.dicomweb.multipart import (
    Event,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    body_tail,
    boundary_from_content_type,
    parse_content_type,
    related_content_type,
)
from dicom_adapter.dicomweb.stow import StowResponse, status_for
from dicom_adapter.errors import UpstreamAuthError, UpstreamError, UpstreamUnavailableError
from dicom_adapter.status import Status

T = TypeVar("T")
Handler = Callable[[httpx.Request], httpx.Response]

# MockTransport responses built from bytes arrive already read, so `aiter_raw` refuses them;
# real transports always stream. WADO bodies are therefore given as async iterators (`chunked`).

ROOT = "http://dicomweb.test/dicom-web"
STOW_URL = f"{ROOT}/studies"
UID = "1.2.826.0.1.3680043.8.498.10"
UID2 = "1.2.826.0.1.3680043.8.498.11"
FAST = RetryPolicy(deadline=2.0, first_delay=0.01, max_delay=0.05)
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
BOUNDARY = "wado-boundary-1234"

Part = tuple[dict[str, str], bytes]


def run_with_client(
    handler: Handler,
    use: Callable[[DicomwebClient], Awaitable[T]],
    policy: RetryPolicy = FAST,
) -> T:
    """Run `use(client)` on a fresh loop, with the production http client over MockTransport."""

    async def main() -> T:
        http = make_http_client(timeout=10.0, transport=httpx.MockTransport(handler))
        async with http:
            return await use(DicomwebClient(http, policy))

    return asyncio.run(main())


def fake_part10(seed: int, size: int) -> bytes:
    """Bytes standing in for a Part-10 file, including delimiter-like sequences."""
    rng = random.Random(seed)
    filler = rng.randbytes(size)
    return b"\x00" * 128 + b"DICM" + b"\r\n--\r\n--dicomadapter-" + filler


def write_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def stow_json(*uids: str) -> dict[str, Any]:
    return {
        "00081199": {
            "vr": "SQ",
            "Value": [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in uids],
        }
    }


def collect_parts(events: Iterable[Event]) -> list[Part]:
    parts: list[Part] = []
    current: tuple[dict[str, str], bytearray] | None = None
    for event in events:
        if isinstance(event, PartStart):
            assert current is None
            current = (event.headers, bytearray())
        elif isinstance(event, PartData):
            assert current is not None
            current[1].extend(event.data)
        elif isinstance(event, PartEnd):
            assert current is not None
            parts.append((current[0], bytes(current[1])))
            current = None
    assert current is None
    return parts


def parse_multipart(content_type: str, body: bytes) -> list[Part]:
    parser = MultipartParser(boundary_from_content_type(content_type))
    events = parser.feed(body)
    parser.close()
    return collect_parts(events)


def multipart_body(parts: Iterable[tuple[str, bytes]], boundary: str = BOUNDARY) -> bytes:
    """A multipart body whose parts have the given raw header block and payload."""
    out = bytearray()
    for i, (headers, payload) in enumerate(parts):
        out += (b"" if i == 0 else b"\r\n") + b"--" + boundary.encode() + b"\r\n"
        out += headers.encode() + b"\r\n\r\n" + payload
    out += body_tail(boundary)
    return bytes(out)


def wado_content_type(boundary: str = BOUNDARY) -> str:
    return related_content_type(boundary) + "; transfer-syntax=*"


async def chunked(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the client's backoff sleeps instead of waiting them out."""
    recorded: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, result: Any = None) -> Any:
        recorded.append(delay)
        await real_sleep(0)
        return result

    monkeypatch.setattr("dicom_adapter.dicomweb.client.asyncio.sleep", fake_sleep)
    return recorded


# --------------------------------------------------------------------------------------------
# STOW-RS request shape
# --------------------------------------------------------------------------------------------


def test_stow_request_shape(tmp_path: Path) -> None:
    data = fake_part10(1, 1_500_000)  # more than one read chunk
    path = write_file(tmp_path, "a.dcm", data)
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=stow_json(UID))

    result = run_with_client(handler, lambda c: c.stow(STOW_URL, [path]))

    assert len(requests) == 1
    request = requests[0]
    assert request.method == "POST"
    assert str(request.url) == STOW_URL
    content_type = request.headers["Content-Type"]
    assert re.fullmatch(
        r'multipart/related; type="application/dicom"; boundary="?[^";\s]+"?', content_type
    ), content_type
    media_type, params = parse_content_type(content_type)
    assert media_type == "multipart/related"
    assert params["type"] == "application/dicom"
    assert int(request.headers["Content-Length"]) == len(request.content)
    assert "Transfer-Encoding" not in request.headers
    assert request.headers["Accept"] == "application/dicom+json"
    parts = parse_multipart(content_type, request.content)
    assert [payload for _, payload in parts] == [data]
    assert parts[0][0]["content-type"] == "application/dicom"
    assert result.http_status == 200
    assert result.referenced == {UID: None}


def test_stow_two_files_two_parts(tmp_path: Path) -> None:
    first = fake_part10(2, 5000)
    second = fake_part10(3, 7000)
    paths = [write_file(tmp_path, "1.dcm", first), write_file(tmp_path, "2.dcm", second)]
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=stow_json(UID, UID2))

    result = run_with_client(handler, lambda c: c.stow(STOW_URL, paths))

    request = requests[0]
    assert int(request.headers["Content-Length"]) == len(request.content)
    parts = parse_multipart(request.headers["Content-Type"], request.content)
    assert [payload for _, payload in parts] == [first, second]
    assert all(headers["content-type"] == "application/dicom" for headers, _ in parts)
    assert result.referenced == {UID: None, UID2: None}


def test_stow_empty_file(tmp_path: Path) -> None:
    path = write_file(tmp_path, "empty.dcm", b"")
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=stow_json())

    run_with_client(handler, lambda c: c.stow(STOW_URL, [path]))
    request = requests[0]
    assert int(request.headers["Content-Length"]) == len(request.content)
    assert [p for _, p in parse_multipart(request.headers["Content-Type"], request.content)] == [
        b""
    ]


def test_stow_boundary_is_fresh_per_request(tmp_path: Path) -> None:
    path = write_file(tmp_path, "a.dcm", b"x")
    types: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        types.append(request.headers["Content-Type"])
        return httpx.Response(200, json=stow_json(UID))

    async def twice(c: DicomwebClient) -> None:
        await c.stow(STOW_URL, [path])
        await c.stow(STOW_URL, [path])

    run_with_client(handler, twice)
    assert boundary_from_content_type(types[0]) != boundary_from_content_type(types[1])


# --------------------------------------------------------------------------------------------
# retries
# --------------------------------------------------------------------------------------------


def test_stow_retries_503_then_succeeds(tmp_path: Path) -> None:
    data = fake_part10(4, 3000)
    path = write_file(tmp_path, "a.dcm", data)
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        if len(bodies) < 3:
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json=stow_json(UID))

    result = run_with_client(handler, lambda c: c.stow(STOW_URL, [path]))
    assert len(bodies) == 3
    assert result.http_status == 200
    assert status_for(result, UID) == Status.SUCCESS
    assert bodies[0] == bodies[2]  # the body is streamed again, complete, on every attempt
    assert len(bodies[2]) > len(data)


@pytest.mark.parametrize("code", [408, 429, 500, 502, 504])
def test_stow_transient_codes_retried(tmp_path: Path, code: int) -> None:
    path = write_file(tmp_path, "a.dcm", b"x")
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            return httpx.Response(code)
        return httpx.Response(200, json=stow_json(UID))

    result = run_with_client(handler, lambda c: c.stow(STOW_URL, [path]))
    assert len(attempts) == 2
    assert result.http_status == 200


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 413, 415])
def test_stow_non_transient_not_retried(tmp_path: Path, code: int) -> None:
    path = write_file(tmp_path, "a.dcm", b"x")
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        return httpx.Response(code)

    result = run_with_client(handler, lambda c: c.stow(STOW_URL, [path]))
    assert len(attempts) == 1
    assert result.http_status == code


def test_stow_extra_retry_code(tmp_path: Path) -> None:
    path = write_file(tmp_path, "a.dcm", b"x")
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            return httpx.Response(409)
        return httpx.Response(200, json=stow_json(UID))

    policy = RetryPolicy(
        deadline=2.0, first_delay=0.01, max_delay=0.05, extra_codes=frozenset({409})
    )
    result = run_with_client(handler, lambda c: c.stow(STOW_URL, [path]), policy)
    assert len(attempts) == 2
    assert result.http_status == 200


def test_retry_policy_is_transient() -> None:
    policy = RetryPolicy(extra_codes=frozenset({409}))
    assert [c for c in (200, 400, 404, 408, 409, 413, 429, 500, 503) if policy.is_transient(c)] == [
        408,
        409,
        429,
        500,
        503,
    ]
    assert not RetryPolicy().is_transient(409)


def test_retry_after_seconds_honoured(tmp_path: Path, sleeps: list[float]) -> None:
    path = write_file(tmp_path, "a.dcm", b"x")
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            return httpx.Response(503, headers={"Retry-After": "3"})
        return httpx.Response(200, json=stow_json(UID))

    policy = RetryPolicy(deadline=10.0, first_delay=0.01, max_delay=0.05)
    result = run_with_client(handler, lambda c: c.stow(STOW_URL, [path]), policy)
    assert len(attempts) == 2
    assert sleeps == [3.0]
    assert result.http_status == 200


def test_retry_after_http_date_honoured(tmp_path: Path, sleeps: list[float]) -> None:
    path = write_file(tmp_path, "a.dcm", b"x")
    attempts: list[int] = []
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=5), usegmt=True)

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            return httpx.Response(429, headers={"Retry-After": when})
        return httpx.Response(200, json=stow_json(UID))

    policy = RetryPolicy(deadline=30.0, first_delay=0.01, max_delay=0.05)
    run_with_client(handler, lambda c: c.stow(STOW_URL, [path]), policy)
    assert len(attempts) == 2
    assert len(sleeps) == 1
    assert 3.0 <= sleeps[0] <= 5.5


def test_retry_after_beyond_deadline_gives_up_at_once(tmp_path: Path) -> None:
    path = write_file(tmp_path, "a.dcm", b"x")
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        return httpx.Response(503, headers={"Retry-After": "30"})

    policy = RetryPolicy(deadline=1.0, first_delay=0.01, max_delay=0.05)
    started = time.monotonic()
    result = run_with_client(handler, lambda c: c.stow(STOW_URL, [path]), policy)
    assert time.monotonic() - started < 1.0
    assert len(attempts) == 1
    assert result.http_status == 503
    assert status_for(result, UID) == Status.OUT_OF_RESOURCES


def test_backoff_is_exponential_and_capped(tmp_path: Path, sleeps: list[float]) -> None:
    path = write_file(tmp_path, "a.dcm", b"x")
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) <= 6:
            return httpx.Response(503)
        return httpx.Response(200, json=stow_json(UID))

    policy = RetryPolicy(deadline=10.0, first_delay=0.01, max_delay=0.05)
    run_with_client(handler, lambda c: c.stow(STOW_URL, [path]), policy)
    assert len(attempts) == 7
    assert len(sleeps) == 6
    for i, slept in enumerate(sleeps):
        ceiling = min(0.01 * 2**i, 0.05)
        assert ceiling / 2 - 1e-9 <= slept <= ceiling + 1e-9, (i, sleeps)


def test_persistent_503_returns_last_response_after_deadline(tmp_path: Path) -> None:
    path = write_file(tmp_path, "a.dcm", b"x")
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        return httpx.Response(503, text="overloaded")

    policy = RetryPolicy(deadline=0.2, first_delay=0.01, max_delay=0.05)
    result = run_with_client(handler, lambda c: c.stow(STOW_URL, [path]), policy)
    assert len(attempts) >= 3
    assert result.http_status == 503
    assert result.body_excerpt == "overloaded"
    assert status_for(result, UID) == Status.OUT_OF_RESOURCES


def test_connection_errors_exhaust_deadline(tmp_path: Path) -> None:
    path = write_file(tmp_path, "a.dcm", b"x")
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        raise httpx.ConnectError("connection refused", request=request)

    policy = RetryPolicy(deadline=0.2, first_delay=0.01, max_delay=0.05)
    with pytest.raises(UpstreamUnavailableError) as info:
        run_with_client(handler, lambda c: c.stow(STOW_URL, [path]), policy)
    assert len(attempts) >= 3
    assert info.value.status == Status.OUT_OF_RESOURCES
    assert info.value.retryable is True
    assert "ConnectError" in str(info.value)
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_hung_attempt_is_cut_off_at_the_deadline(tmp_path: Path) -> None:
    """Under one_deadline(), a request that never answers ends with the retry deadline, not
    the HTTP timeout (10 s)."""
    path = write_file(tmp_path, "a.dcm", b"x")
    attempts: list[int] = []

    async def hang(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def use(client: DicomwebClient) -> StowResponse:
        with client.one_deadline():
            return await asyncio.wait_for(client.stow(STOW_URL, [path]), 5)  # fails, not hangs

    policy = RetryPolicy(deadline=0.3, first_delay=0.01, max_delay=0.05)
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailableError) as info:
        run_with_client(cast(Handler, hang), use, policy)
    assert time.monotonic() - started < 1.0
    assert attempts == [1]
    assert info.value.status == Status.OUT_OF_RESOURCES


def test_one_deadline_is_shared_by_the_requests_of_an_operation(tmp_path: Path) -> None:
    """Two requests under one_deadline() end by one deadline, not one each."""
    path = write_file(tmp_path, "a.dcm", b"x")

    async def use(client: DicomwebClient) -> list[int]:
        with client.one_deadline():
            first = await client.stow(STOW_URL, [path])
            second = await client.stow(STOW_URL, [path])
        return [first.http_status, second.http_status]

    policy = RetryPolicy(deadline=0.4, first_delay=0.01, max_delay=0.05)
    started = time.monotonic()
    codes = run_with_client(lambda r: httpx.Response(503), use, policy)
    assert codes == [503, 503]
    assert time.monotonic() - started < 0.6


def test_stow_reports_how_many_attempts_it_made(tmp_path: Path) -> None:
    path = write_file(tmp_path, "a.dcm", b"x")
    answers = [httpx.Response(503), httpx.Response(409)]
    result = run_with_client(lambda r: answers.pop(0), lambda c: c.stow(STOW_URL, [path]))
    assert (result.http_status, result.attempts) == (409, 2)


def test_timeout_then_success(tmp_path: Path) -> None:
    path = write_file(tmp_path, "a.dcm", b"x")
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            raise httpx.ReadTimeout("read timed out", request=request)
        return httpx.Response(200, json=stow_json(UID))

    result = run_with_client(handler, lambda c: c.stow(STOW_URL, [path]))
    assert len(attempts) == 2
    assert status_for(result, UID) == Status.SUCCESS


# --------------------------------------------------------------------------------------------
# DELETE
# --------------------------------------------------------------------------------------------


def test_delete_ok_and_not_found() -> None:
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        return httpx.Response(200 if request.url.path.endswith("/1") else 404)

    run_with_client(handler, lambda c: c.delete(f"{ROOT}/studies/1"))
    assert seen == [("DELETE", "/dicom-web/studies/1")]
    with pytest.raises(UpstreamError) as info:
        run_with_client(handler, lambda c: c.delete(f"{ROOT}/studies/2"))
    assert not isinstance(info.value, UpstreamUnavailableError)
    assert info.value.status == Status.PROCESSING_FAILURE


# --------------------------------------------------------------------------------------------
# QIDO-RS
# --------------------------------------------------------------------------------------------


async def collect_qido(
    client: DicomwebClient, url: str, params: list[tuple[str, str]], page_size: int = 1000
) -> list[dict[str, Any]]:
    return [item async for item in client.qido(url, params, page_size=page_size)]


def test_query_string_keeps_qido_characters() -> None:
    assert (
        query_string(
            [
                ("PatientName", "DOE^J*"),
                ("StudyDate", "20200101-20201231"),
                ("ModalitiesInStudy", "CT,MR"),
                ("AccessionNumber", "A?1"),
                ("StudyInstanceUID", "1.2.840.113619.2"),
                ("StudyTime", "10:00-12:00"),
            ]
        )
        == "PatientName=DOE^J*&StudyDate=20200101-20201231&ModalitiesInStudy=CT,MR"
        "&AccessionNumber=A?1&StudyInstanceUID=1.2.840.113619.2&StudyTime=10:00-12:00"
    )


def test_query_string_escapes_separators() -> None:
    params = [("PatientName", "O'NEIL & SON=X"), ("00100020", "ID/1 #2+3%"), ("includefield", "")]
    text = query_string(params)
    assert "&" not in text.replace("&00100020=", "").replace("&includefield=", "")
    assert " " not in text
    assert "#" not in text
    assert parse_qsl(text, keep_blank_values=True) == params


def test_query_string_empty() -> None:
    assert query_string([]) == ""


def test_qido_url_keeps_special_characters_unescaped() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=[])

    params = [
        ("PatientName", "DOE^J*"),
        ("StudyDate", "20200101-20201231"),
        ("ModalitiesInStudy", "CT,MR"),
        ("PatientID", "A?1"),
        ("includefield", "00081030"),
    ]
    items = run_with_client(handler, lambda c: collect_qido(c, f"{ROOT}/studies", params, 100))
    assert items == []
    assert len(requests) == 1
    request = requests[0]
    assert request.method == "GET"
    assert request.headers["Accept"] == "application/dicom+json"
    assert request.url.raw_path == (
        b"/dicom-web/studies?PatientName=DOE^J*&StudyDate=20200101-20201231"
        b"&ModalitiesInStudy=CT,MR&PatientID=A?1&includefield=00081030&limit=100&offset=0"
    )


def paging_handler(
    items: list[dict[str, Any]], requests: list[httpx.Request]
) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        limit = int(request.url.params["limit"])
        offset = int(request.url.params["offset"])
        return httpx.Response(200, json=items[offset : offset + limit])

    return handler


def study(n: int) -> dict[str, Any]:
    return {"0020000D": {"vr": "UI", "Value": [f"1.2.3.{n}"]}}


def test_qido_pages_until_empty_page() -> None:
    all_items = [study(n) for n in range(5)]
    requests: list[httpx.Request] = []
    items = run_with_client(
        paging_handler(all_items, requests),
        lambda c: collect_qido(c, f"{ROOT}/studies", [("PatientID", "P1")], page_size=2),
    )
    assert items == all_items
    assert [(r.url.params["limit"], r.url.params["offset"]) for r in requests] == [
        ("2", "0"),
        ("2", "2"),
        ("2", "4"),
        ("2", "5"),
    ]
    assert all(r.url.params["PatientID"] == "P1" for r in requests)


def test_qido_exact_multiple_of_page_size_asks_once_more() -> None:
    all_items = [study(n) for n in range(4)]
    requests: list[httpx.Request] = []
    items = run_with_client(
        paging_handler(all_items, requests),
        lambda c: collect_qido(c, f"{ROOT}/studies", [], page_size=2),
    )
    assert items == all_items
    assert [r.url.params["offset"] for r in requests] == ["0", "2", "4"]


def test_qido_more_than_java_limit_not_truncated() -> None:
    all_items = [study(n) for n in range(5001)]
    requests: list[httpx.Request] = []
    items = run_with_client(
        paging_handler(all_items, requests),
        lambda c: collect_qido(c, f"{ROOT}/studies", []),
    )
    assert len(items) == 5001
    assert items[-1] == study(5000)
    assert len(requests) == 7


def test_qido_204_means_no_results() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(204)

    items = run_with_client(handler, lambda c: collect_qido(c, f"{ROOT}/studies", []))
    assert items == []
    assert len(requests) == 1


def test_qido_empty_200_body_means_no_results() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"")

    assert run_with_client(handler, lambda c: collect_qido(c, f"{ROOT}/studies", [])) == []


def test_qido_retries_transient_then_pages() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if len(requests) == 1:
            return httpx.Response(503)
        return httpx.Response(200, json=[study(1)] if request.url.params["offset"] == "0" else [])

    items = run_with_client(handler, lambda c: collect_qido(c, f"{ROOT}/studies", []))
    assert items == [study(1)]
    assert len(requests) == 3


@pytest.mark.parametrize(
    ("code", "error", "status"),
    [
        (400, UpstreamError, Status.PROCESSING_FAILURE),
        (404, UpstreamError, Status.PROCESSING_FAILURE),
        (401, UpstreamAuthError, Status.NOT_AUTHORIZED),
        (403, UpstreamAuthError, Status.NOT_AUTHORIZED),
    ],
)
def test_qido_http_errors(code: int, error: type[UpstreamError], status: Status) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(code, text="nope")

    with pytest.raises(UpstreamError) as info:
        run_with_client(handler, lambda c: collect_qido(c, f"{ROOT}/studies", []))
    assert type(info.value) is error
    assert info.value.status == status
    assert f"HTTP {code}" in str(info.value)


def test_qido_persistent_503_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    policy = RetryPolicy(deadline=0.2, first_delay=0.01, max_delay=0.05)
    with pytest.raises(UpstreamUnavailableError) as info:
        run_with_client(handler, lambda c: collect_qido(c, f"{ROOT}/studies", []), policy)
    assert info.value.status == Status.OUT_OF_RESOURCES


@pytest.mark.parametrize("content", [b"<html>oops</html>", b'{"not": "an array"}'])
def test_qido_bad_body(content: bytes) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=content, headers={"Content-Type": "application/json"})

    with pytest.raises(UpstreamError) as info:
        run_with_client(handler, lambda c: collect_qido(c, f"{ROOT}/studies", []))
    assert "QIDO-RS" in str(info.value)


# --------------------------------------------------------------------------------------------
# WADO-RS
# --------------------------------------------------------------------------------------------

INSTANCE_URL = f"{ROOT}/studies/1/series/2/instances/3"
PART_HEADERS_1 = (
    "Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n"
    "Content-Location: /studies/1/series/2/instances/3"
)
PART_HEADERS_2 = "Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2"


async def collect_wado(client: DicomwebClient, url: str) -> list[Event]:
    return [event async for event in client.wado_events(url)]


def test_wado_streams_parts() -> None:
    first = fake_part10(10, 20_000)
    second = fake_part10(11, 3_000)
    raw = multipart_body([(PART_HEADERS_1, first), (PART_HEADERS_2, second)])
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(
            200, headers={"Content-Type": wado_content_type()}, content=chunked(raw, 999)
        )

    events = run_with_client(handler, lambda c: collect_wado(c, INSTANCE_URL))
    assert requests[0].method == "GET"
    assert requests[0].headers["Accept"] == WADO_ACCEPT
    # DICOM is not worth deflating: Orthanc would spend ~20 ms of CPU per CT slice on it.
    assert requests[0].headers["Accept-Encoding"] == "identity"
    assert collect_parts(events) == [
        (
            {
                "content-type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
                "content-location": "/studies/1/series/2/instances/3",
            },
            first,
        ),
        ({"content-type": "application/dicom; transfer-syntax=1.2.840.10008.1.2"}, second),
    ]


def test_wado_custom_accept() -> None:
    accepts: list[str] = []
    raw = multipart_body([("Content-Type: application/dicom", b"x")])

    def handler(request: httpx.Request) -> httpx.Response:
        accepts.append(request.headers["Accept"])
        return httpx.Response(
            200, headers={"Content-Type": wado_content_type()}, content=chunked(raw)
        )

    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'

    async def use(c: DicomwebClient) -> list[Event]:
        return [e async for e in c.wado_events(INSTANCE_URL, accept=accept)]

    run_with_client(handler, use)
    assert accepts == [accept]


def test_retrieve_instance_to_writes_first_part(tmp_path: Path) -> None:
    first = fake_part10(12, 50_000)
    second = fake_part10(13, 10_000)
    raw = multipart_body([(PART_HEADERS_1, first), (PART_HEADERS_2, second)])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Type": wado_content_type()}, content=chunked(raw, 4096)
        )

    dest = tmp_path / "out.dcm"
    headers = run_with_client(handler, lambda c: c.retrieve_instance_to(INSTANCE_URL, dest))
    assert dest.read_bytes() == first
    assert headers == {
        "content-type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
        "content-location": "/studies/1/series/2/instances/3",
    }


def test_retrieve_instance_to_retries_transient(tmp_path: Path) -> None:
    payload = fake_part10(14, 1000)
    raw = multipart_body([("Content-Type: application/dicom", payload)])
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            return httpx.Response(503)
        return httpx.Response(
            200, headers={"Content-Type": wado_content_type()}, content=chunked(raw)
        )

    dest = tmp_path / "out.dcm"
    run_with_client(handler, lambda c: c.retrieve_instance_to(INSTANCE_URL, dest))
    assert len(attempts) == 2
    assert dest.read_bytes() == payload


def test_retrieve_instance_to_no_parts(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Type": wado_content_type()}, content=chunked(body_tail(BOUNDARY))
        )

    with pytest.raises(UpstreamError, match="no parts"):
        run_with_client(handler, lambda c: c.retrieve_instance_to(INSTANCE_URL, tmp_path / "o"))


def test_wado_404_is_upstream_error(tmp_path: Path) -> None:
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        return httpx.Response(404, text="no such instance")

    with pytest.raises(UpstreamError) as info:
        run_with_client(handler, lambda c: collect_wado(c, INSTANCE_URL))
    assert type(info.value) is UpstreamError
    assert info.value.status == Status.PROCESSING_FAILURE
    assert "HTTP 404" in str(info.value)
    assert "no such instance" in str(info.value)

    with pytest.raises(UpstreamError) as info2:
        run_with_client(
            handler, lambda c: c.retrieve_instance_to(INSTANCE_URL, tmp_path / "out.dcm")
        )
    assert type(info2.value) is UpstreamError
    assert len(attempts) == 2  # one per call: 404 is not retried


def test_wado_401_is_auth_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401)

    with pytest.raises(UpstreamAuthError) as info:
        run_with_client(handler, lambda c: collect_wado(c, INSTANCE_URL))
    assert info.value.status == Status.NOT_AUTHORIZED


def test_wado_persistent_503_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="busy")

    policy = RetryPolicy(deadline=0.2, first_delay=0.01, max_delay=0.05)
    with pytest.raises(UpstreamUnavailableError) as info:
        run_with_client(handler, lambda c: collect_wado(c, INSTANCE_URL), policy)
    assert info.value.status == Status.OUT_OF_RESOURCES


def test_wado_persistent_503_streamed_body_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, content=chunked(b"busy, try later"))

    policy = RetryPolicy(deadline=0.2, first_delay=0.01, max_delay=0.05)
    with pytest.raises(UpstreamUnavailableError) as info:
        run_with_client(handler, lambda c: collect_wado(c, INSTANCE_URL), policy)
    assert info.value.status == Status.OUT_OF_RESOURCES


def test_wado_single_part_response_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Type": "application/dicom"}, content=b"DICM..."
        )

    with pytest.raises(UpstreamError, match="WADO-RS"):
        run_with_client(handler, lambda c: collect_wado(c, INSTANCE_URL))


def test_wado_truncated_body() -> None:
    raw = multipart_body([("Content-Type: application/dicom", b"x" * 100)])
    truncated = raw[: -len(body_tail(BOUNDARY))]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Type": wado_content_type()}, content=chunked(truncated)
        )

    with pytest.raises(UpstreamError, match="malformed"):
        run_with_client(handler, lambda c: collect_wado(c, INSTANCE_URL))


def test_wado_connection_drop_mid_body_is_unavailable() -> None:
    raw = multipart_body([("Content-Type: application/dicom", b"x" * 10_000)])

    async def dropping() -> AsyncIterator[bytes]:
        yield raw[:5000]
        raise httpx.ReadError("connection reset")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Type": wado_content_type()}, content=dropping()
        )

    with pytest.raises(UpstreamUnavailableError) as info:
        run_with_client(handler, lambda c: collect_wado(c, INSTANCE_URL))
    assert info.value.status == Status.OUT_OF_RESOURCES


def test_wado_response_closed_after_early_stop() -> None:
    # Bigger than the client's read chunk, so the body is still streaming after the first event.
    raw = multipart_body(
        [
            ("Content-Type: application/dicom", b"a" * (3 << 20)),
            ("Content-Type: application/dicom", b"b"),
        ]
    )
    responses: list[httpx.Response] = []

    def handler(request: httpx.Request) -> httpx.Response:
        response = httpx.Response(
            200, headers={"Content-Type": wado_content_type()}, content=chunked(raw, 1 << 16)
        )
        responses.append(response)
        return response

    async def first_event(c: DicomwebClient) -> tuple[Event, bool, bool]:
        events = c.wado_events(INSTANCE_URL)
        assert isinstance(events, AsyncGenerator)
        event = await events.__anext__()
        open_while_reading = not responses[0].is_closed
        await events.aclose()
        return event, open_while_reading, responses[0].is_closed

    event, open_while_reading, closed_after = run_with_client(handler, first_event)
    assert isinstance(event, PartStart)
    assert open_while_reading
    assert closed_after


def test_wado_gzip_content_encoding_decoded(tmp_path: Path) -> None:
    payload = fake_part10(15, 5000)
    raw = multipart_body([("Content-Type: application/dicom", payload)])

    def handler(request: httpx.Request) -> httpx.Response:
        # Like a real front end: compress when the client says it accepts gzip.
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return httpx.Response(
                200,
                headers={"Content-Type": wado_content_type(), "Content-Encoding": "gzip"},
                content=chunked(gzip.compress(raw), 512),
            )
        return httpx.Response(
            200, headers={"Content-Type": wado_content_type()}, content=chunked(raw)
        )

    dest = tmp_path / "out.dcm"
    run_with_client(handler, lambda c: c.retrieve_instance_to(INSTANCE_URL, dest))
    assert dest.read_bytes() == payload


def real_part10(uid_suffix: int, pixels: int) -> bytes:
    """A small Part-10 file written by pydicom (Explicit VR Little Endian)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = f"{UID}.{uid_suffix}"
    ds.BitsAllocated = 8
    ds.PixelData = bytes(range(256)) * (pixels // 256)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_wado_instances_in_memory_spooled_and_unusable(tmp_path: Path) -> None:
    small = real_part10(1, 1024)
    large = real_part10(2, 64 * 1024)
    raw = multipart_body(
        [(PART_HEADERS_2, small), (PART_HEADERS_2, large), (PART_HEADERS_2, b"not dicom" * 30)]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Type": wado_content_type()}, content=chunked(raw, 1000)
        )

    async def use(c: DicomwebClient) -> list[tuple[str, bool, bytes, str]]:
        out = []
        async for item in c.wado_instances(INSTANCE_URL, spool_dir=tmp_path, memory_limit=16384):
            uid = item.meta.sop_instance_uid if item.meta else ""
            out.append((uid, item.path is not None, item.part10_bytes(), item.error))
            if item.meta is not None:
                dataset = item.dataset()
                data = dataset if not isinstance(dataset, DatasetFile) else None
                if data is not None:
                    assert bytes(data) == small[item.meta.dataset_offset :]
            item.discard()
        return out

    got = run_with_client(handler, use)
    assert [(uid, spooled, body) for uid, spooled, body, _ in got[:2]] == [
        (f"{UID}.1", False, small),
        (f"{UID}.2", True, large),
    ]
    assert got[2][0] == ""
    assert "DICM" in got[2][3]  # the unusable part says why
    assert list(tmp_path.iterdir()) == []  # spool files are gone after discard()


# --------------------------------------------------------------------------------------------
# Answers we hold in memory are bounded: a broken server or proxy cannot grow our RSS


async def endless(chunk: bytes = b"[" + b" " * 65535) -> AsyncIterator[bytes]:
    """A body that never ends (64 KiB at a time)."""
    while True:
        yield chunk


@pytest.mark.parametrize("operation", ["qido", "stow", "delete", "wado-error"])
def test_endless_answer_is_cut_at_the_bound(
    operation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "MAX_RESPONSE_BODY", 1 << 20)
    status = 503 if operation == "wado-error" else 200
    served: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        served.append(request.method)
        return httpx.Response(status, content=endless())

    path = write_file(tmp_path, "a.dcm", fake_part10(1, 100))

    async def use(client: DicomwebClient) -> None:
        if operation == "qido":
            async for _ in client.qido(f"{ROOT}/studies", []):
                pass
        elif operation == "stow":
            await client.stow(STOW_URL, [path])
        elif operation == "delete":
            await client.delete(f"{ROOT}/studies/1")
        else:
            async for _ in client.wado_events(f"{ROOT}/studies/1"):
                pass

    async def bounded(client: DicomwebClient) -> None:
        await asyncio.wait_for(use(client), 10.0)  # before the bound: read until memory ran out

    with pytest.raises(UpstreamError, match="longer than 1048576 bytes"):
        run_with_client(handler, bounded)
    assert len(served) == 1  # an oversized answer is not retried


def test_bounded_read_keeps_status_headers_and_decoded_body() -> None:
    """A gzip-encoded QIDO page still reads as JSON through the bounded read."""
    body = gzip.compress(json.dumps([{"0020000D": {"vr": "UI", "Value": [UID]}}]).encode())

    def handler(request: httpx.Request) -> httpx.Response:
        page = body if request.url.params["offset"] == "0" else gzip.compress(b"[]")
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/dicom+json"}
        return httpx.Response(200, headers=headers, content=chunked(page, 5))

    async def use(client: DicomwebClient) -> list[dict[str, Any]]:
        return [item async for item in client.qido(f"{ROOT}/studies", [])]

    assert run_with_client(handler, use) == [{"0020000D": {"vr": "UI", "Value": [UID]}}]


def test_cookies_a_server_sets_are_not_sent_back() -> None:
    """Like the Java adapter's HTTP client: DICOMweb authenticates with headers, and httpx's
    cookie extraction cost 9 % of a WADO-RS fetch's CPU."""
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Cookie"))
        return httpx.Response(200, headers={"Set-Cookie": "session=abc; Path=/"}, content=b"[]")

    async def twice() -> None:
        http = client_module.make_http_client(timeout=5, transport=httpx.MockTransport(handler))
        async with http:
            for _ in range(2):
                (await http.get("http://dicomweb.test/dicom-web/studies")).raise_for_status()
            assert len(http.cookies) == 0

    asyncio.run(twice())
    assert seen == [None, None]
