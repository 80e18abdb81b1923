"""DCMTK tools: finding them outside the venv, running them, parsing dcmsend -d, storescp."""

from __future__ import annotations

import os
import signal as _signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.rig.dimse import echo
from tests.rig.lifecycle import Service
from tests.rig.pki import Pki
from tests.rig.poll import wait_until
from tests.rig.processes import STARTUP_TIMEOUT, free_port, local_env, raise_if_exited

DCMTK_TOOLS = ("dcmsend", "echoscu", "storescu")


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
    return local_env()


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


class StoreSCP(Service):
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

    def start(self) -> None:
        """Start storescp and wait until it answers C-ECHO."""
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
        proc = self.proc

        def answers() -> bool:
            raise_if_exited(proc, "storescp")
            return self._answers_echo()

        try:
            if self.probe:
                wait_until(answers, STARTUP_TIMEOUT, f"storescp to answer C-ECHO on {self.port}")
        except BaseException:
            self.stop()
            raise

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
