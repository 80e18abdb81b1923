"""Benchmark: dicom-export throughput, association reuse vs one association per message.

One Orthanc (fresh storage, loaded once with dcmsend with N+1 generated CT instances,
512x512, 16-bit; the extra one is a warm-up message), the in-process Pub/Sub test server
(`tests.pubsub_server.PubSubServer`) and, per measurement, a fresh topic + subscription and a
fresh DCMTK storescp sink (`+xa --fork`: a child process per association, so the per-message
mode is not serialized on one association at a time; the same sink serves both modes).
Alternating the order per repetition, two consumers deliver the same N messages:

  (a) reuse       -- `dicom-export` as it is (C-STORE sink keeping one association open);
  (a4) pool4      -- `dicom-export --peer_max_associations=4` (up to 4 associations at once);
  (d) dcmsend     -- DCMTK dcmsend of the same files from disk to a fresh storescp (one
      association): what the sink takes when nothing has to be fetched;
  (b) per-message -- BASELINE emulating the Java adapter, because `dicom-export` has no flag
      for one association per message: this script run as a subprocess
      (`--baseline-consumer`), with the real google-cloud-pubsub SubscriberClient (flow
      control max_messages=16, callbacks on a 16-thread pool, like dicom-export), a shared
      httpx.Client for the WADO-RS fetch (the adapter's request headers: original transfer
      syntax, `Accept-Encoding: identity`; first part written to a temp file) and,
      per message, pynetdicom `AE.associate` / `send_c_store(path)` / `release`. It uses the
      adapter's own pynetdicom tuning (`configure_pynetdicom`, and `tune_connection` on
      EVT_CONN_OPEN: TCP_NODELAY on the socket plus the waking DUL poll) and the same maximum
      PDU, so the association policy is the only difference between (a) and (b).

Each measurement: start the consumer, deliver one warm-up message (not timed), then publish
the N instance paths and time from the first publish until all N are acked (polling
`server.acked(sub)`); storescp must then hold all N+1 files. Reports median seconds,
messages/s and the ratio (a)/(b) in messages/s. Targets: ratio >= 3.0 and (a) >= 100 msg/s;
(a4) >= 0.8 x (d) and (a4) >= 5 x (b) (issue 12).

storescp writes to a tmpfs (`--sink_dir`, default /dev/shm), as in bench_retrieve.py.

(p) pubsub_floor -- a consumer that only receives and acks (this script, `--noop-consumer`:
    google-cloud-pubsub with dicom-export's flow control and callback pool): with Orthanc's
    WADO-RS and the sink's CPU per message it bounds what ANY consumer on this client library
    can reach on this machine (printed as "bound").

Usage: python bench/bench_export.py [--messages 200] [--reps 3] [--json PATH] [--sink_dir DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pubsub_server import PubSubServer
from tests.rig import (
    LoggedProcess,
    Orthanc,
    StoreSCP,
    dcmsend,
    generate_ct_series,
    instance_paths,
    proc_status,
    tree_cpu_seconds,
)

from dicom_adapter.dicomweb.client import WADO_ACCEPT, wado_headers
from dicom_adapter.dimse.scu import DEFAULT_MAX_PDU
from dicom_adapter.dimse.server import configure_pynetdicom, release_connection, tune_connection

PROJECT = "bench-project"
SCP_AET = "BENCHSCP"
CLIENT_AET = "EXPORTADAPTER"
MAX_MESSAGES = 16  # dicom-export's default flow control, used by the baseline too
TARGET_RATIO = 3.0
TARGET_RATE = 100.0
TARGET_POOL_VS_DCMSEND = 0.8  # --peer_max_associations=4 against dcmsend from disk
TARGET_POOL_VS_PER_MESSAGE = 5.0
DELIVERY_TIMEOUT = 600.0
READY_TIMEOUT = 60.0
ACK_POLL = 0.01
BASELINE = (
    "per-message baseline: in-bench emulation of the Java adapter (google-cloud-pubsub "
    "SubscriberClient, max_messages=16, httpx WADO-RS, pynetdicom associate/send_c_store/release "
    "per message, TCP_NODELAY, adapter pynetdicom tuning); dicom-export has no such flag"
)


# --------------------------------------------------------------------------------------------
# Processes


def exporter_command(
    dicomweb_url: str, sub: str, scp_port: int, associations: int = 1
) -> list[str]:
    return [
        str(Path(sys.executable).with_name("dicom-export")),
        f"--dicomweb_addr={dicomweb_url}",
        f"--project_id={PROJECT}",
        f"--subscription_id={sub.rsplit('/', 1)[1]}",
        "--log_format=json",
        f"--max_messages={MAX_MESSAGES}",
        f"--peer_dimse_aet={SCP_AET}",
        "--peer_dimse_ip=127.0.0.1",
        f"--peer_dimse_port={scp_port}",
        f"--client_aet={CLIENT_AET}",
        f"--peer_max_associations={associations}",
        "--metrics_port=0",  # served as in production, on any free port (never the default)
    ]


def baseline_command(dicomweb_url: str, sub: str, scp_port: int, spool: Path) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--baseline-consumer",
        f"--dicomweb-url={dicomweb_url}",
        f"--subscription={sub}",
        f"--scp-port={scp_port}",
        f"--spool={spool}",
    ]


def noop_command(sub: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--noop-consumer",
        f"--subscription={sub}",
    ]


# --------------------------------------------------------------------------------------------
# The baseline consumer (runs in its own process)


def first_part(content_type: str, body: bytes) -> bytes:
    """The payload of the first part of a multipart/related body."""
    boundary = ""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise ValueError(f"no multipart boundary in {content_type!r}")
    delimiter = b"--" + boundary.encode()
    start = body.index(delimiter) + len(delimiter)
    start = body.index(b"\r\n\r\n", start) + 4
    end = body.index(b"\r\n" + delimiter, start)
    return body[start:end]


class BaselineExporter:
    """Java adapter behaviour: fetch with WADO-RS, then one association per C-STORE."""

    def __init__(self, dicomweb_url: str, scp_port: int, spool: Path) -> None:
        self.root = dicomweb_url.rstrip("/")
        self.scp_port = scp_port
        self.spool = spool
        limits = httpx.Limits(max_connections=2 * MAX_MESSAGES)
        self.http = httpx.Client(timeout=60.0, limits=limits)
        self.lock = threading.Lock()
        self.associations = 0
        self.failures = 0

    def export(self, data: bytes) -> None:
        url = f"{self.root}/{data.decode().strip().lstrip('/')}"
        # The same request the adapter makes (no gzip: Orthanc would deflate every instance).
        response = self.http.get(url, headers=wado_headers(WADO_ACCEPT))
        response.raise_for_status()
        payload = first_part(response.headers["content-type"], response.content)
        fd, name = tempfile.mkstemp(suffix=".dcm", dir=self.spool)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(payload)
            meta = read_file_meta_info(path)
            sop_class = str(meta.MediaStorageSOPClassUID)
            syntax = str(meta.TransferSyntaxUID)
            ae = AE(ae_title=CLIENT_AET)
            handlers: list[Any] = [
                (evt.EVT_CONN_OPEN, tune_connection),
                (evt.EVT_CONN_CLOSE, release_connection),
            ]
            assoc = ae.associate(
                "127.0.0.1",
                self.scp_port,
                contexts=[build_context(sop_class, [syntax])],
                ae_title=SCP_AET,
                max_pdu=DEFAULT_MAX_PDU,
                evt_handlers=handlers,
            )
            if not assoc.is_established:
                raise RuntimeError("association not established")
            with self.lock:
                self.associations += 1
            try:
                status = assoc.send_c_store(path)
            finally:
                assoc.release()
            code = getattr(status, "Status", None)
            if code is None or int(code) not in (0x0000, 0xB000, 0xB007, 0xB006):
                raise RuntimeError(f"C-STORE status {code}")
        finally:
            path.unlink(missing_ok=True)

    def callback(self, message: Any) -> None:
        try:
            self.export(bytes(message.data))
        except Exception as exc:
            with self.lock:
                self.failures += 1
            print(f"baseline export failed, nacking: {exc!r}", flush=True)
            message.nack()
            return
        message.ack()


def run_noop_consumer(args: argparse.Namespace) -> int:
    """The floor of any consumer built on google-cloud-pubsub: dicom-export's flow control and
    16-thread callback pool, each message acked at once (no fetch, no send)."""
    return run_subscriber(args.subscription, lambda message: message.ack(), "noop")


def run_baseline_consumer(args: argparse.Namespace) -> int:
    configure_pynetdicom()
    exporter = BaselineExporter(args.dicomweb_url, args.scp_port, Path(args.spool))
    try:
        return run_subscriber(args.subscription, exporter.callback, "baseline")
    finally:
        exporter.http.close()
        print(
            f"baseline stopped: associations={exporter.associations} failures={exporter.failures}",
            flush=True,
        )


def run_subscriber(subscription: str, callback: Any, name: str) -> int:
    """Pull `subscription` with `callback` until SIGTERM/SIGINT (exit 1 if the stream ends)."""
    from google.cloud import pubsub_v1  # type: ignore[import-untyped]
    from google.cloud.pubsub_v1.subscriber.scheduler import (  # type: ignore[import-untyped]
        ThreadScheduler,
    )

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    subscriber = pubsub_v1.SubscriberClient()
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=MAX_MESSAGES, thread_name_prefix=f"{name}-callback"
    )
    future = subscriber.subscribe(
        subscription,
        callback,
        flow_control=pubsub_v1.types.FlowControl(max_messages=MAX_MESSAGES),
        scheduler=ThreadScheduler(executor=executor),
        await_callbacks_on_shutdown=True,
    )
    print(f"{name} pulling {subscription}", flush=True)
    try:
        while not stop.wait(0.5):
            if future.done():
                print(f"streaming pull ended: {future.exception()!r}", flush=True)
                return 1
    finally:
        future.cancel()
        with suppress(BaseException):
            future.result(timeout=20)
        subscriber.close()
    return 0


# --------------------------------------------------------------------------------------------
# Measurements


class Bench:
    """The shared Orthanc, Pub/Sub server and instance paths; `run` measures one consumer."""

    def __init__(
        self, orthanc: Orthanc, server: PubSubServer, work: Path, sink: Path, paths: list[str]
    ):
        self.orthanc = orthanc
        self.server = server
        self.work = work
        self.sink = sink  # storescp's folders
        self.warmup, self.paths = paths[0], paths[1:]
        self.runs = 0
        # CPU seconds per message of each process taking part, per measurement of each mode
        self.cpu: dict[str, list[dict[str, float]]] = {}

    def _cpu(self, consumer: int | None, scp: int) -> dict[str, float]:
        """CPU used so far: consumer, Orthanc (WADO-RS), the sink (storescp and its children),
        this process (the Pub/Sub server; also dcmsend's, reaped, in children)."""
        mine = os.times()
        assert self.orthanc.proc is not None
        return {
            "consumer": proc_status(consumer).cpu_seconds if consumer else 0.0,
            "orthanc": proc_status(self.orthanc.proc.pid).cpu_seconds,
            "sink": tree_cpu_seconds(scp),
            "pubsub_server_and_dcmsend": mine.user
            + mine.system
            + (mine.children_user + mine.children_system if consumer is None else 0.0),
        }

    def _note_cpu(self, mode: str, before: dict[str, float], after: dict[str, float]) -> None:
        count = len(self.paths)
        self.cpu.setdefault(mode, []).append(
            {key: (after[key] - before[key]) / count for key in before}
        )

    def run(self, mode: str) -> tuple[float, int]:
        """Seconds to deliver all messages with `mode`, and associations opened (if known)."""
        self.runs += 1
        name = f"{mode}-{self.runs}"
        topic = f"projects/{PROJECT}/topics/{name}"
        sub = f"projects/{PROJECT}/subscriptions/{name}"
        self.server.create_topic(topic)
        self.server.create_subscription(sub, topic, ack_deadline=60)
        run_dir = self.work / name
        spool = run_dir / "spool"
        spool.mkdir(parents=True)
        url = self.orthanc.dicomweb_url
        with StoreSCP(self.sink / name, aet=SCP_AET, fork=True) as scp:
            if mode in ("reuse", "pool4"):
                command = exporter_command(url, sub, scp.port, 4 if mode == "pool4" else 1)
                ready = "dicom-export pulling"
            elif mode == "pubsub_floor":
                command, ready = noop_command(sub), "noop pulling"
            else:
                command = baseline_command(url, sub, scp.port, spool)
                ready = "baseline pulling"
            consumer = LoggedProcess(
                command,
                run_dir / "consumer.log",
                ready=ready,
                env={"PUBSUB_EMULATOR_HOST": self.server.host},
                startup_timeout=READY_TIMEOUT,
            )
            with consumer:
                warm = self.server.publish(topic, self.warmup.encode())
                self.wait_acked(sub, {warm}, consumer)
                assert consumer.proc is not None and scp.proc is not None
                before = self._cpu(consumer.proc.pid, scp.proc.pid)
                started = time.perf_counter()
                sent = {self.server.publish(topic, p.encode()) for p in self.paths}
                self.wait_acked(sub, sent | {warm}, consumer)
                elapsed = time.perf_counter() - started
                self._note_cpu(mode, before, self._cpu(consumer.proc.pid, scp.proc.pid))
                code = consumer.stop()
            if code != 0:
                raise RuntimeError(f"{mode} consumer exit code {code}:\n{consumer.log_text()}")
            received = scp.count()
        expected = len(self.paths) + 1 if mode != "pubsub_floor" else 0
        if received != expected:
            raise RuntimeError(f"{mode}: storescp holds {received} files, expected {expected}")
        redelivered = sum(self.server.deliveries(m) - 1 for m in sent)
        if redelivered:
            print(f"  ({mode}: {redelivered} redeliveries)", flush=True)
        return elapsed, self.associations(mode, consumer.log_text())

    def wait_acked(self, sub: str, wanted: set[str], consumer: LoggedProcess) -> None:
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while not wanted <= self.server.acked(sub):
            if consumer.proc is None or consumer.proc.poll() is not None:
                raise RuntimeError(f"consumer exited:\n{consumer.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not all messages acked within {DELIVERY_TIMEOUT} s")
            time.sleep(ACK_POLL)

    def run_dcmsend(self, files: list[Path]) -> float:
        """Seconds for dcmsend to send the same files from disk to a fresh storescp."""
        self.runs += 1
        with StoreSCP(self.sink / f"dcmsend-{self.runs}", aet=SCP_AET, fork=True) as scp:
            assert scp.proc is not None
            before = self._cpu(None, scp.proc.pid)
            started = time.perf_counter()
            result = dcmsend("127.0.0.1", scp.port, SCP_AET, files, timeout=1800)
            elapsed = time.perf_counter() - started
            self._note_cpu("dcmsend", before, self._cpu(None, scp.proc.pid))
            if result.returncode != 0 or scp.count() != len(files):
                raise RuntimeError(f"dcmsend baseline failed: {result.stderr[-2000:]}")
        return elapsed

    @staticmethod
    def associations(mode: str, log: str) -> int:
        if mode in ("reuse", "pool4"):
            return log.count("association opened")
        for line in log.splitlines():
            if line.startswith("baseline stopped: associations="):
                return int(line.split("=")[1].split()[0])
        return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--baseline-consumer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--noop-consumer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dicomweb-url", help=argparse.SUPPRESS)
    parser.add_argument("--subscription", help=argparse.SUPPRESS)
    parser.add_argument("--scp-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spool", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--sink_dir",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where storescp writes what it receives (default: a tmpfs, so the disk's"
        " write-back does not time the sink; the same for every mode)",
    )
    args = parser.parse_args()
    if args.baseline_consumer:
        return run_baseline_consumer(args)
    if args.noop_consumer:
        return run_noop_consumer(args)

    # SIGTERM unwinds like Ctrl-C, so every server and consumer below is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    print(BASELINE, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        series = work / "ct"
        files = generate_ct_series(series, args.messages + 1, rows=512, cols=512)
        mb = sum(p.stat().st_size for p in series.iterdir()) / 1e6
        print(f"{args.messages} CT instances (+1 warm-up), {mb:.0f} MB", flush=True)
        orthanc = stack.enter_context(Orthanc(workdir=work / "orthanc"))
        loaded = dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, [series], timeout=1800)
        if loaded.returncode != 0:
            raise RuntimeError(f"dcmsend failed: {loaded.stderr[-2000:]}")
        if orthanc.count_instances() != args.messages + 1:
            raise RuntimeError("Orthanc does not hold every generated instance")
        server = stack.enter_context(PubSubServer())
        sink = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.sink_dir)))
        bench = Bench(orthanc, server, work, sink, instance_paths(files))

        modes = ("reuse", "pool4", "per_message", "dcmsend", "pubsub_floor")
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        assocs: dict[str, list[int]] = {mode: [] for mode in modes}
        for rep in range(args.reps):
            order = modes if rep % 2 == 0 else tuple(reversed(modes))
            for mode in order:
                if mode == "dcmsend":
                    elapsed, opened = bench.run_dcmsend(files[1:]), 1
                else:
                    elapsed, opened = bench.run(mode)
                seconds[mode].append(elapsed)
                assocs[mode].append(opened)
                print(
                    f"rep {rep}: {mode:<11} {elapsed:.2f} s, "
                    f"{args.messages / elapsed:.1f} msg/s, {opened} associations",
                    flush=True,
                )

    reuse_s = statistics.median(seconds["reuse"])
    per_message_s = statistics.median(seconds["per_message"])
    pool_s = statistics.median(seconds["pool4"])
    dcmsend_s = statistics.median(seconds["dcmsend"])
    reuse_rate = args.messages / reuse_s
    per_message_rate = args.messages / per_message_s
    pool_rate = args.messages / pool_s
    dcmsend_rate = args.messages / dcmsend_s
    ratio = reuse_rate / per_message_rate
    pool_vs_dcmsend = pool_rate / dcmsend_rate
    pool_vs_per_message = pool_rate / per_message_rate
    results: dict[str, object] = {
        "messages": args.messages,
        "reps": args.reps,
        "baseline": BASELINE,
        "sink": "storescp +xa --fork",
        "max_messages": MAX_MESSAGES,
        "reuse_seconds": [round(s, 3) for s in seconds["reuse"]],
        "per_message_seconds": [round(s, 3) for s in seconds["per_message"]],
        "reuse_associations": assocs["reuse"],
        "per_message_associations": assocs["per_message"],
        "reuse_seconds_median": round(reuse_s, 3),
        "per_message_seconds_median": round(per_message_s, 3),
        "reuse_msg_per_s": round(reuse_rate, 1),
        "per_message_msg_per_s": round(per_message_rate, 1),
        "throughput_ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "target_reuse_msg_per_s": TARGET_RATE,
        "pool4_seconds": [round(s, 3) for s in seconds["pool4"]],
        "pool4_associations": assocs["pool4"],
        "pool4_msg_per_s": round(pool_rate, 1),
        "dcmsend_from_disk_seconds": [round(s, 3) for s in seconds["dcmsend"]],
        "dcmsend_from_disk_inst_per_s": round(dcmsend_rate, 1),
        "pool4_vs_dcmsend_ratio": round(pool_vs_dcmsend, 3),
        "pool4_vs_per_message_ratio": round(pool_vs_per_message, 3),
        "target_pool4_vs_dcmsend": TARGET_POOL_VS_DCMSEND,
        "target_pool4_vs_per_message": TARGET_POOL_VS_PER_MESSAGE,
    }
    # What bounds a mode on this machine: every process's CPU per message, and the rate
    # at which the cores would be saturated if the work spread over all of them perfectly.
    cores = os.cpu_count() or 1
    cpu_ms: dict[str, dict[str, float]] = {}
    for mode, runs in bench.cpu.items():
        cpu_ms[mode] = {
            key: round(1000 * statistics.median(r[key] for r in runs), 2) for key in runs[0]
        }
        cpu_ms[mode]["total"] = round(sum(cpu_ms[mode].values()), 2)
    results["cores"] = cores
    results["cpu_ms_per_message_median"] = cpu_ms
    results["cpu_bound_msg_per_s"] = {
        mode: round(cores * 1000 / ms["total"], 1) for mode, ms in cpu_ms.items() if ms["total"]
    }
    # The best any consumer built on google-cloud-pubsub could do here: the no-op consumer's
    # CPU (receive + ack, and the Pub/Sub server's share) plus what Orthanc's WADO-RS and the
    # sink spend per message in pool4, over all cores. A consumer that fetches and sends
    # costs more than nothing, so pool4 cannot beat this.
    floor, pool = cpu_ms["pubsub_floor"], cpu_ms["pool4"]
    floor_ms = floor["consumer"] + floor["pubsub_server_and_dcmsend"]
    best_ms = floor_ms + pool["orthanc"] + pool["sink"]
    best_rate = cores * 1000 / best_ms
    results["pubsub_floor_msg_per_s"] = round(
        args.messages / statistics.median(seconds["pubsub_floor"]), 1
    )
    results["free_consumer_bound_msg_per_s"] = round(best_rate, 1)
    results["target_pool4_msg_per_s"] = round(TARGET_POOL_VS_DCMSEND * dcmsend_rate, 1)
    verdict = "unreachable" if best_rate < TARGET_POOL_VS_DCMSEND * dcmsend_rate else "not excluded"
    print(json.dumps(results, indent=2))
    print(
        f"bound: a consumer that only receives and acks costs {floor_ms:.2f} ms per message"
        f" (with the Pub/Sub server), Orthanc's WADO-RS {pool['orthanc']:.2f} ms, the sink"
        f" {pool['sink']:.2f} ms: {cores} cores saturate at {best_rate:.0f} msg/s even if"
        f" fetching and sending cost nothing; {TARGET_POOL_VS_DCMSEND} x dcmsend ="
        f" {TARGET_POOL_VS_DCMSEND * dcmsend_rate:.0f} msg/s"
        f" ({verdict} on this machine)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    checks = [
        (f"reuse/per-message >= {TARGET_RATIO}", ratio, ratio >= TARGET_RATIO),
        (f"reuse >= {TARGET_RATE:.0f} msg/s", reuse_rate, reuse_rate >= TARGET_RATE),
        (
            f"pool4/dcmsend >= {TARGET_POOL_VS_DCMSEND}",
            pool_vs_dcmsend,
            pool_vs_dcmsend >= TARGET_POOL_VS_DCMSEND,
        ),
        (
            f"pool4/per-message >= {TARGET_POOL_VS_PER_MESSAGE}",
            pool_vs_per_message,
            pool_vs_per_message >= TARGET_POOL_VS_PER_MESSAGE,
        ),
    ]
    for name, value, met in checks:
        print(f"{'met   ' if met else 'MISSED'} {name} (got {value:.2f})")
    ok = all(met for _, _, met in checks)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
