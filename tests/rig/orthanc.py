"""Orthanc with the DICOMweb plugin on free ports, and what tests read back from it."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.rig.dcmtk import dcmsend
from tests.rig.lifecycle import Service
from tests.rig.poll import wait_until
from tests.rig.processes import (
    POLL_INTERVAL,
    STARTUP_TIMEOUT,
    free_port,
    local_env,
    log_tail,
    raise_if_exited,
    stop_process,
)

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc(Service):
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
        self._launch("wb")
        self._client = httpx.Client(base_url=self.http_url, timeout=60.0, trust_env=False)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _launch(self, log_mode: str) -> None:
        """Start the Orthanc process on this configuration, its output into the log."""
        with self.log_path.open(log_mode) as log:
            self.proc = subprocess.Popen(
                [str(ORTHANC_BINARY), str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=local_env(),  # TCP_NODELAY=1, loopback never proxied
                cwd=self.workdir,
            )

    def _wait_ready(self) -> None:
        proc = self.proc
        assert proc is not None

        def answers() -> bool:
            raise_if_exited(proc, "Orthanc", self.log_path)
            try:
                return self.client.get("/system", timeout=2.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(
            answers,
            self.startup_timeout,
            "Orthanc to answer GET /system",
            interval=POLL_INTERVAL,
            detail=lambda: f"log tail:\n{log_tail(self.log_path)}",
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate Orthanc and remove its temporary directory (unless one was given)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is not None:
            stop_process(self.proc, timeout)
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
