"""A tiny HTTP/1.1 server for Prometheus `/metrics` and Kubernetes `/healthz` and `/readyz`.

One request per connection (`Connection: close`), GET only, a bounded request head read
within a deadline; anything malformed gets a 4xx or a closed socket, never an exception
that reaches the service. The routing (`answer`) is pure and tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from dicom_adapter.errors import ConfigError
from dicom_adapter.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

logger = logging.getLogger(__name__)

MAX_HEAD = 8192  # request line + headers; a probe or a scraper sends a few hundred bytes
READ_TIMEOUT = 5.0  # seconds for the whole request head
WRITE_TIMEOUT = 10.0
LINGER = 1.0  # seconds to read what the client still sends after our answer (see _linger)
LINGER_BYTES = 65536
MAX_CONNECTIONS = 64
TEXT = "text/plain; charset=utf-8"
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Response:
    """What to send back: status, body, content type and extra headers."""

    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = field(default=())

    def encode(self) -> bytes:
        """The whole HTTP/1.1 response, closing the connection."""
        lines = [
            f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def _text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


def _always() -> bool:
    return True


def _check(probe: Callable[[], bool], what: str) -> bool:
    try:
        return bool(probe())
    except Exception:
        logger.exception("%s check failed", what)
        return False


def answer(
    request_line: bytes,
    render: Callable[[], str],
    ready: Callable[[], bool],
    live: Callable[[], bool] = _always,
) -> Response:
    """The response to one request line (`GET /metrics HTTP/1.1`); headers are ignored."""
    parts = request_line.strip().split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _text(400, "bad request")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return _text(400, "bad request")
    try:
        path = urlsplit(target).path or "/"
    except ValueError:
        return _text(400, "bad request")
    if path not in ("/metrics", "/healthz", "/readyz"):
        return _text(404, "not found")
    if method != "GET":
        return Response(405, b"only GET\n", headers=(("Allow", "GET"),))
    if path == "/healthz":
        return _text(200, "ok") if _check(live, "liveness") else _text(503, "not live")
    if path == "/readyz":
        return _text(200, "ready") if _check(ready, "readiness") else _text(503, "not ready")
    try:
        body = render().encode()
    except Exception:
        logger.exception("rendering metrics failed")
        return _text(500, "metrics unavailable")
    return Response(200, body, METRICS_CONTENT_TYPE)


async def read_request_line(reader: asyncio.StreamReader, max_head: int) -> bytes | None:
    """The request line, after reading the whole head (up to `max_head` bytes).

    None when the peer closed before the head ended; ValueError when the head is too long.
    Bare-LF line ends are accepted as well as CRLF.
    """
    first = b""
    size = 0
    while True:
        line = await reader.readline()  # ValueError past the stream limit
        if not line.endswith(b"\n"):
            return None  # end of stream inside the head
        size += len(line)
        if size > max_head:
            raise ValueError("request head too long")
        if not first:
            if line in (b"\r\n", b"\n"):
                continue  # RFC 9112 2.2: ignore empty lines before the request line
            first = line
        elif line in (b"\r\n", b"\n"):
            return first


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read what the client still sends (a body, an oversized head).

    Closing a socket with unread input sends a reset, which can destroy our answer before
    the client has read it; so the rest is read and dropped, bounded in bytes and time.
    """
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(LINGER):
            dropped = 0
            while dropped < LINGER_BYTES:
                chunk = await reader.read(LINGER_BYTES)
                if not chunk:
                    return
                dropped += len(chunk)


class HealthServer:
    """`/metrics`, `/healthz` and `/readyz` on one TCP port; start() and stop() on the loop."""

    def __init__(
        self,
        render: Callable[[], str],
        ready: Callable[[], bool],
        live: Callable[[], bool] = _always,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        max_head: int = MAX_HEAD,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._render = render
        self._ready = ready
        self._live = live
        self._host = host
        self._requested_port = port
        self._max_head = max_head
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> int:
        """Listen; returns the bound port (OSError when the port is taken)."""
        self._server = await asyncio.start_server(
            self._serve, self._host, self._requested_port, limit=self._max_head
        )
        sockets = self._server.sockets or ()
        self.port = int(sockets[0].getsockname()[1]) if sockets else 0
        return self.port

    async def stop(self) -> None:
        """Stop listening and close any connection still open."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), timeout=2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= self._max_connections:
            writer.close()
            return
        self._writers.add(writer)
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            response = await self._respond(reader)
            if response is not None:
                writer.write(response.encode())
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
                await _linger(reader, writer)
        except (ConnectionError, TimeoutError, OSError):
            pass  # the peer went away or stalled: nothing to answer
        except Exception:
            logger.exception("health/metrics request failed")
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _respond(self, reader: asyncio.StreamReader) -> Response | None:
        try:
            async with asyncio.timeout(self._read_timeout):
                line = await read_request_line(reader, self._max_head)
        except (ValueError, asyncio.LimitOverrunError):
            return _text(431, "request head too large")
        if line is None:
            return None
        return answer(line, self._render, self._ready, self._live)


async def serve_health(
    port: int,
    render: Callable[[], str],
    ready: Callable[[], bool],
    live: Callable[[], bool] = _always,
) -> HealthServer | None:
    """Start the endpoints on `port` (-1: disabled, None); logs the bound port once.

    A port that is taken is a configuration problem: ConfigError naming --metrics_port.
    """
    if port < 0:
        logger.info("metrics and health endpoints disabled (--metrics_port=-1)")
        return None
    server = HealthServer(render, ready, live, port=port)
    try:
        bound = await server.start()
    except OSError as exc:
        raise ConfigError("metrics_port", f"cannot listen on {port}: {exc.strerror}") from None
    logger.info("metrics and health on port %d", bound)
    return server
