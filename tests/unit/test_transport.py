"""Unit tests for the lean asyncio HTTP/1.1 transport against a small real HTTP server.

`Server` runs inside each test's own event loop on 127.0.0.1, port 0. A test scripts it with a
handler that receives the parsed request (request bodies de-chunked by the server) and writes
raw response bytes, so framing, keep-alive and the error paths are exercised byte for byte. The
server records every request and every connection. Tests are plain functions that run their
coroutine with `asyncio.run` (under an overall guard, so a hang fails instead of blocking).
Everything is asserted as an httpx user sees it: `httpx.AsyncClient(transport=AsyncioTransport())`
and the adapter's own `make_http_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import random
import resource
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import pytest
from tests.rig import wait_until_async

from dicom_adapter.dicomweb import transport as transport_module
from dicom_adapter.dicomweb.client import (
    TRANSPORT_ENV,
    DicomwebClient,
    RetryPolicy,
    make_http_client,
)
from dicom_adapter.dicomweb.transport import AsyncioTransport

T = TypeVar("T")

GUARD_SECONDS = 20.0  # per test; everything here finishes in well under a second or two
SERVER_LIMIT = 4 * 1024 * 1024


# --- the scriptable server -------------------------------------------------------------------


@dataclass
class Request:
    """One request as the server parsed it; `body` is de-chunked for chunked uploads."""

    conn: int  # index of the server-side connection it arrived on
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunk_sizes: list[int] = field(default_factory=list)  # sizes of the chunks, if chunked

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class ServerConn:
    """The server side of one accepted connection."""

    def __init__(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.close_after = False  # a handler sets this to close once its response is written
        self.eof = asyncio.Event()  # the client closed (EOF or reset seen by the server)
        self.closed = asyncio.Event()  # the server has closed this connection

    def send(self, data: bytes) -> None:
        self.writer.write(data)


Handler = Callable[[Request, ServerConn], Awaitable[None]]


class Server:
    """HTTP/1.1 test server; `handler` is called once per request and writes the raw answer."""

    def __init__(self, handler: Handler, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.conns: list[ServerConn] = []
        self.errors: list[BaseException] = []
        self.port = 0
        self._ssl = ssl_context
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._tick = asyncio.Event()  # set (and replaced) whenever the recorded state changes

    @property
    def connections(self) -> int:
        return len(self.conns)

    def changed(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._tick.wait()

    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", 0, limit=SERVER_LIMIT, ssl=self._ssl
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        if exc_type is None and self.errors:
            raise AssertionError(f"test server failed: {self.errors!r}")

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ServerConn(len(self.conns), reader, writer)
        self.conns.append(conn)
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.changed()

    async def _serve(self, conn: ServerConn) -> None:
        try:
            while not conn.close_after:
                request = await read_request(conn.reader, conn.index)
                if request is None:
                    conn.eof.set()
                    break
                self.requests.append(request)
                self.changed()
                await self.handler(request, conn)
                await conn.writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            conn.eof.set()
        except asyncio.CancelledError:
            pass  # server shutdown
        except Exception as exc:
            self.errors.append(exc)
        finally:
            conn.writer.close()
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()
            conn.closed.set()
            self.changed()


async def read_request(reader: asyncio.StreamReader, conn: int) -> Request | None:
    """Parse one request; None on a clean EOF before any byte of it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, version = request_line.split(" ")
    headers = []
    for line in lines:
        name, sep, value = line.partition(":")
        assert sep, f"malformed request header {line!r}"
        headers.append((name.strip(), value.strip()))
    request = Request(conn, method, target, version, headers)
    if (request.header("Transfer-Encoding") or "").lower() == "chunked":
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            parts.append(await reader.readexactly(size))
            request.chunk_sizes.append(size)
            if await reader.readexactly(2) != b"\r\n":
                raise AssertionError("bad chunk terminator in the request body")
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass  # trailers
        request.body = b"".join(parts)
    elif (length := request.header("Content-Length")) is not None:
        request.body = await reader.readexactly(int(length))
    return request


def response(
    status: int = 200,
    reason: str = "OK",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    length: bool = True,
    version: str = "HTTP/1.1",
) -> bytes:
    """A raw response; Content-Length is added unless `length` is False."""
    lines = [f"{version} {status} {reason}", *(f"{name}: {value}" for name, value in headers)]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def text_handler(body: bytes = b"ok") -> Handler:
    async def handler(request: Request, conn: ServerConn) -> None:
        conn.send(response(body=body))

    return handler


async def hang_forever() -> None:
    await asyncio.Event().wait()


# --- helpers ---------------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, GUARD_SECONDS))


async def wait(event: asyncio.Event, timeout: float = 2.0) -> None:
    await asyncio.wait_for(event.wait(), timeout)


async def settle() -> None:
    """Let the loop process I/O that has already arrived (a FIN in the socket buffer).

    Not a readiness wait: the event being waited for has already happened on the wire.
    """
    for _ in range(5):
        await asyncio.sleep(0)


def plain_client(timeout: float = 5.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=AsyncioTransport(), timeout=httpx.Timeout(timeout))


def adapter_client(timeout: float = 5.0) -> httpx.AsyncClient:
    return make_http_client(timeout=timeout)


ClientFactory = Callable[..., httpx.AsyncClient]
BOTH_CLIENTS = pytest.mark.parametrize(
    "make_client", [plain_client, adapter_client], ids=["AsyncClient", "make_http_client"]
)


def closed_port() -> int:
    """A port on 127.0.0.1 nobody listens on (bound, then released without listening)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(autouse=True)
def _no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proxy variables would route requests through httpx's own proxy transport."""
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


# --- basics ----------------------------------------------------------------------------------


def test_make_http_client_uses_the_asyncio_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        client = make_http_client(timeout=1.5)
        async with client:
            assert isinstance(client._transport, AsyncioTransport)
            assert client.timeout == httpx.Timeout(1.5)
        async with make_http_client(timeout=1.5, http2=True) as client:
            assert not isinstance(client._transport, AsyncioTransport)
        monkeypatch.setenv(TRANSPORT_ENV, "httpx")  # the benchmark/diagnostic switch
        async with make_http_client(timeout=1.5) as client:
            assert isinstance(client._transport, httpx.AsyncHTTPTransport)
        monkeypatch.delenv(TRANSPORT_ENV)
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
        async with make_http_client(timeout=1.5) as client:
            assert not isinstance(client._transport, AsyncioTransport)

    run(main())


@BOTH_CLIENTS
def test_get_with_content_length_response(make_client: ClientFactory) -> None:
    async def handler(request: Request, conn: ServerConn) -> None:
        conn.send(
            response(
                200,
                "Totally Fine",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("X-Test", "one"),
                    ("Set-Cookie", "a=1"),
                    ("Set-Cookie", "b=2"),
                ],
                b"hello world",
            )
        )

    async def main() -> None:
        async with Server(handler) as server, make_client() as client:
            r = await client.get(
                server.url("/dicom-web/studies?q=1&r=%20x"), headers={"X-Req": "v"}
            )
            assert r.status_code == 200
            assert r.reason_phrase == "Totally Fine"
            assert r.http_version == "HTTP/1.1"
            assert r.headers["content-type"] == "text/plain; charset=utf-8"
            assert r.headers["x-test"] == "one"
            assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]
            assert r.headers["content-length"] == "11"
            assert r.content == b"hello world"
            assert r.text == "hello world"
            [seen] = server.requests
            assert (seen.method, seen.target, seen.version) == (
                "GET",
                "/dicom-web/studies?q=1&r=%20x",
                "HTTP/1.1",
            )
            assert seen.header("Host") == f"127.0.0.1:{server.port}"
            assert seen.header("X-Req") == "v"
            assert seen.header("Content-Length") is None
            assert seen.header("Transfer-Encoding") is None
            assert seen.body == b""
            if make_client is adapter_client:
                assert seen.header("User-Agent") == "dicom-adapter"

    run(main())


def test_http_1_0_responses() -> None:
    """HTTP/1.0 is reported as such; without keep-alive its connection is not reused."""

    async def handler(request: Request, conn: ServerConn) -> None:
        if request.target == "/keep":
            conn.send(
                response(headers=[("Connection", "keep-alive")], body=b"k", version="HTTP/1.0")
            )
        else:
            conn.send(response(body=b"ten", version="HTTP/1.0"))
            conn.close_after = True

    async def main() -> None:
        async with Server(handler) as server, plain_client() as client:
            r = await client.get(server.url("/ten"))
            assert (r.http_version, r.content) == ("HTTP/1.0", b"ten")
            r = await client.get(server.url("/keep"))
            assert (r.http_version, r.content) == ("HTTP/1.0", b"k")
            r = await client.get(server.url("/keep"))
            assert r.content == b"k"
            assert [req.conn for req in server.requests] == [0, 1, 1]
            assert server.connections == 2

    run(main())


# --- request bodies --------------------------------------------------------------------------


@BOTH_CLIENTS
def test_request_with_bytes_body_sends_content_length(make_client: ClientFactory) -> None:
    payload = bytes(range(256)) * 300 + b"\r\n0\r\n\r\n"  # framing look-alikes stay payload

    async def handler(request: Request, conn: ServerConn) -> None:
        conn.send(response(201, "Created", body=hashlib.sha256(request.body).hexdigest().encode()))

    async def main() -> None:
        async with Server(handler) as server, make_client() as client:
            r = await client.post(
                server.url("/studies"),
                content=payload,
                headers={"Content-Type": "application/dicom"},
            )
            assert r.status_code == 201
            assert r.text == hashlib.sha256(payload).hexdigest()
            [seen] = server.requests
            assert seen.method == "POST"
            assert seen.header("Content-Length") == str(len(payload))
            assert seen.header("Transfer-Encoding") is None
            assert seen.header("Content-Type") == "application/dicom"
            assert seen.body == payload

    run(main())


@BOTH_CLIENTS
def test_request_with_async_iterator_body_is_sent_chunked(make_client: ClientFactory) -> None:
    pieces = [b"alpha", b"", b"b" * 70_000, b"0\r\n\r\n", b"gamma"]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            await asyncio.sleep(0)
            yield piece

    async def nothing() -> AsyncIterator[bytes]:
        return
        yield b""  # pragma: no cover  (makes this an async generator)

    async def handler(request: Request, conn: ServerConn) -> None:
        conn.send(response(body=str(len(request.body)).encode()))

    async def main() -> None:
        async with Server(handler) as server, make_client() as client:
            r = await client.put(server.url("/upload"), content=body())
            assert r.text == str(sum(map(len, pieces)))
            r = await client.put(server.url("/empty"), content=nothing())
            assert r.text == "0"
            first, empty = server.requests
            assert first.header("Transfer-Encoding") == "chunked"
            assert first.header("Content-Length") is None
            assert first.body == b"".join(pieces)
            assert first.chunk_sizes == [5, 70_000, 5, 5]  # the empty piece is not a chunk
            assert empty.header("Transfer-Encoding") == "chunked"
            assert (empty.body, empty.chunk_sizes) == (b"", [])
            assert server.connections == 1

    run(main())


# --- response framing ------------------------------------------------------------------------

CHUNKED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"5;ext=1\r\nhello\r\n"
    b'2;name="quoted value"\r\n, \r\n'
    b"A \r\n0123456789\r\n"
    b"1b\r\n" + b"x" * 27 + b"\r\n"
    b"0;last\r\n"
    b"X-Trailer: yes\r\n"
    b"X-Other: 2\r\n"
    b"\r\n"
)
CHUNKED_BODY = b"hello, 0123456789" + b"x" * 27


@BOTH_CLIENTS
@pytest.mark.parametrize("delivery", ["whole", "byte-by-byte"])
def test_chunked_response_is_decoded_exactly(make_client: ClientFactory, delivery: str) -> None:
    async def handler(request: Request, conn: ServerConn) -> None:
        if request.target == "/next":
            conn.send(response(body=b"next"))
        elif delivery == "whole":
            conn.send(CHUNKED_RESPONSE)
        else:
            for i in range(len(CHUNKED_RESPONSE)):
                conn.send(CHUNKED_RESPONSE[i : i + 1])
                await conn.writer.drain()
                await asyncio.sleep(0)

    async def main() -> None:
        async with Server(handler) as server, make_client() as client:
            r = await client.get(server.url("/chunked"))
            assert r.status_code == 200
            assert r.headers["transfer-encoding"] == "chunked"
            assert r.content == CHUNKED_BODY
            # the trailers were consumed exactly: the next response on the same connection is intact
            r = await client.get(server.url("/next"))
            assert r.content == b"next"
            assert server.connections == 1

    run(main())


@BOTH_CLIENTS
@pytest.mark.parametrize("connection_header", [True, False], ids=["connection-close", "bare"])
def test_close_delimited_response(make_client: ClientFactory, connection_header: bool) -> None:
    first, second = b"start of the body;", bytes(range(256)) * 1200

    async def handler(request: Request, conn: ServerConn) -> None:
        if request.target == "/after":
            conn.send(response(body=b"after"))
            return
        headers = [("Content-Type", "application/octet-stream")]
        if connection_header:
            headers.append(("Connection", "close"))
        conn.send(response(headers=headers, body=first, length=False))
        await conn.writer.drain()
        await asyncio.sleep(0)
        conn.send(second)
        conn.close_after = True

    async def main() -> None:
        async with Server(handler) as server, make_client() as client:
            r = await client.get(server.url("/eof"))
            assert r.status_code == 200
            assert "content-length" not in r.headers
            assert r.content == first + second
            r = await client.get(server.url("/after"))
            assert r.content == b"after"
            assert [req.conn for req in server.requests] == [0, 1]

    run(main())


@BOTH_CLIENTS
def test_responses_without_body(make_client: ClientFactory) -> None:
    """204, 304 and HEAD have no body, whatever their headers say; the connection stays in sync."""

    async def handler(request: Request, conn: ServerConn) -> None:
        if request.target == "/204":
            conn.send(response(204, "No Content", length=False))
        elif request.target == "/304":
            conn.send(response(304, "Not Modified", [("ETag", '"v1"')], length=False))
        elif request.method == "HEAD" and request.target == "/chunked":
            conn.send(response(headers=[("Transfer-Encoding", "chunked")], length=False))
        elif request.method == "HEAD":
            conn.send(response(headers=[("Content-Length", "1234")], length=False))
        else:
            conn.send(response(body=b"after"))

    async def main() -> None:
        async with Server(handler) as server, make_client() as client:
            r = await client.get(server.url("/204"))
            assert (r.status_code, r.content) == (204, b"")
            r = await client.get(server.url("/304"))
            assert (r.status_code, r.content, r.headers["etag"]) == (304, b"", '"v1"')
            r = await client.head(server.url("/instance"))
            assert (r.status_code, r.content) == (200, b"")
            assert r.headers["content-length"] == "1234"
            r = await client.head(server.url("/chunked"))
            assert (r.status_code, r.content) == (200, b"")
            r = await client.get(server.url("/after"))
            assert r.content == b"after"
            assert [req.method for req in server.requests] == ["GET", "GET", "HEAD", "HEAD", "GET"]
            assert server.connections == 1

    run(main())


@BOTH_CLIENTS
def test_100_continue_is_skipped(make_client: ClientFactory) -> None:
    async def handler(request: Request, conn: ServerConn) -> None:
        if request.method == "POST":
            conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await conn.writer.drain()
            conn.send(b"HTTP/1.1 100 Continue\r\nX-Info: again\r\n\r\n")
            conn.send(response(201, "Created", [("Location", "/studies/1")], b"stored"))
        else:
            conn.send(response(body=b"next"))

    async def main() -> None:
        async with Server(handler) as server, make_client() as client:
            r = await client.post(server.url("/studies"), content=b"dataset")
            assert (r.status_code, r.reason_phrase) == (201, "Created")
            assert r.headers["location"] == "/studies/1"
            assert "x-info" not in r.headers
            assert r.content == b"stored"
            r = await client.get(server.url("/next"))
            assert r.content == b"next"
            assert server.connections == 1

    run(main())


def test_other_informational_responses_are_skipped() -> None:
    async def handler(request: Request, conn: ServerConn) -> None:
        conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        conn.send(response(body=request.target.encode()))

    async def main() -> None:
        async with Server(handler) as server, plain_client() as client:
            r = await client.get(server.url("/first"))
            assert (r.status_code, r.content) == (200, b"/first")
            r = await client.get(server.url("/second"))
            assert (r.status_code, r.content) == (200, b"/second")

    run(main())


# --- keep-alive and the pool -----------------------------------------------------------------


@BOTH_CLIENTS
def test_sequential_requests_reuse_one_connection(make_client: ClientFactory) -> None:
    async def main() -> None:
        async with Server(text_handler()) as server, make_client() as client:
            for _ in range(3):
                r = await client.get(server.url("/"))
                assert r.content == b"ok"
            assert [req.conn for req in server.requests] == [0, 0, 0]
            assert server.connections == 1

    run(main())


def test_concurrent_requests_use_separate_connections_then_reuse_them() -> None:
    arrived = 0
    all_arrived = asyncio.Event()

    async def handler(request: Request, conn: ServerConn) -> None:
        nonlocal arrived
        if request.target == "/together":
            arrived += 1
            if arrived == 5:
                all_arrived.set()
            await all_arrived.wait()  # five requests in flight at once: five connections
        conn.send(response(body=request.target.encode()))

    async def main() -> None:
        async with Server(handler) as server, plain_client() as client:
            rs = await asyncio.gather(*(client.get(server.url("/together")) for _ in range(5)))
            assert [r.content for r in rs] == [b"/together"] * 5
            assert server.connections == 5
            rs = await asyncio.gather(*(client.get(server.url(f"/again{i}")) for i in range(5)))
            assert [r.content for r in rs] == [f"/again{i}".encode() for i in range(5)]
            assert server.connections == 5
            assert sorted(req.conn for req in server.requests[5:]) == [0, 1, 2, 3, 4]

    run(main())


def test_max_idle_bounds_the_pool() -> None:
    all_arrived = asyncio.Event()

    async def handler(request: Request, conn: ServerConn) -> None:
        if request.target == "/together" and len(server.requests) == 5:
            all_arrived.set()
        if request.target == "/together":
            await all_arrived.wait()  # five requests in flight at once: five connections
        conn.send(response(body=b"ok"))

    def eofs() -> int:
        return sum(conn.eof.is_set() for conn in server.conns)

    async def main() -> None:
        async with httpx.AsyncClient(transport=AsyncioTransport(max_idle=2)) as client:
            rs = await asyncio.gather(*(client.get(server.url("/together")) for _ in range(5)))
            assert all(r.content == b"ok" for r in rs)
            assert server.connections == 5
            await server.wait_until(lambda: eofs() >= 3)  # three were closed, two kept
            await settle()
            assert eofs() == 3
            rs = await asyncio.gather(*(client.get(server.url("/again")) for _ in range(5)))
            assert all(r.content == b"ok" for r in rs)
            assert server.connections == 8

    server = Server(handler)

    async def serve_and_run() -> None:
        async with server:
            await main()

    run(serve_and_run())


def test_expired_idle_connection_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with Server(text_handler()) as server, plain_client() as client:
            await client.get(server.url("/"))
            monkeypatch.setattr(transport_module, "IDLE_SECONDS", 0.0)
            r = await client.get(server.url("/"))
            assert r.content == b"ok"
            assert [req.conn for req in server.requests] == [0, 1]
            await wait(server.conns[0].eof)  # the expired connection was closed, not leaked

    run(main())


@BOTH_CLIENTS
def test_connection_close_response_makes_the_next_request_reconnect(
    make_client: ClientFactory,
) -> None:
    async def handler(request: Request, conn: ServerConn) -> None:
        if request.target == "/last":
            conn.send(response(headers=[("Connection", "close")], body=b"bye"))
            conn.close_after = True
        else:
            conn.send(response(body=request.target.encode()))

    async def main() -> None:
        async with Server(handler) as server, make_client() as client:
            r = await client.get(server.url("/last"))
            assert (r.headers["connection"], r.content) == ("close", b"bye")
            r = await client.get(server.url("/fresh"))
            assert r.content == b"/fresh"
            r = await client.get(server.url("/fresh2"))
            assert r.content == b"/fresh2"
            assert [req.conn for req in server.requests] == [0, 1, 1]

    run(main())


@BOTH_CLIENTS
def test_connection_closed_by_server_while_idle_is_not_reused(make_client: ClientFactory) -> None:
    async def handler(request: Request, conn: ServerConn) -> None:
        conn.send(response(body=request.target.encode()))  # keep-alive as far as headers go...
        if request.target == "/first":
            conn.close_after = True  # ...but the server closes it right after

    async def main() -> None:
        async with Server(handler) as server, make_client() as client:
            r = await client.get(server.url("/first"))
            assert r.content == b"/first"
            await wait(server.conns[0].closed)
            await settle()
            r = await client.get(server.url("/second"))
            assert r.content == b"/second"
            assert [req.conn for req in server.requests] == [0, 1]

    run(main())


def test_connection_closed_by_server_just_before_reuse_is_not_reused() -> None:
    async def main() -> None:
        async with Server(text_handler()) as server, plain_client() as client:
            await client.get(server.url("/"))
            await settle()
            # the server closes its side; the client's loop gets no turn before the next request
            server.conns[0].writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
            r = await client.get(server.url("/"))
            assert r.content == b"ok"
            assert server.connections == 2

    run(main())


@BOTH_CLIENTS
@pytest.mark.parametrize("how", ["partly-read", "unread"])
def test_response_not_read_to_the_end_is_not_pooled(make_client: ClientFactory, how: str) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB, several transport reads

    async def handler(request: Request, conn: ServerConn) -> None:
        conn.send(response(body=big if request.target == "/big" else b"small"))

    async def main() -> None:
        async with Server(handler) as server, make_client() as client:
            request = client.build_request("GET", server.url("/big"))
            r = await client.send(request, stream=True)
            if how == "partly-read":
                async for chunk in r.aiter_raw():
                    assert 0 < len(chunk) < len(big)
                    break
            await r.aclose()
            await wait(server.conns[0].eof)  # the client closed that connection
            r = await client.get(server.url("/small"))
            assert r.content == b"small"
            assert [req.conn for req in server.requests] == [0, 1]

    run(main())


# --- content decoding ------------------------------------------------------------------------


@BOTH_CLIENTS
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_gzip_content_encoding_is_decoded(make_client: ClientFactory, framing: str) -> None:
    data = b'{"00080018": {"vr": "UI"}}' * 4000
    packed = gzip.compress(data)

    async def handler(request: Request, conn: ServerConn) -> None:
        headers = [("Content-Type", "application/dicom+json"), ("Content-Encoding", "gzip")]
        if framing == "length":
            conn.send(response(headers=headers, body=packed))
            return
        conn.send(response(headers=[*headers, ("Transfer-Encoding", "chunked")], length=False))
        third = len(packed) // 3
        for piece in (packed[:third], packed[third : 2 * third], packed[2 * third :]):
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")

    async def main() -> None:
        async with Server(handler) as server, make_client() as client:
            r = await client.get(server.url("/studies"))
            assert r.headers["content-encoding"] == "gzip"
            assert r.content == data
            assert r.num_bytes_downloaded == len(packed)

    run(main())


# --- errors ----------------------------------------------------------------------------------


@BOTH_CLIENTS
def test_connect_refused_is_connect_error(make_client: ClientFactory) -> None:
    async def main() -> None:
        async with make_client() as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{closed_port()}/")

    run(main())


def test_unsupported_scheme() -> None:
    async def main() -> None:
        async with plain_client() as client:
            with pytest.raises(httpx.UnsupportedProtocol):
                await client.get("ftp://127.0.0.1/file")
        transport = AsyncioTransport()
        with pytest.raises(httpx.UnsupportedProtocol):
            await transport.handle_async_request(httpx.Request("GET", "ws://127.0.0.1/socket"))

    run(main())


@pytest.mark.parametrize(
    "make_client",
    [lambda: plain_client(0.2), lambda: adapter_client(0.2)],
    ids=["AsyncClient", "make_http_client"],
)
def test_server_that_never_answers_is_read_timeout(make_client: ClientFactory) -> None:
    async def handler(request: Request, conn: ServerConn) -> None:
        if request.target == "/hang":
            await hang_forever()
        conn.send(response(body=b"ok"))

    async def main() -> None:
        async with Server(handler) as server, make_client() as client:
            start = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await client.get(server.url("/hang"))
            assert 0.15 < time.monotonic() - start < 2.0
            r = await client.get(server.url("/ok"))  # the timed-out connection is not reused
            assert r.content == b"ok"
            assert [req.conn for req in server.requests] == [0, 1]

    run(main())


def test_server_that_stalls_mid_body_is_read_timeout() -> None:
    async def handler(request: Request, conn: ServerConn) -> None:
        conn.send(response(body=b"x" * 100)[:-90])  # headers say 100 bytes, 10 are sent
        await conn.writer.drain()
        await hang_forever()

    async def main() -> None:
        async with Server(handler) as server, plain_client(0.2) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get(server.url("/stall"))

    run(main())


@pytest.mark.parametrize("framing", ["length", "chunked", "before-response"])
def test_server_closing_mid_response_is_transport_error(framing: str) -> None:
    async def handler(request: Request, conn: ServerConn) -> None:
        if request.target == "/ok":
            conn.send(response(body=b"ok"))
            return
        if framing == "length":
            conn.send(response(body=b"x" * 100)[:-90])
        elif framing == "chunked":
            conn.send(response(headers=[("Transfer-Encoding", "chunked")], length=False))
            conn.send(b"a\r\n0123456789\r\n64\r\nonly part of it")
        conn.close_after = True

    async def main() -> None:
        async with Server(handler) as server, plain_client() as client:
            with pytest.raises(httpx.TransportError) as info:
                await client.get(server.url("/cut"))
            print(f"{framing}: {type(info.value).__name__}: {info.value}")
            r = await client.get(server.url("/ok"))
            assert r.content == b"ok"

    run(main())


@BOTH_CLIENTS
@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon in this header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad(Name): x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n: x\r\n\r\n",
    ],
    ids=["status-not-a-number", "garbage", "no-status", "bad-header", "space", "paren", "empty"],
)
def test_malformed_response_head_is_remote_protocol_error(
    make_client: ClientFactory, head: bytes
) -> None:
    async def handler(request: Request, conn: ServerConn) -> None:
        conn.send(head if request.target == "/bad" else response(body=b"ok"))

    async def main() -> None:
        async with Server(handler) as server, make_client() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(server.url("/bad"))
            r = await client.get(server.url("/ok"))  # the broken connection is not reused
            assert r.content == b"ok"
            assert [req.conn for req in server.requests] == [0, 1]

    run(main())


@pytest.mark.parametrize("value", ["abc", "-5"])
def test_malformed_content_length_is_remote_protocol_error(value: str) -> None:
    async def handler(request: Request, conn: ServerConn) -> None:
        conn.send(response(headers=[("Content-Length", value)], body=b"12345", length=False))

    async def main() -> None:
        async with Server(handler) as server, plain_client(0.5) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(server.url("/bad"))

    run(main())


# --- read timeout semantics ------------------------------------------------------------------


def test_read_timeout_applies_per_read_not_to_the_whole_body() -> None:
    async def handler(request: Request, conn: ServerConn) -> None:
        conn.send(response(body=b"0123456789")[:-10])
        for digit in b"0123456789":
            await asyncio.sleep(0.05)  # each gap is far below the read timeout
            conn.send(bytes([digit]))
            await conn.writer.drain()

    async def main() -> None:
        async with Server(handler) as server, plain_client(0.25) as client:
            r = await client.get(server.url("/drip"))  # ~0.5 s in total
            assert r.content == b"0123456789"

    run(main())


def test_slow_consumer_of_a_streamed_body_is_not_cancelled() -> None:
    big = b"z" * (4 << 20)  # several reads (the reader pauses the socket at 2x its limit)

    async def handler(request: Request, conn: ServerConn) -> None:
        conn.send(response(body=big))

    async def main() -> None:
        async with Server(handler) as server, plain_client(0.25) as client:
            received = 0
            try:
                async with client.stream("GET", server.url("/wado")) as r:
                    async for chunk in r.aiter_raw():
                        received += len(chunk)
                        await asyncio.sleep(0.1)  # e.g. forwarding each part to a C-MOVE peer
            except asyncio.CancelledError:
                raise AssertionError(f"consumer cancelled after {received} bytes") from None
            assert received == len(big)

    run(main())


# --- large bodies ----------------------------------------------------------------------------

MIB = 1024 * 1024
LARGE_BLOCKS = 32


def large_block(base: bytes, i: int) -> bytes:
    return base[i * 4099 :] + base[: i * 4099]  # a distinct rotation per block


def test_large_upload_and_download_stream() -> None:
    base = random.Random(1234).randbytes(MIB)

    async def handler(request: Request, conn: ServerConn) -> None:
        if request.method == "POST":
            digest = hashlib.sha256(request.body).hexdigest()
            conn.send(response(body=f"{len(request.body)} {digest}".encode()))
            return
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (LARGE_BLOCKS * MIB))
        for i in range(LARGE_BLOCKS):
            conn.send(large_block(base, i))
            await conn.writer.drain()

    async def main() -> None:
        sent = hashlib.sha256()

        async def upload() -> AsyncIterator[bytes]:
            for i in range(LARGE_BLOCKS):
                block = large_block(base, i)
                sent.update(block)
                yield block

        async with Server(handler) as server, make_http_client(timeout=10.0) as client:
            r = await client.post(server.url("/upload"), content=upload())
            assert r.status_code == 200
            assert r.text == f"{LARGE_BLOCKS * MIB} {sent.hexdigest()}"
            assert server.requests[0].header("Transfer-Encoding") == "chunked"
            assert len(server.requests[0].chunk_sizes) == LARGE_BLOCKS

            received, count = hashlib.sha256(), 0
            async with client.stream("GET", server.url("/download")) as r:
                assert r.headers["content-length"] == str(LARGE_BLOCKS * MIB)
                async for chunk in r.aiter_raw():
                    assert len(chunk) <= transport_module.READ_CHUNK
                    received.update(chunk)
                    count += len(chunk)
            assert count == LARGE_BLOCKS * MIB
            assert received.hexdigest() == sent.hexdigest()  # same blocks, same order
            assert server.connections == 1

    run(main())


# --- sockets ---------------------------------------------------------------------------------


def test_tcp_nodelay_is_set_on_the_client_socket() -> None:
    async def main() -> None:
        transport = AsyncioTransport()
        async with Server(text_handler()) as server, httpx.AsyncClient(transport=transport) as c:
            await c.get(server.url("/"))
            # Private state, on purpose (only in this test): the pooled connection's socket.
            [conn] = transport._idle[("http", "127.0.0.1", server.port)]
            sock = conn.writer.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    run(main())


@BOTH_CLIENTS
def test_aclose_closes_idle_connections(make_client: ClientFactory) -> None:
    async def main() -> None:
        async with Server(text_handler()) as server:
            client = make_client()
            await client.get(server.url("/"))
            await client.get(server.url("/"))
            await settle()
            assert server.connections == 1
            assert not server.conns[0].eof.is_set()
            await client.aclose()
            await wait(server.conns[0].eof)

    run(main())


def test_aclose_on_the_transport_empties_the_pool() -> None:
    async def main() -> None:
        transport = AsyncioTransport()
        async with Server(text_handler()) as server:
            client = httpx.AsyncClient(transport=transport)
            await asyncio.gather(client.get(server.url("/")), client.get(server.url("/")))
            assert server.connections == 2
            await transport.aclose()
            await wait(server.conns[0].eof)
            await wait(server.conns[1].eof)
            assert transport._idle == {}  # private state, checked on purpose
            await client.aclose()

    run(main())


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = (
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1"
        " -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1"
    )
    subprocess.run(
        [*command.split(), "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True
    )
    return cert, key


def test_tls_with_custom_context_and_verification(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        async with Server(text_handler(b"secure"), ssl_context=server_context) as server:
            async with httpx.AsyncClient(transport=AsyncioTransport(ssl_context=trusting)) as c:
                for _ in range(2):
                    r = await c.get(server.url("/", scheme="https"))
                    assert r.content == b"secure"
                assert server.connections == 1
            # the default context (system CAs + certifi) does not trust a self-signed certificate
            async with httpx.AsyncClient(transport=AsyncioTransport()) as c:
                with pytest.raises(httpx.ConnectError):
                    await c.get(server.url("/", scheme="https"))

    run(main())


# --- issue 8 point 10: TLS context, early answers, strict framing, high descriptors ------------


def test_one_ssl_context_per_transport(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default context (system store + certifi, ~38 ms of CPU) is built once per client."""
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the system store now trusts the test server
    built = 0
    create_default_context = ssl.create_default_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        nonlocal built
        built += 1
        return create_default_context(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counting)
    all_arrived = asyncio.Event()

    async def handler(request: Request, conn: ServerConn) -> None:
        if len(server.requests) == 3:
            all_arrived.set()
        await all_arrived.wait()  # three requests in flight at once: three connections
        conn.send(response(body=b"secure"))

    server = Server(handler, ssl_context=server_context)

    async def main() -> None:
        async with server, adapter_client() as client:
            url = server.url("/", scheme="https")
            rs = await asyncio.gather(*(client.get(url) for _ in range(3)))
            assert [r.content for r in rs] == [b"secure"] * 3
            assert server.connections == 3
        assert built == 1

    run(main())


class EarlyAnswerServer:
    """Answers every POST/PUT right after its head, without reading the body, and closes.

    Closing with the unread upload in the socket buffer makes the kernel send a reset, as
    Orthanc or a proxy do when they refuse a body (413) or a request (401).
    """

    def __init__(self, status: int, reason: str) -> None:
        self.answer = response(status, reason, [("Connection", "close")], b"refused early")
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(
                self.answer if head.startswith((b"POST", b"PUT")) else response(body=b"ok")
            )
            await writer.drain()
        finally:
            writer.close()


@BOTH_CLIENTS
@pytest.mark.parametrize("status, reason", [(413, "Payload Too Large"), (401, "Unauthorized")])
@pytest.mark.parametrize("body", ["content-length", "chunked"])
def test_early_answer_during_upload_is_the_response(
    make_client: ClientFactory, status: int, reason: str, body: str
) -> None:
    block = b"u" * MIB
    blocks = 64  # far more than the socket buffers hold: the upload is cut off by the reset

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(blocks):
            yield block

    async def main() -> None:
        async with EarlyAnswerServer(status, reason) as server, make_client() as client:
            url = f"http://127.0.0.1:{server.port}/studies"
            content = upload() if body == "chunked" else block * blocks
            r = await client.post(url, content=content)
            assert (r.status_code, r.reason_phrase, r.content) == (status, reason, b"refused early")
            assert server.connections == 1
            r = await client.get(url)  # the cut connection was not pooled
            assert r.content == b"ok"
            assert server.connections == 2

    run(main())


def chunked_answer(chunked_body: bytes, extra_headers: bytes = b"") -> Handler:
    async def handler(request: Request, conn: ServerConn) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + extra_headers + b"\r\n")
        conn.send(chunked_body)
        await conn.writer.drain()
        await hang_forever()  # the connection stays open: only the data can end the response

    return handler


@pytest.mark.parametrize(
    "chunked_body",
    [
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"0_5\r\nhello\r\n0\r\n\r\n",
        b"-0\r\n\r\n",
        b"1" + b"0" * 19 + b"\r\nhello",  # 2**76 bytes announced
        b"10000000001\r\nhello",  # just over 1 TiB
        b"0" * 5000 + b"5\r\nhello\r\n0\r\n\r\n",  # a size line longer than any real one
        b"5;" + b"e" * 300_000 + b"\r\nhello\r\n0\r\n\r\n",  # beyond the reader's limit
        b"5\r\nhello\r\n0\r\n" + b"X-Trailer: yes\r\n" * 20_000,  # endless trailers
    ],
    ids=[
        "0x",
        "plus",
        "leading-space",
        "underscore",
        "minus",
        "huge",
        "over-1TiB",
        "long-line",
        "over-limit-line",
        "endless-trailers",
    ],
)
def test_malformed_chunk_size_is_remote_protocol_error(chunked_body: bytes) -> None:
    async def main() -> None:
        async with Server(chunked_answer(chunked_body)) as server, plain_client(2.0) as client:
            start = time.monotonic()
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(server.url("/chunked"))
            assert time.monotonic() - start < 1.0  # at once, not at the read timeout

    run(main())


@BOTH_CLIENTS
@pytest.mark.parametrize(
    "headers",
    [
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: gzip\r\nContent-Length: 5\r\n",
        b"Transfer-Encoding: identity\r\nContent-Length: 5\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
    ],
    ids=["gzip-chunked", "gzip", "identity", "two-headers", "chunked-twice", "two-lengths"],
)
def test_unsupported_transfer_coding_is_remote_protocol_error(
    make_client: ClientFactory, headers: bytes
) -> None:
    body = b"5\r\nhello\r\n0\r\n\r\n" if b"chunked" in headers else b"hello"

    async def handler(request: Request, conn: ServerConn) -> None:
        if request.target == "/ok":
            conn.send(response(body=b"ok"))
        else:
            conn.send(b"HTTP/1.1 200 OK\r\n" + headers + b"\r\n" + body)

    async def main() -> None:
        async with Server(handler) as server, make_client(1.0) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(server.url("/coded"))
            r = await client.get(server.url("/ok"))
            assert r.content == b"ok"
            assert [req.conn for req in server.requests] == [0, 1]

    run(main())


def test_connection_on_a_descriptor_above_1023_is_reused() -> None:
    """select() cannot watch descriptors >= 1024; a busy adapter has that many open files."""
    wanted = 1200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))

    async def main() -> None:
        fillers: list[int] = []
        try:
            async with Server(text_handler()) as server, plain_client() as client:
                while not fillers or fillers[-1] < 1100:  # take every free descriptor below 1100
                    fillers.append(os.open(os.devnull, os.O_RDONLY))
                for fd in [fd for fd in fillers if fd >= 1024]:
                    os.close(fd)
                fillers = [fd for fd in fillers if fd < 1024]
                await client.get(server.url("/"))
                # private state, checked on purpose: the pooled connection is above select's range
                [conn] = client._transport._idle[("http", "127.0.0.1", server.port)]  # type: ignore[attr-defined]
                assert conn.writer.get_extra_info("socket").fileno() >= 1024
                r = await client.get(server.url("/"))
                assert r.content == b"ok"
                assert [req.conn for req in server.requests] == [0, 0]
        finally:
            for fd in fillers:
                os.close(fd)

    run(main())


# --- WADO-RS over the pool ---------------------------------------------------------------------


def wado_handler(epilogue: bytes) -> Handler:
    """A two-part WADO-RS answer (Content-Length framed) with `epilogue` after the close."""

    async def handler(request: Request, conn: ServerConn) -> None:
        parts = [b"DICM-one-" + request.target.encode(), b"DICM-two"]
        body = b"".join(
            b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in parts
        )
        body += b"--b--" + epilogue
        content_type = 'multipart/related; type="application/dicom"; boundary=b'
        conn.send(response(headers=[("Content-Type", content_type)], body=body))

    return handler


@pytest.mark.parametrize(
    ("epilogue", "connections"),
    [(b"", 1), (b"\r\n", 1), (b"x" * (1 << 20), 3)],
    ids=["nothing-after-close", "crlf-after-close", "oversized-epilogue"],
)
def test_wado_rs_fetches_reuse_one_connection(
    tmp_path: Path, epilogue: bytes, connections: int
) -> None:
    """Each WADO-RS answer is read to its end, so the next fetch reuses the connection
    (was: a new connection per fetch); an epilogue past 64 KiB is not read, the connection
    is dropped instead (the bound is counted after the chunk that held the delimiter)."""

    async def main() -> None:
        async with Server(wado_handler(epilogue)) as server, adapter_client() as http:
            client = DicomwebClient(http, RetryPolicy())
            for i in range(3):
                got = []
                async for part in client.wado_instances(
                    server.url(f"/studies/{i}"), spool_dir=tmp_path
                ):
                    got.append(part.part10_bytes())
                    part.discard()
                assert got == [f"DICM-one-/studies/{i}".encode(), b"DICM-two"]
            assert server.connections == connections

    run(main())


def truncated_wado_handler(stall: bool) -> Handler:
    """One instance and the close delimiter, then a body cut short (Content-Length claims
    more): closed at once, or stalled until the client gives up."""

    async def handler(request: Request, conn: ServerConn) -> None:
        body = b"--b\r\nContent-Type: application/dicom\r\n\r\nDICM-one\r\n--b--"
        content_type = 'multipart/related; type="application/dicom"; boundary=b'
        head = response(headers=[("Content-Type", content_type)], length=False)
        head = head.replace(b"\r\n\r\n", b"\r\nContent-Length: %d\r\n\r\n" % (len(body) + 100))
        conn.send(head + body)
        await conn.writer.drain()
        if stall:
            await hang_forever()
        conn.close_after = True

    return handler


@pytest.mark.parametrize("stall", [False, True], ids=["cut-after-close", "stalled-after-close"])
def test_wado_rs_trouble_after_the_close_delimiter_keeps_the_instances(
    tmp_path: Path, stall: bool
) -> None:
    """What follows the close delimiter is read only to reuse the connection: a body cut
    short or stalled there does not fail the fetch (the instance was whole), and a stall
    costs about a second (the drain's bound), not the read timeout."""

    async def main() -> None:
        async with (
            Server(truncated_wado_handler(stall)) as server,
            adapter_client(timeout=30.0) as http,
        ):
            client = DicomwebClient(http, RetryPolicy())
            started = time.monotonic()
            got = [
                part.part10_bytes()
                async for part in client.wado_instances(server.url("/i"), spool_dir=tmp_path)
            ]
            assert got == [b"DICM-one"]
            assert time.monotonic() - started < 10.0

    run(main())


# --- request bodies with files: sendfile -----------------------------------------------------


def digest_handler() -> Handler:
    """Answers each POST with the body's length and SHA-256 as the server received it."""

    async def handler(request: Request, conn: ServerConn) -> None:
        digest = hashlib.sha256(request.body).hexdigest()
        conn.send(response(body=f"{len(request.body)} {digest}".encode()))

    return handler


def parts_body(tmp_path: Path, *sizes: int) -> tuple[transport_module.PartsBody, bytes]:
    """A body of a head, files of `sizes` bytes (random content) separated by bytes and a
    memoryview, and a tail; with the bytes the server must receive."""
    rng = random.Random(sum(sizes))
    parts: list[bytes | memoryview | transport_module.FilePart] = [b"--head--\r\n"]
    for i, size in enumerate(sizes):
        data = rng.randbytes(size)
        path = tmp_path / f"part{i}.dcm"
        path.write_bytes(data)
        parts += [transport_module.FilePart(path, size), memoryview(b"\r\n--between--\r\n")]
    parts.append(b"--tail--")
    expected = b"".join(
        p.path.read_bytes() if isinstance(p, transport_module.FilePart) else bytes(p) for p in parts
    )
    return transport_module.PartsBody(parts), expected


async def post_parts(
    client: httpx.AsyncClient, url: str, body: transport_module.PartsBody, length: int
) -> httpx.Response:
    """POST a PartsBody the way DicomwebClient.stow does (Content-Length, the body unwrapped)."""
    request = client.build_request(
        "POST", url, headers={"Content-Length": str(length)}, content=body
    )
    request.stream = body
    return await client.send(request)


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """Wrap owner.name so each call is recorded (its result when an int, else 0)."""
    calls: list[int] = []
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        calls.append(result if isinstance(result, int) else 0)
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@BOTH_CLIENTS
def test_files_in_a_body_arrive_byte_exact_by_sendfile(
    make_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body, expected = parts_body(tmp_path, 300_000, 1, 700_000)
    sendfile = count_calls(monkeypatch, os, "sendfile")

    async def main() -> None:
        async with Server(digest_handler()) as server, make_client() as client:
            for _ in range(2):  # a body can be sent again (a retry); the connection is reused
                r = await post_parts(client, server.url("/studies"), body, len(expected))
                assert r.text == f"{len(expected)} {hashlib.sha256(expected).hexdigest()}"
            assert server.connections == 1
            assert all(req.header("Transfer-Encoding") is None for req in server.requests)

    run(main())
    assert sum(sendfile) == 2 * (300_000 + 1 + 700_000)  # every file byte went by sendfile


def test_a_file_bigger_than_the_socket_takes_is_finished_from_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body, expected = parts_body(tmp_path, 40 * MIB)  # far beyond loopback's socket buffers
    rests = count_calls(monkeypatch, transport_module, "_send_rest")

    async def main() -> None:
        async with Server(digest_handler()) as server, plain_client(timeout=10.0) as client:
            r = await post_parts(client, server.url("/studies"), body, len(expected))
            assert r.text == f"{len(expected)} {hashlib.sha256(expected).hexdigest()}"

    run(main())
    assert rests, "the socket took 40 MiB at once: the thread path was not exercised"


def test_a_file_that_shrank_fails_the_request_at_once(tmp_path: Path) -> None:
    body, expected = parts_body(tmp_path, 100_000)
    file_part = body.parts[1]
    assert isinstance(file_part, transport_module.FilePart)
    file_part.path.write_bytes(file_part.path.read_bytes()[:50_000])

    async def main() -> None:
        async with Server(digest_handler()) as server, plain_client(timeout=10.0) as client:
            started = time.monotonic()
            with pytest.raises(httpx.LocalProtocolError, match="ended at byte 50000 of 100000"):
                await post_parts(client, server.url("/studies"), body, len(expected))
            assert time.monotonic() - started < 5.0  # not the read timeout (10 s)
            await wait(server.conns[0].eof)  # the half-sent request's connection was closed
            assert server.requests == []

    run(main())


class SilentServer:
    """Accepts connections and never reads from them (a peer whose buffers are full)."""

    def __init__(self) -> None:
        self.port = 0
        self.peers: list[socket.socket] = []
        self._server: asyncio.Server | None = None
        self._accepted = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for peer in self.peers:
            peer.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        self.peers.append(socket.socket(fileno=os.dup(sock.fileno())))
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the kernel's buffers fill up, then the sender waits

    def reset_seen(self) -> bool:
        """True when the client shut its side: reading the peer's socket ends (EOF/reset)."""
        peer = self.peers[0]
        peer.setblocking(False)
        try:
            while peer.recv(1 << 20):
                pass
        except BlockingIOError:
            return False
        except ConnectionError:
            return True
        return True


def client_descriptors(server: SilentServer) -> int:
    """Descriptors of this process on the client's end of the server's first connection."""
    client_end = server.peers[0].getpeername()
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            probe = socket.socket(fileno=int(name))
            try:
                count += probe.getsockname() == client_end
            finally:
                probe.detach()
    return count


def test_a_file_upload_to_a_peer_that_stops_reading_is_a_write_timeout(tmp_path: Path) -> None:
    body, expected = parts_body(tmp_path, 40 * MIB)

    async def main() -> None:
        async with SilentServer() as server, plain_client(timeout=0.5) as client:
            with pytest.raises(httpx.WriteTimeout):
                await post_parts(client, f"http://127.0.0.1:{server.port}/s", body, len(expected))
            # the connection and the thread's duplicate of it are closed: the peer sees the end
            await wait_until_async(
                lambda: client_descriptors(server) == 0, 5.0, "the upload's descriptors closed"
            )
            assert server.reset_seen()

    run(main())


def test_cancelling_a_file_upload_ends_its_thread_and_closes_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body, expected = parts_body(tmp_path, 40 * MIB)
    original = transport_module._send_rest

    async def main() -> None:
        parked = asyncio.Event()

        async def send_rest(*args: Any) -> None:
            parked.set()
            await original(*args)

        monkeypatch.setattr(transport_module, "_send_rest", send_rest)
        async with SilentServer() as server, plain_client(timeout=60.0) as client:
            upload = asyncio.create_task(
                post_parts(client, f"http://127.0.0.1:{server.port}/s", body, len(expected))
            )
            await wait(parked)  # the socket is full: the rest is being sent from a thread
            upload.cancel()
            with pytest.raises(asyncio.CancelledError):
                await upload
            # the thread sees the shutdown at once and closes its duplicates
            await wait_until_async(
                lambda: client_descriptors(server) == 0, 5.0, "the upload's descriptors closed"
            )
            assert server.reset_seen()

    run(main())


def test_files_in_a_body_over_tls_are_read_and_encrypted(
    tls_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    body, expected = parts_body(tmp_path, 3 * MIB + 5)
    sendfile = count_calls(monkeypatch, os, "sendfile")

    async def main() -> None:
        async with (
            Server(digest_handler(), ssl_context=server_context) as server,
            httpx.AsyncClient(transport=AsyncioTransport(ssl_context=trusting)) as client,
        ):
            url = server.url("/studies", scheme="https")
            r = await post_parts(client, url, body, len(expected))
            assert r.text == f"{len(expected)} {hashlib.sha256(expected).hexdigest()}"

    run(main())
    assert sendfile == []  # sendfile would bypass TLS


def test_a_send_that_cannot_start_leaves_no_descriptor_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The duplicate of the connection's descriptor is closed when it cannot be used."""
    body, _ = parts_body(tmp_path, 1000)
    part = body.parts[1]
    assert isinstance(part, transport_module.FilePart)

    def not_a_socket(*args: Any, **kwargs: Any) -> socket.socket:
        raise OSError("not a socket")

    async def main() -> None:
        ours, peer = socket.socketpair()
        with ours, peer, part.path.open("rb") as source:
            before = sorted(os.listdir("/proc/self/fd"))
            monkeypatch.setattr(socket, "socket", not_a_socket)
            try:
                with pytest.raises(OSError, match="not a socket"):
                    await transport_module._send_rest(ours.fileno(), source.fileno(), 0, part, 1.0)
            finally:
                monkeypatch.undo()
            assert sorted(os.listdir("/proc/self/fd")) == before

    run(main())
