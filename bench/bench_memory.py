"""Benchmark: peak RSS of the adapter moving ONE large instance, for a sweep of sizes (issue 12).

Each size is one generated 8-bit multi-frame Secondary Capture written to disk in chunks
(never held in memory by this script), moved once along each path, each with a fresh
process. Peak RSS is VmHWM from /proc, reset (clear_refs) once the process is ready, so it is
the high-water mark of the transfer; the start-up peak (import time, before any instance) is
reported beside it:
  cstore: dcmsend -> dicom-import (synchronous) -> a local STOW-RS sink (this script, a thread)
          that reads the request body in 1 MiB pieces, discards it, counts its bytes and
          answers a DICOM JSON STOW response naming the instance. Orthanc is NOT the upstream
          here: it holds a whole STOW-RS body in memory (GBs), so it would measure Orthanc.
          Target <= 100 MB at 4 GB.
  cstore_spool: the same with the durable spool and --auto_ack_cstore (the instance is
          written to the spool, answered, then uploaded), until the sink has the whole body.
  cmove:  C-MOVE (pynetdicom SCU) through dicom-import, whose WADO-RS source is Orthanc
          (loaded with dcmsend), to a DCMTK storescp writing to disk; the received file must
          have the original size. Target <= 150 MB at 2 GB.
  export: dicom-export, pulling one message from the in-process Pub/Sub test server, fetching
          the instance from Orthanc with WADO-RS and delivering it to storescp; the message
          must be acked and the file received whole. Target <= 150 MB at 2 GB.

Orthanc builds a whole WADO-RS answer in memory before its first byte (about 3 x the instance
size, and more than the default 10 s --http_timeout at 2 GB on a shared 2-core machine), so the
paths through Orthanc run with longer HTTP timeouts (SLOW_SOURCE; memory is not affected) and
are skipped for sizes above `--orthanc-max-mb`.
Files are deleted after each size.

Usage: python bench/bench_memory.py [--sizes 64,256,1024] [--paths cstore,cmove,export]
                                    [--orthanc-max-mb 2048] [--json PATH]
  targets: python bench/bench_memory.py --sizes 4000 --paths cstore
           python bench/bench_memory.py --sizes 2000 --paths cmove,export
"""

from __future__ import annotations

import argparse
import http.server
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pubsub_server import PubSubServer
from tests.rig import (
    Importer,
    LoggedProcess,
    Orthanc,
    StoreSCP,
    dcmsend,
    proc_status,
    write_large_instance,
)
from tests.rig.dimse import study_move
from tests.rig.poll import wait_until

PATHS = ("cstore", "cstore_spool", "cmove", "export")
SPOOL_FLAGS = ("--auto_ack_cstore", "--persistent_file_upload_retry_amount=5")
TARGET_MB = {
    "cstore": (4000, 100.0),
    "cstore_spool": (4000, 100.0),
    "cmove": (2000, 150.0),
    "export": (2000, 150.0),
}
DEST_AET = "MEMDEST"
PROJECT = "bench-project"
TIMEOUT = 1800.0
POLL = 0.05
# Orthanc answers a 2 GB WADO-RS request after tens of seconds: wait for it.
SLOW_SOURCE = ("--http_timeout=300", "--upstream_retry_deadline=600")
PIECE = 1 << 20


# --------------------------------------------------------------------------------------------
# A STOW-RS sink that keeps nothing


class _SinkHandler(http.server.BaseHTTPRequestHandler):
    """Reads every request body piecewise and discards it; STOW answers name `sink.uid`."""

    protocol_version = "HTTP/1.1"
    server: _SinkServer

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: one line per request would only slow the sink down."""

    def _discard_body(self) -> int:
        received = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := int(self.rfile.readline().split(b";")[0], 16):
                remaining = size
                while remaining:
                    remaining -= len(self.rfile.read(min(PIECE, remaining)))
                received += size
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            return received
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            piece = self.rfile.read(min(PIECE, remaining))
            if not piece:
                raise ConnectionError("request body cut short")
            remaining -= len(piece)
            received += len(piece)
        return received

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(200, b"[]")  # the startup probe (`/studies?limit=1`) and any QIDO

    def do_POST(self) -> None:
        received = self._discard_body()
        with self.server.lock:
            self.server.received += received
        item = {"00081155": {"vr": "UI", "Value": [self.server.uid]}}
        answer = {"00081199": {"vr": "SQ", "Value": [item]}}
        self._answer(200, json.dumps(answer).encode())


class _SinkServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SinkHandler)
        self.lock = threading.Lock()
        self.received = 0
        self.uid = ""


class StowSink:
    """`with StowSink() as sink:` serves STOW-RS on `sink.url`; `sink.received` bytes so far."""

    def __init__(self) -> None:
        self._server = _SinkServer()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/dicom-web"

    @property
    def received(self) -> int:
        with self._server.lock:
            return self._server.received

    def expect(self, uid: str) -> None:
        """Name `uid` as stored in every STOW answer from now on."""
        self._server.uid = uid

    def __enter__(self) -> StowSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# --------------------------------------------------------------------------------------------
# The three paths


def peak_mb(pid: int) -> float:
    return proc_status(pid).peak_rss_kib / 1024


def reset_peak(pid: int) -> dict[str, float]:
    """The start-up peak and current RSS, then VmHWM reset to VmRSS (Linux clear_refs 5).

    Import time alone peaks near 100 MB (pydicom's dictionaries, the codec plugins), before
    any instance arrives; the reset makes `peak_rss_mb` the high-water mark of the transfer.
    """
    before = proc_status(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return {"startup_peak_mb": before.peak_rss_kib / 1024, "idle_mb": before.rss_kib / 1024}


def measure_cstore(big: Path, uid: str, spool: Path | None = None) -> dict[str, float]:
    """dicom-import receiving `big` by C-STORE and posting it to the discarding sink.

    With `spool`: through the durable spool with --auto_ack_cstore, until the upload is done.
    """
    size = big.stat().st_size
    flags = [] if spool is None else [*SPOOL_FLAGS, f"--persistent_file_storage_location={spool}"]
    with StowSink() as sink, Importer(sink.url, *flags) as importer:
        assert importer.proc is not None
        sink.expect(uid)
        idle = reset_peak(importer.proc.pid)
        started = time.perf_counter()
        result = dcmsend("127.0.0.1", importer.port, importer.aet, [big.parent], timeout=TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError(f"dcmsend failed ({result.returncode}): {result.stderr[-2000:]}")
        # synchronous: already there; spool: until the upload is done
        wait_until(
            lambda: sink.received >= size,
            TIMEOUT,
            "the whole body at the STOW-RS sink",
            detail=lambda: f"{sink.received} of {size} bytes",
        )
        seconds = time.perf_counter() - started
        return {"peak_rss_mb": peak_mb(importer.proc.pid), "seconds": seconds, **idle}


def c_move(port: int, aet: str, study_uid: str) -> None:
    """One STUDY-level C-MOVE to DEST_AET; fails unless it ends in Success with 1 completed."""
    study_move(port, aet, study_uid, DEST_AET, 1, TIMEOUT)


def received_whole(scp: StoreSCP, size: int) -> None:
    """storescp holds one file of about `size` bytes (its own meta header may differ)."""
    files = scp.files()
    if len(files) != 1 or abs(files[0].stat().st_size - size) > 4096:
        raise RuntimeError(f"storescp holds {[f.stat().st_size for f in files]}, not {size} bytes")


def measure_cmove(orthanc: Orthanc, big: Path, study_uid: str, work: Path) -> dict[str, float]:
    """dicom-import serving a C-MOVE of the one instance from Orthanc to storescp."""
    with StoreSCP(work / "move-scp", aet=DEST_AET) as scp:
        aets = json.dumps([{"name": DEST_AET, "host": "127.0.0.1", "port": scp.port}])
        flags = (f"--aet_dictionary_inline={aets}", *SLOW_SOURCE, "--cstore_answer_deadline=900")
        with Importer(orthanc.dicomweb_url, *flags) as importer:
            assert importer.proc is not None
            idle = reset_peak(importer.proc.pid)
            started = time.perf_counter()
            c_move(importer.port, importer.aet, study_uid)
            seconds = time.perf_counter() - started
            peak = peak_mb(importer.proc.pid)
        received_whole(scp, big.stat().st_size)
        scp.clear()
    return {"peak_rss_mb": peak, "seconds": seconds, **idle}


def measure_export(
    orthanc: Orthanc, server: PubSubServer, big: Path, path: str, work: Path
) -> dict[str, float]:
    """dicom-export delivering the one instance (one Pub/Sub message) from Orthanc to storescp."""
    name = f"memory-{time.monotonic_ns()}"
    topic = f"projects/{PROJECT}/topics/{name}"
    sub = f"projects/{PROJECT}/subscriptions/{name}"
    server.create_topic(topic)
    server.create_subscription(sub, topic, ack_deadline=600)
    with StoreSCP(work / "export-scp", aet=DEST_AET) as scp:
        command = [
            str(Path(sys.executable).with_name("dicom-export")),
            f"--dicomweb_addr={orthanc.dicomweb_url}",
            f"--project_id={PROJECT}",
            f"--subscription_id={name}",
            "--log_format=json",
            f"--peer_dimse_aet={DEST_AET}",
            "--peer_dimse_ip=127.0.0.1",
            f"--peer_dimse_port={scp.port}",
            "--metrics_port=0",
            *SLOW_SOURCE,
        ]
        log = work / f"{name}.log"
        env = {"PUBSUB_EMULATOR_HOST": server.host}
        with LoggedProcess(command, log, ready="dicom-export pulling", env=env) as consumer:
            assert consumer.proc is not None
            idle = reset_peak(consumer.proc.pid)
            started = time.perf_counter()
            message = server.publish(topic, path.encode())
            proc = consumer.proc

            def acked() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"dicom-export exited:\n{consumer.log_text()[-4000:]}")
                return message in server.acked(sub)

            wait_until(acked, TIMEOUT, "the Pub/Sub message acked", interval=POLL)
            seconds = time.perf_counter() - started
            peak = peak_mb(consumer.proc.pid)
        received_whole(scp, big.stat().st_size)
        scp.clear()
    return {"peak_rss_mb": peak, "seconds": seconds, **idle}


# --------------------------------------------------------------------------------------------


def measure_size(
    work: Path, size_mb: int, paths: list[str], orthanc_max_mb: int, server: PubSubServer | None
) -> dict[str, dict[str, float]]:
    """Every requested path for one instance of `size_mb` MB (1e6 bytes)."""
    folder = work / f"large-{size_mb}"
    folder.mkdir()
    big = folder / "large.dcm"
    try:
        uid = write_large_instance(big, size_mb * 1_000_000)
        ds = dcmread(big, stop_before_pixels=True)
        out: dict[str, dict[str, float]] = {}
        if "cstore" in paths:
            out["cstore"] = measure_cstore(big, uid)
            report(size_mb, "cstore", out["cstore"])
        if "cstore_spool" in paths:
            out["cstore_spool"] = measure_cstore(big, uid, spool=work / f"spool-{size_mb}")
            report(size_mb, "cstore_spool", out["cstore_spool"])
            shutil.rmtree(work / f"spool-{size_mb}", ignore_errors=True)
        via_orthanc = [p for p in paths if p in ("cmove", "export")]
        if via_orthanc and size_mb > orthanc_max_mb:
            print(f"{size_mb} MB: {via_orthanc} skipped (above --orthanc-max-mb)", flush=True)
        elif via_orthanc:
            with Orthanc(workdir=work / f"orthanc-{size_mb}") as orthanc:
                sent = dcmsend(
                    "127.0.0.1", orthanc.dicom_port, orthanc.aet, [folder], timeout=TIMEOUT
                )
                if sent.returncode != 0 or orthanc.count_instances() != 1:
                    raise RuntimeError(f"Orthanc did not take the instance: {sent.stderr[-2000:]}")
                if "cmove" in paths:
                    out["cmove"] = measure_cmove(orthanc, big, str(ds.StudyInstanceUID), work)
                    report(size_mb, "cmove", out["cmove"])
                if "export" in paths:
                    assert server is not None
                    path = (
                        f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                        f"/instances/{uid}"
                    )
                    out["export"] = measure_export(orthanc, server, big, path, work)
                    report(size_mb, "export", out["export"])
            shutil.rmtree(work / f"orthanc-{size_mb}", ignore_errors=True)
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(size_mb: int, path: str, row: dict[str, float]) -> None:
    print(
        f"{size_mb} MB {path:<12}: peak RSS {row['peak_rss_mb']:.0f} MB "
        f"(idle {row['idle_mb']:.0f} MB, start-up peak {row['startup_peak_mb']:.0f} MB), "
        f"{row['seconds']:.1f} s, "
        f"{size_mb / row['seconds']:.0f} MB/s",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="64,256,1024", help="instance sizes in MB (1e6 bytes)")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--orthanc-max-mb", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=None, help="where the files go (temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    paths = args.paths.split(",")
    if not set(paths) <= set(PATHS):
        parser.error(f"--paths takes {', '.join(PATHS)}")

    results: dict[str, Any] = {"sizes_mb": sizes, "paths": paths, "upstream_cstore": "stow-sink"}
    rows: dict[str, dict[str, dict[str, float]]] = {path: {} for path in paths}
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=args.workdir) as tmp:
        server = PubSubServer().start() if "export" in paths else None
        try:
            for size in sizes:
                for path, row in measure_size(
                    Path(tmp), size, paths, args.orthanc_max_mb, server
                ).items():
                    rows[path][str(size)] = {k: round(v, 2) for k, v in row.items()}
        finally:
            if server is not None:
                server.stop()
    results["results"] = rows
    missed = []
    for path, (size, limit) in TARGET_MB.items():
        measured = rows.get(path, {}).get(str(size))
        if measured is not None and measured["peak_rss_mb"] > limit:
            missed.append(f"{path} at {size} MB: {measured['peak_rss_mb']:.0f} > {limit:.0f} MB")
    results["targets"] = {
        p: {"size_mb": s, "peak_rss_mb_max": m} for p, (s, m) in TARGET_MB.items()
    }
    results["missed"] = missed
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print("TARGETS MISSED: " + "; ".join(missed) if missed else "targets met (where measured)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
