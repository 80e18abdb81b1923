"""A tiny STOW-RS server on a free port: lets tests drive the production HTTP transport
(dicomweb/transport.py) over real sockets instead of httpx.MockTransport."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

from tests.rig.lifecycle import Service

Framing = Literal["length", "chunked", "close"]  # how a response body's end is marked


@dataclass(frozen=True)
class StowRequest:
    """One request as the server read it off the wire."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    peer: tuple[str, int]  # the client's address: one per TCP connection


Responder = Callable[[StowRequest], tuple[int, bytes]]  # -> (status, application/dicom+json)


class StowServer(Service):
    """HTTP/1.1 with keep-alive on 127.0.0.1; answers each request with `respond`, its body
    framed by Content-Length, chunked transfer coding, or the connection's close."""

    def __init__(self, respond: Responder, framing: Framing = "length") -> None:
        self.respond = respond
        self.framing = framing
        self.requests: list[StowRequest] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))  # listens now
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The DICOMweb root to give as --dicomweb_address."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/dicom-web"

    def start(self) -> None:
        """Serve on its thread."""
        self._thread.start()

    def stop(self) -> None:
        """Shut the server down and join its thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _handler(server: StowServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive unless the framing closes

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the test asserts what it needs."""

        def do_POST(self) -> None:
            request = StowRequest(
                method="POST",
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=self._body(),
                peer=self.client_address,
            )
            server.requests.append(request)
            status, body = server.respond(request)
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            if server.framing == "length":
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif server.framing == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                half = len(body) // 2
                for piece in (body[:half], body[half:], b""):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:  # the body ends where the connection does
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True
            self.wfile.flush()

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()  # the CRLF after the chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return body

    return Handler
