"""gcp-storage-emulator as a subprocess on a free port, in memory, with one bucket.

Quirks seen with gcp-storage-emulator 2026.7 (against real Cloud Storage):
- one thread, HTTP/1.0: requests are served one at a time, each on a new connection;
- preconditions (ifGenerationMatch=0) are ignored: a second write replaces the object;
- listing, ranged reads, copyTo, delete of a missing object (404) behave as in Cloud Storage.
Clients reach it through STORAGE_EMULATOR_HOST (the adapter) or an api_endpoint (the tests).
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from tests.rig import free_port, raise_if_exited, wait_until
from tests.rig.lifecycle import Service

STARTUP_TIMEOUT = 20.0


def emulator_binary() -> Path:
    """The `gcp-storage-emulator` console script installed next to the running interpreter."""
    return Path(sys.executable).with_name("gcp-storage-emulator")


class StorageEmulator(Service):
    """The emulator, ready once its bucket answers; `env` points the adapter at it."""

    def __init__(self, bucket: str = "spool-bucket", log_dir: Path | None = None) -> None:
        self.bucket = bucket
        self.port = free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a dicom-import or dicom-spool subprocess needs to use the emulator."""
        return {"STORAGE_EMULATOR_HOST": self.host}

    def start(self) -> None:
        """Start it and poll until the bucket exists."""
        log: int | IO[bytes] = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._log = log = (self.log_dir / f"gcs-emulator-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                str(emulator_binary()),
                "start",
                "--host=127.0.0.1",
                f"--port={self.port}",
                "--in-memory",
                f"--default-bucket={self.bucket}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"{self.host}/storage/v1/b/{self.bucket}"
        proc = self.proc

        def answers() -> bool:
            raise_if_exited(proc, "gcp-storage-emulator")
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    return bool(answer.status == 200)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        try:
            wait_until(answers, STARTUP_TIMEOUT, f"gcp-storage-emulator to serve {url}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def client(self) -> Any:
        """A google-cloud-storage bucket handle for the test process (no env change)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud.storage import Client

        client = Client(
            project="test",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": self.host},
        )
        return client.bucket(self.bucket)

    def names(self, prefix: str) -> list[str]:
        """Object names under a prefix, sorted."""
        return sorted(blob.name for blob in self.client().list_blobs(prefix=prefix))
