"""Benchmark: the durable spool (--persistent_file_storage_location) against Orthanc.

Three measurements, each repeated `--reps` times with fresh Orthanc storage, same-run ratios:
  matrix: the spool uploader alone (in this process, as dicom-import runs it) uploading N
          queued CT instances: instances/s for every --spool_upload_batch x concurrency.
  p1:     dcmsend of N CT instances to dicom-import with --auto_ack_cstore, time until ALL are
          stored in Orthanc (its /statistics polled), against dcmsend straight to Orthanc.
          Target: direct time / adapter time >= 1.0.
  ceiling: P1's upper bound: dicom-import acknowledging with --auto_ack_cstore while it
          uploads nothing, with and without fsync (eatmydata, if installed), against dcmsend
          straight to Orthanc: instances/s and ratios.
  p2:     one association, dcmsend of N CT instances, dicom-import -> a proxy adding
          --delay-ms to every request -> Orthanc: synchronous (no spool) against
          --auto_ack_cstore, instances/s as the sender sees them. Target with the spool >= 150.
          The proxy is tests/rig/delay_proxy.py (heads parsed, bodies spliced: a network's
          latency without a Python relay's CPU); `auto_ack_fault_proxy` repeats auto-ack
          through FaultProxy (each request read whole and re-sent through httpx), the old setup.
          With --delays 0,20,50,100 (a sweep; replaces the single --delay-ms run), each delay
          also measures `per_request`, the Java adapter's behaviour emulated: synchronous, one
          STOW-RS per instance, and a NEW HTTP connection per request. Our client has no switch
          for that, so the proxy answers every request with `Connection: close` (our transport
          then opens a new connection for the next one) and charges one more delay per new
          connection for the TCP handshake's round trip (no TLS handshake is emulated).
  CPU:    p1, p2 and ceiling also give the CPU per instance of each process (/proc: dcmsend,
          dicom-import, Orthanc, the proxy's threads, the rest of this process), the CPU bound
          (instances/s if every instance costs that much CPU on all cores) and the share of the
          cores busy; p1_ratio_cpu_bound is the best P1 ratio that CPU allows.

Usage: python bench/bench_spool.py [--only matrix,p1,p2,ceiling] [--instances 200] [--reps 3]
                                   [--batches 1,5,10,20] [--concurrency 1,4] [--delay-ms 100]
                                   [--batch N (p1/p2: --spool_upload_batch, default: the flag's)]
                                   [--delays 0,20,50,100 (p2 sweep)] [--proxy lean|fault]
                                   [--p2-modes sync,auto_ack,auto_ack_fault_proxy]
                                   [--spool-flag=--FLAG=VALUE ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom import dcmread
from tests.rig import (
    FaultProxy,
    Importer,
    Orthanc,
    dcmsend,
    free_port,
    generate_ct_series,
    proc_status,
    tree_cpu_seconds,
)
from tests.rig.delay_proxy import DelayProxy, thread_cpu_seconds
from tests.rig.fault_proxy import _Request

from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy, make_http_client
from dicom_adapter.importer.store import StoreService
from dicom_adapter.malloc import tune_malloc
from dicom_adapter.observability.metrics import ImportMetrics, MetricsRegistry
from dicom_adapter.spool.local import LocalSpool
from dicom_adapter.spool.uploader import SpoolUploader

POLL = 0.01
DEFAULT_BATCH = ImporterSettings.model_fields["spool_upload_batch"].default
DEFAULT_BATCH_BYTES = ImporterSettings.model_fields["spool_upload_batch_bytes"].default


def wait_stored(orthanc: Orthanc, expected: int, timeout: float = 300.0) -> None:
    """Poll Orthanc's instance count until `expected` (raises after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while (stored := orthanc.count_instances()) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {stored} of {expected} instances stored in Orthanc")
        time.sleep(POLL)


def send(port: int, aet: str, folder: Path) -> float:
    """Seconds for one dcmsend of `folder` over one association; fails loudly."""
    started = time.perf_counter()
    result = dcmsend("127.0.0.1", port, aet, [folder], timeout=1800)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"dcmsend failed ({result.returncode}): {result.stderr[-2000:]}")
    return elapsed


# ---------------------------------------------------------------------------------------- CPU

CORES = os.cpu_count() or 1


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far, from /proc/stat: whoever used them."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


def main_thread_cpu(pid: int) -> float:
    """CPU seconds of a process's main thread: in dicom-import, the event loop (uploads, HTTP),
    which shares one GIL with the association threads that receive."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def proxy_cpu(proxy: FaultProxy | DelayProxy | None) -> float:
    """CPU seconds of the proxy's threads in this process so far."""
    if isinstance(proxy, DelayProxy):
        return proxy.cpu_seconds()
    if proxy is not None and proxy._thread is not None and proxy._thread.native_id is not None:
        return thread_cpu_seconds(proxy._thread.native_id)
    return 0.0


class CpuMeter:
    """CPU seconds per process over one measured window (call `read` at both ends).

    dcmsend: this process's reaped children (it is the only one reaped inside the window);
    bench: this process minus the proxy threads (polling Orthanc, waiting on dcmsend);
    dicom_import_loop: the part of dicom-import's CPU spent on its event loop thread;
    machine_busy: the share of all cores busy (anyone's work, other jobs included).
    """

    def __init__(
        self,
        orthanc: Orthanc | None = None,
        importer: Importer | None = None,
        proxy: FaultProxy | DelayProxy | None = None,
    ) -> None:
        self.orthanc, self.importer, self.proxy = orthanc, importer, proxy

    def read(self) -> dict[str, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy, total = machine_jiffies()
        proxy = proxy_cpu(self.proxy)
        reading = {
            "dcmsend": children.ru_utime + children.ru_stime,
            "bench": time.process_time() - proxy,
            "wall": time.perf_counter(),
            "busy_jiffies": float(busy),
            "all_jiffies": float(total),
        }
        if self.proxy is not None:
            reading["proxy"] = proxy
        if self.orthanc is not None and self.orthanc.proc is not None:
            reading["orthanc"] = proc_status(self.orthanc.proc.pid).cpu_seconds
        if self.importer is not None and self.importer.proc is not None:
            reading["dicom_import"] = tree_cpu_seconds(self.importer.proc.pid)
            reading["dicom_import_loop"] = main_thread_cpu(self.importer.proc.pid)
        return reading


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per process between two readings, their total, and the machine's load."""
    used = {key: after[key] - before[key] for key in before if key not in _NOT_CPU}
    used["total"] = sum(value for key, value in used.items() if key not in _PARTS)
    wall = after["wall"] - before["wall"]
    used["wall"] = wall
    used["process_busy"] = used["total"] / (CORES * wall)
    all_jiffies = after["all_jiffies"] - before["all_jiffies"]
    used["machine_busy"] = (after["busy_jiffies"] - before["busy_jiffies"]) / max(all_jiffies, 1)
    return used


_NOT_CPU = ("wall", "busy_jiffies", "all_jiffies")
_PARTS = ("dicom_import_loop",)  # inside another process's figure: not added to the total


def cpu_summary(runs: list[dict[str, float]], count: int) -> dict[str, float]:
    """Medians over repetitions: CPU ms per instance per process, and the CPU bound: the most
    instances/s this machine's cores allow when every instance costs that much CPU (and the
    most dicom-import allows if its CPU ran on one core)."""
    keys = [key for key in runs[0] if key not in ("wall", "process_busy", "machine_busy")]
    summary = {
        f"{key}_ms_per_inst": round(statistics.median(r[key] for r in runs) * 1e3 / count, 2)
        for key in keys
    }
    total = statistics.median(r["total"] for r in runs)
    summary["cpu_bound_inst_per_s"] = round(count * CORES / total, 1) if total else 0.0
    if "dicom_import" in keys:
        # dicom-import's Python work (receive thread and upload loop) shares one GIL: most of
        # its CPU cannot spread over more than one core
        own = statistics.median(r["dicom_import"] for r in runs)
        summary["dicom_import_one_core_inst_per_s"] = round(count / own, 1) if own else 0.0
    summary["process_busy"] = round(statistics.median(r["process_busy"] for r in runs), 2)
    summary["machine_busy"] = round(statistics.median(r["machine_busy"] for r in runs), 2)
    return summary


def print_cpu(label: str, used: dict[str, float], count: int) -> None:
    parts = ", ".join(
        f"{key} {value * 1e3 / count:.2f}"
        for key, value in used.items()
        if key not in ("wall", "process_busy", "machine_busy")
    )
    print(
        f"    {label} CPU ms/inst: {parts}; cores busy: ours {used['process_busy']:.0%},"
        f" machine {used['machine_busy']:.0%}",
        flush=True,
    )


# ------------------------------------------------------------------------------------ matrix


def fill_spool(root: Path, series: list[Path]) -> None:
    """Queue copies of the series in a new spool, as received instances are committed."""
    spool = LocalSpool(root, headroom_bytes=0)
    try:
        for path in series:
            copy = spool.incoming / path.name
            shutil.copyfile(path, copy)
            spool.commit(copy, str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    finally:
        spool.close()


async def upload_all(root: Path, dicomweb_url: str, batch: int, concurrency: int) -> float:
    """Seconds the uploader takes to empty the spool's queue into the upstream."""
    spool = LocalSpool(root, headroom_bytes=0)
    http = make_http_client(timeout=60.0)
    store = StoreService(
        DicomwebClient(http, RetryPolicy()),
        stow_url=dicomweb_url + "/studies",
        dicomweb_root=dicomweb_url,
        overwrite=False,
    )
    uploader = SpoolUploader(
        spool,
        store,
        ImportMetrics(MetricsRegistry()),
        concurrency=concurrency,
        retries=0,
        min_delay=0.1,
        max_delay=1.0,
        batch=batch,
        batch_bytes=DEFAULT_BATCH_BYTES,
    )
    try:
        started = time.perf_counter()
        await uploader.start()
        while spool.depth():
            await asyncio.sleep(POLL)
        elapsed = time.perf_counter() - started
    finally:
        await uploader.stop()
        await http.aclose()
        spool.close()
    if list(spool.failed.iterdir()):
        raise RuntimeError("instances failed to upload: see " + str(spool.failed))
    return elapsed


def run_matrix(
    work: Path, series: list[Path], reps: int, batches: list[int], concurrencies: list[int]
) -> dict[str, object]:
    """Wall time, and CPU per instance of Orthanc and of the uploader (less load-sensitive)."""
    combos = [(b, c) for c in concurrencies for b in batches]
    seconds: dict[tuple[int, int], list[float]] = {combo: [] for combo in combos}
    orthanc_cpu: dict[tuple[int, int], list[float]] = {combo: [] for combo in combos}
    own_cpu: dict[tuple[int, int], list[float]] = {combo: [] for combo in combos}
    n = len(series)
    for rep in range(reps):
        shift = rep % len(combos)
        for batch, concurrency in combos[shift:] + combos[:shift]:
            combo = (batch, concurrency)
            root = work / f"spool-{rep}-{batch}-{concurrency}"
            fill_spool(root, series)
            with Orthanc() as orthanc:
                assert orthanc.proc is not None
                before = proc_status(orthanc.proc.pid).cpu_seconds
                mine = time.process_time()
                elapsed = asyncio.run(upload_all(root, orthanc.dicomweb_url, batch, concurrency))
                own_cpu[combo].append((time.process_time() - mine) * 1e3 / n)
                orthanc_cpu[combo].append(
                    (proc_status(orthanc.proc.pid).cpu_seconds - before) * 1e3 / n
                )
                if orthanc.count_instances() != n:
                    raise RuntimeError("Orthanc does not hold every uploaded instance")
            shutil.rmtree(root)
            seconds[combo].append(elapsed)
            print(
                f"rep {rep}: batch {batch:2d} x concurrency {concurrency}: {elapsed:.2f} s"
                f" ({n / elapsed:.0f} inst/s), CPU per instance: Orthanc"
                f" {orthanc_cpu[combo][-1]:.1f} ms, uploader {own_cpu[combo][-1]:.1f} ms",
                flush=True,
            )
    table = {
        f"batch{b}_conc{c}": {
            "inst_per_s_median": round(n / statistics.median(seconds[(b, c)]), 1),
            "inst_per_s_all": [round(n / s, 1) for s in seconds[(b, c)]],
            "orthanc_cpu_ms_per_inst": round(statistics.median(orthanc_cpu[(b, c)]), 2),
            "uploader_cpu_ms_per_inst": round(statistics.median(own_cpu[(b, c)]), 2),
        }
        for b, c in combos
    }
    return {"matrix": table}


# ---------------------------------------------------------------------------------------- p1


EXTRA_SPOOL_FLAGS: list[str] = []  # --spool-flag: more dicom-import flags for p1/p2's spool runs


def spool_flags(spool: Path, batch: int | None) -> list[str]:
    flags = [
        f"--persistent_file_storage_location={spool}",
        "--auto_ack_cstore",
        "--persistent_file_upload_retry_amount=5",
        *EXTRA_SPOOL_FLAGS,
    ]
    return flags + ([f"--spool_upload_batch={batch}"] if batch else [])


def run_p1(work: Path, folder: Path, count: int, reps: int, batch: int | None) -> dict[str, object]:
    direct: list[float] = []
    adapter: list[float] = []
    cpu: dict[str, list[dict[str, float]]] = {"direct": [], "adapter": []}
    for rep in range(reps):
        for which in ["direct", "adapter"] if rep % 2 == 0 else ["adapter", "direct"]:
            with Orthanc() as orthanc:
                if which == "direct":
                    meter = CpuMeter(orthanc)
                    before = meter.read()
                    direct.append(send(orthanc.dicom_port, orthanc.aet, folder))
                    wait_stored(orthanc, count, timeout=0)
                    cpu[which].append(cpu_used(before, meter.read()))
                    print(f"rep {rep}: P1 direct  {direct[-1]:.2f} s", flush=True)
                    print_cpu(which, cpu[which][-1], count)
                    continue
                spool = work / f"p1-spool-{rep}"
                with Importer(orthanc.dicomweb_url, *spool_flags(spool, batch)) as importer:
                    meter = CpuMeter(orthanc, importer)
                    before = meter.read()
                    started = time.perf_counter()
                    sent = send(importer.port, importer.aet, folder)
                    wait_stored(orthanc, count)
                    adapter.append(time.perf_counter() - started)
                    cpu[which].append(cpu_used(before, meter.read()))
                shutil.rmtree(spool)
                print(
                    f"rep {rep}: P1 adapter {adapter[-1]:.2f} s until all stored"
                    f" (dcmsend done after {sent:.2f} s)",
                    flush=True,
                )
                print_cpu(which, cpu[which][-1], count)
    ratios = [d / a for d, a in zip(direct, adapter, strict=True)]
    summary = {kind: cpu_summary(runs, count) for kind, runs in cpu.items()}
    # The adapter path cannot finish before its CPU, spread over every core, is spent.
    fastest_adapter = statistics.median(r["total"] for r in cpu["adapter"]) / CORES
    return {
        "p1_direct_seconds_median": round(statistics.median(direct), 3),
        "p1_adapter_seconds_median": round(statistics.median(adapter), 3),
        "p1_ratio_per_rep": [round(r, 3) for r in ratios],
        "p1_ratio_median": round(statistics.median(ratios), 3),
        "p1_cpu": summary,
        "p1_ratio_cpu_bound": round(statistics.median(direct) / fastest_adapter, 3),
    }


# ---------------------------------------------------------------------------------------- p2


P2_SINGLE_MODES = ("sync", "auto_ack", "auto_ack_fault_proxy")


def run_p2(
    work: Path,
    folder: Path,
    count: int,
    reps: int,
    delay: float,
    batch: int | None,
    modes: tuple[str, ...] = P2_SINGLE_MODES,
) -> dict[str, object]:
    """Synchronous and --auto_ack_cstore through the lean delaying proxy, and --auto_ack_cstore
    through FaultProxy (reads each request whole, re-sends it through httpx: the old P2 setup)
    for a same-run comparison of what the proxy's own CPU costs."""
    acked: dict[str, list[float]] = {mode: [] for mode in modes}
    stored: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    requests: dict[str, list[int]] = {mode: [] for mode in modes}
    for rep in range(reps):
        shift = rep % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            lean = mode != "auto_ack_fault_proxy"
            with Orthanc() as orthanc, make_proxy(orthanc.http_port, mode, delay, lean) as proxy:
                upstream = proxy.url + "/dicom-web"
                spool = work / f"p2-spool-{rep}-{mode}"
                flags = [] if mode == "sync" else spool_flags(spool, batch)
                with Importer(upstream, *flags) as importer:
                    meter = CpuMeter(orthanc, importer, proxy)
                    before = meter.read()
                    started = time.perf_counter()
                    acked[mode].append(send(importer.port, importer.aet, folder))
                    wait_stored(orthanc, count, timeout=0 if mode == "sync" else 300)
                    stored[mode].append(time.perf_counter() - started)
                    cpu[mode].append(cpu_used(before, meter.read()))
                shutil.rmtree(spool, ignore_errors=True)
                if isinstance(proxy, DelayProxy):
                    requests[mode].append(proxy.requests)
            print(
                f"rep {rep}: P2 {mode} {count / acked[mode][-1]:.1f} inst/s acknowledged,"
                f" all stored after {stored[mode][-1]:.2f} s"
                + (f", {requests[mode][-1]} upstream requests" if requests[mode] else ""),
                flush=True,
            )
            print_cpu(mode, cpu[mode][-1], count)
    result: dict[str, object] = {"p2_delay_ms": round(delay * 1000)}
    for mode in modes:
        result[f"p2_{mode}_inst_per_s_median"] = round(count / statistics.median(acked[mode]), 1)
        result[f"p2_{mode}_inst_per_s_all"] = [round(count / a, 1) for a in acked[mode]]
        result[f"p2_{mode}_all_stored_seconds_median"] = round(statistics.median(stored[mode]), 3)
        if requests[mode]:
            result[f"p2_{mode}_upstream_requests_median"] = statistics.median(requests[mode])
    if "sync" in modes and "auto_ack" in modes:
        ratios = [s / a for s, a in zip(acked["sync"], acked["auto_ack"], strict=True)]
        result["p2_speedup_per_rep"] = [round(r, 1) for r in ratios]
    return result | {
        "p2_cpu": {mode: cpu_summary(runs, count) for mode, runs in cpu.items()},
    }


class ConnectionPerRequestProxy(FaultProxy):
    """The delaying proxy closing every connection after one answer (`Connection: close`).

    A new connection costs one more `delay` before its first request is read: the round trip
    of a TCP handshake with an upstream that far away.
    """

    connections = 0  # accepted so far (the loop thread writes, the bench reads after a run)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        await super()._serve(reader, writer)

    async def _forward(
        self, request: _Request
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
        status, reason, headers, body = await super()._forward(request)
        return status, reason, [*headers, (b"Connection", b"close")], body

    async def _answer(self, *args: Any) -> bool:
        await super()._answer(*args)
        return False


P2_MODES = ("sync", "auto_ack", "per_request")


def make_proxy(port: int, mode: str, delay: float, lean: bool) -> FaultProxy | DelayProxy:
    """The delaying proxy to Orthanc's HTTP `port` for a P2 `mode`: the lean DelayProxy, or
    (`lean` False) FaultProxy and its connection-per-request variant."""
    per_request = mode == "per_request"
    if lean:
        return DelayProxy("127.0.0.1", port, delay=delay, close_each=per_request)
    if per_request:
        return ConnectionPerRequestProxy("127.0.0.1", port, delay=delay)
    return FaultProxy("127.0.0.1", port, delay=delay)


def p2_once(
    work: Path,
    folder: Path,
    count: int,
    mode: str,
    delay: float,
    batch: int | None,
    lean: bool = True,
) -> float:
    """Seconds dcmsend takes (the sender's view) through dicom-import in `mode` at `delay`."""
    with Orthanc() as orthanc, make_proxy(orthanc.http_port, mode, delay, lean) as proxy:
        upstream = proxy.url + "/dicom-web"
        if mode != "auto_ack":
            with Importer(upstream) as importer:
                seconds = send(importer.port, importer.aet, folder)
            wait_stored(orthanc, count, timeout=0)
            connections = getattr(proxy, "connections", count)
            if mode == "per_request" and connections < count:
                raise RuntimeError(f"{connections} connections for {count} instances")
            return seconds
        spool = work / f"p2-sweep-spool-{time.monotonic_ns()}"
        with Importer(upstream, *spool_flags(spool, batch)) as importer:
            seconds = send(importer.port, importer.aet, folder)
            wait_stored(orthanc, count)
        shutil.rmtree(spool)
        return seconds


def run_p2_sweep(
    work: Path,
    folder: Path,
    count: int,
    reps: int,
    delays: list[float],
    batch: int | None,
    lean: bool = True,
) -> dict[str, object]:
    """Instances/s (sender's view) per upstream delay and mode, median of `reps`."""
    table: dict[str, dict[str, float]] = {}
    for delay in delays:
        seconds: dict[str, list[float]] = {mode: [] for mode in P2_MODES}
        for rep in range(reps):
            shift = rep % len(P2_MODES)
            for mode in P2_MODES[shift:] + P2_MODES[:shift]:
                seconds[mode].append(p2_once(work, folder, count, mode, delay, batch, lean))
                print(
                    f"rep {rep}: P2 {delay * 1000:.0f} ms {mode:<11} "
                    f"{count / seconds[mode][-1]:.1f} inst/s",
                    flush=True,
                )
        table[str(round(delay * 1000))] = {
            mode: round(count / statistics.median(seconds[mode]), 1) for mode in P2_MODES
        }
    return {"p2_sweep_inst_per_s": table, "p2_sweep_proxy": "lean" if lean else "fault"}


# ------------------------------------------------------------------------------- ceiling


class _NoSyncImporter(Importer):
    """dicom-import under eatmydata (LD_PRELOAD: fsync/fdatasync return at once): what the
    receive path costs without durability. For the benchmark only, never for a real spool."""

    @property
    def args(self) -> list[str]:
        return ["eatmydata", *super().args]


def run_ceiling(work: Path, folder: Path, count: int, reps: int) -> dict[str, object]:
    """P1's ceiling: how fast dicom-import acknowledges with --auto_ack_cstore when it uploads
    nothing (upstream: a closed port, retries far apart), against dcmsend straight to Orthanc.

    P1 cannot beat this ratio: the sender's last instance is acknowledged no earlier than
    here, and uploading only adds work on the same cores.
    """
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    flags = [
        "--auto_ack_cstore",
        "--persistent_file_upload_retry_amount=100",
        "--min_upload_delay=600000",
        "--max_waiting_time_between_uploads=600",
    ]
    kinds = ["direct", "receive"] + (["receive_no_fsync"] if shutil.which("eatmydata") else [])
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    cpu: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for rep in range(reps):
        for kind in kinds if rep % 2 == 0 else list(reversed(kinds)):
            if kind == "direct":
                with Orthanc() as orthanc:
                    meter = CpuMeter(orthanc)
                    before = meter.read()
                    rates[kind].append(count / send(orthanc.dicom_port, orthanc.aet, folder))
                    wait_stored(orthanc, count, timeout=0)
                    cpu[kind].append(cpu_used(before, meter.read()))
            else:
                spool = work / f"ceiling-{kind}-{rep}"
                cls = _NoSyncImporter if kind == "receive_no_fsync" else Importer
                with cls(dead, f"--persistent_file_storage_location={spool}", *flags) as importer:
                    meter = CpuMeter(importer=importer)
                    before = meter.read()
                    rates[kind].append(count / send(importer.port, importer.aet, folder))
                    cpu[kind].append(cpu_used(before, meter.read()))
                shutil.rmtree(spool)
            print(f"rep {rep}: {kind} {rates[kind][-1]:.1f} inst/s", flush=True)
            print_cpu(kind, cpu[kind][-1], count)
    result: dict[str, object] = {
        f"ceiling_{kind}_inst_per_s_median": round(statistics.median(values), 1)
        for kind, values in rates.items()
    }
    result["ceiling_cpu"] = {kind: cpu_summary(runs, count) for kind, runs in cpu.items()}
    direct = statistics.median(rates["direct"])
    for kind in kinds[1:]:
        result[f"ceiling_{kind}_vs_direct"] = round(statistics.median(rates[kind]) / direct, 3)
    return result


def number(value: object) -> float:
    if not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="matrix,p1,p2")
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batches", default="1,5,10,20")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--delay-ms", type=float, default=100.0)
    parser.add_argument("--batch", type=int, default=None, help="p1/p2 --spool_upload_batch")
    parser.add_argument("--delays", default=None, help="p2 sweep: upstream delays in ms, e.g. 0,20")
    parser.add_argument(
        "--spool-flag",
        action="append",
        default=[],
        help="p1/p2: one more dicom-import flag for the spool runs (repeatable), e.g. "
        "--spool-flag=--spool_upload_concurrency=1",
    )
    parser.add_argument(
        "--p2-modes",
        default=",".join(P2_SINGLE_MODES),
        help="p2 (no --delays): which of " + ",".join(P2_SINGLE_MODES),
    )
    parser.add_argument(
        "--proxy",
        choices=["lean", "fault"],
        default="lean",
        help="p2 sweep's delaying proxy: lean (DelayProxy, splices) or fault (FaultProxy)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    # The P2 proxy relays every upload inside this process, on the cores dicom-import needs:
    # the adapter's own malloc tuning keeps its page faults from stealing that CPU.
    tune_malloc()
    EXTRA_SPOOL_FLAGS.extend(args.spool_flag)
    parts = set(args.only.split(","))
    if not parts <= {"matrix", "p1", "p2", "ceiling"}:
        parser.error("--only takes matrix, p1, p2, ceiling")

    results: dict[str, object] = {
        "instances": args.instances,
        "reps": args.reps,
        "spool_upload_batch": args.batch or DEFAULT_BATCH,
        "spool_flags": args.spool_flag,
    }
    with tempfile.TemporaryDirectory(prefix="bench-spool-") as tmp:
        work = Path(tmp)
        folder = work / "ct"
        series = generate_ct_series(folder, args.instances, rows=512, cols=512)
        mb = sum(p.stat().st_size for p in series) / 1e6
        print(f"{args.instances} CT instances, {mb:.0f} MB", flush=True)
        if "matrix" in parts:
            batches = [int(b) for b in args.batches.split(",")]
            concurrencies = [int(c) for c in args.concurrency.split(",")]
            results.update(run_matrix(work, series, args.reps, batches, concurrencies))
        if "p1" in parts:
            results.update(run_p1(work, folder, args.instances, args.reps, args.batch))
        if "ceiling" in parts:
            results.update(run_ceiling(work, folder, args.instances, args.reps))
        if "p2" in parts and args.delays:
            delays = [float(d) / 1000 for d in args.delays.split(",")]
            results.update(
                run_p2_sweep(
                    work,
                    folder,
                    args.instances,
                    args.reps,
                    delays,
                    args.batch,
                    args.proxy == "lean",
                )
            )
        elif "p2" in parts:
            delay = args.delay_ms / 1000
            modes = tuple(args.p2_modes.split(","))
            if not set(modes) <= set(P2_SINGLE_MODES):
                parser.error("--p2-modes takes " + ",".join(P2_SINGLE_MODES))
            results.update(
                run_p2(work, folder, args.instances, args.reps, delay, args.batch, modes)
            )

    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    missed = []
    if "p1" in parts and number(results["p1_ratio_median"]) < 1.0:
        missed.append("P1 ratio >= 1.0")
    p2_acked = results.get("p2_auto_ack_inst_per_s_median")
    if "p2" in parts and p2_acked is not None and number(p2_acked) < 150:
        missed.append("P2 auto-ack >= 150 inst/s")
    print("TARGETS MISSED: " + ", ".join(missed) if missed else "targets met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
