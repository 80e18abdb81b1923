"""Credentials for DICOMweb requests: none, static bearer/basic, or Google ADC.

Google tokens are refreshed in a worker thread (google-auth is blocking) under a lock, ahead
of expiry, so the event loop never waits on the metadata server. Tokens are never logged.
A failed refresh is transient (0xA700, retry later): only the DICOMweb server's own 401/403
means "not authorized".
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import urlsplit

import httpx

from dicom_adapter.errors import ConfigError, UpstreamUnavailableError

logger = logging.getLogger(__name__)

DEFAULT_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
REFRESH_MARGIN = datetime.timedelta(minutes=5)


def is_google_url(url: str) -> bool:
    """True for Google API hosts, which need Google credentials."""
    host = urlsplit(url).hostname or ""
    return host == "googleapis.com" or host.endswith(".googleapis.com")


class BearerAuth(httpx.Auth):
    """A static bearer token."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Any:
        request.headers["Authorization"] = self._header
        yield request


class GoogleAuth(httpx.Auth):
    """Google Application Default Credentials, refreshed off the event loop before expiry."""

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials
        self._lock = asyncio.Lock()

    def _needs_refresh(self) -> bool:
        creds = self._credentials
        if not creds.token or not creds.valid:
            return True
        expiry = getattr(creds, "expiry", None)
        if expiry is None:
            return False
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        return bool(expiry - now < REFRESH_MARGIN)

    async def token(self) -> str:
        """A valid access token, refreshing it in a thread when near expiry."""
        async with self._lock:
            if self._needs_refresh():
                import google.auth.exceptions
                import google.auth.transport.requests

                try:
                    await asyncio.to_thread(
                        self._credentials.refresh, google.auth.transport.requests.Request()
                    )
                except google.auth.exceptions.GoogleAuthError as exc:
                    # metadata server or token endpoint blip: retry later, not "not authorized"
                    raise UpstreamUnavailableError(
                        f"cannot refresh Google credentials: {exc}",
                        comment="cannot refresh Google credentials",
                    ) from exc
            return str(self._credentials.token)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = f"Bearer {await self.token()}"
        yield request


def load_google_credentials(scopes: str) -> Any:
    """google.auth.default() with our scopes (blocking: call it from a thread)."""
    import google.auth
    import google.auth.exceptions

    scope_list = [s.strip() for s in scopes.split(",") if s.strip()] or list(DEFAULT_SCOPES)
    try:
        credentials, _project = google.auth.default(scopes=scope_list)
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise ConfigError(
            "dicomweb_address",
            "a googleapis.com address needs Google Application Default Credentials, "
            f"none found ({str(exc).splitlines()[0]})",
        ) from None
    return credentials


def choose_auth(
    url: str,
    *,
    bearer_token: str,
    basic_auth: str,
    google_credentials: Any | None,
    force_google: bool = False,
) -> httpx.Auth | None:
    """Pick the auth for an upstream: static credentials first, then Google ADC for Google
    hosts (or for every host when `force_google`)."""
    if bearer_token:
        return BearerAuth(bearer_token)
    if basic_auth:
        user, _, password = basic_auth.partition(":")
        return httpx.BasicAuth(user, password)
    if google_credentials is not None and (force_google or is_google_url(url)):
        return GoogleAuth(google_credentials)
    return None


async def credentials_if_needed(
    urls: list[str], *, static_auth: bool, force_google: bool, scopes: str
) -> Any | None:
    """Google ADC (loaded in a worker thread) when an upstream needs them, else None."""
    if static_auth or not (force_google or any(is_google_url(url) for url in urls)):
        return None
    return await asyncio.to_thread(load_google_credentials, scopes)
