"""DICOMweb credentials: static bearer/basic, Google ADC refresh off the loop, no token leaks."""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import threading
from pathlib import Path
from typing import Any

import google.auth
import google.auth.exceptions
import httpx
import pytest

from dicom_adapter.dicom.attributes import InstanceIdentity
from dicom_adapter.dicomweb.auth import (
    BearerAuth,
    GoogleAuth,
    choose_auth,
    credentials_if_needed,
    is_google_url,
    load_google_credentials,
)
from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy, make_http_client
from dicom_adapter.errors import AdapterError, ConfigError, UpstreamUnavailableError
from dicom_adapter.importer.store import StoreService

GOOGLE = (
    "https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb"
)


class FakeCredentials:
    """Stands in for google.auth credentials: counts refreshes and the thread they ran on."""

    def __init__(
        self,
        *,
        valid: bool,
        expires_in: float | None,
        fail: bool = False,
        failures: list[Exception] | None = None,
    ) -> None:
        self.token: str | None = "old-token" if valid else None
        self.valid = valid
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        self.expiry = None if expires_in is None else now + datetime.timedelta(seconds=expires_in)
        self.fail = fail
        self.failures = failures or []  # raised by the next refreshes, one each, in order
        self.refreshes = 0
        self.refresh_threads: list[int] = []

    def refresh(self, request: Any) -> None:
        self.refresh_threads.append(threading.get_ident())
        if self.fail:
            raise google.auth.exceptions.RefreshError("metadata server said no")  # type: ignore[no-untyped-call]
        if self.failures:
            raise self.failures.pop(0)
        self.refreshes += 1
        self.token = f"fresh-token-{self.refreshes}"
        self.valid = True
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        self.expiry = now + datetime.timedelta(hours=1)


def authorization_sent(auth: httpx.Auth, url: str = GOOGLE) -> str:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization", ""))
        return httpx.Response(200, json=[])

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), auth=auth) as c:
            await c.get(url)

    asyncio.run(main())
    return seen[0]


def test_is_google_url() -> None:
    assert is_google_url(GOOGLE)
    assert is_google_url("https://googleapis.com/x")
    assert not is_google_url("http://127.0.0.1:8042/dicom-web")
    assert not is_google_url("https://googleapis.com.evil.example/x")


def test_static_bearer_and_basic_win_over_google() -> None:
    creds = FakeCredentials(valid=True, expires_in=3600)
    bearer = choose_auth(GOOGLE, bearer_token="s3cret", basic_auth="", google_credentials=creds)
    assert isinstance(bearer, BearerAuth)
    assert authorization_sent(bearer) == "Bearer s3cret"
    basic = choose_auth(GOOGLE, bearer_token="", basic_auth="orthanc:pw:x", google_credentials=None)
    assert basic is not None
    assert authorization_sent(basic) == "Basic " + base64.b64encode(b"orthanc:pw:x").decode()


def test_google_credentials_only_for_google_hosts() -> None:
    creds = FakeCredentials(valid=True, expires_in=3600)
    assert (
        choose_auth(
            "http://orthanc:8042/dicom-web",
            bearer_token="",
            basic_auth="",
            google_credentials=creds,
        )
        is None
    )
    google_auth = choose_auth(GOOGLE, bearer_token="", basic_auth="", google_credentials=creds)
    assert isinstance(google_auth, GoogleAuth)


def test_valid_token_is_used_without_refresh() -> None:
    creds = FakeCredentials(valid=True, expires_in=3600)
    assert authorization_sent(GoogleAuth(creds)) == "Bearer old-token"
    assert creds.refreshes == 0


@pytest.mark.parametrize(("valid", "expires_in"), [(False, None), (True, 60), (True, -5)])
def test_missing_or_expiring_token_is_refreshed_in_a_worker_thread(
    valid: bool, expires_in: float | None
) -> None:
    creds = FakeCredentials(valid=valid, expires_in=expires_in)
    assert authorization_sent(GoogleAuth(creds)) == "Bearer fresh-token-1"
    assert creds.refreshes == 1
    assert creds.refresh_threads[0] != threading.get_ident()  # never on the loop's thread


def test_concurrent_requests_refresh_once() -> None:
    creds = FakeCredentials(valid=False, expires_in=None)
    auth = GoogleAuth(creds)

    async def main() -> list[str]:
        return list(await asyncio.gather(*(auth.token() for _ in range(10))))

    assert set(asyncio.run(main())) == {"fresh-token-1"}
    assert creds.refreshes == 1


def metadata_blip() -> Exception:
    return google.auth.exceptions.TransportError("metadata server unreachable")  # type: ignore[no-untyped-call]


def test_refresh_failure_is_retry_later_not_unauthorized() -> None:
    """A token endpoint that says no is not the DICOMweb server refusing us: 0xA700."""
    auth = GoogleAuth(FakeCredentials(valid=False, expires_in=None, fail=True))
    with pytest.raises(UpstreamUnavailableError) as caught:
        asyncio.run(auth.token())
    assert caught.value.status == 0xA700


def store_status(creds: FakeCredentials, tmp_path: Path, handler: Any) -> int:
    """The C-STORE status of one instance stored through Google credentials `creds`."""
    instance = tmp_path / "x.dcm"
    instance.write_bytes(b"\0" * 128 + b"DICM")
    identity = InstanceIdentity("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", "1.2.3", "1.2.3.5")

    async def main() -> int:
        http = make_http_client(
            timeout=5, auth=GoogleAuth(creds), transport=httpx.MockTransport(handler)
        )
        try:
            client = DicomwebClient(http, RetryPolicy(deadline=0.3, first_delay=0.01))
            service = StoreService(
                client, stow_url=f"{GOOGLE}/studies", dicomweb_root=GOOGLE, overwrite=False
            )
            return await service.store(instance, identity)
        except AdapterError as exc:  # what the C-STORE handler answers
            return int(exc.status)
        finally:
            await http.aclose()

    return asyncio.run(main())


def stored(request: httpx.Request) -> httpx.Response:
    body = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.4"]}}]}}
    return httpx.Response(200, json=body)


def test_metadata_server_blip_is_0xa700(tmp_path: Path) -> None:
    """A refresh that keeps failing with a TransportError: C-STORE 0xA700, never 0x0124."""
    creds = FakeCredentials(valid=False, expires_in=None, failures=[metadata_blip()] * 1000)
    assert store_status(creds, tmp_path, stored) == 0xA700


def test_metadata_server_blip_is_retried(tmp_path: Path) -> None:
    """One failed refresh is retried within the deadline and the instance is stored."""
    creds = FakeCredentials(valid=False, expires_in=None, failures=[metadata_blip()])
    assert store_status(creds, tmp_path, stored) == 0x0000
    assert creds.refreshes == 1


def test_dicomweb_401_is_not_authorized(tmp_path: Path) -> None:
    """Only the DICOMweb server's own refusal is 0x0124."""
    creds = FakeCredentials(valid=True, expires_in=3600)
    assert store_status(creds, tmp_path, lambda request: httpx.Response(401)) == 0x0124


def test_no_application_default_credentials_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_adc(scopes: list[str] | None = None) -> Any:
        raise google.auth.exceptions.DefaultCredentialsError(  # type: ignore[no-untyped-call]
            "Could not find default credentials."
        )

    monkeypatch.setattr(google.auth, "default", no_adc)
    with pytest.raises(ConfigError) as caught:
        load_google_credentials("")
    assert "--dicomweb_address" in str(caught.value)
    assert "Application Default Credentials" in str(caught.value)


def test_scopes_default_and_custom(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[list[str] | None] = []

    def fake_default(scopes: list[str] | None = None) -> Any:
        asked.append(scopes)
        return FakeCredentials(valid=True, expires_in=3600), "project"

    monkeypatch.setattr(google.auth, "default", fake_default)
    load_google_credentials("")
    load_google_credentials("https://a/scope, https://b/scope")
    assert asked == [
        ["https://www.googleapis.com/auth/cloud-platform"],
        ["https://a/scope", "https://b/scope"],
    ]


def test_token_never_appears_in_logs(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    instance = tmp_path / "x.dcm"
    instance.write_bytes(b"\0" * 128 + b"DICM")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, text=f"rejected {request.url}")

    async def main() -> int:
        http = make_http_client(
            timeout=5, auth=BearerAuth("TOPSECRET"), transport=httpx.MockTransport(handler)
        )
        try:
            client = DicomwebClient(http, RetryPolicy(deadline=0.1))
            return (await client.stow(f"{GOOGLE}/studies", [instance])).http_status
        finally:
            await http.aclose()

    with caplog.at_level(logging.DEBUG):
        assert asyncio.run(main()) == 401
    assert caplog.records, "the 401 should have been logged"
    assert "TOPSECRET" not in caplog.text


def test_forced_google_credentials_apply_to_any_host() -> None:
    creds = FakeCredentials(valid=True, expires_in=3600)
    auth = choose_auth(
        "http://orthanc:8042/dicom-web",
        bearer_token="",
        basic_auth="",
        google_credentials=creds,
        force_google=True,
    )
    assert isinstance(auth, GoogleAuth)


@pytest.mark.parametrize(
    ("urls", "static_auth", "force_google", "loaded"),
    [
        (["http://orthanc/dicom-web"], False, False, False),
        ([GOOGLE], False, False, True),
        ([GOOGLE], True, False, False),
        (["http://orthanc/dicom-web"], False, True, True),
    ],
)
def test_credentials_are_loaded_only_when_an_upstream_needs_them(
    monkeypatch: pytest.MonkeyPatch,
    urls: list[str],
    static_auth: bool,
    force_google: bool,
    loaded: bool,
) -> None:
    calls: list[str] = []

    def fake_load(scopes: str) -> str:
        calls.append(scopes)
        return "creds"

    monkeypatch.setattr("dicom_adapter.dicomweb.auth.load_google_credentials", fake_load)
    got = asyncio.run(
        credentials_if_needed(urls, static_auth=static_auth, force_google=force_google, scopes="s")
    )
    assert (got == "creds") is loaded
    assert calls == (["s"] if loaded else [])
