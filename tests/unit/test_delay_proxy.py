"""The benches' lean delaying proxy (tests/rig/delay_proxy.py) relays requests and answers
byte for byte, on keep-alive connections, one delay per request."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from tests.rig.delay_proxy import DelayProxy

DELAY = 0.05


class _Echo(BaseHTTPRequestHandler):
    """Answers a POST with the body's SHA-256 (Content-Length framed) and a GET with the path
    repeated 10 000 times, chunked in pieces of 7 000 bytes."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = hashlib.sha256(body).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def do_GET(self) -> None:
        payload = self.path.encode() * 10_000
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(payload), 7000):
            piece = payload[start : start + 7000]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_bodies_and_answers_cross_whole_on_one_connection(upstream_port: int) -> None:
    bodies = [bytes(range(256)) * 12_289, b"", b"x" * 70_001]  # 3 MiB (not pipe-aligned), ...
    proxy = DelayProxy("127.0.0.1", upstream_port, delay=DELAY)
    with proxy, httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as client:
        for body in bodies:
            started = time.monotonic()
            response = client.post("/stow", content=body)
            assert time.monotonic() - started >= DELAY
            assert response.text == hashlib.sha256(body).hexdigest()
        chunked = client.get("/wado/abc")
        assert chunked.content == b"/wado/abc" * 10_000
    assert (proxy.connections, proxy.requests) == (1, 4)
    assert proxy.cpu_seconds() > 0


def test_close_each_answers_connection_close_and_charges_the_handshake(
    upstream_port: int,
) -> None:
    proxy = DelayProxy("127.0.0.1", upstream_port, delay=DELAY, close_each=True)
    with proxy, httpx.Client(base_url=proxy.url, trust_env=False, timeout=10) as client:
        for _ in range(2):
            started = time.monotonic()
            response = client.post("/stow", content=b"instance")
            assert time.monotonic() - started >= 2 * DELAY
            assert response.headers["connection"] == "close"
            assert response.text == hashlib.sha256(b"instance").hexdigest()
    assert (proxy.connections, proxy.requests) == (2, 2)
