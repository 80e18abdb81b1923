"""Reusable test and benchmark rig: Orthanc, the importer subprocess, DCMTK tools, test data.

Plain helpers without pytest, so `bench/` scripts can import them as `from tests.rig import ...`.
Every server gets a free port and is polled for readiness; nothing sleeps to wait for a server.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal as _signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DCMTK_TOOLS = ("dcmsend", "echoscu", "storescu")

VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (C-ECHO)

STARTUP_TIMEOUT = 30.0
POLL_INTERVAL = 0.1
LOG_TAIL_CHARS = 4000


def free_port() -> int:
    """Return a TCP port that is free on all interfaces right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """Return the last `chars` characters of a log file (empty if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text[-chars:]


def _local_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: TCP_NODELAY on, loopback never proxied."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    for key in ("NO_PROXY", "no_proxy"):
        parts = [p for p in env.get(key, "").split(",") if p]
        for host in ("127.0.0.1", "localhost"):
            if host not in parts:
                parts.append(host)
        env[key] = ",".join(parts)
    if extra:
        env.update(extra)
    return env


def _accepts_tcp(host: str, port: int) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM a process, wait up to `timeout`, SIGKILL if needed; return its exit code."""
    if proc.poll() is None:
        proc.send_signal(_signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# --------------------------------------------------------------------------------------------
# Orthanc


class Orthanc:
    """Orthanc with the DICOMweb plugin on free ports, in its own temporary directory."""

    def __init__(
        self,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int] | list[str | int]] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        workdir: Path | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        self.aet = aet
        self.modalities = {name: list(v) for name, v in (modalities or {}).items()}
        self.extra_config = dict(extra_config or {})
        self._given_workdir = workdir
        self.startup_timeout = startup_timeout
        self.http_port = 0
        self.dicom_port = 0
        self.http_url = ""
        self.dicomweb_url = ""
        self.workdir = Path()
        self.log_path = Path()
        self.config_path = Path()
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    def config(self) -> dict[str, Any]:
        """The Orthanc configuration written to disk."""
        cfg: dict[str, Any] = {
            "Name": f"rig-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": self.modalities,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomCheckCalledAet": False,
            "StableAge": 1,
            "HttpTimeout": 60,
            "StorageCompression": False,
            "SaveJobs": False,
            "LogExportedResources": False,
        }
        cfg.update(self.extra_config)
        return cfg

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Write the config, start Orthanc and wait until `GET /system` answers 200."""
        for path in (ORTHANC_BINARY, DICOMWEB_PLUGIN):
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} is missing: install the Debian packages orthanc and orthanc-dicomweb"
                )
        if self._given_workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="orthanc-rig-"))
        else:
            self.workdir = self._given_workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = self.http_url + "/dicom-web"
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self.log_path = self.workdir / "orthanc.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(ORTHANC_BINARY), str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_local_env(),
                cwd=self.workdir,
            )
        self._client = httpx.Client(base_url=self.http_url, timeout=60.0, trust_env=False)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                if self.client.get("/system", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Orthanc did not answer GET /system within {self.startup_timeout} s; "
                    f"log tail:\n{_tail(self.log_path)}"
                )
            try:  # doubles as the poll interval and as death detection
                code = self.proc.wait(timeout=POLL_INTERVAL)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(
                f"Orthanc exited with code {code} during startup; log tail:\n{_tail(self.log_path)}"
            )

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate Orthanc and remove its temporary directory (unless one was given)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is not None:
            _stop_process(self.proc, timeout)
            self.proc = None
        if self._given_workdir is None and self.workdir != Path() and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def client(self) -> httpx.Client:
        """An httpx client with base URL `http_url` (no proxies)."""
        if self._client is None:
            raise RuntimeError("Orthanc is not running")
        return self._client

    def _get_json(self, path: str) -> Any:
        response = self.client.get(path)
        response.raise_for_status()
        return response.json()

    def instances(self) -> list[str]:
        """Orthanc ids of all stored instances."""
        ids: list[str] = self._get_json("/instances")
        return ids

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored Part-10 file, byte for byte."""
        response = self.client.get(f"/instances/{orthanc_id}/file")
        response.raise_for_status()
        return response.content

    def instance_dataset(self, orthanc_id: str) -> Dataset:
        """The stored Part-10 file, parsed by pydicom."""
        return dcmread(io.BytesIO(self.instance_file(orthanc_id)))

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """Main tags of an instance as `{keyword: value}` (Orthanc's simplified tags)."""
        tags: dict[str, Any] = self._get_json(f"/instances/{orthanc_id}/simplified-tags")
        return tags

    def transfer_syntax(self, orthanc_id: str) -> str:
        """Transfer syntax UID the instance is stored with."""
        response = self.client.get(f"/instances/{orthanc_id}/metadata/TransferSyntax")
        response.raise_for_status()
        return response.text.strip()

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc id of the instance with this SOP Instance UID, or None."""
        response = self.client.post("/tools/lookup", content=sop_instance_uid)
        response.raise_for_status()
        for item in response.json():
            if item.get("Type") == "Instance":
                found: str = item["ID"]
                return found
        return None

    def count_instances(self) -> int:
        """Number of stored instances."""
        count: int = self._get_json("/statistics")["CountInstances"]
        return count


# --------------------------------------------------------------------------------------------
# The importer under test


def importer_binary() -> Path:
    """The `dicom-import` console script installed next to the running interpreter."""
    return Path(sys.executable).with_name("dicom-import")


class Importer:
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

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _stop_process(self.proc, 30.0)
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
                env=_local_env(self.extra_env),
            )
        try:
            self._wait_ready()
        except BaseException:
            _stop_process(self.proc, 5.0)
            raise

    def _answers(self) -> bool:
        if not self.ready_by_http:
            return echo("127.0.0.1", self.port, self.aet, timeout=2.0)
        try:
            return http_get(self.metrics_url + "/readyz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            # TCP first: pynetdicom logs an error for every refused association attempt
            if (
                self.proc.poll() is None
                and _accepts_tcp("127.0.0.1", self.port)
                and self._answers()
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"importer did not answer C-ECHO on port {self.port} within "
                    f"{self.startup_timeout} s; log tail:\n{self.log_text()[-LOG_TAIL_CHARS:]}"
                )
            try:  # doubles as the poll interval and as death detection
                code = self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(
                f"importer exited with code {code} during startup; command: {self.args}; "
                f"log:\n{self.log_text()[-LOG_TAIL_CHARS:]}"
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
        return _tail(self.log_path, chars=sys.maxsize)

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines (lines that are not JSON objects are skipped)."""
        return json_records(self.log_text())


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


class LoggedProcess:
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
        self.env = _local_env(env)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env,
            )  # fmt: skip
        deadline = time.monotonic() + self.startup_timeout
        try:
            while self.ready not in self.log_text():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.args[0]} not ready:\n{self.log_text()[-4000:]}")
                try:  # doubles as the poll interval and as death detection
                    code = self.proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    continue
                raise RuntimeError(f"{self.args[0]} exited with {code}:\n{self.log_text()[-4000:]}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (SIGKILL after `timeout`); the exit code, or None if it was not running."""
        proc, self.proc = self.proc, None
        return None if proc is None else _stop_process(proc, timeout)

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        return _tail(self.log_path, chars=sys.maxsize)

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines."""
        return json_records(self.log_text())


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample name with labels: value}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def http_get(url: str, timeout: float = 10.0) -> httpx.Response:
    """GET without proxies (the metrics and health endpoints of a service under test)."""
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        return client.get(url)


def scrape_metrics(metrics_url: str) -> dict[str, float]:
    """The samples served at `<metrics_url>/metrics`."""
    response = http_get(metrics_url + "/metrics")
    response.raise_for_status()
    return parse_metrics(response.text)


# --------------------------------------------------------------------------------------------
# DCMTK and pynetdicom clients


def dcmtk_tool(name: str) -> str:
    """Absolute path of a DCMTK tool, skipping the venv (pynetdicom installs namesakes there)."""
    venv_bin = Path(sys.executable).parent.resolve()
    for entry in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if not entry or Path(entry).resolve() == venv_bin:
            continue
        candidate = Path(entry) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    fallback = Path("/usr/bin") / name
    if fallback.is_file():
        return str(fallback)
    raise FileNotFoundError(
        f"DCMTK tool {name!r} not found on PATH: install the Debian package dcmtk"
    )


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: the current one plus TCP_NODELAY=1."""
    return _local_env()


def run_dcmtk(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool (args[0] is its name or path), capturing text output."""
    tool = args[0] if os.sep in args[0] else dcmtk_tool(args[0])
    return subprocess.run(
        [tool, *args[1:]],
        env=dcmtk_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def dcmsend(
    host: str,
    port: int,
    aet: str,
    files_or_dirs: Iterable[Path | str],
    calling_aet: str = "DCMSEND",
    extra: Sequence[str] = (),
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """Send files (directories are scanned recursively) with DCMTK's dcmsend."""
    paths = [Path(p) for p in files_or_dirs]
    options = ["-aet", calling_aet, "-aec", aet]
    if any(p.is_dir() for p in paths):
        options += ["+sd", "+r"]
    return run_dcmtk(
        ["dcmsend", *options, *extra, host, str(port), *(str(p) for p in paths)], timeout
    )


def echo(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "ECHOSCU",
    timeout: float = 10.0,
) -> bool:
    """True if a C-ECHO with pynetdicom succeeds (association accepted, status 0x0000)."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0x0000
    finally:
        assoc.release()


def parse_dcmsend_debug(output: str) -> dict[str, int]:
    """Map SOP Instance UID -> DIMSE status of every C-STORE response in `dcmsend -d` output.

    Responses are matched to requests by message ID, so a response that omits the
    Affected SOP Instance UID still counts. Instances without a response are absent.
    """
    requests: dict[int, str] = {}
    statuses: dict[str, int] = {}
    block: str | None = None  # "RQ" or "RSP" while inside a dumped DIMSE message
    message_id: int | None = None
    uid: str | None = None
    for raw in output.splitlines():
        line = raw[3:] if raw[1:3] == ": " else raw
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "Message Type":
            block = "RQ" if value == "C-STORE RQ" else "RSP" if value == "C-STORE RSP" else None
            message_id, uid = None, None
        elif block is None:
            continue
        elif key in ("Message ID", "Message ID Being Responded To"):
            message_id = int(value)
        elif key == "Affected SOP Instance UID":
            uid = value
            if block == "RQ" and message_id is not None:
                requests[message_id] = value
        elif key == "DIMSE Status" and block == "RSP":
            status = int(value.split(":")[0], 16)
            target = requests.get(message_id, uid) if message_id is not None else uid
            if target is not None:
                statuses[target] = status
            block = None
    return statuses


def send_file(
    host: str,
    port: int,
    called_aet: str,
    path: Path,
    calling_aet: str = "STORESCU",
    timeout: float = 60.0,
) -> int | None:
    """C-STORE one Part-10 file with pynetdicom, its bytes sent as they are in the file.

    The SOP Class, SOP Instance and transfer syntax UIDs come from the file meta, so the
    dataset itself may lack them. One presentation context is proposed, with only the file's
    transfer syntax. Flips pynetdicom's global STORE_SEND_CHUNKED_DATASET for the call, so
    do not run it from several threads at once. Returns the response status, or None when no
    response arrived (the association was aborted or timed out). Raises ConnectionError if
    the association is not accepted.
    """
    meta = read_file_meta_info(path)
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        raise ConnectionError(f"association with {called_aet}@{host}:{port} not accepted")
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, no decode/re-encode
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if status and "Status" in status else None


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        data += chunk
    return data


def _c_store_command(sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ command set, implicit VR little endian, with its group length."""
    elements = b""
    for element, value in (
        (0x0002, _uid_bytes(sop_class_uid)),  # Affected SOP Class UID
        (0x0100, struct.pack("<H", 0x0001)),  # Command Field: C-STORE-RQ
        (0x0110, struct.pack("<H", 1)),  # Message ID
        (0x0700, struct.pack("<H", 0)),  # Priority: medium
        (0x0800, struct.pack("<H", 0x0000)),  # Command Data Set Type: a data set follows
        (0x1000, _uid_bytes(sop_instance_uid)),  # Affected SOP Instance UID
    ):
        elements += struct.pack("<HHI", 0x0000, element, len(value)) + value
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(elements)) + elements


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def interrupt_c_store(
    host: str,
    port: int,
    called_aet: str,
    path: Path,
    send_bytes: int,
    abort: bool = True,
    calling_aet: str = "INTERRUPT",
    timeout: float = 30.0,
) -> None:
    """Start a C-STORE of a Part-10 file over a raw socket, then stop after `send_bytes`.

    Speaks just enough of the DICOM upper layer to get an association (one presentation
    context: the file's SOP class and transfer syntax), sends the command and the first
    `send_bytes` of the data set, then sends an A-ABORT (`abort=True`) or simply closes the
    connection, as a crashed sender would. Deterministic, unlike aborting a pynetdicom
    association from another thread mid-send.
    """
    meta = read_file_meta_info(path)
    context_id = 1
    presentation_context = _item(
        0x20,
        struct.pack(">BBBB", context_id, 0, 0, 0)
        + _item(0x30, str(meta.MediaStorageSOPClassUID).encode("ascii"))
        + _item(0x40, str(meta.TransferSyntaxUID).encode("ascii")),
    )
    user_information = _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    associate_rq = _pdu(
        0x01,
        struct.pack(">HH", 1, 0)
        + called_aet.encode("ascii").ljust(16)
        + calling_aet.encode("ascii").ljust(16)
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + presentation_context
        + user_information,
    )
    max_pdv = 16000  # fits pynetdicom's default maximum PDU (16382) and most others

    def p_data(payload: bytes, control: int) -> bytes:
        pdv = struct.pack(">IBB", len(payload) + 2, context_id, control) + payload
        return _pdu(0x04, pdv)

    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(associate_rq)
        pdu_type, _, length = struct.unpack(">BBI", _recv_exactly(sock, 6))
        body = _recv_exactly(sock, length)
        if pdu_type != 0x02:
            raise ConnectionError(f"association not accepted (PDU type {pdu_type:#04x})")
        # The single presentation context item in the A-ASSOCIATE-AC: result byte at offset 2
        offset = 68
        while offset < len(body):
            item_type, _, item_length = struct.unpack(">BBH", body[offset : offset + 4])
            if item_type == 0x21 and body[offset + 6] != 0:
                raise ConnectionError("presentation context rejected")
            offset += 4 + item_length
        sock.sendall(
            p_data(
                _c_store_command(meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID),
                0x03,
            )
        )
        with path.open("rb") as fh:
            fh.seek(split_dataset(path)[1])  # skip preamble and file meta
            remaining = send_bytes
            while remaining > 0:
                chunk = fh.read(min(max_pdv, remaining))
                if not chunk:
                    break
                sock.sendall(p_data(chunk, 0x00))  # data set fragment, not the last one
                remaining -= len(chunk)
        if abort:
            sock.sendall(_pdu(0x07, bytes(4)))  # A-ABORT, source: service user


# --------------------------------------------------------------------------------------------
# Test data


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def generate_ct_series(
    dest_dir: Path,
    count: int,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    patient_id: str = "PAT1",
    study_uid: str | None = None,
) -> list[Path]:
    """Write `count` CT instances (one new series) with random 12-bit pixels; return the paths."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_of_reference_uid = generate_uid()
    paths: list[Path] = []
    for index in range(count):
        sop_instance_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = _file_meta(CTImageStorage, sop_instance_uid)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_instance_uid
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "dicom-adapter tests"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "rig CT study"
        ds.SeriesDescription = f"rig CT series seed {seed}"
        ds.PatientName = f"Rig^{patient_id}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.SliceThickness = "1.0"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(index)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = float(index)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [0.5, 0.5]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        pixels = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16)
        ds.PixelData = pixels.astype("<u2").tobytes()
        path = dest_dir / f"ct_{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


LARGE_FRAME_ROWS = 1024
LARGE_FRAME_COLS = 1024
CHUNK_BYTES = 8 * 1024 * 1024


def write_large_instance(path: Path, size_bytes: int, seed: int = 0) -> str:
    """Write an 8-bit multi-frame Secondary Capture with ~`size_bytes` of pixel data, streamed.

    The pixel data is never held in memory: the header is written by pydicom, then the
    (7FE0,0010) element header and the pixel bytes are appended in 8 MB chunks.
    Returns the SOP Instance UID.
    """
    frame_bytes = LARGE_FRAME_ROWS * LARGE_FRAME_COLS
    frames = max(1, round(size_bytes / frame_bytes))
    pixel_length = frames * frame_bytes  # even, fits the 32-bit length below
    if pixel_length >= 0xFFFFFFFF:
        raise ValueError(f"{size_bytes} bytes do not fit a single explicit-length element")
    sop_class_uid = MultiFrameGrayscaleByteSecondaryCaptureImageStorage
    sop_instance_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class_uid, sop_instance_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.PatientName = "Rig^Large"
    ds.PatientID = "LARGE"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = "40"
    ds.Rows = LARGE_FRAME_ROWS
    ds.Columns = LARGE_FRAME_COLS
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.save_as(path, enforce_file_format=True)

    chunk = np.random.default_rng(seed).integers(0, 256, size=CHUNK_BYTES, dtype=np.uint8)
    chunk_bytes = chunk.tobytes()
    with path.open("ab") as fh:
        # Explicit VR little endian: tag group, element, VR "OB", 2 reserved bytes, 32-bit length
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, pixel_length))
        remaining = pixel_length
        while remaining > 0:
            n = min(remaining, CHUNK_BYTES)
            fh.write(chunk_bytes[:n] if n < CHUNK_BYTES else chunk_bytes)
            remaining -= n
    return sop_instance_uid


class StoreSCP:
    """DCMTK storescp on a free port writing every received instance into `folder`.

    `accept="all"` takes every transfer syntax (`+xa`), `"implicit"` only Implicit VR Little
    Endian (`+xi`, a receiver that refuses compressed data). `fork` serves associations in
    parallel (`--fork`). Readiness is a polled C-ECHO unless `probe` is False (storescp
    without --fork serves one association at a time).
    """

    def __init__(
        self,
        folder: Path,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        accept: str = "all",
        fork: bool = False,
        probe: bool = True,
        options: Sequence[str] = (),
        tls: Pki | None = None,
    ) -> None:
        self.options = list(options)  # more storescp options, e.g. --abort-after
        self.tls = tls  # DICOM TLS with the PKI's server certificate; clients must show theirs
        self.folder = folder
        self.aet = aet
        self.port = port or free_port()
        self.accept = accept
        self.fork = fork
        self.probe = probe
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [dcmtk_tool("storescp"), *(["--fork"] if self.fork else []), "-aet", self.aet]
        args += ["+xa" if self.accept == "all" else "+xi", "-od", str(self.folder), *self.options]
        if self.tls is not None:
            pki = self.tls
            args += ["+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca)]
        self.proc = subprocess.Popen(
            [*args, str(self.port)],
            env=dcmtk_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # forked children share the group: stop() ends them all
        )
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while self.probe and not self._answers_echo():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"storescp exited with code {self.proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError("storescp did not answer C-ECHO")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _answers_echo(self) -> bool:
        if self.tls is None:
            return echo("127.0.0.1", self.port, self.aet, timeout=2.0)
        pki = self.tls
        args = ["echoscu", "-to", "2", "-aec", self.aet, "+tls", str(pki.client_key)]
        args += [str(pki.client_cert), "+cf", str(pki.ca), "127.0.0.1", str(self.port)]
        return run_dcmtk(args, timeout=10).returncode == 0

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, _signal.SIGTERM)
            proc.wait(10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, _signal.SIGKILL)
            proc.wait()

    def files(self) -> list[Path]:
        """Received files, sorted by name."""
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def count(self) -> int:
        """How many instances arrived."""
        return len(self.files())

    def received(self) -> list[Dataset]:
        """Every received instance, parsed."""
        return [dcmread(p) for p in self.files()]

    def received_uids(self) -> set[str]:
        """SOP Instance UIDs of the complete files (storescp names them <modality>.<uid>)."""
        return {p.name.split(".", 1)[1] for p in self.files()}

    def clear(self) -> None:
        """Forget what arrived so far."""
        for p in self.files():
            p.unlink()


def part10_bytes(sop_class: str, uid: str, syntax: str, payload: bytes = b"pixels") -> bytes:
    """A Part-10 file: a real meta group, then one (0010,0020) element as its data set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(uid)
    meta.TransferSyntaxUID = UID(syntax)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_file_meta_info(out, meta, enforce_standard=True)
    value = payload + b" " * (len(payload) % 2)
    element = struct.pack("<HH2sH", 0x0010, 0x0020, b"LO", len(value)) + value
    return b"\0" * 128 + b"DICM" + out.getvalue() + element


def store_jpeg_instance(orthanc: Orthanc, folder: Path, patient_id: str) -> Dataset:
    """pydicom's bundled JPEG baseline image, with fresh UIDs, stored in Orthanc as JPEG.

    For the paths that must fall back to an uncompressed syntax when a peer refuses JPEG.
    """
    source = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    assert source is not None, "pydicom's bundled JPEG baseline file is missing"
    ds = dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = patient_id
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "jpeg.dcm")
    sent = dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, [folder], extra=["-dn"])
    assert sent.returncode == 0, sent.stderr
    stored = orthanc.find_instance(str(ds.SOPInstanceUID))
    assert stored is not None
    assert orthanc.transfer_syntax(stored) == ds.file_meta.TransferSyntaxUID  # still JPEG
    return ds


@dataclass(frozen=True)
class ProcStatus:
    """What /proc says about a running process: memory, threads, open files, CPU used so far."""

    rss_kib: int  # VmRSS
    peak_rss_kib: int  # VmHWM: the high-water mark of the whole process life
    threads: int
    fds: int
    cpu_seconds: float  # user + system, all threads


def proc_status(pid: int) -> ProcStatus:
    """One reading of /proc/<pid>/{status,stat,fd}, the only place tests and benches parse them."""
    status: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            status[key] = int(value.split()[0])
    # after "(comm)", which may itself contain spaces and parentheses
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return ProcStatus(
        rss_kib=status["VmRSS"],
        peak_rss_kib=status["VmHWM"],
        threads=status["Threads"],
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        cpu_seconds=(int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"),
    )


def c_find(port: int, aet: str, sop_class: str, identifier: Dataset) -> list[Dataset]:
    """Every pending C-FIND answer of one query; fails unless the final status is success."""
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    assert assoc.is_established
    answers: list[Dataset] = []
    try:
        for status, answer in assoc.send_c_find(identifier, sop_class):
            assert status, "no C-FIND response"
            if status.Status == 0xFF00:  # pending: one more match
                assert answer is not None
                answers.append(answer)
            else:
                assert status.Status == 0x0000, f"final status 0x{status.Status:04X}"
    finally:
        assoc.release()
    return answers


@dataclass(frozen=True)
class Pki:
    """A test CA, a server certificate (localhost, 127.0.0.1), a client one, and a stranger."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # self-signed: not from the CA
    stranger_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _issue(folder: Path, name: str, subject: str, ca: tuple[Path, Path], san: str) -> None:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", subject,
    )  # fmt: skip
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip


def make_pki(folder: Path) -> Pki:
    """Create the certificates with the openssl command line in `folder`."""
    d = folder
    d.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"),
        "-out", str(d / "ca.crt"), "-days", "2", "-subj", "/CN=dicom-adapter test CA",
    )  # fmt: skip
    ca = (d / "ca.crt", d / "ca.key")
    _issue(d, "server", "/CN=localhost", ca, "IP:127.0.0.1,DNS:localhost")
    _issue(d, "client", "/CN=MODALITY", ca, "DNS:modality.test")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "stranger.key"),
        "-out", str(d / "stranger.crt"), "-days", "2", "-subj", "/CN=stranger",
    )  # fmt: skip
    return Pki(
        ca=d / "ca.crt",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        stranger_cert=d / "stranger.crt",
        stranger_key=d / "stranger.key",
    )
