"""A lean HTTP/1.1 transport for httpx on plain asyncio streams.

Why: per request, httpcore + anyio cost ~3 ms of CPU (sniffio look-ups, cancel scopes, h11
events), which under the GIL competes with pynetdicom's receive threads and halved C-STORE
throughput. This transport speaks just what DICOMweb needs: keep-alive connections per host,
request bodies with Content-Length or chunked framing, responses with Content-Length, chunked
or close-delimited bodies, TLS through the ssl module, TCP_NODELAY. httpx keeps doing the
rest (auth, URL handling, content decoding), and its own transport is still used for HTTP/2
and whenever proxy environment variables are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

MAX_HEAD_BYTES = 256 * 1024
IDLE_SECONDS = 4.0  # below common server keep-alive timeouts (5 s), so reuse rarely races a close
# Body reads take everything buffered (asyncio's StreamReader pauses the socket at 2x its
# limit): a smaller read copies a piece out and then memmoves the rest of its buffer forward.
READ_CHUNK = 16 << 20


def default_ssl_context() -> ssl.SSLContext:
    """System CA store (honours SSL_CERT_FILE/SSL_CERT_DIR) plus certifi's bundle."""
    context = ssl.create_default_context()
    with contextlib.suppress(ImportError, OSError):
        import certifi

        context.load_verify_locations(certifi.where())
    return context


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self) -> bool:
        """Idle, fresh, and nothing readable (an idle socket that is readable was closed)."""
        if (
            self.writer.is_closing()
            or self.reader.at_eof()
            or time.monotonic() - self.idle_since >= IDLE_SECONDS
        ):
            return False
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return True
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def _timeouts(request: httpx.Request) -> dict[str, float | None]:
    value = request.extensions.get("timeout", {})
    return value if isinstance(value, dict) else {}


class _ResponseStream(httpx.AsyncByteStream):
    """The response body; the connection goes back to the pool once it was read to the end."""

    def __init__(
        self,
        transport: AsyncioTransport,
        key: tuple[str, str, int],
        conn: _Connection,
        request: httpx.Request,
        framing: str,
        length: int,
        keep_alive: bool,
    ) -> None:
        self._transport = transport
        self._key = key
        self._conn = conn
        self._request = request
        self._framing = framing
        self._length = length
        self._keep_alive = keep_alive
        self._done = False
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks():
                yield chunk
        except TimeoutError as exc:
            raise httpx.ReadTimeout(
                "timed out reading the response body", request=self._request
            ) from exc
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise httpx.ReadError(f"response body: {exc!r}", request=self._request) from exc
        except ValueError as exc:
            raise httpx.RemoteProtocolError(
                f"malformed chunked body: {exc}", request=self._request
            ) from exc
        self._done = True

    async def _chunks(self) -> AsyncIterator[bytes]:
        """The body's pieces; the read timeout applies to each read, never across a yield."""
        reader = self._conn.reader
        timeout = _timeouts(self._request).get("read")
        if self._framing == "length":
            async for chunk in _read_exactly(reader, self._length, timeout):
                yield chunk
        elif self._framing == "chunked":
            while True:
                async with asyncio.timeout(timeout):
                    size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while True:  # trailers, up to the empty line
                        async with asyncio.timeout(timeout):
                            if await reader.readuntil(b"\r\n") == b"\r\n":
                                return
                async for chunk in _read_exactly(reader, size, timeout):
                    yield chunk
                async with asyncio.timeout(timeout):
                    if await reader.readexactly(2) != b"\r\n":
                        raise ValueError("bad chunk terminator")
        elif self._framing == "close":
            while True:
                async with asyncio.timeout(timeout):
                    chunk = await reader.read(READ_CHUNK)
                if not chunk:
                    break
                yield chunk
            self._keep_alive = False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        reusable = self._done and self._keep_alive
        if not reusable:
            self._conn.close()
        self._transport._release(self._key, self._conn if reusable else None)


class AsyncioTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive over asyncio streams (see the module docstring)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_idle: int = 32,
        max_connections: int = 64,
    ) -> None:
        self._ssl_context = ssl_context
        self._max_idle = max_idle
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}

    def _release(self, key: tuple[str, str, int], conn: _Connection | None) -> None:
        """Give back the connection slot, and the connection itself when it can be reused."""
        self._slots.release()
        if conn is None:
            return
        pool = self._idle.setdefault(key, [])
        if len(pool) >= self._max_idle or conn.writer.is_closing():
            conn.close()
            return
        conn.idle_since = time.monotonic()
        pool.append(conn)

    async def _connect(self, request: httpx.Request, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        context: ssl.SSLContext | None = None
        if scheme == "https":
            context = self._ssl_context or default_ssl_context()
        try:
            async with asyncio.timeout(_timeouts(request).get("connect")):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context else None,
                    limit=MAX_HEAD_BYTES,
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(
                f"connect to {host}:{port} timed out", request=request
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"connect to {host}:{port}: {exc}", request=request) from exc
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(reader, writer)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}", request=request)
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, url.host, port)
        try:
            async with asyncio.timeout(_timeouts(request).get("pool")):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise httpx.PoolTimeout("no free connection slot", request=request) from exc
        try:
            return await self._exchange(request, key)
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(self, request: httpx.Request, key: tuple[str, str, int]) -> httpx.Response:
        """Send on a pooled or new connection; the slot is released when the body is closed."""
        conn = None
        pool = self._idle.get(key)
        while pool:
            candidate = pool.pop()
            if candidate.usable():
                conn = candidate
                break
            candidate.close()
        if conn is None:
            conn = await self._connect(request, key)
        try:
            await self._write_request(conn, request)
            status, reason, headers, http_version = await self._read_head(conn, request)
            framing, length, keep_alive = _framing(request, status, headers, http_version)
        except BaseException:
            conn.close()
            raise
        stream = _ResponseStream(self, key, conn, request, framing, length, keep_alive)
        if framing == "none":
            stream._done = True
        return httpx.Response(
            status,
            headers=headers,
            stream=stream,
            extensions={"http_version": http_version, "reason_phrase": reason},
        )

    async def _write_request(self, conn: _Connection, request: httpx.Request) -> None:
        writer = conn.writer
        write_timeout = _timeouts(request).get("write")
        chunked = request.headers.get("Transfer-Encoding", "").lower() == "chunked"
        head = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        try:
            writer.write(b"".join(head))
            stream: Any = request.stream
            async for chunk in stream:
                if not chunk:
                    continue
                if chunked:
                    writer.write(b"%x\r\n" % len(chunk))
                    writer.write(chunk)
                    writer.write(b"\r\n")
                else:
                    writer.write(chunk)
                async with asyncio.timeout(write_timeout):
                    await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
            async with asyncio.timeout(write_timeout):
                await writer.drain()
        except TimeoutError as exc:
            raise httpx.WriteTimeout("timed out sending the request", request=request) from exc
        except OSError as exc:
            raise httpx.WriteError(f"sending the request: {exc}", request=request) from exc

    async def _read_head(
        self, conn: _Connection, request: httpx.Request
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
        try:
            async with asyncio.timeout(_timeouts(request).get("read")):
                while True:
                    raw = await conn.reader.readuntil(b"\r\n\r\n")
                    status_line, *lines = raw[:-4].split(b"\r\n")
                    version, _, rest = status_line.partition(b" ")
                    code_text, _, reason = rest.partition(b" ")
                    status = int(code_text)
                    if not 100 <= status < 200 or status == 101:
                        break  # informational answers (100 Continue, 103 Early Hints) precede it
        except TimeoutError as exc:
            raise httpx.ReadTimeout("timed out waiting for the response", request=request) from exc
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise httpx.ReadError(f"reading the response: {exc!r}", request=request) from exc
        except ValueError as exc:
            raise httpx.RemoteProtocolError(
                f"malformed status line: {exc}", request=request
            ) from exc
        headers = []
        for line in lines:
            name, sep, value = line.partition(b":")
            if not sep:
                raise httpx.RemoteProtocolError("malformed response header", request=request)
            headers.append((name.strip(), value.strip()))
        return status, reason, headers, version

    async def aclose(self) -> None:
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()


async def _read_exactly(
    reader: asyncio.StreamReader, length: int, timeout: float | None
) -> AsyncIterator[bytes]:
    """Yield exactly `length` bytes in pieces; a short stream is an IncompleteReadError."""
    remaining = length
    while remaining:
        async with asyncio.timeout(timeout):
            chunk = await reader.read(min(remaining, READ_CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", remaining)
        remaining -= len(chunk)
        yield chunk


def _framing(
    request: httpx.Request, status: int, headers: list[tuple[bytes, bytes]], version: bytes
) -> tuple[str, int, bool]:
    """How the response body is delimited: ('none'|'length'|'chunked'|'close', length, keep)."""
    values: dict[bytes, bytes] = {}
    for name, value in headers:
        values[name.lower()] = value.lower()
    connection = values.get(b"connection", b"")
    keep_alive = b"close" not in connection and (
        version == b"HTTP/1.1" or b"keep-alive" in connection
    )
    if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return "none", 0, keep_alive
    if b"chunked" in values.get(b"transfer-encoding", b""):
        return "chunked", 0, keep_alive
    if b"content-length" in values:
        text = values[b"content-length"].strip()
        if not text.isdigit():
            raise httpx.RemoteProtocolError(f"bad Content-Length {text!r}", request=request)
        length = int(text)
        return ("length" if length else "none"), length, keep_alive
    return "close", 0, False
