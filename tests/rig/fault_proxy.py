"""A fault-injecting HTTP/1.1 proxy for the fault suite, run on its own asyncio loop thread.

It sits between the adapter and Orthanc's HTTP port. Each request is read whole, then either
forwarded (the answer relayed as it came) or met with the fault set at that moment: an answer
of its own (503, 429, an empty 200, a garbage status line, silence) or the upstream's real
answer mangled on the way back (reset halfway, a truncated chunked body, 1 MiB of headers).
`set()` switches the fault at runtime; `log` records what each request met, with the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass
from enum import StrEnum

import httpx

from tests.rig.lifecycle import Service

HEAD_LIMIT = 1 << 20
HUGE_HEADER_BYTES = 1 << 20
# Headers not relayed: hop-by-hop ones and the body framing, which the proxy sets itself.
_NOT_RELAYED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"content-length",
        b"content-encoding",
        b"upgrade",
        b"te",
        b"trailer",
    }
)


class Fault(StrEnum):
    """What a request meets at the proxy."""

    NONE = "none"  # forwarded, answer relayed
    UNAVAILABLE = "503"  # 503 from the proxy, not forwarded
    TOO_MANY_REQUESTS = "429"  # 429 with Retry-After: 1, not forwarded
    HANG = "hang"  # read, never answered (until the client gives up)
    RESET_MID_RESPONSE = "reset"  # forwarded; half the answer, then a TCP reset
    TRUNCATED_CHUNKED = "truncated-chunked"  # forwarded; half the body as chunks, then EOF
    HUGE_HEADERS = "huge-headers"  # forwarded; the answer behind 1 MiB of header lines
    GARBAGE_STATUS = "garbage-status"  # a status line that is not HTTP, then close
    EMPTY_200 = "empty-200"  # 200 with an empty body, not forwarded
    FORBIDDEN = "403"  # 403 with a short body, not forwarded (a permanent refusal)


# Faults whose request reaches Orthanc (it may have stored the instance) before the fault.
FORWARDED = frozenset(
    {Fault.NONE, Fault.RESET_MID_RESPONSE, Fault.TRUNCATED_CHUNKED, Fault.HUGE_HEADERS}
)


@dataclass(frozen=True)
class Seen:
    """One request the proxy received and the fault it met."""

    at: float  # time.monotonic()
    method: str
    path: str
    fault: Fault


@dataclass(frozen=True)
class _Request:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return b""


class FaultProxy(Service):
    """The proxy; `with FaultProxy(host, port) as proxy:` serves on `proxy.url`."""

    def __init__(self, upstream_host: str, upstream_port: int, *, delay: float = 0.0) -> None:
        self._upstream = f"http://{upstream_host}:{upstream_port}"
        self.delay = delay  # seconds added to every request before it is answered (latency)
        self._lock = threading.Lock()
        self._fault = Fault.NONE
        self._pass_first = 0
        self._times: int | None = None
        self._log: list[Seen] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._startup_error: BaseException | None = None
        self._client: httpx.AsyncClient | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Root URL of the proxy (the upstream's paths are served under it unchanged)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> list[Seen]:
        """A copy of what every request met so far."""
        with self._lock:
            return list(self._log)

    def set(self, fault: Fault, *, times: int | None = None, pass_first: int = 0) -> None:
        """From now on: forward `pass_first` requests, then fault `times` (None: all) requests."""
        with self._lock:
            self._fault, self._times, self._pass_first = fault, times, pass_first
            self._log.clear()

    def clear(self) -> None:
        """Forward everything from now on."""
        self.set(Fault.NONE)

    def _next_fault(self, method: str, path: str) -> Fault:
        with self._lock:
            fault = self._fault
            if self._pass_first > 0:
                self._pass_first -= 1
                fault = Fault.NONE
            elif self._times is not None:
                if self._times > 0:
                    self._times -= 1
                else:
                    fault = Fault.NONE
            self._log.append(Seen(time.monotonic(), method, path, fault))
            return fault

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Run the proxy on its own loop thread (ready when this returns)."""
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise TimeoutError("fault proxy did not start")
        if self._startup_error is not None:
            raise RuntimeError("fault proxy failed to start") from self._startup_error

    def stop(self) -> None:
        """Stop the loop and join its thread."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with httpx.AsyncClient(
            base_url=self._upstream, trust_env=False, timeout=60.0
        ) as client:
            self._client = client
            server = await asyncio.start_server(
                self._serve, "127.0.0.1", 0, limit=HEAD_LIMIT, reuse_address=True
            )
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            async with server:
                await self._stopping.wait()
                server.close()
                # Hung exchanges wait on `_stopping` too, so they end here as well.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 5)

    # ----------------------------------------------------------------------------- exchanges

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                path = request.target.decode("latin-1")
                fault = self._next_fault(request.method, path)
                if self.delay > 0:
                    await asyncio.sleep(self.delay)
                keep = await self._answer(fault, request, reader, writer)
                if not keep or request.header(b"connection").lower() == b"close":
                    return
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return
        finally:
            with contextlib.suppress(OSError):
                writer.close()

    async def _answer(
        self,
        fault: Fault,
        request: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request as `fault` says; True when the connection may serve another."""
        if fault is Fault.UNAVAILABLE:
            writer.write(_simple(503, b"Service Unavailable", b"fault proxy: unavailable"))
        elif fault is Fault.TOO_MANY_REQUESTS:
            writer.write(
                _simple(429, b"Too Many Requests", b"slow down", extra=[(b"Retry-After", b"1")])
            )
        elif fault is Fault.FORBIDDEN:
            writer.write(_simple(403, b"Forbidden", b"fault proxy: forbidden"))
        elif fault is Fault.EMPTY_200:
            writer.write(
                _simple(200, b"OK", b"", extra=[(b"Content-Type", b"application/dicom+json")])
            )
        elif fault is Fault.GARBAGE_STATUS:
            writer.write(b"\x00\x8bNOT HTTP AT ALL \xff\xfe\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return False
        elif fault is Fault.HANG:
            await self._hang(reader)
            return False
        else:
            status, reason, headers, body = await self._forward(request)
            return await _relay(fault, status, reason, headers, body, writer)
        await writer.drain()
        return True

    async def _hang(self, reader: asyncio.StreamReader) -> None:
        """Say nothing until the client closes the connection or the proxy stops."""
        assert self._stopping is not None
        eof = asyncio.ensure_future(reader.read())
        stop = asyncio.ensure_future(self._stopping.wait())
        _, pending = await asyncio.wait({eof, stop}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()

    async def _forward(
        self, request: _Request
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
        headers = [
            (name, value)
            for name, value in request.headers
            if name.lower() not in _NOT_RELAYED
            and name.lower() not in (b"host", b"accept-encoding")
        ]
        headers.append((b"Accept-Encoding", b"identity"))
        assert self._client is not None
        response = await self._client.request(
            request.method,
            request.target.decode("latin-1"),
            headers=headers,
            content=request.body,
        )
        relayed = [(k, v) for k, v in response.headers.raw if k.lower() not in _NOT_RELAYED]
        reason = response.reason_phrase.encode("latin-1") or b"-"
        return response.status_code, reason, relayed, response.content


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """One request with its whole body (Content-Length or chunked); None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    request_line, *lines = head[:-4].split(b"\r\n")
    method, target, _version = request_line.split(b" ", 2)
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    request = _Request(method.decode("ascii"), target, headers, b"")
    if b"chunked" in request.header(b"transfer-encoding").lower():
        pieces = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                break
            pieces.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(pieces)
    else:
        body = await reader.readexactly(int(request.header(b"content-length") or b"0"))
    return _Request(request.method, target, headers, body)


def _head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _simple(
    status: int, reason: bytes, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> bytes:
    headers = [(b"Content-Type", b"text/plain"), *(extra or [])]
    headers.append((b"Content-Length", str(len(body)).encode()))
    return _head(status, reason, headers) + body


async def _relay(
    fault: Fault,
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    writer: asyncio.StreamWriter,
) -> bool:
    """Send the upstream's answer, mangled as `fault` says; True when it was sent whole."""
    length = [(b"Content-Length", str(len(body)).encode())]
    if fault is Fault.NONE:
        writer.write(_head(status, reason, headers + length) + body)
        await writer.drain()
        return True
    if fault is Fault.HUGE_HEADERS:
        count = HUGE_HEADER_BYTES // 1000 + 1
        padding = [(b"X-Fault-Padding-%06d" % i, b"x" * 1000) for i in range(count)]
        writer.write(_head(status, reason, padding + headers + length) + body)
        await writer.drain()
        return False
    half = body[: len(body) // 2]
    if fault is Fault.TRUNCATED_CHUNKED:
        chunked = [(b"Transfer-Encoding", b"chunked")]
        writer.write(_head(status, reason, headers + chunked) + b"%x\r\n%s\r\n" % (len(half), half))
        await writer.drain()
        return False  # EOF without the last chunk
    # RESET_MID_RESPONSE: the head promises the whole body, half arrives, then RST.
    writer.write(_head(status, reason, headers + length) + half)
    await writer.drain()
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    return False
