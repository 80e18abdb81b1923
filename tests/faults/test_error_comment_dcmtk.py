"""What the operator sees in DCMTK's debug output when the upstream refuses us (issue 11.3).

dicom-import runs as a subprocess against a tiny HTTP server that answers every request with
Google's 403 body; `dcmsend -d`, `findscu -d` and `movescu -d` must print the ErrorComment.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.rig import Importer, free_port, generate_ct_series, parse_dcmsend_debug, run_dcmtk

SCOPES = "Request had insufficient authentication scopes."
SHOWN = "Http_403, PERMISSION_DENIED, Request had insufficient authentica"


class _Forbidden(BaseHTTPRequestHandler):
    """Google's answer to a token without the cloud-healthcare scope, for every request."""

    body = json.dumps({"error": {"code": 403, "message": SCOPES, "status": "PERMISSION_DENIED"}})

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        payload = self.body.encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


def error_comments(output: str) -> list[str]:
    """ErrorComment values DCMTK printed, from its status detail lines:
    `D: (0000,0902) LO [Http_403, ...]   #  64, 1 ErrorComment`."""
    return [
        line.split("[", 1)[1].rsplit("]", 1)[0]
        for line in output.splitlines()
        if "(0000,0902)" in line and "[" in line
    ]


@pytest.fixture(scope="module")
def importer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Importer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    logs = tmp_path_factory.mktemp("logs")
    try:
        destination = [{"name": "MOVESCU", "host": "127.0.0.1", "port": free_port()}]
        flags = ("--log_format=text", f"--aet_dictionary_inline={json.dumps(destination)}")
        with Importer(address, *flags, log_dir=logs) as running:
            yield running
    finally:
        server.shutdown()
        server.server_close()


def test_dcmsend_debug_shows_the_error_comment(importer: Importer, tmp_path: Path) -> None:
    (path,) = generate_ct_series(tmp_path, 1, rows=8, cols=8)

    result = run_dcmtk(
        ["dcmsend", "-d", "-aec", importer.aet, "127.0.0.1", str(importer.port), str(path)], 60
    )

    output = result.stdout + result.stderr
    assert list(parse_dcmsend_debug(output).values()) == [0x0124]
    assert error_comments(output) == [SHOWN], output


def test_findscu_debug_shows_the_error_comment(importer: Importer) -> None:
    result = run_dcmtk(
        [
            "findscu",
            "-d",
            "-S",
            "-aec",
            importer.aet,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
            "127.0.0.1",
            str(importer.port),
        ],
        60,
    )

    output = result.stdout + result.stderr
    assert "DIMSE Status                  : 0x0124" in output
    assert error_comments(output) == [SHOWN], output


def test_movescu_debug_shows_the_error_comment(importer: Importer) -> None:
    result = run_dcmtk(
        [
            "movescu", "-d", "-S", "-aec", importer.aet, "-aem", "MOVESCU",
            "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3.4",
            "127.0.0.1", str(importer.port),
        ],
        60,
    )  # fmt: skip

    output = result.stdout + result.stderr
    assert "DIMSE Status                  : 0x0124" in output
    assert error_comments(output) == [SHOWN], output
