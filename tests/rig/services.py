"""Our console scripts (dicom-import, dicom-export) as subprocesses, ready when they answer."""

from __future__ import annotations

import json
import shutil
import signal as _signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.rig.dimse import echo
from tests.rig.lifecycle import Service
from tests.rig.poll import wait_until
from tests.rig.processes import (
    LOG_TAIL_CHARS,
    STARTUP_TIMEOUT,
    accepts_tcp,
    free_port,
    http_get,
    local_env,
    log_tail,
    raise_if_exited,
    stop_process,
)


def importer_binary() -> Path:
    """The `dicom-import` console script installed next to the running interpreter."""
    return Path(sys.executable).with_name("dicom-import")


class Importer(Service):
    """`dicom-import` as a subprocess on a free port, ready once it answers C-ECHO."""

    def __init__(
        self,
        dicomweb_address: str,
        *extra_args: str,
        aet: str = "IMPORTER",
        port: int | None = None,
        metrics_port: int | None = None,
        log_dir: Path | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        env: Mapping[str, str] | None = None,
        ready_by_http: bool = False,
    ) -> None:
        self.dicomweb_address = dicomweb_address
        self.extra_args = list(extra_args)
        self.aet = aet
        # /readyz instead of a plain C-ECHO (e.g. when the DIMSE port speaks only TLS)
        self.ready_by_http = ready_by_http
        self.port = port if port is not None else free_port()
        # Never the default 9090: tests and benchmarks run several importers at once.
        self.metrics_port = metrics_port if metrics_port is not None else free_port()
        while self.metrics_port == self.port:
            self.metrics_port = free_port()
        self._given_log_dir = log_dir
        self._own_dir: Path | None = None
        self.startup_timeout = startup_timeout
        self.extra_env = dict(env or {})
        self.log_path = Path()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def args(self) -> list[str]:
        """The full command line."""
        return [
            str(importer_binary()),
            f"--dimse_aet={self.aet}",
            f"--dimse_port={self.port}",
            f"--dicomweb_address={self.dicomweb_address}",
            f"--metrics_port={self.metrics_port}",
            *self.extra_args,
        ]

    @property
    def metrics_url(self) -> str:
        """Root of the metrics and health endpoints (`/metrics`, `/healthz`, `/readyz`)."""
        return f"http://127.0.0.1:{self.metrics_port}"

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Unlike `stop` (the log stays readable), leaving also removes the own log folder."""
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, 30.0)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def start(self) -> None:
        """Start the process and wait until it answers C-ECHO."""
        binary = importer_binary()
        if not binary.exists():
            raise FileNotFoundError(f"{binary} is missing: install the package (pip install -e .)")
        if self._given_log_dir is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="importer-rig-"))
            log_dir = self._own_dir
        else:
            log_dir = self._given_log_dir
            log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"importer-{self.port}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=local_env(self.extra_env),
            )
        try:
            self._wait_ready()
        except BaseException:
            stop_process(self.proc, 5.0)
            raise

    def _answers(self) -> bool:
        if not self.ready_by_http:
            return echo("127.0.0.1", self.port, self.aet, timeout=2.0)
        try:
            return http_get(self.metrics_url + "/readyz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait_ready(self) -> None:
        proc = self.proc
        assert proc is not None

        def answers() -> bool:
            raise_if_exited(proc, f"importer {self.args}", self.log_path)
            # TCP first: pynetdicom logs an error for every refused association attempt
            return accepts_tcp("127.0.0.1", self.port) and self._answers()

        wait_until(
            answers,
            self.startup_timeout,
            f"the importer to answer on port {self.port}",
            interval=0.2,
            detail=lambda: f"log tail:\n{self.log_text()[-LOG_TAIL_CHARS:]}",
        )

    def running(self) -> bool:
        """True while the process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, signal: int = _signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `signal` and return the exit code; kill and raise TimeoutError if it hangs."""
        if self.proc is None:
            raise RuntimeError("importer was never started")
        if self.proc.poll() is None:
            self.proc.send_signal(signal)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise TimeoutError(
                    f"importer did not exit within {timeout} s of signal {signal}; "
                    f"log tail:\n{self.log_text()[-LOG_TAIL_CHARS:]}"
                ) from None
        return self.proc.returncode

    def log_text(self) -> str:
        """Everything the process wrote to stdout/stderr so far."""
        return log_tail(self.log_path, chars=sys.maxsize)

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines (lines that are not JSON objects are skipped)."""
        return json_records(self.log_text())


# The integration suite's `start_importer` fixture (tests/integration/conftest.py).
StartImporter = Callable[..., Importer]


def json_records(text: str) -> list[dict[str, Any]]:
    """The lines of a log that are JSON objects (our services log one per line)."""
    records: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class LoggedProcess(Service):
    """A service as a subprocess logging to a file; ready once `ready` appears in its log.

    For services without a DIMSE port to probe (dicom-export, the export benchmark's
    baseline consumer).
    """

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        *,
        ready: str,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.ready = ready
        self.env = local_env(env)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process and wait until its log says it is ready."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env,
            )  # fmt: skip
        proc = self.proc

        def ready() -> bool:
            raise_if_exited(proc, self.args[0], self.log_path)
            return self.ready in self.log_text()

        try:
            wait_until(
                ready,
                self.startup_timeout,
                f"{self.args[0]} to log {self.ready!r}",
                detail=lambda: f"log tail:\n{self.log_text()[-LOG_TAIL_CHARS:]}",
            )
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (SIGKILL after `timeout`); the exit code, or None if it was not running."""
        proc, self.proc = self.proc, None
        return None if proc is None else stop_process(proc, timeout)

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        return log_tail(self.log_path, chars=sys.maxsize)

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines."""
        return json_records(self.log_text())
