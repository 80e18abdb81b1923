"""C-STORE against a DICOMweb server that hangs: retried, answered 0xA700 before the deadline."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rig import Importer, generate_ct_series, importer_binary, send_file

HOST = "127.0.0.1"


class HungServer:
    """An HTTP server that accepts every connection, reads the request and never answers."""

    def __init__(self) -> None:
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections.append(conn)  # held open, never answered

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def hung_server() -> Iterator[HungServer]:
    server = HungServer()
    yield server
    server.close()


def test_hung_stow_is_retried_and_answered_before_the_deadline(
    hung_server: HungServer, tmp_path: Path
) -> None:
    """Attempt 1 ends at the HTTP timeout, attempt 2 is cut at the retry deadline: 0xA700 in
    time, where a second full HTTP timeout (1.5 s) would have run past the answer deadline."""
    (instance,) = generate_ct_series(tmp_path / "in", 1, rows=8, cols=8)
    flags = ("--http_timeout=1.5", "--upstream_retry_deadline=2", "--cstore_answer_deadline=3")
    with Importer(f"http://{HOST}:{hung_server.port}/dicom-web", *flags, log_dir=tmp_path) as imp:
        started = time.monotonic()
        status = send_file(HOST, imp.port, imp.aet, instance, timeout=10)
        elapsed = time.monotonic() - started
    assert status == 0xA700
    assert elapsed < 3.0, f"answered after {elapsed:.2f} s, past the 3 s answer deadline"
    assert len(hung_server.connections) == 2, "the hung request was not retried once"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--http_timeout=60", "--upstream_retry_deadline=30"], "--http_timeout (60)"),
        (["--upstream_retry_deadline=30"], "--cstore_answer_deadline (25)"),
        (["--cstore_answer_deadline=20", "--upstream_retry_deadline=20"], "(20) < "),
    ],
)
def test_timeouts_that_do_not_nest_are_refused(flags: list[str], named: str) -> None:
    """Exit 2 and one line naming the three flags."""
    done = subprocess.run(
        [
            str(importer_binary()),
            "--dimse_aet=IMPORTER",
            "--dicomweb_address=http://127.0.0.1:1/dicom-web",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for flag in ("--http_timeout", "--upstream_retry_deadline", "--cstore_answer_deadline"):
        assert flag in lines[0]
    assert named in lines[0]
