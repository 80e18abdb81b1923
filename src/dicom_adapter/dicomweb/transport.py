"""A lean HTTP/1.1 transport for httpx on plain asyncio streams.

Why: per request, httpcore + anyio cost ~1-2 ms more CPU than this (sniffio look-ups, cancel
scopes, h11 events), CPU that under the GIL competes with pynetdicom's receive threads. This
transport speaks just what DICOMweb needs: keep-alive connections per host, request bodies with
Content-Length or chunked framing, responses with Content-Length, chunked or close-delimited
bodies, TLS through the ssl module (one context per transport), TCP_NODELAY. httpx keeps doing
the rest (auth, URL handling, content decoding); its own transport is used for HTTP/2, when
proxy environment variables are set, and with DICOM_ADAPTER_HTTP_TRANSPORT=httpx (client.py).

Hazards: a server may answer (413, 401) and close while we upload: the answer is read after
the write fails. A peer's bytes never size an allocation: heads, chunk-size lines and trailers
are bounded, chunk sizes are hex digits only, and a transfer coding other than chunked is an
error (ResponseFramingError -> httpx.RemoteProtocolError).

Measured against httpx's own transport, same runs, rotating order (2026-12-06, the shared
2-core VM at load 3-12; ratio = httpx / ours, > 1 means ours is better):
  bench_store, 200 CT via dcmsend: wall time per repetition, median 1.01 / 1.12 / 1.11 in three
    runs (24 reps pooled: 1.06); adapter CPU 5.7-5.9 vs 6.9-7.8 ms per instance (1.21-1.31).
  bench_retrieve, C-MOVE of 200 CT: wall 1.11 / 1.04 / 1.26 / 0.99 in four runs (45 reps
    pooled: 1.04); adapter CPU 1.2-1.9 vs 1.6-2.4 ms per instance (1.22-1.35).
  bench_retrieve, C-FIND latency, per pair: 1.10 / 1.13 / 1.12 / 1.10 (660 pairs; p50 12.4-12.9
    vs 13.8-14.1 ms); adapter CPU per C-FIND 5.0-5.1 vs 6.1-6.2 ms.
Kept: C-FIND latency wins by 10-13 % and the adapter uses ~20 % less CPU; throughput gains
only 4-6 % on this box. Rerun: bench/bench_store.py --reps 9 --large-mb 0 --transports
asyncio,httpx; bench/bench_retrieve.py --reps 15 --finds 150 --transports asyncio,httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MAX_HEAD_BYTES = 256 * 1024  # also the StreamReader limit: no line is read past it
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
MAX_CHUNK_SIZE = 1 << 40  # no server sends a 1 TiB chunk; a bigger size is garbage
MAX_TRAILER_BYTES = 64 * 1024
HEX_DIGITS = b"0123456789abcdefABCDEF"
# A header field name: an RFC 9110 token (a regular expression: checking it byte by byte in
# Python cost ~20 us per response, 1.5 % of an export's CPU per message)
FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
IDLE_SECONDS = 4.0  # below common server keep-alive timeouts (5 s), so reuse rarely races a close
# Body reads take everything buffered (asyncio's StreamReader pauses the socket at 2x its
# limit): a smaller read copies a piece out and then memmoves the rest of its buffer forward.
READ_CHUNK = 16 << 20
FILE_CHUNK = 1 << 20  # a file part read into memory for a transport that cannot sendfile
SENDFILE_STEP = 8 << 20  # at most this per sendfile call, so a wait is never longer than one


@dataclass(frozen=True)
class FilePart:
    """A whole file inside a request body; `size` is what Content-Length counted."""

    path: Path
    size: int


class PartsBody(httpx.AsyncByteStream):
    """A request body of bytes and whole files, of a length known in advance.

    Iterated (httpx's own transport does), it reads each file in FILE_CHUNK pieces.
    AsyncioTransport instead hands the files to the kernel (`os.sendfile`): uvloop copies what
    a transport writes into the socket while holding the GIL, and in a py-spy --gil profile of
    the spool's uploads (P1) that copy was 13 % of dicom-import's GIL time, time taken from the
    threads receiving C-STOREs. P1 (200 CT, 6 alternating reps, 2026-12-07): all stored after
    1.789 -> 1.660 s, dicom-import CPU 6.55 -> 5.97 ms per instance, ratio 0.744 -> 0.802.
    """

    def __init__(self, parts: Sequence[bytes | memoryview | FilePart]) -> None:
        self.parts = list(parts)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            if isinstance(part, FilePart):
                for chunk in _read_file(part):
                    yield chunk
            else:
                for chunk in _pieces(part):
                    yield chunk


def _pieces(part: bytes | memoryview) -> Iterator[bytes]:
    if isinstance(part, bytes):
        yield part
        return
    view = memoryview(part).cast("B")
    for start in range(0, len(view), FILE_CHUNK):
        yield bytes(view[start : start + FILE_CHUNK])


def _read_file(part: FilePart) -> Iterator[bytes]:
    """The file's bytes; OSError if it no longer has the size the body was framed with."""
    done = 0
    with part.path.open("rb") as stream:
        while done < part.size and (chunk := stream.read(min(FILE_CHUNK, part.size - done))):
            done += len(chunk)
            yield chunk
    if done != part.size:
        raise FileChanged(f"{part.path} ended at byte {done} of {part.size}")


class ResponseFramingError(Exception):
    """A response head or body that breaks HTTP/1.1 framing (mapped to RemoteProtocolError)."""


class FileChanged(OSError):
    """A file of a request body no longer has the size its Content-Length counted."""


class ResponseTruncated(ResponseFramingError):
    """The connection ended (EOF or reset) inside a response (mapped to ReadError)."""


def default_ssl_context() -> ssl.SSLContext:
    """System CA store (honours SSL_CERT_FILE/SSL_CERT_DIR) plus certifi's bundle."""
    context = ssl.create_default_context()
    with contextlib.suppress(ImportError, OSError):
        import certifi

        context.load_verify_locations(certifi.where())
    return context


class _Reader(asyncio.StreamReader):
    """A StreamReader whose buffered bytes stay readable after the connection was reset.

    asyncio's raises the reset on the next read even with a whole response buffered, e.g. a 413
    from a server that then closed on the rest of our upload. Here the reset ends the stream
    like EOF after the buffered bytes and is kept in `reset`; EOF-delimited bodies check it.
    """

    reset: BaseException | None = None

    def set_exception(self, exc: BaseException) -> None:
        self.reset = exc
        self.feed_eof()

    def buffered(self) -> bool:
        """True when a read returns at once: bytes are buffered (asyncio's `_buffer`; were it
        renamed, every read would arm its timeout, as before)."""
        return bool(getattr(self, "_buffer", b""))


async def _read(reader: asyncio.StreamReader, size: int, timeout: float | None) -> bytes:
    """`reader.read(size)` within the read timeout. The timeout is only armed for a read that
    waits: timers were ~10 % of the samples in a py-spy profile of WADO-RS fetches."""
    if isinstance(reader, _Reader) and reader.buffered():
        return await reader.read(size)
    async with asyncio.timeout(timeout):
        return await reader.read(size)


class _Connection:
    def __init__(self, reader: _Reader, writer: asyncio.StreamWriter) -> None:
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
        try:  # poll, not select: select() cannot take descriptors >= 1024
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

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
        except (OSError, ResponseTruncated) as exc:
            raise httpx.ReadError(f"response body: {exc!r}", request=self._request) from exc
        except ResponseFramingError as exc:
            raise httpx.RemoteProtocolError(
                f"malformed response body: {exc}", request=self._request
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
            async for chunk in dechunk(reader, timeout):
                yield chunk
        elif self._framing == "close":
            self._keep_alive = False
            while True:
                chunk = await _read(reader, READ_CHUNK, timeout)
                if not chunk:
                    break
                yield chunk
            if isinstance(reader, _Reader) and reader.reset is not None:
                raise ResponseTruncated(f"connection reset: {reader.reset!r}")

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
        self._ssl_context = ssl_context  # built on the first HTTPS connection, then shared
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
            if self._ssl_context is None:
                self._ssl_context = default_ssl_context()
            context = self._ssl_context
        loop = asyncio.get_running_loop()
        reader = _Reader(limit=MAX_HEAD_BYTES, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            async with asyncio.timeout(_timeouts(request).get("connect")):
                transport, _ = await loop.create_connection(
                    lambda: protocol,
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context else None,
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(
                f"connect to {host}:{port} timed out", request=request
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"connect to {host}:{port}: {exc}", request=request) from exc
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
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
            write_error: httpx.WriteError | None = None
            try:
                await self._write_request(conn, request)
            except httpx.WriteError as exc:
                write_error = exc  # an early answer (413, 401) and a close cut the upload short
            try:
                status, reason, headers, http_version = await self._read_head(conn, request)
            except httpx.TransportError:
                if write_error is not None:
                    raise write_error from None
                raise
            framing, length, keep_alive = _framing(request, status, headers, http_version)
            keep_alive = keep_alive and write_error is None
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
            out = _plain_socket(writer)
            if isinstance(stream, PartsBody) and not chunked and out is not None:
                await _write_parts(writer, out, stream, write_timeout)
                return
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
        except FileChanged as exc:  # ours, not the connection's: no answer to wait for
            raise httpx.LocalProtocolError(str(exc), request=request) from exc
        except OSError as exc:
            raise httpx.WriteError(f"sending the request: {exc}", request=request) from exc

    async def _read_head(
        self, conn: _Connection, request: httpx.Request
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
        try:
            return await read_head(conn.reader, _timeouts(request).get("read"))
        except TimeoutError as exc:
            raise httpx.ReadTimeout("timed out waiting for the response", request=request) from exc
        except (OSError, ResponseTruncated) as exc:
            raise httpx.ReadError(f"reading the response: {exc!r}", request=request) from exc
        except ResponseFramingError as exc:
            raise httpx.RemoteProtocolError(
                f"malformed response head: {exc}", request=request
            ) from exc

    async def aclose(self) -> None:
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()


def _plain_socket(writer: asyncio.StreamWriter) -> Any:
    """The connection's socket when the kernel may write to it directly (not TLS), else None."""
    if writer.get_extra_info("ssl_object") is not None:
        return None
    return writer.get_extra_info("socket")


async def _write_parts(
    writer: asyncio.StreamWriter, out: Any, body: PartsBody, timeout: float | None
) -> None:
    """Write a PartsBody: bytes through the stream, files by sendfile once the stream is empty."""
    for part in body.parts:
        if not isinstance(part, FilePart):
            for chunk in _pieces(part):
                writer.write(chunk)
                async with asyncio.timeout(timeout):
                    await writer.drain()
            continue
        if writer.transport.get_write_buffer_size():
            # the file's bytes must follow what is buffered: wait until the buffer is empty
            writer.transport.set_write_buffer_limits(high=0)
            try:
                async with asyncio.timeout(timeout):
                    await writer.drain()
            finally:
                writer.transport.set_write_buffer_limits()
            if writer.transport.get_write_buffer_size():
                raise OSError("the connection's write buffer did not empty")
        await _send_file(out.fileno(), part, timeout)
    async with asyncio.timeout(timeout):
        await writer.drain()


async def _send_file(fd: int, part: FilePart, timeout: float | None) -> None:
    """Send a whole file on the (non-blocking) socket `fd` with os.sendfile.

    The first call is made right here: it releases the GIL, and on loopback or a fast network
    it usually takes the whole file. What the socket cannot take at once is sent from a worker
    thread that waits for room with poll(): no GIL held while the kernel copies or waits. That
    thread works on duplicates of both descriptors, closed when it ends; if the request is
    cancelled meanwhile, the socket is shut down, which ends the thread's wait at once.
    """
    with part.path.open("rb") as source:
        sent = _sendfile_some(fd, source.fileno(), 0, part)
        if sent is None or sent < part.size:
            await _send_rest(fd, source.fileno(), sent or 0, part, timeout)


def _sendfile_some(out: int, source: int, offset: int, part: FilePart) -> int | None:
    """Bytes sent by one sendfile call from `offset` (None: the socket is full)."""
    try:
        sent = os.sendfile(out, source, offset, min(part.size - offset, SENDFILE_STEP))
    except BlockingIOError:
        return None
    if sent == 0:
        raise FileChanged(f"{part.path} ended at byte {offset} of {part.size}")
    return offset + sent


async def _send_rest(
    fd: int, source: int, offset: int, part: FilePart, timeout: float | None
) -> None:
    copy = os.dup(fd)
    try:
        duplicate = socket.socket(fileno=copy)
    except OSError:  # not a socket any more: nothing to send on
        os.close(copy)
        raise
    try:
        source = os.dup(source)  # the caller closes its own when a cancellation ends it
    except OSError:
        duplicate.close()
        raise
    lock = threading.Lock()
    wait_ms = -1 if timeout is None else max(1, int(timeout * 1000))

    def run() -> None:
        try:
            poller = select.poll()
            poller.register(duplicate.fileno(), select.POLLOUT)
            done = offset
            while done < part.size:
                sent = _sendfile_some(duplicate.fileno(), source, done, part)
                if sent is not None:
                    done = sent
                elif not poller.poll(wait_ms):
                    raise TimeoutError(f"no room to send {part.path} for {timeout} s")
        finally:
            os.close(source)
            with lock:
                duplicate.close()

    # shielded: `run` always runs (so it always closes the duplicates), even if cancelled early
    work = asyncio.get_running_loop().run_in_executor(None, run)
    work.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        await asyncio.shield(work)
    except asyncio.CancelledError:
        with lock, contextlib.suppress(OSError):
            if duplicate.fileno() != -1:
                duplicate.shutdown(socket.SHUT_RDWR)
        raise


async def read_head(
    reader: asyncio.StreamReader, timeout: float | None
) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
    """The final response head, after any informational ones (100 Continue, 103 Early Hints).

    All heads together are bounded by MAX_HEAD_BYTES. Raises ResponseFramingError (or
    ResponseTruncated) and TimeoutError only.
    """
    budget = MAX_HEAD_BYTES
    async with asyncio.timeout(timeout):
        while True:
            raw = await _read_until(reader, b"\r\n\r\n", budget, "response head")
            budget -= len(raw)
            head = parse_head(raw)
            if not 100 <= head[0] < 200 or head[0] == 101:
                return head


def parse_head(raw: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
    """(status, reason, headers, version) of one response head; ResponseFramingError if bad."""
    status_line, *lines = raw.removesuffix(b"\r\n\r\n").split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if len(version) != 8 or not version.startswith(b"HTTP/1.") or not version[7:].isdigit():
        raise ResponseFramingError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    if len(code) != 3 or not code.isdigit() or code[0] == ord("0"):
        raise ResponseFramingError(f"bad status code: {status_line[:80]!r}")
    headers = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or FIELD_NAME.fullmatch(name) is None:
            raise ResponseFramingError(f"malformed response header {line[:80]!r}")
        headers.append((name, value.strip(b" \t")))
    return int(code), reason, headers, version


async def dechunk(reader: asyncio.StreamReader, timeout: float | None) -> AsyncIterator[bytes]:
    """The data of a chunked body, trailers consumed; the read timeout applies to each read.

    Raises ResponseFramingError (ResponseTruncated at an early end) and TimeoutError only.
    """
    while True:
        async with asyncio.timeout(timeout):
            line = await _read_until(reader, b"\r\n", MAX_CHUNK_LINE, "chunk-size line")
        size = chunk_size(line)
        if size == 0:
            break
        async for piece in _read_exactly(reader, size, timeout):
            yield piece
        async with asyncio.timeout(timeout):
            if await _read_until(reader, b"\r\n", 2, "chunk terminator") != b"\r\n":
                raise ResponseFramingError("bad chunk terminator")
    budget = MAX_TRAILER_BYTES
    while True:  # trailers, up to the empty line
        async with asyncio.timeout(timeout):
            line = await _read_until(reader, b"\r\n", budget, "trailer section")
        if line == b"\r\n":
            return
        budget -= len(line)


def chunk_size(line: bytes) -> int:
    """The size in a chunk-size line (`1*HEXDIG [ext] CRLF`); ResponseFramingError if bad."""
    digits = line.removesuffix(b"\r\n").split(b";", 1)[0].rstrip(b" \t")
    if not digits or digits.strip(HEX_DIGITS):
        raise ResponseFramingError(f"bad chunk size {digits[:40]!r}")
    size = int(digits, 16)
    if size > MAX_CHUNK_SIZE:
        raise ResponseFramingError(f"chunk size {size} is over {MAX_CHUNK_SIZE}")
    return size


async def _read_until(
    reader: asyncio.StreamReader, separator: bytes, limit: int, what: str
) -> bytes:
    """Bytes up to and including `separator`, at most `limit` of them."""
    try:
        data = await reader.readuntil(separator)
    except asyncio.IncompleteReadError as exc:
        raise ResponseTruncated(f"connection closed inside the {what}") from exc
    except asyncio.LimitOverrunError as exc:
        raise ResponseFramingError(f"{what} longer than {limit} bytes") from exc
    if len(data) > limit:
        raise ResponseFramingError(f"{what} longer than {limit} bytes")
    return data


async def _read_exactly(
    reader: asyncio.StreamReader, length: int, timeout: float | None
) -> AsyncIterator[bytes]:
    """Yield exactly `length` bytes in pieces; a short stream is ResponseTruncated."""
    remaining = length
    while remaining:
        chunk = await _read(reader, min(remaining, READ_CHUNK), timeout)
        if not chunk:
            raise ResponseTruncated(f"connection closed {remaining} bytes before the body's end")
        remaining -= len(chunk)
        yield chunk


def _framing(
    request: httpx.Request, status: int, headers: list[tuple[bytes, bytes]], version: bytes
) -> tuple[str, int, bool]:
    """How the response body is delimited: ('none'|'length'|'chunked'|'close', length, keep)."""
    values: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value.lower())
    connection = b",".join(values.get(b"connection", []))
    keep_alive = b"close" not in connection and (
        version == b"HTTP/1.1" or b"keep-alive" in connection
    )
    if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return "none", 0, keep_alive
    if b"transfer-encoding" in values:
        codings = b",".join(values[b"transfer-encoding"]).split(b",")
        if [coding.strip(b" \t") for coding in codings] != [b"chunked"]:
            raise httpx.RemoteProtocolError(
                f"unsupported Transfer-Encoding {codings!r} (only chunked)", request=request
            )
        return "chunked", 0, keep_alive
    if b"content-length" in values:
        texts = {text.strip(b" \t") for text in b",".join(values[b"content-length"]).split(b",")}
        text = texts.pop()
        if texts or not text.isdigit():
            raise httpx.RemoteProtocolError(f"bad Content-Length {text!r}", request=request)
        length = int(text)
        return ("length" if length else "none"), length, keep_alive
    return "close", 0, False
